"""The compression plan: which dims of each parameter's `v` are averaged (DESIGN §4).

One JSON document (schema ``lowmem.plan/2``)::

    {"schema": "lowmem.plan/2",
     "model": {"class": "GPT", "parameters": 10650112, "fingerprint": "sha256:…"},
     "source": {"method": "snr", "threshold": 1.0, "window": [200, 1000], "probe_lr": 3e-4},
     "layers": {"blocks.0.attn.q.weight": {"shape": [256, 256], "role": "attn_q",
                                           "view": [256, 256], "reduce": [1], "state": {"m": "int8", "v": "fp32"},
                                           "snr": {...}, "why": "…"}},
     "summary": {"v_full": 10650112, "v_kept": 61440, "v_saved": 0.9942}}

`view` reshapes the parameter; `reduce` lists dims of the view over which `v` is averaged
(``null``: full Adam; every dim: one scalar). A fused Q/K/V projection may instead carry
``parts``: slices ``[start, stop)`` of one raw dim, each with its own `view` and `reduce`; the
slices tile that dim and the layer's own `reduce` is then ``null``. The keys of ``snr`` are
`lowmem.snr.keys.SnrKey` texts (``0,1`` for the raw view, ``q.heads:0,1`` for another).

``state`` (optional) says how the parameter's `m` and kept `v` are stored
(`lowmem.compress.formats.StateFormat`: fp32, bf16, int8, int4); left out, both are fp32.
Plans of schema ``lowmem.plan/1`` (before formats existed) still load, as fp32 state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowmem.compress.formats import FULL, StateFormat
from lowmem.layers import normalize_name
from lowmem.snr.keys import SnrKey

SCHEMA = "lowmem.plan/2"
READS = ("lowmem.plan/1", SCHEMA)   # /1: no "state" entries (fp32 state)


class PlanError(ValueError):
    """A plan that cannot be read or is inconsistent; the message says where."""


class PlanMismatchError(PlanError):
    """A plan made for another model; the message names the parameters that differ."""


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def kept_entries(view: list[int], reduce: list[int] | None) -> int:
    """How many `v` entries remain after averaging `view` over `reduce`."""
    if reduce is None:
        return _prod(view)
    return _prod(s for i, s in enumerate(view) if i not in set(reduce))


@dataclass
class PartPlan:
    """One slice of a fused parameter (e.g. the ``k`` rows of ``c_attn``) and its reduction."""

    name: str
    dim: int
    start: int
    stop: int
    view: list[int]
    reduce: list[int] | None
    why: str = ""
    snr: dict[SnrKey, float] | None = None

    @property
    def v_kept(self) -> int:
        return kept_entries(self.view, self.reduce)

    def to_json(self) -> dict:
        d = {"name": self.name, "dim": self.dim, "start": self.start, "stop": self.stop,
             "view": list(self.view), "reduce": None if self.reduce is None else list(self.reduce)}
        if self.snr is not None:
            d["snr"] = _snr_out(self.snr)
        d["why"] = self.why
        return d


@dataclass
class LayerPlan:
    """What to keep of one parameter's `v`.

    Attributes:
        shape: the parameter's shape.
        role: its role (see `lowmem.layers.ROLES`).
        view: a reshape of the parameter (same number of entries).
        reduce: dims of `view` averaged over; None keeps full Adam.
        why: one line a person can read.
        snr: the SNR behind the decision, by view and subset (`SnrKey`).
        parts: slices of a fused parameter with their own view/reduce (then `reduce` is None):
            each slices one dim of `view`, which is the shape itself where q, k and v lie one
            after the other, or the out axis read as (groups, rows per group) where each group
            holds a slice of every part (GPT-NeoX's heads, Falcon's key-value groups).
        aliases: other names of a tied parameter.
        state: how `m` and the kept `v` are stored (`StateFormat`); None: both fp32.
    """

    shape: list[int]
    role: str
    view: list[int]
    reduce: list[int] | None
    why: str = ""
    snr: dict[SnrKey, float] | None = None
    parts: list[PartPlan] | None = None
    aliases: list[str] = field(default_factory=list)
    state: StateFormat | None = None

    @property
    def state_format(self) -> StateFormat:
        return self.state or FULL

    @property
    def numel(self) -> int:
        return _prod(self.shape)

    @property
    def v_kept(self) -> int:
        if self.parts:
            return sum(p.v_kept for p in self.parts)
        return kept_entries(self.view, self.reduce)

    @property
    def compressed(self) -> bool:
        return self.v_kept < self.numel

    @property
    def v_whole(self) -> bool:
        """`v` kept whole in the parameter's shape (full Adam without parts): where a
        quantized `v` may apply (`lowmem.compress.formats.effective_format`)."""
        return self.reduce is None and not self.parts

    def check(self, name: str) -> None:
        """Raise `PlanError` naming `name` when shape, view, reduce or parts are inconsistent."""
        for key, dims in (("shape", self.shape), ("view", self.view)):
            if _bad_sizes(dims):
                raise PlanError(f"layer {name!r}: {key} {dims} must be integers >= 0")
        if _prod(self.view) != self.numel:
            raise PlanError(f"layer {name!r}: view {self.view} has {_prod(self.view)} entries, shape {self.shape} has {self.numel}")
        if self.reduce is not None and _bad_reduce(self.reduce, self.view):
            raise PlanError(f"layer {name!r}: reduce {self.reduce} is not a set of dims of view {self.view}")
        if self.parts:
            if self.reduce is not None:
                raise PlanError(f"layer {name!r}: a layer with parts must have reduce null")
            # The parts slice one dim of the layer's `view`: the shape itself where they lie one
            # after the other, the out axis read as (groups, rows per group) where interleaved.
            dims = {p.dim for p in self.parts}
            if len(dims) != 1 or not all(_is_int(d) and 0 <= d < len(self.view) for d in dims):
                raise PlanError(f"layer {name!r}: parts must slice one dim of view {self.view}, "
                                f"found dim {sorted(dims, key=str)}")
            d = dims.pop()
            pos = 0
            for p in sorted(self.parts, key=lambda p: p.start):
                if not (_is_int(p.start) and _is_int(p.stop)) or p.start != pos or p.stop <= p.start:
                    raise PlanError(f"layer {name!r}: part {p.name!r} [{p.start}, {p.stop}) does not continue at {pos}")
                pos = p.stop
                n = self.numel // self.view[d] * (p.stop - p.start) if self.view[d] else 0
                if _bad_sizes(p.view):
                    raise PlanError(f"layer {name!r}: part {p.name!r} view {p.view} must be integers >= 0")
                if _prod(p.view) != n:
                    raise PlanError(f"layer {name!r}: part {p.name!r} view {p.view} has {_prod(p.view)} entries, the slice has {n}")
                if p.reduce is not None and _bad_reduce(p.reduce, p.view):
                    raise PlanError(f"layer {name!r}: part {p.name!r} reduce {p.reduce} is out of range for view {p.view}")
            if pos != self.view[d]:
                raise PlanError(f"layer {name!r}: parts cover {pos} of {self.view[d]} along dim {d}")

    def to_json(self) -> dict:
        d: dict = {"shape": list(self.shape), "role": self.role, "view": list(self.view),
                   "reduce": None if self.reduce is None else list(self.reduce)}
        if self.snr is not None:
            d["snr"] = _snr_out(self.snr)
        if self.parts:
            d["parts"] = [p.to_json() for p in self.parts]
        if self.aliases:
            d["aliases"] = list(self.aliases)
        if self.state is not None:
            d["state"] = self.state.to_json()
        d["why"] = self.why
        return d


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad_sizes(dims) -> bool:
    return not all(_is_int(x) and x >= 0 for x in dims)


def _bad_reduce(reduce, view) -> bool:
    """Whether `reduce` is not a set of dims of `view` (each once, in range)."""
    return not all(_is_int(r) and 0 <= r < len(view) for r in reduce) or len(set(reduce)) != len(reduce)


def _ints(value, key: str) -> list[int]:
    """A JSON list of integers (``8``, not ``8.0``, ``1e30`` or ``true``), or ValueError naming `key`."""
    if not isinstance(value, list) or not all(_is_int(x) for x in value):
        raise ValueError(f"\"{key}\" must be a list of integers, found {json.dumps(value)[:80]}")
    return list(value)


def _reduce_in(value, key: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_int(x) for x in value):
        raise ValueError(f"\"{key}\" must be null (full Adam) or a list of view dims (integers), "
                         f"found {json.dumps(value)[:80]}")
    return list(value)


def _int_in(value, key: str) -> int:
    if not _is_int(value):
        raise ValueError(f"\"{key}\" must be an integer, found {json.dumps(value)[:80]}")
    return value


def _part_in(p, i: int) -> PartPlan:
    at = f"parts[{i}]"
    if not isinstance(p, dict):
        raise ValueError(f"{at} must be a JSON object, found {json.dumps(p)[:80]}")
    missing = [k for k in ("name", "dim", "start", "stop", "view", "reduce") if k not in p]
    if missing:
        raise ValueError(f"{at}: missing key {missing[0]!r}")
    return PartPlan(str(p["name"]), _int_in(p["dim"], f"{at}.dim"), _int_in(p["start"], f"{at}.start"),
                    _int_in(p["stop"], f"{at}.stop"), _ints(p["view"], f"{at}.view"),
                    _reduce_in(p["reduce"], f"{at}.reduce"), str(p.get("why", "")), _snr_in(p.get("snr")))


def _round(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def model_fingerprint(named_shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    """``sha256:`` of the ordered (name, shape) list, names normalised."""
    h = hashlib.sha256()
    for name, shape in named_shapes:
        h.update(f"{normalize_name(name)}:{','.join(map(str, shape))};".encode())
    return "sha256:" + h.hexdigest()


def model_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Ordered (canonical name, shape) of the trainable parameters, as a plan records them."""
    return [(normalize_name(n), tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class Plan:
    """A per-layer compression plan for one model; see the module docstring for the format."""

    model: dict
    layers: dict[str, LayerPlan]
    source: dict = field(default_factory=dict)
    schema: str = SCHEMA

    # -- numbers ---------------------------------------------------------------------------
    @property
    def v_full(self) -> int:
        return sum(lp.numel for lp in self.layers.values())

    @property
    def v_kept(self) -> int:
        return sum(lp.v_kept for lp in self.layers.values())

    @property
    def summary(self) -> dict:
        full, kept = self.v_full, self.v_kept
        return {"v_full": full, "v_kept": kept, "v_saved": round(1 - kept / full, 6) if full else 0.0}

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"schema": self.schema, "model": dict(self.model), "source": dict(self.source),
                "layers": {n: lp.to_json() for n, lp in self.layers.items()}, "summary": self.summary}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (temporary file in the same folder, then rename)."""
        return write_atomic(path, self.dumps())

    @classmethod
    def from_json(cls, doc: dict, where: str = "plan") -> "Plan":
        if not isinstance(doc, dict):
            raise PlanError(f"{where}: expected a JSON object, found {type(doc).__name__}")
        if doc.get("schema") not in READS:
            raise PlanError(f"{where}: \"schema\" is {doc.get('schema')!r}, expected {SCHEMA!r} "
                            f"(or {READS[0]!r})")
        for key, typ in (("model", dict), ("layers", dict)):
            if not isinstance(doc.get(key), typ):
                raise PlanError(f"{where}: \"{key}\" must be a JSON object")
        layers = {}
        for name, d in doc["layers"].items():
            at = f"{where}: layers[{name!r}]"
            if not isinstance(d, dict):
                raise PlanError(f"{at}: expected a JSON object, found {type(d).__name__}")
            try:
                parts = d.get("parts")
                if parts is not None and not isinstance(parts, list):
                    raise ValueError(f"\"parts\" must be null or a list of slices, found {json.dumps(parts)[:80]}")
                aliases = d.get("aliases", [])
                if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                    raise ValueError(f"\"aliases\" must be a list of names, found {json.dumps(aliases)[:80]}")
                lp = LayerPlan(_ints(d["shape"], "shape"), str(d["role"]), _ints(d["view"], "view"),
                               _reduce_in(d["reduce"], "reduce"), str(d.get("why", "")), _snr_in(d.get("snr")),
                               [_part_in(p, i) for i, p in enumerate(parts)] if parts else None,
                               list(aliases), StateFormat.from_json(d["state"]) if d.get("state") else None)
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                missing = f"missing key {e}" if isinstance(e, KeyError) else str(e)
                raise PlanError(f"{at}: {missing}") from None
            try:
                lp.check(name)
            except PlanError as e:
                raise PlanError(f"{where}: {e}") from None
            layers[name] = lp
        return cls(model=doc["model"], layers=layers, source=doc.get("source") or {})

    @classmethod
    def loads(cls, text: str, where: str = "plan") -> "Plan":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{where}: line {e.lineno} column {e.colno}: {e.msg}") from None
        return cls.from_json(doc, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan file; `PlanError` says which file, line or layer is wrong."""
        path = Path(path)
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise PlanError(f"{path}: not UTF-8 text (byte {e.start})") from None
        return cls.loads(text, str(path))

    # -- checks against a model -------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Check this plan against `model` before it is applied to it.

        Every layer is checked on its own (`LayerPlan.check`: sizes, view, reduce, parts) and its
        shape against the model's parameter of that name, whether or not the fingerprint matches:
        the fingerprint is a string in the file, and a hand-edited shape keeps it.

        Raises:
            PlanError: a layer is inconsistent (the message names it and the field).
            PlanMismatchError: the plan was made for a model with other parameters, or its shapes
                differ from the model's (names, plan value and model value in the message).
        """
        for name, lp in self.layers.items():
            lp.check(name)
        ours = {normalize_name(n): list(lp.shape) for n, lp in self.layers.items()}
        theirs = {n: list(s) for n, s in model_shapes(model)}
        same_fingerprint = self.model.get("fingerprint") == model_fingerprint(model_shapes(model))
        missing = [n for n in theirs if n not in ours]
        extra = [n for n in ours if n not in theirs]
        shape = [f"{n} (plan {ours[n]}, model {theirs[n]})" for n in ours if n in theirs and ours[n] != theirs[n]]
        problems = []
        if shape:
            problems.append("different shapes: " + _some(shape))
        if missing:
            problems.append("in the model, not in the plan: " + _some(missing))
        if extra:
            problems.append("in the plan, not in the model: " + _some(extra))
        if not problems:
            if same_fingerprint or list(ours) == list(theirs):
                return  # same names, shapes and order: a hand-edited fingerprint is not a mismatch
            problems.append("parameter order differs (fingerprint mismatch)")
        if same_fingerprint:   # the record is this model's: the layers were edited after the plan was made
            raise PlanMismatchError("plan layers do not match the model they were made for (its fingerprint "
                                    "matches this model; were the layers edited?): " + "; ".join(problems))
        raise PlanMismatchError(
            f"plan was made for {self.model.get('class', '?')} with {self.model.get('parameters', '?')} "
            f"parameters, this model is {type(model).__name__}: " + "; ".join(problems))


def _some(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" … ({len(items) - n} more)" if len(items) > n else "")


def _snr_out(snr: dict[SnrKey, float]) -> dict[str, float | None]:
    return {str(k): _round(v) for k, v in snr.items()}


def _snr_in(d) -> dict[SnrKey, float] | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise TypeError(f"\"snr\" must be an object, found {type(d).__name__}")
    return {SnrKey.parse(str(k)): (float("nan") if v is None else float(v)) for k, v in d.items()}


def model_record(model: nn.Module) -> dict:
    """The plan's ``model`` entry: class, trainable parameter count, fingerprint."""
    shapes = model_shapes(model)
    inner = model
    while isinstance(getattr(inner, "_orig_mod", getattr(inner, "module", None)), nn.Module):
        inner = getattr(inner, "_orig_mod", getattr(inner, "module", None))  # DDP(compile(model)) nests both
    return {"class": type(inner).__name__,
            "parameters": sum(_prod(s) for _, s in shapes),
            "fingerprint": model_fingerprint(shapes)}


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` so that a reader sees the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a failed write leaves the old file and no temporary
        if isinstance(e, OSError) and not e.filename:   # a failed write() names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


def plan_digest(plan: Plan) -> str:
    """What a plan optimizer depends on, as one string: the hash of the plan's layers."""
    text = json.dumps(plan.to_json()["layers"], sort_keys=True)
    return "plan sha256:" + hashlib.sha256(text.encode()).hexdigest()
