"""Optimizer-state memory: what a plan implies, what an optimizer holds, and estimates from shapes.

AdamW keeps `m` and `v` for every parameter entry; a plan keeps full `m` and `v` reduced per
its `reduce` dims. The per-parameter ``step`` scalar (4 bytes) is left out of every estimate, as
the papers count only `m` and `v` (Zhang et al., "Adam-mini", 2024, Table 1; Tomar et al.,
"Eve", 2024, §2); `optimizer_state_bytes` measures it separately.

Where the bytes of an entry come from: ``torch.optim.AdamW`` keeps its states in the parameter
dtype (fp32 parameters: 8 bytes per parameter; bf16 parameters: 4). lowmem's optimizers keep them
in the compute dtype (fp32 for fp32 and bf16 parameters) unless a state format says otherwise
(`lowmem.compress.formats`: `m` and the kept `v` in fp32, bf16, int8 or int4, the quantized ones
with one fp32 scale per block of each row and an fp32 fallback for small tensors).

An estimate needs shapes only, so a model built on the meta device (``lowmem.compress.configs``)
answers for models far larger than the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lowmem.compress.builders import build_preset
from lowmem.compress.formats import FULL, M_FORMATS, V_FORMATS, StateFormat, effective_format, stored_bytes
from lowmem.compress.optim.registry import REGISTRY, StateCount, adamw_count, entry  # StateCount: re-exported
from lowmem.compress.plan import Plan, model_record
from lowmem.layers import ModelLayers, resolve_layers

STATE_BYTES = 4  # fp32
PARAM_BYTES = {"fp32": 4, "bf16": 2}   # bytes of one parameter entry, and so of one of torch AdamW's states
ALL_FORMATS: tuple[StateFormat, ...] = tuple(StateFormat(m, v) for m in M_FORMATS for v in V_FORMATS)


@dataclass(frozen=True)
class StateMemory:
    adamw_bytes: int
    plan_bytes: int

    @property
    def saved(self) -> float:
        """Share of AdamW's optimizer state the plan saves."""
        return 1 - self.plan_bytes / self.adamw_bytes if self.adamw_bytes else 0.0


def plan_state_memory(plan: Plan, bytes_per_entry: int = STATE_BYTES) -> StateMemory:
    """Bytes of `m` + `v` under AdamW (every entry `bytes_per_entry` bytes) and under `plan`
    (its kept entries in the plan's ``state`` formats, `plan_state_bytes`; `bytes_per_entry`
    bytes where a format is fp32)."""
    return StateMemory(2 * plan.v_full * bytes_per_entry, sum(plan_state_bytes(plan, None, bytes_per_entry)))


def plan_state_bytes(plan: Plan, fmt: StateFormat | None = None, compute_bytes: int = STATE_BYTES) -> tuple[int, int]:
    """Bytes of `m` and of the kept `v` of a plan optimizer, summed over the plan's parameters.

    Each parameter's state is stored in `fmt` (None: its own ``state`` entry, fp32 without one),
    as `effective_format` applies it: `m` over the parameter's shape, `v` over the kept entries,
    a quantized `v` only where it is kept whole; ``stored_bytes`` gives the bytes of each.

    Args:
        plan: the plan (one layer per parameter, tied weights once).
        fmt: one format for every parameter, or None for the plan's own.
        compute_bytes: bytes of an entry in the compute dtype (the ``fp32`` format).
    """
    m = v = 0
    for lp in plan.layers.values():
        whole = lp.v_whole
        eff = effective_format(lp.state_format if fmt is None else fmt, lp.shape, v_full=whole)
        m += stored_bytes(eff.m, lp.shape, compute_bytes)
        v += stored_bytes(eff.v, lp.shape if whole else (lp.v_kept,), compute_bytes)
    return m, v


def plan_format(plan: Plan) -> StateFormat | None:
    """The one format every parameter of `plan` is stored in (fp32 without ``state`` entries), or
    None where its layers differ."""
    found = {lp.state_format for lp in plan.layers.values()}
    return found.pop() if len(found) == 1 else (FULL if not found else None)


def format_bytes(n: int) -> str:
    """Binary units, labelled, at most three integer digits: ``12.30 MiB``, ``0.98 GiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= 1000 * (scale >> 10):   # 1,000 MiB and up read as 0.98 GiB, not 1,000.01 MiB
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,} B"


# -- measured from a live optimizer ----------------------------------------------------------

@dataclass(frozen=True)
class StateBytes:
    """Bytes of an optimizer's state tensors (``numel · element_size``; for a tensor subclass such as
    torchao's quantized states, of the tensors inside it), summed over parameters,
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
        if is_traceable_wrapper_subclass(value) and getattr(value, "placements", None) is None:
            # A tensor subclass that stores its data in inner tensors (torchao's quantized states
            # look like fp32 but hold uint8 codes, fp32 scales and a code map): count those.
            # DTensors are counted as before, by their global shape.
            attrs, _ = value.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(value, a)) for a in attrs)
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


