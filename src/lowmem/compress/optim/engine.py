"""One engine for every "AdamW with `v` averaged over some dims" optimizer (DESIGN §5).

For each parameter the plan gives a `view` (a reshape) and `reduce` (dims of the view over which
`v` is averaged), or `parts` (slices of one raw dim, each with its own view and reduce). With
``r`` the reduce dims, one step is::

    m ← β1 m + (1−β1) g
    v ← β2 v + (1−β2) mean_r(g²)              (kept with keepdim, broadcast in the update)
    θ ← θ (1 − lr·λ)                           (decoupled decay, first, as torch.optim.AdamW)
    θ ← θ − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + ε)

With no reduction anywhere this is `torch.optim.AdamW` (same operations in the same order). The
engine reads views and reduce dims from the plan and never parses parameter names.

The engine is three pieces:

- this class keeps the books: parameter groups and their checks, lazy state, names and layouts,
  and per step it sorts each group's tensors into buckets (device, dtype, whether in the state
  dtype and contiguous, layout kind, step count: `backends.BucketKey`);
- `layout` says how each parameter's `v` is kept and how a step reduces ``g²`` and lands its
  update, for single-process and row-sharded (FSDP2) parameters alike;
- `backends` holds the update as functions over a bucket's lists of tensors (reference, foreach,
  fused, compiled, native: a C kernel, `native`, and triton: GPU kernels, `gpu`) and `choose_backend`, which alone decides which runs
  (`ReducedAdamW.backend_of` answers it for one parameter);

and `checkpoint` reads and writes state dicts.

State keys are AdamW's: ``step`` (a float32 scalar tensor), ``exp_avg`` (full, like the
parameter) and ``exp_avg_sq`` (the kept entries: the view's shape with reduced dims of size 1;
the parameter's shape where nothing is reduced; a flat vector of every part's kept entries for
a parameter with parts). States are computed in fp32 for bf16/fp16 parameters and fp64 for fp64
ones. On a row-sharded parameter ``exp_avg`` is a DTensor like the parameter and a compressed
``exp_avg_sq`` a flat tensor of this rank's kept entries; `state_dict` gathers it.

Storage formats (`lowmem.compress.formats`, per parameter from the plan's ``state`` entries or
the `state_format` option): a state in ``bf16``, ``int8`` or ``int4`` is stored as `state`
says (bf16 tensors, or uint8 codes plus ``exp_avg_scale`` / ``exp_avg_sq_scale``). Such a
parameter is *staged*: for its step its states are decoded into compute-dtype temporaries, the
backend updates those as any other tensors, and they are encoded back (except in a backend that
reads stored formats itself, `backends.Backend.reads_stored`: the native kernel); staged parameters go
through the backends in buckets of at most `STAGE_ENTRIES` entries (a larger parameter forms a
bucket of its own), so the temporaries of one step stay bounded by one bucket's: about 16 bytes
per entry in fp32 (m, v, a gradient and a parameter copy where their dtype differs) plus what the
backend itself allocates.

Low-precision parameters (bf16/fp16) take their update in the compute dtype and are rounded
back as `param_rounding` says: ``"nearest"`` (round-to-nearest, as torch's AdamW), 
``"stochastic"`` (unbiased: `rounding.round_stochastic`, drawn from the optimizer's own
generator per device, seeded with `rounding_seed` alike on every rank, so data-parallel
replicas round alike, and saved in the state dict, so a resumed run continues exactly) or ``"kahan"`` (a compensation buffer
``kahan_comp`` in the parameter's dtype keeps what rounding lost and adds it back next step, as
torch-optimi does; 2 more bytes per bf16 entry).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowmem.compress.formats import FULL, QUANTIZED, StateFormat, effective_format
from lowmem.compress.optim import checkpoint
from lowmem.compress.optim import state as stored
from lowmem.compress.optim._common import (as_float, check_grad, check_hparams, local, named_trainable,
                                           param_groups_for, state_dtype_for)
from lowmem.compress.optim.backends import Backend, Bucket, BucketKey, StepScalars, Stored, choose_backend, kind_of
from lowmem.compress.optim.layout import Block, Layout, ShardedLayout, layout_of, mean_sq, reduce_v, sharded_layout
from lowmem.compress.optim.rounding import round_stochastic
from lowmem.compress.plan import Plan
from lowmem.layers import is_sharded
from lowmem.sharding import row_shards

BACKEND_CHOICES = ("reference", "foreach", "compiled", "native", "triton")
ROUNDINGS = ("nearest", "stochastic", "kahan")
STAGE_ENTRIES = 1 << 22   # parameter entries per staged bucket (its fp32 temporaries: 64 MiB)
STAGE = [f.name for f in fields(BucketKey)].index("stage")   # where `_key_fields` puts it


class ReducedAdamW(torch.optim.Optimizer):
    """AdamW whose second moment `v` is averaged over the dims a `Plan` gives per parameter.

    Args:
        model: the model whose trainable parameters are optimised (names and shapes come from it).
        plan: a `Plan` (validated against `model`), a path to ``plan.json``, or None for full
            AdamW on every parameter.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (decoupled weight decay).
        param_groups: torch-style groups (a list of parameters, or of dicts with ``"params"`` and
            per-group options); every parameter must belong to `model`. Default: one group.
        maximize: ascend instead of descend.
        foreach: as torch's flag: False asks for the readable reference backend (one tensor at a
            time), True or None for the fast default (``backend="native"``).
        compiled: ``backend="compiled"``: `torch.compile` of the update over lists of tensors
            (the first step of each new set of shapes compiles; see `backends.compiled_step`).
        backend: which backends to try, ``"native"`` (the default: on CPU a C kernel,
            `lowmem.compress.optim.native`, on CUDA Triton kernels, `lowmem.compress.optim.gpu`,
            then as ``"foreach"``), ``"triton"`` (the Triton kernels; on CPU tensors in Triton's
            interpreter where ``TRITON_INTERPRET=1``, for tests), ``"foreach"`` (torch ops only), ``"compiled"`` or
            ``"reference"`` (see `backends.PREFERENCE`; it overrides
            `foreach` and `compiled`); per group too. Tensors a backend cannot take (e.g. a
            sharded parameter in the native kernel) go to the next one.
        state_dtype: the compute dtype of the states (and their dtype in format ``fp32``);
            default fp32 (fp64 for fp64 parameters).
        state_format: how every parameter's states are stored (a `StateFormat`, or text such as
            ``"m=int8"`` or ``"m=bf16,v=bf16"``), overriding the plan's ``state`` entries;
            default: the plan's, fp32 where it says nothing. Quantized formats fall back to fp32
            where they do not apply (`lowmem.compress.formats.effective_format`).
        param_rounding: how bf16/fp16 parameters take their update: ``"nearest"``,
            ``"stochastic"`` or ``"kahan"`` (see the module docstring); per group too.
        rounding_seed: seed of the stochastic rounding's generators (the same on every rank).

    Raises:
        ValueError: a hyper-parameter out of range (the value is in the message), or a parameter
            group holding a tensor that is not a trainable parameter of `model`.
        PlanMismatchError: the plan was made for another model.
    """

    kind = "plan"

    def __init__(self, model: nn.Module, plan: Plan | str | None = None, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, param_groups: Iterable | None = None, maximize: bool = False, foreach: bool | None = None,
                 compiled: bool = False, backend: str | None = None, state_dtype: torch.dtype | None = None,
                 state_format: StateFormat | str | None = None, param_rounding: str = "nearest",
                 rounding_seed: int = 0):
        check_hparams(lr, betas, eps, weight_decay)
        _check_backend(backend)
        _check_rounding(param_rounding)
        if isinstance(state_format, str):
            state_format = StateFormat.parse(state_format)
        if state_format is not None and not isinstance(state_format, StateFormat):
            raise TypeError(f"state_format must be a StateFormat, text such as 'm=int8' or None, "
                            f"got {type(state_format).__name__}")
        if state_dtype is not None and not state_dtype.is_floating_point:
            raise ValueError(f"Invalid state_dtype: {state_dtype} (expected a floating-point dtype)")
        if isinstance(plan, (str, bytes)) or hasattr(plan, "__fspath__"):
            plan = Plan.load(plan)
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a lowmem Plan, a path to plan.json or None, got {type(plan).__name__}")
        if plan is not None:
            plan.validate(model)
        self.plan = plan
        self.state_dtype = state_dtype
        self.rounding_seed = int(rounding_seed)
        self._rngs: dict[str, torch.Generator] = {}   # stochastic rounding, per device
        names = named_trainable(model)
        groups = param_groups_for(model, param_groups)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, compiled=compiled, backend=backend, param_rounding=param_rounding)
        super().__init__(groups, defaults)
        for g in self.param_groups:   # per-group overrides are checked as eagerly as the defaults
            check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
            _check_backend(g["backend"])
            _check_rounding(g["param_rounding"])
        layers = plan.layers if plan is not None else {}
        # Keyed by the parameter tensor (as `self.state` is), so deepcopy keeps them consistent.
        self._names: dict[torch.Tensor, str] = {}
        self._layouts: dict[torch.Tensor, Layout] = {}
        self._sharded: dict[torch.Tensor, ShardedLayout] = {}   # FSDP2 parameters: this rank's share
        self._kinds: dict[torch.Tensor, str] = {}   # each parameter's BucketKey.kind (its layout's)
        self._formats: dict[torch.Tensor, StateFormat] = {}   # how its states are stored (effective)
        self._scratch: dict = {}   # small tensors backends keep across steps
        for g in self.param_groups:
            for p in g["params"]:
                name = names[id(p)]
                self._names[p] = name
                self._layouts[p] = layout_of(tuple(p.shape), layers.get(name))
                if is_sharded(p):
                    try:
                        self._sharded[p] = sharded_layout(self._layouts[p], tuple(p.shape), row_shards(p, name))
                    except ValueError as e:
                        raise ValueError(f"lowmem: {name}: {e}") from None
                self._kinds[p] = kind_of(self.layout_of(p), p)
                lp = layers.get(name)
                wanted = state_format or (lp.state_format if lp is not None else FULL)
                whole = not self._layouts[p].compressed and not self._layouts[p].flat
                self._formats[p] = effective_format(wanted, tuple(p.shape), whole)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            scalars = dict(lr=as_float(group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1],
                           eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"])
            preference = self._preference(group)
            for bucket in self._buckets(group):
                backend = choose_backend(bucket.key, preference)
                staged = bucket.stages and not backend.reads_stored
                if staged:
                    _load(bucket)
                backend.fn(bucket, StepScalars(**scalars, step=bucket.key.step))
                if staged:
                    _store(bucket)
        return loss

    def _buckets(self, group: dict) -> list[Bucket]:
        """The group's tensors with a gradient, checked, their state made and their step counted,
        sorted into buckets; a 0-element parameter only counts its step (as torch's AdamW)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            check_grad(p.grad, self._names[p], type(self).__name__)
            self._init_state(p)
        if params:
            torch._foreach_add_([self.state[p]["step"] for p in params], 1)
        params = [p for p in params if p.numel() > 0]
        buckets: dict[BucketKey, Bucket] = {}
        staged = {}   # (key without stage) -> [stage number, entries in it]
        facts = self.__dict__.setdefault("_facts", {})
        for p in params:
            fact = facts.get(p)
            if fact is None:   # what does not change between steps, in one lookup
                fact = facts[p] = (self._kinds[p], self._formats[p], self.layout_of(p), p in self._sharded)
            kind, fmt, layout, sharded = fact
            state = self.state[p]
            shard, grad = (local(p), local(p.grad)) if sharded else (p, p.grad)
            # (the key's fields as a tuple: a BucketKey is built once per bucket, not per tensor)
            key = self._key_fields(p, grad, int(state["step"].item()), group, fact)
            if key[STAGE]:   # staged buckets hold at most STAGE_ENTRIES entries (global counts: ranks agree)
                at = staged.setdefault(key, [1, 0])
                if at[1] and at[1] + p.numel() > STAGE_ENTRIES:
                    at[0], at[1] = at[0] + 1, 0
                at[1] += p.numel()
                key = key[:STAGE] + (at[0],) + key[STAGE + 1:]
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(BucketKey(*key), self.state_dtype_of(p), self._scratch)
            if key[STAGE]:
                b.stages.append(_Stage(p, shard, grad, state, fmt, layout, group["param_rounding"],
                                       self.rng(shard.device) if group["param_rounding"] == "stochastic" else None))
                continue
            b.params.append(shard)
            b.grads.append(grad)
            b.exp_avgs.append(local(state["exp_avg"]))
            b.exp_avg_sqs.append(local(state["exp_avg_sq"]))
            b.layouts.append(layout)
            b.steps.append(state["step"])
        return list(buckets.values())

    def _preference(self, group: dict) -> str:
        """Which backends the group asks for (`backends.PREFERENCE`): its ``backend``, else
        ``compiled`` / ``foreach=False`` as torch's flags say, else the fast default."""
        if group.get("backend") is not None:
            return group["backend"]
        if group.get("compiled"):
            return "compiled"
        if group.get("foreach") is False or torch.jit.is_scripting():
            return "reference"
        return "native"

    def backend_of(self, p: torch.Tensor) -> Backend:
        """The backend that steps `p` at its next step, with its gradient as it is now."""
        group = self._group_of(p)
        step = int(self.state[p]["step"].item()) + 1 if self.state.get(p) else 1
        return choose_backend(self._key(p, local(p.grad if p.grad is not None else p), step, group),
                              self._preference(group))

    def _key(self, p: torch.Tensor, grad: torch.Tensor, step: int, group: dict, fact: tuple | None = None) -> BucketKey:
        """The `BucketKey` of `p` with its (local) gradient `grad` at step count `step`. A staged
        parameter's (`format_of`, `param_rounding`) is keyed as its compute-dtype temporaries.
        `fact`: `_buckets`' (kind, format, layout, sharded) of `p`, when it has them."""
        return BucketKey(*self._key_fields(p, grad, step, group, fact))

    def _key_fields(self, p: torch.Tensor, grad: torch.Tensor, step: int, group: dict,
                    fact: tuple | None = None) -> tuple:
        """`_key`'s fields, in `BucketKey`'s order: (device, dtype, native, kind, step, stage, stored)."""
        if fact is None:
            fact = (self._kinds[p], self._formats[p], None, p in self._sharded)
        kind, fmt, _, sharded = fact
        shard = local(p) if sharded else p
        dtype = state_dtype_for(shard, self.state_dtype)
        if fmt.full and shard.dtype == dtype:
            return (shard.device, shard.dtype, _native(shard, grad, dtype, kind), kind, step, 0, None)
        contiguous = kind == "sharded" or (shard.is_contiguous() and grad.is_contiguous() and grad.dtype == shard.dtype)
        stored = Stored(fmt.m, fmt.v, shard.dtype, dtype, group["param_rounding"], contiguous)
        if not fmt.full or group["param_rounding"] != "nearest":
            return (shard.device, dtype, True, kind, step, 1, stored)
        # a low-precision parameter with its states in the compute dtype, rounded to nearest:
        # the reference backend steps it through a copy, the native one as it is
        return (shard.device, shard.dtype, False, kind, step, 0, stored)

    def rng(self, device: torch.device) -> torch.Generator:
        """The stochastic rounding's generator on `device` (seeded with `rounding_seed`)."""
        key = str(torch.device(device))
        if key not in self._rngs:
            self._rngs[key] = torch.Generator(device=device).manual_seed(self.rounding_seed)
        return self._rngs[key]

    def format_of(self, p: torch.Tensor) -> StateFormat:
        """How `p`'s states are stored (after the fallbacks of `effective_format`)."""
        return self._formats[p]

    def layout_of(self, p: torch.Tensor) -> Layout | ShardedLayout:
        """How `p`'s `v` is kept on this rank: its plan `Layout`, or this rank's `ShardedLayout`."""
        return self._sharded.get(p) or self._layouts[p]

    def state_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        return state_dtype_for(p, self.state_dtype)

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        dtype, fmt, shard = self.state_dtype_of(p), self._formats[p], local(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        lay = self._sharded.get(p)
        v_shape = (tuple(shard.shape) if lay.like_param else (lay.v_size,)) if lay else self._layouts[p].v_shape
        rows_like = stored.allocate("m", fmt.m, shard.shape, dtype, shard.device)
        v = stored.allocate("v", fmt.v, v_shape, dtype, shard.device)
        if self.keeps_kahan(p):
            rows_like["kahan_comp"] = torch.zeros_like(shard)
        if lay is not None:   # DTensors sharded like the parameter (a flat compressed v stays local)
            rows_like = {k: _sharded_like(t, p) for k, t in rows_like.items()}
            if lay.like_param:
                v = {k: _sharded_like(t, p) for k, t in v.items()}
        state.update(rows_like)
        state.update(v)

    def keeps_kahan(self, p: torch.Tensor) -> bool:
        """Whether `p` keeps a Kahan buffer: a parameter below the compute dtype in a group that
        rounds with ``"kahan"``."""
        return local(p).dtype != self.state_dtype_of(p) and self._group_of(p)["param_rounding"] == "kahan"

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults, state and groups; the plan and layouts travel too.
        extra = ("plan", "state_dtype", "variant", "_names", "_layouts", "_sharded", "_kinds", "_formats",
                 "rounding_seed", "_rngs")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in extra if k in self.__dict__}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})
        self.__dict__.setdefault("_rngs", {})
        self.__dict__.setdefault("rounding_seed", 0)

    # -- checkpoints (`checkpoint`) -----------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's state dict plus ``"lowmem"``: the optimizer, parameter names in group order and
        the plan, as plain data (survives ``torch.load(weights_only=True)``).

        For row-sharded (FSDP2) parameters ``exp_avg`` stays a DTensor and a compressed
        ``exp_avg_sq`` is the whole single-process one, the same on every rank (gathered: every
        rank must call this). So `torch.distributed.checkpoint` saves correct state, and the
        checkpoint loads on any number of ranks."""
        return checkpoint.state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer, of another lowmem plan optimizer made under the
        same plan, or of `torch.optim.AdamW` (full ``exp_avg_sq`` is then averaged per plan).

        States take this optimizer's state dtype (fp32 for bf16/fp16 parameters, so a bf16
        AdamW checkpoint steps here; fp32 `v` of bf16 parameters survives) and are copied, never
        shared with the dict loaded. Everything is checked before anything is loaded: a refused
        checkpoint leaves the optimizer as it was.

        Raises:
            TypeError: `state_dict` is not a dict.
            ValueError: an entry is missing or malformed (another optimizer's checkpoint, a
                ``step`` that is not a count, a state of the wrong shape), named in the message.
            PlanError (a ValueError): the checkpoint was made under another plan.
        """
        checkpoint.load_state_dict(self, state_dict)

    def adamw_state_dict(self) -> dict:
        """This optimizer's state as `torch.optim.AdamW` keeps it, to load into AdamW: ``exp_avg``
        decoded, each kept `v` entry spread over the entries it averages, both in the parameter's
        dtype (as AdamW keeps them); hyper-parameters and steps as here. Collective for sharded
        parameters (their states are gathered whole)."""
        return checkpoint.adamw_state_dict(self)

    def __repr__(self) -> str:
        src = self.plan.source if self.plan is not None else {"method": "none (full AdamW)"}
        what = src.get("preset") or src.get("method", "?")
        n = sum(len(g["params"]) for g in self.param_groups)
        g0 = self.param_groups[0]
        kept = sum(lay.blocks and sum(b.kept for b in lay.blocks) for lay in self._layouts.values())
        full = sum(p.numel() for p in self._layouts)
        return (f"{type(self).__name__}(plan={what!r}, params={n}, v kept {kept:,} of {full:,}, "
                f"lr={g0['lr']}, betas={g0['betas']}, eps={g0['eps']}, weight_decay={g0['weight_decay']})")


