"""Optimizers built from a plan (DESIGN §5): one engine for every "AdamW with `v` averaged over
some dims" method (`engine`: the books; `layout`: how `v` is kept and reduced, sharded or not;
`backends`: the update as functions and the one choice among them; `state` and `quant`: states
kept in bf16, int8 or int4; `rounding`: low-precision parameters; `checkpoint`), the named
presets on top of it, AdaMeM beside it, and `registry`, the one list of every optimizer."""

from lowmem.compress.optim.adamem import AdafactorMomentum, AdaMeM, adafactor_state_numel, adamem_state_numel
from lowmem.compress.optim.engine import ReducedAdamW, reduce_v
from lowmem.compress.optim.presets import AdaLayer, AdamMini, Eve, SlimAdam, optimizer_from_plan
from lowmem.compress.optim.registry import REGISTRY, OptimizerEntry

__all__ = ["REGISTRY", "AdaLayer", "AdaMeM", "AdafactorMomentum", "AdamMini", "Eve", "OptimizerEntry", "ReducedAdamW",
           "SlimAdam", "adafactor_state_numel", "adamem_state_numel", "optimizer_from_plan", "reduce_v"]