# -- estimated from shapes -------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryRow:
    """One optimizer's estimated state in bytes, and its savings against AdamW (shares, 0–1).

    `state` is the format its `m` and kept `v` are stored in, the same for every parameter
    (`lowmem.compress.formats.StateFormat`; ``fp32`` is the compute dtype; quantized formats fall
    back to fp32 where they do not apply), or None where it differs from parameter to parameter
    (a plan with its own ``state`` entries). torch AdamW's is its parameters' dtype
    (``m=bf16,v=bf16`` for bf16 parameters); AdaMeM and Adafactor keep all of theirs in the
    compute dtype.
    """

    name: str
    m_bytes: int | None
    v_bytes: int | None
    total_bytes: int
    v_saved: float | None
    total_saved: float
    state: StateFormat | None = FULL

    @property
    def label(self) -> str:
        """``name`` and the format, as a person asks for a row: ``"slimadam m=int8,v=fp32"``."""
        return self.name if self.state is None else f"{self.name} {self.state}"

    def to_json(self, parameters: int | None = None) -> dict:
        """The row with raw bytes; with `parameters`, its ``bytes_per_param`` too."""
        d = {"name": self.name, "state": None if self.state is None else self.state.to_json(),
             "m_bytes": self.m_bytes, "v_bytes": self.v_bytes, "total_bytes": self.total_bytes}
        if parameters is not None:
            d["bytes_per_param"] = round(self.total_bytes / parameters, 6) if parameters else None
        d["v_saved"] = None if self.v_saved is None else round(self.v_saved, 6)
        d["total_saved"] = round(self.total_saved, 6)
        return d


