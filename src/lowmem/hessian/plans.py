"""A plan from measured curvature: each parameter's Hessian partition becomes its `view`/`reduce`.

Adam-mini's principle, one learning rate per dense sub-block of the Hessian (Zhang et al.,
"Adam-mini: Use Fewer Learning Rates To Gain More", 2024), applied to partitions that were
measured (`lowmem.hessian.structure`) instead of guessed from layer names.

A `view`/`reduce` pair keeps one `v` value per combination of the view's kept dims, so it can
express a partition only when the partition's groups are exactly those sets of flat indices: one
group (whole), rows, columns, equal runs of rows (heads), and the like. A partition it cannot
express (unequal or scattered groups) becomes its coarsest *refinement* among the layouts: the
layout with the fewest `v` values whose every block lies inside one Hessian group. A coarsening
would put entries of two dense blocks under one learning rate, which is what the partition says
not to do; full Adam (one value per entry) always refines, so there is always an answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import chain, combinations

import torch
from torch import nn

from lowmem.compress.builders import _full, _rule_view
from lowmem.compress.plan import LayerPlan, Plan, kept_entries, model_record
from lowmem.hessian.structure import Partition
from lowmem.layers import ModelLayers, normalize_name, resolve_layers


@dataclass(frozen=True)
class Layout:
    """The `view`/`reduce` a partition becomes.

    Attributes:
        view: the reshape of the parameter.
        reduce: dims of `view` averaged over (None: full Adam).
        exact: True when the layout's blocks are exactly the partition's groups; False when it
            is the coarsest layout that refines the partition.
        words: what the layout keeps, for a person.
    """

    view: list[int]
    reduce: list[int] | None
    exact: bool
    words: str

    @property
    def kept(self) -> int:
        return kept_entries(self.view, self.reduce)


def layout_labels(view: list[int], reduce: list[int] | None) -> torch.Tensor:
    """The `v` entry each flat index of the parameter is averaged into, a (numel,) int64 tensor."""
    if reduce is None:
        return torch.arange(math.prod(view))
    kept_shape = [1 if d in reduce else s for d, s in enumerate(view)]
    return torch.arange(math.prod(kept_shape)).reshape(kept_shape).expand(*view).reshape(-1)


def layout_for(partition: Partition, shape: tuple[int, ...] | list[int], axes: tuple[str, ...] | None = None) -> Layout:
    """The layout of a parameter of `shape` that expresses `partition`, or its coarsest refinement.

    Candidates, each checked by the partition it induces on the flat indices: the presets' own
    layouts (one scalar, one value per row, one per equal run along the ``out`` axis, as
    `lowmem.compress.build_preset` writes them, so a per-head partition gets exactly Adam-mini's
    layout), then every subset of dims of the matrix view (rows, columns) and of that view with
    its rows or its columns split into equal runs. The fewest kept values wins among those whose
    every block lies inside one group; ties go to the earlier candidate.

    Args:
        partition: a partition of the parameter's flat (row-major) indices.
        shape: the parameter's shape.
        axes: the meaning of its dims (`lowmem.layers.ParamInfo.axes`); default rows ``out``,
            then ``in``. With an ``expert`` axis, a group that spans experts is split by expert
            first: one learning rate is never shared across experts.
    """
    shape = [int(s) for s in shape]
    n = math.prod(shape)
    if partition.size != n:
        raise ValueError(f"partition {partition.name!r} covers {partition.size} indices, shape {shape} has {n}")
    axes = tuple(axes) if axes is not None else ("out", *(["in"] * (len(shape) - 1)))
    groups = partition.labels()
    if "expert" in axes and len(axes) == len(shape):
        # a stack of experts: no learning rate is shared across experts (as no preset or SNR plan
        # shares one), so each group is first split by expert
        e = axes.index("expert")
        expert = torch.arange(shape[e]).view([-1 if d == e else 1 for d in range(len(shape))]).expand(*shape)
        groups = torch.unique(groups * shape[e] + expert.reshape(-1), return_inverse=True)[1]
    k = int(groups.max()) + 1 if groups.numel() else len(partition)
    candidates = sorted(enumerate(_candidates(shape, axes, k)), key=lambda c: (kept_entries(c[1][0], c[1][1]), c[0]))
    for _, (view, reduce, words) in candidates:
        kept = kept_entries(view, reduce)
        if kept >= k and _refines(layout_labels(view, reduce), kept, groups):
            return Layout(view, reduce, kept == k == len(partition), words)
    raise AssertionError("full Adam refines every partition")   # unreachable: reduce None is a candidate


def _candidates(shape: list[int], axes: tuple[str, ...], k: int):
    """(view, reduce, words) layouts, the presets' own first."""
    for rule, heads in (("scalar", None), ("row", None), ("head", k)):
        view, reduce, words = _rule_view(shape, axes, heads, rule)
        if rule == "head":
            if len(view) > len(shape):   # split: k equal runs along the out axis, as heads
                words = f"one value per run of {shape[axes.index('out')] // k:,} output units ({k:,} runs, as heads)"
        yield view, reduce, words
    matrix = [shape[0], math.prod(shape[1:])] if len(shape) > 1 else [shape[0]]
    views = [matrix]
    for d, size in enumerate(matrix):
        views += [matrix[:d] + [m, size // m] + matrix[d + 1:] for m in _divisors(size)]
    for view in views:
        dims = range(len(view))
        for reduce in chain.from_iterable(combinations(dims, r) for r in range(len(view) + 1)):
            kept = kept_entries(view, list(reduce))
            words = "full Adam" if not reduce else "one value for the tensor" if kept == 1 else \
                "one value per column" if view == matrix and reduce == (0,) and len(view) == 2 else \
                f"{kept:,} values: view {view} averaged over dims {list(reduce)}"
            yield list(view), list(reduce) or None, words


def _divisors(n: int) -> list[int]:
    """Divisors of n strictly between 1 and n, ascending."""
    small = [m for m in range(2, math.isqrt(n) + 1) if n % m == 0]
    return sorted(set(small + [n // m for m in small]))


def _refines(layout: torch.Tensor, kept: int, groups: torch.Tensor) -> bool:
    """Whether every layout block lies inside one group (its group label is constant on it)."""
    lo = torch.full((kept,), groups.numel(), dtype=torch.int64).scatter_reduce(0, layout, groups, "amin")
    hi = torch.full((kept,), -1, dtype=torch.int64).scatter_reduce(0, layout, groups, "amax")
    return torch.equal(lo, hi)


def plan_from_partitions(model: nn.Module, partitions: dict[str, Partition], base: Plan | None = None,
                         layers: ModelLayers | None = None, source: dict | None = None) -> Plan:
    """A plan whose blocks follow measured Hessian partitions.

    Args:
        model: the model (names, shapes, fingerprint).
        partitions: a partition of each chosen parameter's flat indices, by parameter name
            (normalised or any alias of a tied weight), e.g. ``classify(H, shape, heads).partition``.
        base: the plan the other parameters keep their entries from (validated against `model`);
            without one they keep full Adam.
        layers: pre-resolved layers (default: resolved from `model`).
        source: extra provenance merged into the plan's ``source``.

    Returns:
        A checked `Plan` with ``source["method"] == "hessian"``; each layer's ``why`` says which
        partition was found and which layout is used (an exact match or the coarsest refinement).

    Raises:
        ValueError: a name is not a parameter of `model`, or a partition does not cover it.
        PlanMismatchError: `base` was made for another model.
    """
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    if base is not None:
        base.validate(model)
    by_alias = {n: info.name for info in layers for n in info.names}
    chosen: dict[str, Partition] = {}
    for name, partition in partitions.items():
        canonical = by_alias.get(normalize_name(name))
        if canonical is None:
            raise ValueError(f"{name!r} is not a trainable parameter of {type(model).__name__}")
        chosen[canonical] = partition

    plan_layers: dict[str, LayerPlan] = {}
    record: dict[str, dict] = {}
    for info in layers:
        partition = chosen.get(info.name)
        if partition is None:
            plan_layers[info.name] = replace(base.layers[info.name]) if base is not None and info.name in base.layers \
                else _full(info, "no Hessian partition: full Adam")
            continue
        if partition.size != info.numel:
            raise ValueError(f"{info.name}: partition {partition.name!r} covers {partition.size} indices, the "
                             f"parameter has {info.numel} (a partition of a sub-view cannot make a plan)")
        layout = layout_for(partition, info.view_shape, info.axes)
        found = f"Hessian partition {partition.name!r}, {_describe(partition)}"
        why = f"{found}: {layout.words}" if layout.exact else \
            f"{found}, not a view/reduce layout; its coarsest expressible refinement: {layout.words}"
        lp = LayerPlan(list(info.shape), info.role, layout.view, layout.reduce, why, None, None, list(info.aliases))
        lp.check(info.name)
        plan_layers[info.name] = lp
        record[info.name] = {"partition": partition.name, "groups": len(partition), "exact": layout.exact}
    src = {"method": "hessian", "partitions": record, "base": dict(base.source) if base is not None else None}
    src.update(source or {})
    return Plan(model=model_record(model), layers=plan_layers, source=src)


def _describe(partition: Partition) -> str:
    sizes = partition.sizes
    if len(sizes) == 1:
        return "1 group"
    if len(set(sizes)) == 1:
        return f"{len(sizes):,} groups of {sizes[0]:,}"
    return f"{len(sizes):,} groups of {min(sizes):,} to {max(sizes):,}"
