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

from lightning.pytorch.callbacks import Callback

from lowmem.integrations import CaptureCallback


class LowmemCallback(CaptureCallback, Callback):
    """Attach `lowmem.capture` to a Lightning module's optimizer for the whole fit; its arguments
    are `lowmem.integrations.CaptureCallback`'s (every, out, shadow, precision_out,
    precision_every, stream)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start(trainer.optimizers[0] if trainer.optimizers else None, pl_module, trainer.global_rank == 0)

    def on_train_end(self, trainer, pl_module) -> None:
        self.stop()