@dataclass(frozen=True)
class MemoryEstimate:
    """Optimizer-state bytes of AdamW (first row) and of each other optimizer for one model.

    Attributes:
        model: the model's class.
        parameters: its trainable entries (tied weights once).
        bytes_per_state: bytes of a state entry in the compute dtype (the ``fp32`` format).
        rows: AdamW first, then one row per optimizer and state format.
        param_dtype: the parameters' dtype (``fp32`` or ``bf16``), which AdamW's states follow.
    """

    model: str
    parameters: int
    bytes_per_state: int
    rows: tuple[MemoryRow, ...]
    param_dtype: str = "fp32"

    def bytes_per_param(self, row: MemoryRow) -> float:
        """State bytes per trainable parameter entry: ``total_bytes / parameters``."""
        return row.total_bytes / self.parameters if self.parameters else 0.0

    def row(self, name: str, state: StateFormat | str | None = None) -> MemoryRow:
        """The row of optimizer `name` in `state` (a `StateFormat` or its text, ``"m=int8"``);
        without `state`, the one row of that name.

        Raises:
            KeyError: no such row, or several of that name and no `state` (the labels are in the message).
        """
        fmt = StateFormat.parse(state) if isinstance(state, str) else state
        found = [r for r in self.rows if r.name == name and (state is None or r.state == fmt)]
        if len(found) == 1:
            return found[0]
        what = f"{name!r}" if state is None else f"{name!r} in {fmt}"
        why = "several rows" if found else "no row"
        raise KeyError(f"{why} {what}; rows: {', '.join(r.label for r in self.rows)}")

    def __getitem__(self, key: str | tuple[str, StateFormat | str]) -> MemoryRow:
        """``estimate["eve"]``, ``estimate["eve", "m=int8"]`` or a label, ``estimate["eve m=int8,v=fp32"]``."""
        if isinstance(key, tuple):
            return self.row(*key)
        for row in self.rows:
            if row.label == key:
                return row
        return self.row(key)

    def to_json(self) -> dict:
        return {"model": {"class": self.model, "parameters": self.parameters}, "param_dtype": self.param_dtype,
                "bytes_per_state": self.bytes_per_state,
                "optimizers": [r.to_json(self.parameters) for r in self.rows]}

    @classmethod
    def from_json(cls, doc: dict) -> "MemoryEstimate":
        """Inverse of `to_json` (the savings as rounded there); a document written before state
        formats (no ``state``, no ``param_dtype``) reads as fp32 throughout. ValueError on a
        malformed document."""
        try:
            rows = tuple(MemoryRow(str(r["name"]), r["m_bytes"], r["v_bytes"], int(r["total_bytes"]),
                                   r["v_saved"], float(r["total_saved"]), _state_in(r)) for r in doc["optimizers"])
            dtype = str(doc.get("param_dtype", "fp32"))
            if dtype not in PARAM_BYTES:
                raise ValueError(f"param_dtype {dtype!r}")
            return cls(str(doc["model"]["class"]), int(doc["model"]["parameters"]), int(doc["bytes_per_state"]),
                       rows, dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed memory document: {e!r}") from None


def _state_in(row: dict) -> StateFormat | None:
    if "state" not in row:
        return FULL
    return None if row["state"] is None else StateFormat.from_json(row["state"])


def estimate_state_memory(
    model: nn.Module,
    plan: Plan | str | os.PathLike | None = None,
    bytes_per_state: int = STATE_BYTES,
    optimizers: tuple[str, ...] | None = None,
    layers: ModelLayers | None = None,
    *,
    formats: tuple[StateFormat | str, ...] | None = None,
    param_dtype: str = "fp32",
) -> MemoryEstimate:
    """Optimizer-state bytes from parameter shapes alone: AdamW, then each optimizer of the
    registry (`lowmem.compress.optim.registry`: the presets, AdaMeM at rank ¼·min(m, n),
    Adafactor with momentum), then a plan.

    With ``n`` trainable entries and ``b`` bytes per state entry in the compute dtype, AdamW keeps
    ``2·n·p`` bytes, ``p`` the bytes of a parameter entry (torch keeps its states in the parameter
    dtype: ``p = b`` for fp32 parameters, 2 for bf16). A plan optimizer (a preset, or the plan)
    gets one row per state format: with everything in ``fp32`` it keeps ``(n + v_kept)·b``,
    `v_kept` summing over parameters the product of the view's dims that are not reduced; in other
    formats `plan_state_bytes` sums `stored_bytes` of each parameter's `m` and kept `v`. A plan with
    its own ``state`` entries gets one row, stored as they say. AdaMeM and Adafactor keep their
    states in the compute dtype, ``b`` bytes an entry, whatever the parameter dtype. Savings are
    ``1 − v / v_AdamW`` and ``1 − total / total_AdamW``, against AdamW in the same parameter
    dtype (negative where a row keeps more). The step counters are not counted (the papers count
    only `m` and `v`); `optimizer_state_bytes(...).without_step` measures the same quantity.

    Args:
        model: any model; built on the meta device it costs no memory.
        plan: a `Plan` or a path to ``plan.json``, the last rows (named ``"plan"``).
        bytes_per_state: bytes of one state entry in the compute dtype (4: fp32, lowmem's default;
            2 stores every state in 2 bytes, the estimate before state formats; 8: fp64). Only 4
            goes with bf16 parameters, whose compute dtype is fp32.
        optimizers: registry names of the rows after AdamW's (default every other entry).
        layers: pre-resolved layers (default: resolved from `model`).
        formats: the state formats of the plan optimizers' rows (`StateFormat` or its text,
            ``"m=int8"``), one row each, in this order (default: fp32 only).
        param_dtype: ``"fp32"`` or ``"bf16"``: the dtype of the parameters, hence of AdamW's states.

    Raises:
        ValueError: `bytes_per_state` is not a positive integer (or not 4 with bf16 parameters),
            an optimizer, a format or the parameter dtype is unknown, or `formats` is empty.
        PlanError: the plan file is unreadable or one of its layers inconsistent; PlanMismatchError:
            it was made for another model, or its shapes are not the model's (`Plan.validate`).
    """
    if isinstance(bytes_per_state, bool) or not isinstance(bytes_per_state, int) or bytes_per_state < 1:
        raise ValueError(f"bytes_per_state must be a positive integer, got {bytes_per_state!r}")
    if param_dtype not in PARAM_BYTES:
        raise ValueError(f"param_dtype must be one of {', '.join(PARAM_BYTES)}, got {param_dtype!r}")
    if param_dtype != "fp32" and bytes_per_state != STATE_BYTES:
        raise ValueError(f"bytes_per_state must be {STATE_BYTES} with {param_dtype} parameters (their compute dtype "
                         f"is fp32), got {bytes_per_state}; ask for {param_dtype} states with formats")
    formats = state_formats(formats)
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if plan is not None:
        plan.validate(model)
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    names = [n for n in REGISTRY if n != "adamw"] if optimizers is None else [entry(n).name for n in optimizers]

    b = bytes_per_state
    n = adamw_count(model, layers).m
    p = b if param_dtype == "fp32" else PARAM_BYTES[param_dtype]
    adamw_state = FULL if param_dtype == "fp32" else StateFormat(param_dtype, param_dtype)
    sized: list[tuple[str, StateFormat | None, int | None, int | None, int]] = [("adamw", adamw_state, n * p, n * p, 2 * n * p)]
    for name in names:
        e = REGISTRY[name]
        if name == "adamw":
            continue
        if e.preset is not None:   # a plan optimizer
            sized += _plan_rows(name, build_preset(e.preset, model, layers), formats, b)
        else:   # not a plan optimizer: its states are in the compute dtype
            c = e.count(model, layers)
            sized.append((name, FULL, _times(c.m, b), _times(c.v, b), c.total * b))
    if plan is not None:
        own = any(lp.state is not None for lp in plan.layers.values())
        sized += _plan_rows("plan", plan, None if own else formats, b)

    _, _, _, adamw_v, adamw_total = sized[0]
    rows = tuple(MemoryRow(name, m, v, total, None if v is None else _saved(v, adamw_v), _saved(total, adamw_total), fmt)
                 for name, fmt, m, v, total in sized)
    return MemoryEstimate(model_record(model)["class"], n, b, rows, param_dtype)


def state_formats(formats) -> tuple[StateFormat, ...]:
    """`formats` as a tuple of distinct `StateFormat`s, in order (None: fp32 only; a single
    format or text alone is one).

    Raises:
        ValueError: a text `StateFormat.parse` refuses, or no format at all.
    """
    if formats is None:
        return (FULL,)
    if isinstance(formats, (str, StateFormat)):
        formats = (formats,)
    out: list[StateFormat] = []
    for f in formats:
        f = StateFormat.parse(f) if isinstance(f, str) else f
        if not isinstance(f, StateFormat):
            raise ValueError(f"a state format is a StateFormat or text like 'm=int8,v=fp32', got {f!r}")
        if f not in out:
            out.append(f)
    if not out:
        raise ValueError("formats must name at least one state format (None: fp32)")
    return tuple(out)


def _plan_rows(name: str, plan: Plan, formats: tuple[StateFormat, ...] | None, b: int):
    """One sized row per format, or one in the plan's own formats (`formats` None)."""
    rows = []
    for fmt in (None,) if formats is None else formats:
        m, v = plan_state_bytes(plan, fmt, b)
        rows.append((name, plan_format(plan) if fmt is None else fmt, m, v, m + v))
    return rows


def _times(n: int | None, b: int) -> int | None:
    return None if n is None else n * b


def _saved(kept: int, full: int) -> float:
    return 1 - kept / full if full else 0.0


# -- bytes per parameter of every format ---------------------------------------------------------

@dataclass(frozen=True)
class FormatGrid:
    """Bytes per parameter of each plan optimizer in each state format, beside torch AdamW with
    fp32 and with bf16 parameters: which formats beat which baseline.

    Attributes:
        estimate: fp32 parameters, ``fp32`` = 4 bytes: AdamW, then one row per (optimizer, format).
        adamw: AdamW's row for each parameter dtype (``"fp32"``: 8 bytes per parameter, ``"bf16"``: 4).
    """

    estimate: MemoryEstimate
    adamw: dict[str, MemoryRow]

    @property
    def formats(self) -> tuple[StateFormat, ...]:
        return tuple(dict.fromkeys(r.state for r in self.estimate.rows[1:]))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.name for r in self.estimate.rows[1:]))

    def bytes_per_param(self, name: str, fmt: StateFormat | str) -> float:
        return self.estimate.bytes_per_param(self.estimate.row(name, fmt))

    def to_json(self) -> dict:
        n = self.estimate.parameters
        return {"bytes_per_state": self.estimate.bytes_per_state,
                "adamw": {dtype: row.to_json(n) for dtype, row in self.adamw.items()},
                "optimizers": [r.to_json(n) for r in self.estimate.rows[1:]]}


def format_grid(
    model: nn.Module,
    plan: Plan | None = None,
    formats: tuple[StateFormat | str, ...] = ALL_FORMATS,
    layers: ModelLayers | None = None,
) -> FormatGrid:
    """Every plan optimizer (the presets, and `plan` unless it has its own ``state`` entries) in
    each of `formats` (default all twelve), and AdamW in every parameter dtype: `estimate_state_memory`
    with 4-byte fp32 entries, the compute dtype of fp32 and bf16 parameters alike.

    Raises:
        as `estimate_state_memory`.
    """
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    presets = tuple(name for name, e in REGISTRY.items() if e.preset is not None)
    if plan is not None and any(lp.state is not None for lp in plan.layers.values()):
        plan = None   # one row in its own formats: the memory table has it
    estimate = estimate_state_memory(model, plan, optimizers=presets, layers=layers, formats=formats)
    adamw = {dtype: estimate_state_memory(model, optimizers=(), layers=layers, param_dtype=dtype)["adamw"]
             for dtype in PARAM_BYTES}
    return FormatGrid(estimate, adamw)
