"""What the benchmarks share: the machine line, the allocator environment, device syncs, quartiles.

Imported by the scripts beside it (``python benchmarks/NAME.py`` puts this folder on sys.path).
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def allocator_env(keys) -> dict[str, str]:
    """The variables among `keys`, and any ``MALLOC_*``, that are set: they change CPU timings."""
    keys = set(keys) | {k for k in os.environ if k.startswith("MALLOC_")}
    return {k: os.environ[k] for k in sorted(keys) if k in os.environ}


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3