def _native(shard: torch.Tensor, grad: torch.Tensor, state_dtype: torch.dtype, kind: str) -> bool:
    """`BucketKey.native`: the parameter is in the state dtype and, unless sharded, it and its
    gradient are contiguous. (A shard's bucket must not depend on what one rank sees alone: each
    sharded bucket takes one collective, and every rank must join the same ones.)"""
    return shard.dtype == state_dtype and (kind == "sharded" or shard.is_contiguous() and grad.is_contiguous())


@dataclass
class _Stage:
    """A staged parameter of a bucket (see the module docstring): what `_load` decodes into the
    bucket's lists and `_store` writes back."""

    param: torch.Tensor
    shard: torch.Tensor
    grad: torch.Tensor
    state: dict
    fmt: StateFormat
    layout: Layout | ShardedLayout
    rounding: str
    generator: torch.Generator | None = None
    temps: tuple | None = None


def _load(b: Bucket) -> None:
    """Fill a staged bucket's lists with compute-dtype temporaries of its parameters."""
    dtype = b.state_dtype
    for st in b.stages:
        local_state = {k: local(t) for k, t in st.state.items() if isinstance(t, torch.Tensor)}
        shard = st.shard
        if shard.dtype == dtype and shard.is_contiguous():
            param = shard                                   # steps in place
        else:
            param = shard.to(dtype=dtype, copy=True).contiguous()
            if st.rounding == "kahan" and "kahan_comp" in local_state:
                param.add_(local_state["kahan_comp"])
        v_stored = local_state["exp_avg_sq"]
        v_shape = shard.shape if st.fmt.v in QUANTIZED else v_stored.shape   # quantized v: kept whole
        m = stored.decode("m", st.fmt.m, local_state, shard.shape, dtype)
        v = stored.decode("v", st.fmt.v, local_state, v_shape, dtype)
        st.temps = (param, m, v, local_state)
        b.params.append(param)
        b.grads.append(st.grad.to(dtype).contiguous())   # (`.to` keeps a same-dtype tensor's strides)
        b.exp_avgs.append(m)
        b.exp_avg_sqs.append(v)
        b.layouts.append(st.layout)
        b.steps.append(st.state["step"])


