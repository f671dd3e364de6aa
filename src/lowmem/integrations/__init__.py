"""Thin adapters that attach lowmem to training frameworks (optional extras).

- `lowmem.integrations.hf.LowmemCallback`: a Hugging Face `transformers.TrainerCallback`
  (``pip install lowmem[hf]``).
- `lowmem.integrations.lightning.LowmemCallback`: a PyTorch Lightning `Callback`
  (``pip install lowmem[lightning]``).
"""

from __future__ import annotations

import torch


def unwrap_optimizer(optimizer):
    """The torch optimizer that does the work: accelerate's ``AcceleratedOptimizer`` (itself a
    torch `Optimizer` subclass) and Lightning's ``LightningOptimizer`` keep it in ``.optimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
