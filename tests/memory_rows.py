"""Every row of `lowmem.compress.memory.estimate_state_memory` and the optimizer that keeps that
state (the plan row: the plan's optimizer). Plain Python, no pytest: tests/vision_models.py runs it
in a second Python too."""

from __future__ import annotations

import torch

import lowmem
from lowmem.compress.optim.adamem import AdafactorMomentum, AdaMeM

OPTIMIZERS = {
    "adamw": lambda model, plan: torch.optim.AdamW(model.parameters()),
    "slimadam": lambda model, plan: lowmem.SlimAdam(model),
    "eve": lambda model, plan: lowmem.Eve(model),
    "adam-mini": lambda model, plan: lowmem.AdamMini(model),
    "adam-mini-paper": lambda model, plan: lowmem.AdamMini(model, variant="paper"),
    "adalayer": lambda model, plan: lowmem.AdaLayer(model),
    "adamem": lambda model, plan: AdaMeM(model),
    "adafactor-momentum": lambda model, plan: AdafactorMomentum(model),
    "plan": lambda model, plan: lowmem.optimizer_from_plan(model, plan),
}