def _store(b: Bucket) -> None:
    """Encode a staged bucket's temporaries back into their formats and parameters."""
    for st in b.stages:
        param, m, v, local_state = st.temps
        stored.encode_("m", st.fmt.m, m, local_state)
        stored.encode_("v", st.fmt.v, v, local_state)
        if param is not st.shard:
            if st.rounding == "stochastic":
                st.shard.copy_(round_stochastic(param, st.shard.dtype, st.generator))
            else:
                st.shard.copy_(param)
                if st.rounding == "kahan" and "kahan_comp" in local_state:   # what rounding lost
                    local_state["kahan_comp"].copy_(param.sub_(st.shard.to(param.dtype)))
        st.temps = None
    b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.layouts, b.steps = [], [], [], [], [], []


def _sharded_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A local tensor whose dim 0 is `p`'s local rows as a DTensor sharded like `p`."""
    from torch.distributed.tensor import DTensor

    shape = (p.shape[0], *t.shape[1:])
    # a contiguous tensor's strides do not depend on its dim 0: the local ones are the global ones
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=shape, stride=t.stride())


def _check_rounding(rounding: Any) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"Invalid param_rounding: {rounding!r} (expected one of {', '.join(map(repr, ROUNDINGS))})")


def _check_backend(backend: Any) -> None:
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(map(repr, BACKEND_CHOICES))} "
                         "or None)")


__all__ = ["BACKEND_CHOICES", "ROUNDINGS", "STAGE_ENTRIES", "Block", "Layout", "ReducedAdamW", "layout_of", "mean_sq", "reduce_v"]
