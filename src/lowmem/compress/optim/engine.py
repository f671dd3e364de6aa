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
  fused, compiled) and `choose_backend`, which alone decides which runs
  (`ReducedAdamW.backend_of` answers it for one parameter);

and `checkpoint` reads and writes state dicts.

State keys are AdamW's: ``step`` (a float32 scalar tensor), ``exp_avg`` (full, like the
parameter) and ``exp_avg_sq`` (the kept entries: the view's shape with reduced dims of size 1;
the parameter's shape where nothing is reduced; a flat vector of every part's kept entries for
a parameter with parts). States are fp32 for bf16/fp16 parameters and fp64 for fp64 ones. On a
row-sharded parameter ``exp_avg`` is a DTensor like the parameter and a compressed
``exp_avg_sq`` a flat tensor of this rank's kept entries; `state_dict` gathers it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowmem.compress.optim import checkpoint
from lowmem.compress.optim._common import (as_float, check_grad, check_hparams, local, named_trainable,
                                           param_groups_for, state_dtype_for)
from lowmem.compress.optim.backends import Backend, Bucket, BucketKey, StepScalars, choose_backend, kind_of
from lowmem.compress.optim.layout import Block, Layout, ShardedLayout, layout_of, mean_sq, reduce_v, sharded_layout
from lowmem.compress.plan import Plan
from lowmem.layers import is_sharded
from lowmem.sharding import row_shards

BACKEND_CHOICES = ("reference", "foreach", "compiled")


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
            time), True or None for the fast default (``backend="foreach"``).
        compiled: ``backend="compiled"``: `torch.compile` of the update over lists of tensors
            (the first step of each new set of shapes compiles; see `backends.compiled_step`).
        backend: which backends to try, ``"reference"``, ``"foreach"`` or ``"compiled"`` (see
            `backends.PREFERENCE`; it overrides `foreach` and `compiled`); per group too. Tensors
            a backend cannot take (e.g. bf16 parameters with fp32 state) go to the next one.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``; default fp32 (fp64 for fp64 parameters).

    Raises:
        ValueError: a hyper-parameter out of range (the value is in the message), or a parameter
            group holding a tensor that is not a trainable parameter of `model`.
        PlanMismatchError: the plan was made for another model.
    """

    kind = "plan"

    def __init__(self, model: nn.Module, plan: Plan | str | None = None, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, param_groups: Iterable | None = None, maximize: bool = False, foreach: bool | None = None,
                 compiled: bool = False, backend: str | None = None, state_dtype: torch.dtype | None = None):
        check_hparams(lr, betas, eps, weight_decay)
        _check_backend(backend)
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
        names = named_trainable(model)
        groups = param_groups_for(model, param_groups)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, compiled=compiled, backend=backend)
        super().__init__(groups, defaults)
        for g in self.param_groups:   # per-group overrides are checked as eagerly as the defaults
            check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
            _check_backend(g["backend"])
        layers = plan.layers if plan is not None else {}
        # Keyed by the parameter tensor (as `self.state` is), so deepcopy keeps them consistent.
        self._names: dict[torch.Tensor, str] = {}
        self._layouts: dict[torch.Tensor, Layout] = {}
        self._sharded: dict[torch.Tensor, ShardedLayout] = {}   # FSDP2 parameters: this rank's share
        self._kinds: dict[torch.Tensor, str] = {}   # each parameter's BucketKey.kind (its layout's)
        self._scratch: dict = {}   # small tensors backends keep across steps
        for g in self.param_groups:
            for p in g["params"]:
                name = names[id(p)]
                self._names[p] = name
                self._layouts[p] = layout_of(tuple(p.shape), layers.get(name))
                if is_sharded(p):
                    self._sharded[p] = sharded_layout(self._layouts[p], tuple(p.shape), row_shards(p, name))
                self._kinds[p] = kind_of(self.layout_of(p), p)

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
                choose_backend(bucket.key, preference).fn(bucket, StepScalars(**scalars, step=bucket.key.step))
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
        grads = [local(p.grad) for p in params]
        buckets: dict[BucketKey, Bucket] = {}
        for p, grad in zip(params, grads):
            state, shard, layout = self.state[p], local(p), self.layout_of(p)
            key = self._key(p, grad, int(state["step"].item()))
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(key, self.state_dtype_of(p), self._scratch)
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
        return "foreach"

    def backend_of(self, p: torch.Tensor) -> Backend:
        """The backend that steps `p` at its next step, with its gradient as it is now."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        step = int(self.state[p]["step"].item()) + 1 if self.state.get(p) else 1
        return choose_backend(self._key(p, local(p.grad if p.grad is not None else p), step), self._preference(group))

    def _key(self, p: torch.Tensor, grad: torch.Tensor, step: int) -> BucketKey:
        """The `BucketKey` of `p` with its (local) gradient `grad` at step count `step`."""
        shard, kind = local(p), self._kinds[p]
        return BucketKey(shard.device, shard.dtype, _native(shard, grad, self.state_dtype_of(p), kind), kind, step)

    def layout_of(self, p: torch.Tensor) -> Layout | ShardedLayout:
        """How `p`'s `v` is kept on this rank: its plan `Layout`, or this rank's `ShardedLayout`."""
        return self._sharded.get(p) or self._layouts[p]

    def state_dtype_of(self, p: torch.Tensor) -> torch.dtype:
        return state_dtype_for(p, self.state_dtype)

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        dtype = self.state_dtype_of(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        lay = self._sharded.get(p)
        if lay is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)      # a DTensor sharded like the parameter
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype) if lay.like_param else \
                torch.zeros(lay.v_size, dtype=dtype, device=local(p).device)
            return
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(self._layouts[p].v_shape, dtype=dtype, device=p.device)

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults, state and groups; the plan and layouts travel too.
        extra = ("plan", "state_dtype", "variant", "_names", "_layouts", "_sharded", "_kinds")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in extra if k in self.__dict__}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_scratch", {})

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


def _check_backend(backend: Any) -> None:
    if backend is not None and backend not in BACKEND_CHOICES:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(map(repr, BACKEND_CHOICES))} "
                         "or None)")


__all__ = ["BACKEND_CHOICES", "Block", "Layout", "ReducedAdamW", "layout_of", "mean_sq", "reduce_v"]
