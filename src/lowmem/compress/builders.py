"""Plan builders: from a measured SNR trajectory, and the published fixed rules (DESIGN §4).

The SNR builder follows Kalra, Kirchenbauer, Barkeshli, Goldstein, "When Can You Get Away with
Low Memory Adam?" (2025): time-mean SNR over a window of measured steps, a subset passes when its
SNR is strictly above the threshold, the highest-SNR passing subset wins, norms are never
compressed. Options: prefer the most compression among passing subsets; average the SNR over
depth for layers of one role and shape so they share one decision.

With precision measurements (`lowmem.snr.precision`), each layer's `state` entry says how its
`m` and kept `v` are stored: the smallest format whose update-direction error stays below
``precision_threshold`` at every measurement of the same window (`lowmem.compress.precision`).

Head-split views (``heads``, ``q.heads``, …) are measured over every axis subset, but only
subsets that keep the ``head`` axis are plan candidates: those that average over it either
repeat a raw-view subset (``head+out`` is fan_out) or pool entries of different heads that sit
at the same in-head position, which no structure of the model aligns; with few heads their SNR
is also inflated by the small sample (4 heads: the population variance of 4 values).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

from torch import nn

from lowmem.compress.plan import LayerPlan, PartPlan, Plan, PlanError, kept_entries, model_record
from lowmem.compress.precision import PRECISION_THRESHOLD, choose_state
from lowmem.layers import ModelLayers, ParamInfo, is_generic_axis, resolve_layers
from lowmem.snr.keys import SnrKey, ViewLabel, format_subset
from lowmem.snr.precision import PrecisionTrajectory
from lowmem.snr.trajectory import SnrTrajectory
from lowmem.snr.views import View, describe_subset, param_views, part_of, split_heads

PRESETS = ("slimadam-rules", "eve", "adam-mini", "adam-mini-paper", "adalayer")

# Roles whose `v` is never averaged (DESIGN §4). An unknown layer (`other`) keeps full Adam where
# its axes are unknown too (DESIGN §2); where they are known (a Linear of an unknown name), the
# SNR measured along them decides, as for any layer.
_NEVER = {"norm": "norms keep full Adam"}


# One parameter's time-mean SNR by (view, dims of the view).
Measured = dict[tuple[ViewLabel, tuple[int, ...]], float]


def _full(info: ParamInfo, why: str, snr=None) -> LayerPlan:
    return LayerPlan(list(info.shape), info.role, list(info.shape), None, why, snr, None, list(info.aliases))


def build_plan(
    model: nn.Module | dict,
    trajectory: SnrTrajectory,
    threshold: float = 1.0,
    window: tuple[int | None, int | None] | None = None,
    prefer: str = "snr",
    depth_average: bool = False,
    allow_token: bool = False,
    layers: ModelLayers | None = None,
    source: dict | None = None,
    precision: PrecisionTrajectory | None = None,
    precision_threshold: float = PRECISION_THRESHOLD,
    rule: str = "lowmem",
) -> Plan:
    """Build a plan from the time-mean SNR of each parameter's views and axis subsets.

    Args:
        model: the model the trajectory was measured on (names, shapes, fingerprint), or its plan
            record (``{"class", "parameters", "fingerprint"}``, e.g. from a run folder's
            ``layers.json``) together with `layers`, to rebuild a plan without the model.
        trajectory: the measured samples (`lowmem.snr.SnrTrajectory`).
        threshold: a subset passes when its time-mean SNR is strictly above this.
        window: ``(start, end)`` steps, inclusive, either may be None; default all steps.
        prefer: ``"snr"`` (highest-SNR passing subset) or ``"compression"`` (fewest `v` entries
            kept among passing subsets, ties to the higher SNR).
        depth_average: average SNR over layers with the same role and shape before deciding.
        allow_token: allow averaging over an embedding's ``token`` axis (off by default).
        layers: pre-resolved layers (default: resolved from `model`).
        source: extra provenance merged into the plan's ``source``.
        precision: the errors each state format caused (`lowmem.snr.precision`); None (a run
            folder from before they were measured, or shadow mode): no ``state`` entries, fp32.
        precision_threshold: a state format passes when its update-direction error is strictly
            below this at every measurement in `window` (`lowmem.compress.precision`); 0 keeps
            every state in fp32 and writes no ``state`` entries.
        rule: ``"lowmem"`` (default): the subsets of every view are candidates, head views'
            per-head subsets too (one `v` per head and row, say), never an embedding's token
            axis unless `allow_token`. ``"paper"``: SlimAdam as published (Kalra et al. 2025):
            every non-empty subset of the tensor's own axes (a fused projection's parts as
            separate tensors), the token axis included, no head view; each layer's highest
            SNR strictly above `threshold`; norms never. It takes `prefer` ``"snr"`` and no
            `depth_average`.

    Returns:
        A `Plan`; layers without samples keep full Adam and say so (with a warning naming them).

    Raises:
        PlanError (a ValueError): the trajectory is empty, `window` holds no measured step (the
            message lists the measured ones), or no parameter of the model has a sample in it
            (another model's trajectory; a few names of each side are given).
    """
    if prefer not in ("snr", "compression"):
        raise ValueError(f"prefer must be 'snr' or 'compression', got {prefer!r}")
    if rule not in ("lowmem", "paper"):
        raise ValueError(f"rule must be 'lowmem' or 'paper', got {rule!r}")
    if rule == "paper" and (prefer != "snr" or depth_average):
        raise ValueError("the paper's rule takes each layer's own highest SNR: no prefer='compression' and no "
                         "depth_average")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if not (isinstance(precision_threshold, (int, float)) and math.isfinite(precision_threshold)
            and precision_threshold >= 0):
        raise ValueError(f"precision_threshold must be a finite number >= 0, got {precision_threshold!r}")
    if isinstance(model, dict) and layers is None:
        raise ValueError("build_plan from a model record needs the resolved layers")
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    _check_samples(trajectory, window, layers)
    means = trajectory.time_mean(window)
    by_name: dict[str, Measured] = defaultdict(dict)
    for (name, label, dims), m in means.items():
        by_name[name][(label, dims)] = m.snr

    if depth_average:
        groups: dict[tuple, list[str]] = defaultdict(list)
        for info in layers:
            groups[(info.role, info.shape)].append(info.name)
        averaged = {}
        for names in groups.values():
            keys = set().union(*(by_name[n].keys() for n in names))
            avg = {}
            for k in keys:
                vals = [by_name[n][k] for n in names if k in by_name[n]]
                avg[k] = sum(vals) / len(vals)
            for n in names:
                averaged[n] = avg
        by_name = defaultdict(dict, averaged)

    plan_layers = {}
    for info in layers:
        snr = by_name.get(info.name) or {}
        plan_layers[info.name] = _decide(info, snr, threshold, prefer, allow_token or rule == "paper",
                                         heads=rule != "paper")
    say_roles(plan_layers, layers)
    steps = trajectory.steps
    win = [window[0] if window and window[0] is not None else (steps[0] if steps else None),
           window[1] if window and window[1] is not None else (steps[-1] if steps else None)]
    src = {"method": "snr", "rule": rule, "threshold": threshold, "window": win, "prefer": prefer,
           "depth_average": depth_average,
           "measurements": sum(1 for s in steps if win[0] <= s <= win[1]) if steps else 0}   # in the window
    if precision is not None:
        src["precision_threshold"] = precision_threshold
        if precision_threshold > 0:
            _choose_states(plan_layers, precision, window, precision_threshold)
    src.update(source or {})
    record = dict(model) if isinstance(model, dict) else model_record(model)
    return Plan(model=record, layers=plan_layers, source=src)


def _choose_states(plan_layers: dict[str, LayerPlan], precision: PrecisionTrajectory, window,
                   threshold: float) -> None:
    """Each layer's `state` (`lowmem.compress.precision.choose_state`), said in its `why`."""
    worst = precision.by_layer(window)
    for name, lp in plan_layers.items():
        lp.state, why = choose_state(lp, worst.get(name, {}), threshold)
        lp.why = f"{lp.why}; {why}" if lp.why else why


def say_roles(plan_layers: dict[str, LayerPlan], layers: ModelLayers) -> None:
    """End each layer's `why` with how its role was found (`ParamInfo.found`): by name, module
    type, structure, or given; a record without it (an older layers.json) says nothing."""
    for info in layers:
        lp = plan_layers.get(info.name)
        if lp is not None and info.found:
            lp.why = f"{lp.why}; role {info.role}: {info.found}" if lp.why else f"role {info.role}: {info.found}"


def _check_samples(trajectory: SnrTrajectory, window, layers: ModelLayers) -> None:
    """Refuse a trajectory that cannot make a plan for `layers`, rather than keep every layer's
    full Adam without saying why; warn about the parameters that have no sample."""
    steps = trajectory.steps
    if not steps:
        raise PlanError("the SNR trajectory holds no samples: nothing to build a plan from")
    start, end = window if window else (None, None)
    where = f" in the window [{_step(start)}, {_step(end)}]" if (start, end) != (None, None) else ""
    inside = {s for s in steps if (start is None or s >= start) and (end is None or s <= end)}
    if not inside:
        raise PlanError(f"window [{_step(start)}, {_step(end)}] holds no measured step; the "
                        f"{len(steps):,} measured steps are {_listing([_step(s) for s in steps], 8)}")
    sampled = sorted({s.name for s in trajectory.samples if s.step in inside})
    names = [info.name for info in layers]
    missing = [n for n in names if n not in set(sampled)]
    if names and len(missing) == len(names):
        raise PlanError(f"none of the model's {len(names):,} parameters has an SNR sample{where}; is the "
                        f"trajectory another model's? The model has {_listing(names, 3, tail=False)}; the "
                        f"trajectory has {_listing(sampled, 3, tail=False)}")
    if missing:
        warnings.warn(f"lowmem: {len(missing):,} of {len(names):,} parameters have no SNR sample{where} and "
                      f"keep full Adam: {_listing(missing, 4, tail=False)}", stacklevel=3)


def _step(s: int | None) -> str:
    return "…" if s is None else f"{s:,}"


def _listing(items: list[str], n: int, tail: bool = True) -> str:
    """At most `n` of `items`: the first and last halves (or the first `n`), and how many are left out."""
    if len(items) <= n:
        return ", ".join(items)
    head = n // 2 if tail else n
    shown = items[:head] + [f"… ({len(items) - n} more)"] + (items[len(items) - (n - head):] if tail else [])
    return ", ".join(shown)


def _decide(info: ParamInfo, snr: Measured, threshold, prefer, allow_token, heads: bool = True) -> LayerPlan:
    if info.role in _NEVER:
        return _full(info, _NEVER[info.role], _snr_record(info, snr) or None)
    if info.role == "other" and all(is_generic_axis(a) for a in info.axes):
        return _full(info, "unknown layer type and axes: full Adam", _snr_record(info, snr) or None)
    if not snr:
        return _full(info, "no SNR samples (no gradient seen): full Adam")
    # Without head views (the paper's rule), the tensor's own axes, or each part's
    views = [v for v in param_views(info) if heads or v.name.rpartition(".")[2] != "heads"]
    if info.parts:
        parts = []
        for part, size in info.parts:
            pviews = [v for v in views if v.part == part]
            choice = _best(pviews, snr, threshold, prefer, allow_token)
            base = pviews[0]
            parts.append(_part_plan(part, base, choice, snr, threshold))
        if all(p.reduce is None for p in parts):   # nothing averaged: one whole full-Adam layer (its v
            # whole, so a state format may store it), not parts that each keep theirs
            return _full(info, "; ".join(f"{p.name}: {p.why}" for p in parts), _snr_record(info, snr))
        lp = LayerPlan(list(info.shape), info.role, list(info.part_source or info.view_shape), None,
                       "; ".join(f"{p.name}: {p.why}" for p in parts), _snr_record(info, snr),
                       parts, list(info.aliases))
        return lp
    choice = _best(views, snr, threshold, prefer, allow_token)
    unknown = "unknown layer type, measured along its known axes: " if info.role == "other" else ""
    if choice is None:
        return _full(info, unknown + _why_not(views, snr, threshold, allow_token) + _unsplit(info),
                     _snr_record(info, snr))
    view, subset, value = choice
    return LayerPlan(list(info.shape), info.role, list(view.shape), list(subset),
                     unknown + _why_passed(view, subset, value, threshold) + _unsplit(info),
                     _snr_record(info, snr), None, list(info.aliases))


def _unsplit(info: ParamInfo) -> str:
    """For a fused Q/K/V projection kept whole, why (its layout), to append to a `why`."""
    if info.role != "attn_qkv" or info.parts:
        return ""
    layout = {"per_head": "each head's q, k, v rows together", "grouped": "q, k, v per key-value group"}.get(
        info.qkv_layout, "layout not known")
    if info.qkv_layout in ("per_head", "grouped"):
        layout += " and its heads or widths unknown, or the parameter row-sharded"
    return f" (fused q/k/v not split: {layout})"


def _why_passed(view: View, subset, value: float, threshold: float) -> str:
    return f"SNR along {describe_subset(view.axes, subset)}{_in_view(view)} {value:.2f} > {threshold:g}"


def _in_view(view: View) -> str:
    return "" if view.name in ("raw",) or view.part and "." not in view.name else f" ({view.name} view)"


def is_candidate(view: View, dims: tuple[int, ...], allow_token: bool = False) -> bool:
    """Whether averaging `view` over `dims` may enter a plan (see the module docstring); never
    over a mixture-of-experts stack's ``expert`` axis (each expert is its own matrix), nor over an
    axis lowmem could not name."""
    if not allow_token and any(view.axes[d] == "token" for d in dims):
        return False
    return not any(view.axes[d] in ("head", "expert") or is_generic_axis(view.axes[d]) for d in dims)


def _candidates(views, snr, allow_token):
    for view in views:
        for (label, dims), value in snr.items():
            if label != view.label() or not math.isfinite(value):
                continue
            if is_candidate(view, dims, allow_token):
                yield view, dims, value


def _best(views, snr, threshold, prefer, allow_token):
    passing = [(v, s, x) for v, s, x in _candidates(views, snr, allow_token) if x > threshold]
    if not passing:
        return None
    if prefer == "compression":
        # Fewest kept entries; ties to the higher SNR, then to the simpler (earlier) view.
        return min(passing, key=lambda c: (kept_entries(list(c[0].shape), list(c[1])), -c[2]))
    return max(passing, key=lambda c: (c[2], -views.index(c[0])))


def _why_not(views, snr, threshold, allow_token) -> str:
    cands = list(_candidates(views, snr, allow_token))
    if not cands:
        return "no admissible subset measured: full Adam"
    v, s, x = max(cands, key=lambda c: c[2])
    return f"best SNR {x:.2f} (along {describe_subset(v.axes, s)}) not > {threshold:g}: full Adam"


def _part_plan(part, base: View, choice, snr, threshold) -> PartPlan:
    rec = {SnrKey(label.name, dims): x for (label, dims), x in snr.items() if part_of(label.name) == part}
    if choice is None:
        return PartPlan(part, base.dim, base.start, base.stop, list(base.shape), None,
                        _why_not([base], snr, threshold, False), rec)
    view, subset, value = choice
    return PartPlan(part, base.dim, base.start, base.stop, list(view.shape), list(subset),
                    _why_passed(view, subset, value, threshold), rec)


def _snr_record(info: ParamInfo, snr: Measured) -> dict[SnrKey, float]:
    # In the order of the texts in the trajectory file, as plans have always listed them.
    ordered = sorted(snr.items(), key=lambda kv: (str(kv[0][0]), format_subset(kv[0][1])))
    return {SnrKey(label.name, dims): value for (label, dims), value in ordered}


# -- presets -------------------------------------------------------------------------------

# Kalra et al. 2025, the published fixed rules: which axis of `v` each role averages over.
_SLIMADAM_RULES = {
    "attn_q": ("in",), "attn_k": ("in",),
    "attn_v": ("out",), "attn_out": ("out",),
    "mlp_up": ("out",), "mlp_gate": ("out",), "mlp_down": ("out",),
    "embedding": ("model",),
    "lm_head": ("in",),
}
_PART_ROLE = {"q": "attn_q", "k": "attn_k", "v": "attn_v"}


def slimadam_rules(model: nn.Module, layers: ModelLayers | None = None) -> Plan:
    """The published fixed rules of SlimAdam (Kalra et al. 2025) as a plan.

    Q/K average over fan_in; V, attention output and MLP over fan_out; embeddings over the model
    dim (one value per token); the LM head over fan_in (one per vocabulary row); norms, biases,
    convolutions and unknown layers keep full Adam. A fused Q/K/V projection gets the rule of
    each part. Works on a model built on the meta device.
    """
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    plan_layers = {}
    for info in layers:
        if info.parts:
            parts = []
            for view in (v for v in param_views(info) if "." not in v.name):
                axes = _SLIMADAM_RULES[_PART_ROLE[view.part]]
                dims = [d for d, a in enumerate(view.axes) if a in axes]
                parts.append(PartPlan(view.part, view.dim, view.start, view.stop, list(view.shape), dims,
                                      f"published rule for {_PART_ROLE[view.part]}: average over {describe_subset(view.axes, tuple(dims))}"))
            plan_layers[info.name] = LayerPlan(list(info.shape), info.role, list(info.part_source or info.view_shape), None,
                                               "published rules per part", None, parts, list(info.aliases))
            continue
        axes = _SLIMADAM_RULES.get(info.role)
        dims = [d for d, a in enumerate(info.axes) if axes and a in axes]
        if not dims:
            plan_layers[info.name] = _full(info, f"published rules keep full Adam for {info.role}{_unsplit(info)}")
            continue
        plan_layers[info.name] = LayerPlan(list(info.shape), info.role, list(info.view_shape), dims,
                                           f"published rule for {info.role}: average over {describe_subset(info.axes, tuple(dims))}",
                                           None, None, list(info.aliases))
    say_roles(plan_layers, layers)
    return Plan(model=model_record(model), layers=plan_layers,
                source={"method": "preset", "preset": "slimadam-rules"})


# -- the other presets: one rule per role, as data (DESIGN §5) ---------------------------------
#
# Each rule names what is *kept* of `v`: "full" (Adam), "row" (one value per output row / token:
# average over fan_in, or over the model dim of an embedding), "head" (one per attention head),
# "scalar" (one value for the tensor). A fused Q/K/V projection gets the rule of each part.

# (``attn_qkv`` here is a fused projection kept whole, its q/k/v layout not one after the other:
# a row never mixes q, k and v, one value per head or per part would need the split.)
_MATRIX_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_up", "mlp_gate", "mlp_down", "router",
                 "lm_head", "conv", "other")

