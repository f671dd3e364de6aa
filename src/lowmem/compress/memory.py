"""Optimizer-state memory: what a plan implies, what an optimizer holds, and estimates from shapes.

AdamW keeps `m` and `v` for every parameter entry; a plan keeps full `m` and `v` reduced per
its `reduce` dims. The per-parameter ``step`` scalar (4 bytes) is left out of every estimate, as
the papers count only `m` and `v` (Zhang et al., "Adam-mini", 2024, Table 1; Tomar et al.,
"Eve", 2024, §2); `optimizer_state_bytes` measures it separately.

An estimate needs shapes only, so a model built on the meta device (``lowmem.compress.configs``)
answers for models far larger than the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch
from torch import nn

from lowmem.compress.optim.registry import REGISTRY, StateCount, adamw_count, entry, plan_count
from lowmem.compress.plan import Plan, model_record
from lowmem.layers import ModelLayers, resolve_layers

STATE_BYTES = 4  # fp32


@dataclass(frozen=True)
class StateMemory:
    adamw_bytes: int
    plan_bytes: int

    @property
    def saved(self) -> float:
        """Share of AdamW's optimizer state the plan saves."""
        return 1 - self.plan_bytes / self.adamw_bytes if self.adamw_bytes else 0.0


def plan_state_memory(plan: Plan, bytes_per_entry: int = STATE_BYTES) -> StateMemory:
    """Bytes of `m` + `v` under AdamW and under `plan`."""
    full, kept = plan.v_full, plan.v_kept
    return StateMemory(2 * full * bytes_per_entry, (full + kept) * bytes_per_entry)


def format_bytes(n: int) -> str:
    """Binary units, labelled, at most three integer digits: ``12.30 MiB``, ``0.98 GiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= 1000 * (scale >> 10):   # 1,000 MiB and up read as 0.98 GiB, not 1,000.01 MiB
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,} B"


# -- measured from a live optimizer ----------------------------------------------------------

@dataclass(frozen=True)
class StateBytes:
    """Bytes of an optimizer's state tensors (``numel · element_size``), summed over parameters,
    per state key (``step``, ``exp_avg``, ``exp_avg_sq``, or whatever the optimizer keeps)."""

    by_key: dict[str, int]

    @property
    def exp_avg(self) -> int:
        return self.by_key.get("exp_avg", 0)

    @property
    def exp_avg_sq(self) -> int:
        return self.by_key.get("exp_avg_sq", 0)

    @property
    def step(self) -> int:
        return self.by_key.get("step", 0)

    @property
    def total(self) -> int:
        return sum(self.by_key.values())

    @property
    def without_step(self) -> int:
        """Everything but the per-parameter step counters: what `estimate_state_memory` estimates."""
        return self.total - self.step


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> StateBytes:
    """Measure the state an optimizer holds now, from its real state tensors.

    Works for any `torch.optim.Optimizer` (AdamW, Adafactor, the lowmem optimizers): every tensor
    in ``optimizer.state[p]`` counts, also inside lists or dicts. Parameters that have not taken a
    step yet hold no state, so measure after the first step.
    """
    by_key: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            by_key[key] = by_key.get(key, 0) + _tensor_bytes(value)
    return StateBytes(by_key)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


# -- estimated from shapes -------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryRow:
    """One optimizer's estimated state in bytes, and its savings against AdamW (shares, 0–1)."""

    name: str
    m_bytes: int | None
    v_bytes: int | None
    total_bytes: int
    v_saved: float | None
    total_saved: float

    def to_json(self) -> dict:
        return {"name": self.name, "m_bytes": self.m_bytes, "v_bytes": self.v_bytes, "total_bytes": self.total_bytes,
                "v_saved": None if self.v_saved is None else round(self.v_saved, 6),
                "total_saved": round(self.total_saved, 6)}


@dataclass(frozen=True)
class MemoryEstimate:
    """Optimizer-state bytes of AdamW (first row) and of each other optimizer for one model."""

    model: str
    parameters: int
    bytes_per_state: int
    rows: tuple[MemoryRow, ...]

    def __getitem__(self, name: str) -> MemoryRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def to_json(self) -> dict:
        return {"model": {"class": self.model, "parameters": self.parameters},
                "bytes_per_state": self.bytes_per_state, "optimizers": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, doc: dict) -> "MemoryEstimate":
        """Inverse of `to_json` (the savings as rounded there); ValueError on a malformed document."""
        try:
            rows = tuple(MemoryRow(str(r["name"]), r["m_bytes"], r["v_bytes"], int(r["total_bytes"]),
                                   r["v_saved"], float(r["total_saved"])) for r in doc["optimizers"])
            return cls(str(doc["model"]["class"]), int(doc["model"]["parameters"]), int(doc["bytes_per_state"]), rows)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed memory document: {e!r}") from None


def estimate_state_memory(
    model: nn.Module,
    plan: Plan | str | os.PathLike | None = None,
    bytes_per_state: int = STATE_BYTES,
    optimizers: tuple[str, ...] | None = None,
    layers: ModelLayers | None = None,
) -> MemoryEstimate:
    """Optimizer-state bytes from parameter shapes alone: AdamW, then each optimizer of the
    registry (`lowmem.compress.optim.registry`: the presets, AdaMeM at rank ¼·min(m, n),
    Adafactor with momentum), then a plan.

    With ``n`` trainable entries and ``b`` bytes per state entry, AdamW keeps ``2·n·b`` bytes;
    a plan optimizer keeps ``(n + v_kept)·b``, `v_kept` summing over parameters the product of
    the view's dims that are not reduced. Savings are ``1 − v / v_AdamW`` and
    ``1 − total / total_AdamW``. The step counters are not counted (the papers count only `m`
    and `v`); `optimizer_state_bytes(...).without_step` measures the same quantity.

    Args:
        model: any model; built on the meta device it costs no memory.
        plan: a `Plan` or a path to ``plan.json``, the last row (named ``"plan"``).
        bytes_per_state: bytes of one state entry (4: fp32, lowmem's default; 2: bf16).
        optimizers: registry names of the rows after AdamW's (default every other entry).
        layers: pre-resolved layers (default: resolved from `model`).

    Raises:
        ValueError: `bytes_per_state` is not a positive integer, or an optimizer is unknown.
        PlanError: the plan file is unreadable or one of its layers inconsistent; PlanMismatchError:
            it was made for another model, or its shapes are not the model's (`Plan.validate`).
    """
    if isinstance(bytes_per_state, bool) or not isinstance(bytes_per_state, int) or bytes_per_state < 1:
        raise ValueError(f"bytes_per_state must be a positive integer, got {bytes_per_state!r}")
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan is not None:
        plan.validate(model)
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    names = [n for n in REGISTRY if n != "adamw"] if optimizers is None else [entry(n).name for n in optimizers]
    counts: list[tuple[str, StateCount]] = [("adamw", adamw_count(model, layers))]
    counts += [(name, REGISTRY[name].count(model, layers)) for name in names if name != "adamw"]
    if plan is not None:
        counts.append(("plan", plan_count(plan, layers)))

    adamw = counts[0][1]
    b = bytes_per_state
    rows = tuple(MemoryRow(name, _times(c.m, b), _times(c.v, b), c.total * b,
                           None if c.v is None else _saved(c.v, adamw.v), _saved(c.total, adamw.total))
                 for name, c in counts)
    return MemoryEstimate(model_record(model)["class"], adamw.m, b, rows)


def _times(n: int | None, b: int) -> int | None:
    return None if n is None else n * b


def _saved(kept: int, full: int) -> float:
    return 1 - kept / full if full else 0.0
