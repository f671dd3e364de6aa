"""Capture the SNR of Adam's `v` inside a PyTorch Lightning run.

    from lowmem.integrations.lightning import LowmemCallback
    trainer = lightning.Trainer(callbacks=[LowmemCallback(every=10, out="snr.csv")], ...)
    trainer.fit(module, dataloader)

A thin adapter over `lowmem.capture`: at ``on_train_start`` it takes the module's first optimizer
(unwrapping ``LightningOptimizer``) and attaches an `SnrCapture` on global rank 0 (under DDP `v`
is replicated; under FSDP2 on every rank, since the measurement is collective, with rank 0
writing); at ``on_train_end`` it closes it. Needs ``pip install lowmem[lightning]``.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import Callback

from lowmem.integrations import captures_here, unwrap_optimizer
from lowmem.snr.capture import SnrCapture


class LowmemCallback(Callback):
    """Attach `lowmem.capture` to a Lightning module's optimizer for the whole fit.

    Args:
        every: measure every `every` optimizer steps.
        out: the trajectory CSV (streamed to ``out.part``, moved into place when training ends).
        shadow: estimate `v` from gradients when the optimizer keeps no ``exp_avg_sq``.
        precision_out: also measure the error each storage format of `m` and `v` would cause,
            into this CSV (``lowmem.build_plan(..., precision=PrecisionTrajectory.read(path))``
            then picks each layer's formats); default none.
        precision_every: measure that precision only at the measurements whose step is a
            multiple of this (a multiple of `every`); default at every measurement.
        stream: on CUDA, measure on a side stream beside training (see `lowmem.capture`).

    The arguments are checked as `lowmem.capture` checks them, when training starts.
    """

    def __init__(self, every: int = 10, out: str | os.PathLike = "lowmem-out/snr.csv", shadow: bool = False,
                 precision_out: str | os.PathLike | None = None, precision_every: int | None = None,
                 stream: bool = False):
        self.every, self.out, self.shadow = every, out, shadow
        self.precision_out, self.precision_every, self.stream = precision_out, precision_every, stream
        self.capture: SnrCapture | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers or not captures_here(pl_module, trainer.global_rank == 0):
            return
        self.capture = SnrCapture(unwrap_optimizer(trainer.optimizers[0]), pl_module, every=self.every,
                                  out=self.out, shadow=self.shadow, precision_out=self.precision_out,
                                  precision_every=self.precision_every, stream=self.stream).attach()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None