# Tomar et al. 2024, "Eve: Less Memory, Same Might": M×N -> M×1 for every matrix, vectors full.
_EVE = {**{r: "row" for r in _MATRIX_ROLES}, "embedding": "row", "norm": "full", "bias": "full"}
# The published adam-mini 1.1.1 package (Zhang et al. 2024): Q/K per head; V, attention output,
# MLP, embedding and output per row; biases (a norm's bias too) full Adam; norm weights and
# everything else one scalar.
_ADAM_MINI = {"attn_q": "head", "attn_k": "head", "attn_v": "row", "attn_out": "row", "mlp_up": "row",
              "mlp_gate": "row", "mlp_down": "row", "router": "row", "attn_qkv": "row", "embedding": "row",
              "lm_head": "row", "bias": "full",
              "norm": "scalar", "norm_bias": "full", "conv": "scalar", "other": "scalar"}
# Adam-mini's paper (Algorithms 1-4): Q/K per head, embedding and output full Adam, every other
# block (the default PyTorch partition: one block per tensor) one scalar.
_ADAM_MINI_PAPER = {**{r: "scalar" for r in _MATRIX_ROLES}, "attn_q": "head", "attn_k": "head", "attn_qkv": "row",
                    "embedding": "full", "lm_head": "full", "norm": "scalar", "bias": "scalar"}
