"""The named optimizers, each the engine (`ReducedAdamW`) with the plan its paper describes.

- `SlimAdam`: the plan measured by lowmem (or the published fixed rules) — Kalra, Kirchenbauer,
  Barkeshli, Goldstein, "When Can You Get Away with Low Memory Adam?" (2025).
- `Eve`: one `v` per row of every matrix, vectors full — Tomar et al., "Eve: Less Memory, Same
  Might" (2024). The paper's Algorithm 1 has no bias correction; like every lowmem optimizer, Eve
  here uses AdamW's, so it equals the paper's update once β^t has decayed.
- `AdamMini`: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More" (2024), as the
  published ``adam-mini`` 1.1.1 package partitions (``variant="package"``) or as the paper's
  Algorithms 1–4 do (``variant="paper"``).
- `AdaLayer`: one scalar `v` per tensor, Adam for the LM head and norms — Zhao et al.,
  "Deconstructing What Makes a Good Optimizer for Language Models" (2024).

Which layer is which comes from `lowmem.layers` through the preset plans in
`lowmem.compress.builders`; nothing here looks at names.
"""

from __future__ import annotations

import os

from torch import nn

from lowmem.compress.builders import build_preset
from lowmem.compress.optim.engine import ReducedAdamW
from lowmem.compress.plan import Plan


class SlimAdam(ReducedAdamW):
    """AdamW with `v` averaged as a lowmem plan says (default: the published fixed rules).

    Args:
        model: the model the plan was made for.
        plan: a `Plan` or a path to ``plan.json``; None builds the ``slimadam-rules`` preset.
        **kwargs: as `ReducedAdamW` (lr, betas, eps, weight_decay, param_groups, foreach, …).
    """

    kind = "slimadam"

    def __init__(self, model: nn.Module, plan: Plan | str | os.PathLike | None = None, **kwargs):
        super().__init__(model, plan if plan is not None else build_preset("slimadam-rules", model), **kwargs)


class Eve(ReducedAdamW):
    """AdamW keeping one `v` per output row of every matrix (M×N → M×1); vectors keep full `v`."""

    kind = "eve"

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, build_preset("eve", model), **kwargs)


class AdamMini(ReducedAdamW):
    """Adam-mini: one `v` per Hessian block.

    Args:
        variant: ``"package"`` — as ``adam-mini`` 1.1.1: Q/K one per head; V, attention output,
            MLP, routers, embedding and LM head one per output row; biases full; norms and others
            one scalar. ``"paper"`` — as the paper's Algorithms 1–4: Q/K one per head, embedding
            and output full Adam, every other tensor one scalar. In both, a stack of experts keeps
            its expert axis (per row, or one scalar, of each expert) and a tensor with axes lowmem
            cannot name keeps full Adam (the package would pool it into one scalar).
        **kwargs: as `ReducedAdamW`. Weight decay applies to every parameter of a group, as in
            `torch.optim.AdamW`; the adam-mini 1.1.1 package instead exempts the parameters whose
            lower-cased names contain ``norm``, ``ln`` or ``bias``. To match it, pass
            ``param_groups=package_decay_groups(model)`` (the same rule as two groups).
    """

    kind = "adam-mini"

    def __init__(self, model: nn.Module, variant: str = "package", **kwargs):
        presets = {"package": "adam-mini", "paper": "adam-mini-paper"}
        if variant not in presets:
            raise ValueError(f"Invalid Adam-mini variant: {variant!r} (expected 'package' or 'paper')")
        self.variant = variant
        super().__init__(model, build_preset(presets[variant], model), **kwargs)


def package_decay_groups(model: nn.Module) -> list[dict]:
    """adam-mini 1.1.1's weight-decay rule as param groups: no decay for the parameters whose
    lower-cased names contain ``norm``, ``ln`` or ``bias``, as the package tests them."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if any(s in name.lower() for s in ("norm", "ln", "bias")) else decay).append(p)
    return [g for g in ({"params": decay}, {"params": exempt, "weight_decay": 0.0}) if g["params"]]


class AdaLayer(ReducedAdamW):
    """AdamW with one scalar `v` per tensor, except the LM head and norms (full Adam)."""

    kind = "adalayer"

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, build_preset("adalayer", model), **kwargs)


def optimizer_from_plan(model: nn.Module, plan: Plan | str | os.PathLike, **kwargs) -> SlimAdam:
    """The optimizer a plan (or ``plan.json``) describes, for `model`.

    Args:
        model: the model the plan was made for (checked by fingerprint, names and shapes).
        plan: a `Plan` or a path to one.
        **kwargs: lr, betas, eps, weight_decay, param_groups, … as `ReducedAdamW`.

    Raises:
        PlanError: the file is unreadable or inconsistent; PlanMismatchError: another model's plan.
    """
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    return SlimAdam(model, plan, **kwargs)
