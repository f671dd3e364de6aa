"""Thin adapters that attach lowmem to training frameworks (optional extras).

- `lowmem.integrations.hf.LowmemCallback`: a Hugging Face `transformers.TrainerCallback`
  (``pip install lowmem[hf]``).
- `lowmem.integrations.lightning.LowmemCallback`: a PyTorch Lightning `Callback`
  (``pip install lowmem[lightning]``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lowmem.layers import is_sharded
from lowmem.snr.capture import SnrCapture


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


class CaptureCallback:
    """What both callbacks share: `lowmem.capture`'s settings, and the capture they attach when
    training starts (`start`, where this process `captures_here`) and close when it ends (`stop`).

    Args:
        every: measure every `every` optimizer steps.
        out: the trajectory CSV (streamed to ``out.part``, moved into place when training ends).
        shadow: estimate `v` from gradients when the optimizer keeps no ``exp_avg_sq``.
        precision_out: also measure the error each storage format of `m` and `v` would cause,
            into this CSV (``lowmem.build_plan(..., precision=PrecisionTrajectory.read(path))``
            then picks each layer's formats); default none.
        precision_every: measure that precision only at the first measurement and at those
            whose step is a multiple of this (a multiple of `every`); default at every measurement.
        stream: on CUDA, measure on a side stream beside training (see `lowmem.capture`).

    The arguments are checked as `lowmem.capture` checks them, when training starts.
    """

    def __init__(self, every: int = 10, out: str | os.PathLike = "lowmem-out/snr.csv", shadow: bool = False,
                 precision_out: str | os.PathLike | None = None, precision_every: int | None = None,
                 stream: bool = False):
        self.every, self.out, self.shadow = every, out, shadow
        self.precision_out, self.precision_every, self.stream = precision_out, precision_every, stream
        self.capture = None

    def start(self, optimizer, model: nn.Module, is_main: bool) -> None:
        if optimizer is None or model is None or not captures_here(model, is_main):
            return
        self.capture = SnrCapture(unwrap_optimizer(optimizer), model, every=self.every, out=self.out,
                                  shadow=self.shadow, precision_out=self.precision_out,
                                  precision_every=self.precision_every, stream=self.stream).attach()

    def stop(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