# AdaLayer (Zhao et al. 2024, "Deconstructing What Makes a Good Optimizer for Language Models"):
# one scalar per tensor, except the LM head and norms, which keep Adam.
_ADALAYER = {**{r: "scalar" for r in _MATRIX_ROLES}, "embedding": "scalar", "bias": "scalar",
             "lm_head": "full", "norm": "full"}

_ROLE_RULES = {"eve": _EVE, "adam-mini": _ADAM_MINI, "adam-mini-paper": _ADAM_MINI_PAPER,
               "adalayer": _ADALAYER}
_RULE_WORDS = {"full": "full Adam", "row": "one value per row", "head": "one value per head",
               "scalar": "one value for the tensor"}


def _rule_view(shape, axes, heads, rule) -> tuple[list[int], list[int] | None, str]:
    """(view, reduce, words) that keep what `rule` names for a tensor with these axes. A stack of
    experts keeps its ``expert`` axis (a rule applies to each expert's matrix); a tensor with an
    axis the resolver could not name (``d0``, …) keeps full Adam: no rule averages over it."""
    shape, axes = tuple(shape), tuple(axes)
    if rule != "full" and any(is_generic_axis(a) for a in axes):
        return list(shape), None, f"{_RULE_WORDS['full']} (axes not known)"
    words = _RULE_WORDS[rule] + (" of each expert" if "expert" in axes and rule != "full" else "")
    if rule == "head":
        split = split_heads(shape, axes, heads)
        if split is None:   # heads unknown or not dividing the rows: per row is the closest block
            return _rule_view(shape, axes, None, "row")
        vshape, vaxes = split
        return list(vshape), [d for d, a in enumerate(vaxes) if a not in ("head", "expert")], words
    if rule == "row":
        dims = [d for d, a in enumerate(axes) if a in ("in", "kh", "kw", "kd", "model")]
        if not dims or len(dims) == len(shape):   # a vector, or no row to keep: full Adam
            return list(shape), None, _RULE_WORDS["full"]
        return list(shape), dims, words
    if rule == "scalar":
        dims = [d for d, a in enumerate(axes) if a != "expert"]
        return list(shape), dims, words
    return list(shape), None, _RULE_WORDS["full"]


