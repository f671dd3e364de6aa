"""Thin adapters that attach lowmem to training frameworks (optional extras).

- `lowmem.integrations.hf.LowmemCallback`: a Hugging Face `transformers.TrainerCallback`
  (``pip install lowmem[hf]``).
- `lowmem.integrations.lightning.LowmemCallback`: a PyTorch Lightning `Callback`
  (``pip install lowmem[lightning]``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem.layers import is_sharded


def unwrap_optimizer(optimizer):
    """The torch optimizer that does the work: accelerate's ``AcceleratedOptimizer`` (itself a
    torch `Optimizer` subclass) and Lightning's ``LightningOptimizer`` keep it in ``.optimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def captures_here(model: nn.Module, is_main: bool) -> bool:
    """Whether this process attaches capture: the main process alone under DDP, whose `v` is
    replicated; every process when parameters are sharded (FSDP2), since a measurement is then
    collective (`lowmem.capture` writes the CSV on global rank 0 only)."""
    return is_main or any(is_sharded(p) for p in model.parameters())
