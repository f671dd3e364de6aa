"""Capture the SNR of Adam's `v` inside a Hugging Face `Trainer` run.

    from lowmem.integrations.hf import LowmemCallback
    trainer = Trainer(model, args, train_dataset=..., callbacks=[LowmemCallback(every=10, out="snr.csv")])
    trainer.train()
    plan = lowmem.build_plan(model, lowmem.SnrTrajectory.read("snr.csv"))

A thin adapter over `lowmem.capture`: at ``on_train_begin`` it unwraps the optimizer from
accelerate's ``AcceleratedOptimizer`` and the model from its DDP / ``torch.compile`` wrappers and
attaches an `SnrCapture`; at ``on_train_end`` it closes it (the CSV is then in place). Under DDP
only the main process captures (`v` is replicated, so one rank's `v` is the whole of it); under
FSDP2 every process does, since the measurement is collective, and the main process writes.
Needs ``pip install lowmem[hf]`` (transformers, accelerate).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from lowmem.integrations import captures_here, unwrap_optimizer
from lowmem.snr.capture import SnrCapture


class LowmemCallback(TrainerCallback):
    """Attach `lowmem.capture` to a `Trainer`'s optimizer for the whole run.

    Args:
        every: measure every `every` optimizer steps.
        out: the trajectory CSV (streamed to ``out.part``, moved into place when training ends).
        shadow: estimate `v` from gradients when the optimizer keeps no ``exp_avg_sq``.
    """

    def __init__(self, every: int = 10, out: str | os.PathLike = "lowmem-out/snr.csv", shadow: bool = False):
        self.every, self.out, self.shadow = every, out, shadow
        self.capture: SnrCapture | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None or model is None or not captures_here(model, state.is_world_process_zero):
            return
        self.capture = SnrCapture(unwrap_optimizer(optimizer), model, every=self.every, out=self.out,
                                  shadow=self.shadow).attach()

    def on_train_end(self, args, state, control, **kwargs):
        if self.capture is not None:
            self.capture.close()
            self.capture = None