def role_rule_plan(name: str, model: nn.Module, layers: ModelLayers | None = None) -> Plan:
    """A preset that keeps one kind of `v` block per role: ``eve``, ``adam-mini``,
    ``adam-mini-paper`` or ``adalayer`` (see the tables above). Works on a meta-device model.

    A weight shared by the embedding and the LM head follows the LM head's rule where the two
    differ (AdaLayer keeps Adam for it); a 1-D tensor never has rows, so "row" keeps it full.
    """
    rules = _ROLE_RULES[name]
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    plan_layers = {}
    for info in layers:
        role = "lm_head" if info.role == "embedding" and info.tied and rules["lm_head"] == "full" else info.role
        if role == "norm" and info.is_bias and "norm_bias" in rules:
            role = "norm_bias"   # a norm's `bias` tensor, where a preset treats it as a bias
        if info.parts:
            parts = []
            for view in (v for v in param_views(info) if "." not in v.name):
                prole = _PART_ROLE[view.part]
                h = info.part_heads[[p for p, _ in info.parts].index(view.part)] if info.part_heads else None
                vshape, reduce, words = _rule_view(view.shape, view.axes, h, rules[prole])
                parts.append(PartPlan(view.part, view.dim, view.start, view.stop, vshape, reduce,
                                      f"{name} for {prole}: {words}"))
            plan_layers[info.name] = LayerPlan(list(info.shape), info.role, list(info.part_source or info.view_shape), None,
                                               f"{name} rules per part", None, parts, list(info.aliases))
            continue
        vshape, reduce, words = _rule_view(info.view_shape, info.axes, info.heads, rules.get(role, "full"))
        plan_layers[info.name] = LayerPlan(list(info.shape), info.role, vshape, reduce,
                                           f"{name} for {role}: {words}{_unsplit(info)}", None, None,
                                           list(info.aliases))
    say_roles(plan_layers, layers)
    return Plan(model=model_record(model), layers=plan_layers, source={"method": "preset", "preset": name})


def build_preset(name: str, model: nn.Module, layers: ModelLayers | None = None) -> Plan:
    """A named preset plan (see `PRESETS`); works on a model built on the meta device."""
    if name == "slimadam-rules":
        return slimadam_rules(model, layers)
    if name in _ROLE_RULES:
        return role_rule_plan(name, model, layers)
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
