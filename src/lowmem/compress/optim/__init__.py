"""Optimizers built from a plan (DESIGN §5): one engine for every "AdamW with `v` averaged over
some dims" method, the named presets on top of it, and AdaMeM beside it."""

from lowmem.compress.optim.adamem import AdafactorMomentum, AdaMeM, adafactor_state_numel, adamem_state_numel
from lowmem.compress.optim.engine import ReducedAdamW, reduce_v
from lowmem.compress.optim.presets import AdaLayer, AdamMini, Eve, SlimAdam, optimizer_from_plan

__all__ = ["AdaLayer", "AdaMeM", "AdafactorMomentum", "AdamMini", "Eve", "ReducedAdamW", "SlimAdam",
           "adafactor_state_numel", "adamem_state_numel", "optimizer_from_plan", "reduce_v"]
