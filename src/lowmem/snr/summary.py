"""Summaries of a trajectory: median time-mean SNR per role, view and axis subset."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from lowmem.layers import ModelLayers
from lowmem.snr.keys import format_subset
from lowmem.snr.trajectory import SnrTrajectory
from lowmem.snr.views import describe_subset, param_views


@dataclass(frozen=True)
class RoleSnr:
    """Median over the layers of one role of the time-mean SNR along one subset of one view.

    Its fields are the text a person or a JSON reader sees (the CLI prints them as they are).
    """

    role: str
    view: str          # view name: raw, heads, q, q.heads, …
    subset: str        # dims of the view, "0,1"
    axes: str          # the same in words, "fan_out+fan_in"
    median: float
    layers: int
    plannable: bool = True   # the SNR plan may average over these axes (`lowmem.compress.builders.is_candidate`)


def median_by_role(trajectory: SnrTrajectory, layers: ModelLayers,
                   window: tuple[int | None, int | None] | None = None) -> list[RoleSnr]:
    """Median over layers of each role of the time-mean SNR, per view and subset, in model order;
    `plannable` as the SNR plan's own rule (`is_candidate`, tokens not averaged: the default)."""
    from lowmem.compress.builders import is_candidate   # (builders reads the snr modules: imported here)

    by_name: dict[str, list] = defaultdict(list)
    for (name, label, dims), m in trajectory.time_mean(window).items():
        by_name[name].append((label, dims, m))
    values: dict[tuple[str, str, tuple[int, ...]], list[float]] = defaultdict(list)
    words: dict[tuple[str, str, tuple[int, ...]], str] = {}
    plannable: dict[tuple[str, str, tuple[int, ...]], bool] = {}
    for info in layers:
        for view in param_views(info):
            for label, dims, m in by_name.get(info.name, ()):
                if label != view.label():
                    continue
                key = (info.role, view.name, dims)
                values[key].append(m.snr)
                words[key] = describe_subset(view.axes, dims)
                plannable[key] = is_candidate(view, dims)
    return [RoleSnr(role, view, format_subset(dims), words[(role, view, dims)], statistics.median(v), len(v),
                    plannable[(role, view, dims)])
            for (role, view, dims), v in values.items()]
