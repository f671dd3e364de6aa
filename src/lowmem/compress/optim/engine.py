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

Paths, chosen by `_choose_path` as torch chooses between its kernels: the readable single-tensor
path (``foreach=False``), a foreach path (the default) that batches the element-wise work over
tensors of one device and dtype and computes every reduction along the contiguous axis without
full-size temporaries, and an opt-in ``compiled=True`` path (`torch.compile` of the per-tensor
update; one fused kernel per tensor on CUDA and on CPU). Tests prove each equals the readable one.

State keys are AdamW's: ``step`` (a float32 scalar tensor), ``exp_avg`` (full, like the
parameter) and ``exp_avg_sq`` (the kept entries: the view's shape with reduced dims of size 1;
the parameter's shape where nothing is reduced; a flat vector of every part's kept entries for
a parameter with parts). States are fp32 for bf16/fp16 parameters and fp64 for fp64 ones.

Row-sharded (FSDP2) parameters take `_sharded_step` on each rank's rows (`lowmem.sharding`):
a mean whose slices a shard holds whole stays on its rank, the others are all-reduced partial
sums, one collective per step for all of them. There ``exp_avg`` is a DTensor like the
parameter and a compressed ``exp_avg_sq`` a flat tensor of this rank's kept entries
(`ShardedLayout`); `state_dict` gathers it into the single-process ``exp_avg_sq``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowmem.compress.optim._common import (StateSpec, as_float, check_grad, check_hparams, check_state_dict,
                                           load_groups, local, named_trainable, param_groups_for, state_dtype_for,
                                           step_tensor)
from lowmem.compress.plan import LayerPlan, PartPlan, Plan, PlanError
from lowmem.layers import is_sharded, normalize_name
from lowmem.sharding import RowShards, ShardedRegion, all_reduce_by_group, local_region, region_range, row_shards, \
    sharded_region

# Row chunks of at most this many bytes when squaring for a reduction that keeps the last dim:
# large enough that per-chunk dispatch is amortised (256 KiB chunks made SlimAdam's column
# reductions of 2048 x 2048 fp32 matrices 1.7x slower on CPU), small enough to stay in cache.
_CHUNK_BYTES = 1 << 21


@dataclass(frozen=True)
class Block:
    """A region of a parameter with one reduction of `v`.

    Attributes:
        view: the region's shape after reshaping.
        reduce: dims of `view` averaged over, or None (full Adam).
        dim, start, stop: the slice of the raw tensor (parts only; `dim` is None for the whole tensor).
        offset: where the region's kept entries start in a flat ``exp_avg_sq`` (parts only).
    """

    view: tuple[int, ...]
    reduce: tuple[int, ...] | None
    dim: int | None = None
    start: int = 0
    stop: int = 0
    offset: int = 0

    @property
    def kept_shape(self) -> tuple[int, ...]:
        if self.reduce is None:
            return self.view
        return tuple(1 if d in self.reduce else s for d, s in enumerate(self.view))

    @property
    def kept(self) -> int:
        return math.prod(self.kept_shape)

    def narrow(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.dim is None else t.narrow(self.dim, self.start, self.stop - self.start)

    def region(self, t: torch.Tensor) -> torch.Tensor:
        """The block's entries of a parameter-shaped tensor, in view shape (a copy if not viewable)."""
        return self.narrow(t).reshape(self.view)


@dataclass(frozen=True)
class Layout:
    """How one parameter's `v` is kept: its blocks and the shape of ``exp_avg_sq``."""

    blocks: tuple[Block, ...]
    v_shape: tuple[int, ...]
    flat: bool

    @property
    def compressed(self) -> bool:
        return any(b.reduce is not None for b in self.blocks)

    def v_region(self, exp_avg_sq: torch.Tensor, block: Block) -> torch.Tensor:
        if self.flat:
            return exp_avg_sq[block.offset:block.offset + block.kept].view(block.kept_shape)
        return exp_avg_sq.view(block.kept_shape)


def layout_of(shape: tuple[int, ...], lp: LayerPlan | None) -> Layout:
    """The `Layout` a plan entry gives a parameter of `shape` (None: full Adam)."""
    shape = tuple(shape)
    if lp is None or (not lp.parts and not lp.reduce):   # reduce [] averages over nothing: full Adam
        return Layout((Block(shape, None),), shape, False)
    if not lp.parts:
        block = Block(tuple(lp.view), tuple(sorted(lp.reduce)))
        return Layout((block,), block.kept_shape, False)
    blocks, offset = [], 0
    for part in sorted(lp.parts, key=lambda p: p.start):
        b = Block(tuple(part.view), tuple(sorted(part.reduce)) if part.reduce else None,
                  part.dim, part.start, part.stop, offset)
        blocks.append(b)
        offset += b.kept
    return Layout(tuple(blocks), (offset,), True)


@dataclass(frozen=True)
class ShardedBlock:
    """A block of a row-sharded (FSDP2) parameter as this rank keeps it.

    Attributes:
        block: the block of the parameter's `Layout`.
        region: this rank's share of the block's reduction, or None for full Adam.
        offset: where this rank's `v` entries of the block start in its flat ``exp_avg_sq``.
        span: which of the block's kept entries they are: the region's local entries (full
            Adam), the local range of the kept entries (a reduction that stays on the rank), or
            None for every kept entry, the same on all ranks (a reduction across ranks).
        rows: this rank's rows of the parameter.
    """

    block: Block
    region: ShardedRegion | None
    offset: int
    span: tuple[int, int] | None
    rows: tuple[int, int]

    @property
    def size(self) -> int:
        return self.block.kept if self.span is None else self.span[1] - self.span[0]

    def entries(self, shard: torch.Tensor) -> torch.Tensor:
        """This rank's entries of the block from its shard of a parameter-shaped tensor."""
        b = self.block
        return local_region(shard, self.rows, b.dim, b.start, b.stop)


@dataclass(frozen=True)
class ShardedLayout:
    """How this rank keeps `v` for a row-sharded parameter (see `lowmem.sharding`): a DTensor
    like the parameter when it keeps full Adam, else a flat local tensor of `v_size` entries."""

    shards: RowShards
    blocks: tuple[ShardedBlock, ...]
    v_size: int
    like_param: bool

    def gather(self, layout: Layout, v: torch.Tensor) -> torch.Tensor:
        """This rank's contribution to the whole flat `v` of `layout` (the single-process
        ``exp_avg_sq``, flattened): its own entries in place and zeros elsewhere, the entries that
        every rank keeps from the group's first rank only; summed over the ranks it is `v`."""
        whole = torch.zeros(math.prod(layout.v_shape), dtype=v.dtype, device=v.device)
        for sb in self.blocks:
            if sb.span is not None or self.shards.rank == 0:
                i, j = sb.span or (0, sb.block.kept)
                whole[sb.block.offset + i:sb.block.offset + j] = v[sb.offset:sb.offset + sb.size]
        return whole

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's flat `v` from the whole one (`gather`'s inverse)."""
        flat = whole.reshape(-1)
        return torch.cat([flat[sb.block.offset + i:sb.block.offset + j]
                          for sb in self.blocks for i, j in [sb.span or (0, sb.block.kept)]])


def sharded_layout(layout: Layout, shape: tuple[int, ...], shards: RowShards) -> ShardedLayout:
    """This rank's `ShardedLayout` of a parameter of `shape` kept as `layout`."""
    blocks, offset = [], 0
    for b in layout.blocks:
        if b.reduce is None:
            region, span = None, region_range(shape, shards.rows, b.dim, b.start, b.stop)
        else:
            region = sharded_region(shards, shape, b.view, b.reduce, b.dim, b.start, b.stop)
            span = region.local_kept if region.is_local else None
        blocks.append(ShardedBlock(b, region, offset, span, shards.rows))
        offset += blocks[-1].size
    return ShardedLayout(shards, tuple(blocks), offset, not layout.flat and not layout.compressed)


def sharded_means(items: list[tuple[ShardedLayout, torch.Tensor]], square: bool) -> list[list[torch.Tensor | None]]:
    """For each (layout, local shard of a parameter-shaped tensor x), the mean of x² (or x) over
    each block's reduce dims: this rank's `v` entries of the block, flat (None for full-Adam
    blocks). Reductions across ranks are all-reduced as partial sums, one collective per process
    group and dtype."""
    out: list[list[torch.Tensor | None]] = []
    spread: list[tuple[torch.Tensor, object]] = []
    for lay, x in items:
        means = []
        for sb in lay.blocks:
            r = sb.region
            if r is None:
                means.append(None)
                continue
            xr = sb.entries(x).reshape(-1)
            if r.is_local:
                xr = xr.view(r.local_shape)
                means.append((xr * xr if square else xr).mean(dim=r.local_reduce).reshape(-1))
                continue
            sums = torch.zeros(r.kept_shape, dtype=x.dtype, device=x.device)
            for box in r.boxes:
                xb = r.piece(xr, box)
                sums[box.kept_index(r.reduce)] += (xb * xb if square else xb).sum(dim=r.reduce, keepdim=True)
            means.append(sums)
            spread.append((sums, lay.shards.group))
        out.append(means)
    all_reduce_by_group(spread)
    for (lay, _), means in zip(items, out):
        for i, (sb, m) in enumerate(zip(lay.blocks, means)):
            if m is not None and not sb.region.is_local:
                means[i] = m.div_(sb.region.count).reshape(-1)
    return out


def mean_sq(x: torch.Tensor, reduce: tuple[int, ...]) -> torch.Tensor:
    """``(x * x).mean(reduce, keepdim=True)`` computed along the contiguous axis, without a
    full-size temporary: trailing reductions through `vector_norm`, reductions that keep the last
    dim by squaring row chunks of bounded size. Other layouts fall back to the plain formula."""
    n = math.prod(x.shape[d] for d in reduce)
    kept_shape = tuple(1 if d in reduce else s for d, s in enumerate(x.shape))
    k = x.dim() - len(reduce)
    if x.is_contiguous() and tuple(reduce) == tuple(range(k, x.dim())):
        norm = torch.linalg.vector_norm(x.view(*x.shape[:k], -1), 2, dim=-1)
        return norm.square_().div_(n).view(kept_shape)
    if x.is_contiguous() and x.dim() >= 2 and x.dim() - 1 not in reduce:
        rows = max(1, _CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))
        if tuple(reduce) == (0,) and x.device.type == "cpu":
            # Leading dim only (column means): accumulate squares of row chunks in a chunk-sized
            # buffer with addcmul_ (no temporary per chunk), then sum the buffer once.
            acc = torch.zeros_like(x[:min(rows, x.shape[0])])
            for c in x.split(acc.shape[0], dim=0):
                acc[:c.shape[0]].addcmul_(c, c)
            return acc.sum(dim=0, keepdim=True).div_(n)
        if 0 in reduce:
            acc = torch.zeros(kept_shape, dtype=x.dtype, device=x.device)
            for c in x.split(rows, dim=0):
                acc.add_((c * c).sum(dim=reduce, keepdim=True))
            return acc.div_(n)
        out = torch.empty(kept_shape, dtype=x.dtype, device=x.device)
        for i, c in enumerate(x.split(rows, dim=0)):
            out[i * rows:i * rows + c.shape[0]] = (c * c).sum(dim=reduce, keepdim=True).div_(n)
        return out
    return (x * x).mean(dim=reduce, keepdim=True)


def _add_update(target: torch.Tensor, block: Block, m: torch.Tensor, denom: torch.Tensor, value: float) -> None:
    """``target[block] += value · m[block] / denom``, in place on the parameter."""
    region = block.narrow(target)
    try:
        region_view = region.view(block.view)
    except RuntimeError:   # a non-contiguous parameter whose view needs a copy: update through one
        region.add_((block.region(m) / denom).mul_(value).reshape(region.shape))
        return
    region_view.addcdiv_(block.region(m), denom, value=value)


def _add_sharded_update(param: torch.Tensor, sb: ShardedBlock, m: torch.Tensor, denom: torch.Tensor,
                        value: float) -> None:
    """``param[block] += value · m[block] / denom`` on this rank's shard of a sharded block;
    `denom` is flat: the block's local `v` entries."""
    target = sb.entries(param)
    work = target if target.is_contiguous() else target.contiguous()
    flat, mr, r = work.view(-1), sb.entries(m).reshape(-1), sb.region
    if r is None:
        flat.addcdiv_(mr, denom, value=value)
    elif r.is_local:
        flat.view(r.local_shape).addcdiv_(mr.view(r.local_shape), denom.view(r.local_kept_shape), value=value)
    else:
        denom = denom.view(r.kept_shape)
        for box in r.boxes:
            r.piece(flat, box).addcdiv_(r.piece(mr, box), denom[box.kept_index(r.reduce)], value=value)
    if work is not target:
        target.copy_(work)


def _compiled_update(param, grad, exp_avg, exp_avg_sq, lr, weight_decay, beta1, beta2, eps, bc1, bc2_sqrt,
                     dim: int | None):
    """The whole step of one tensor in canonical form, for `torch.compile` to fuse into one kernel:
    `param` 1-D with `exp_avg_sq` full (``dim`` None) or one value (``dim`` 0), or 2-D with `v`
    averaged over ``dim``. Scalars are 0-dim tensors, so a new step does not recompile."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad * (1 - beta1))
    if dim is None:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).add_((grad * grad).mean(dim=dim, keepdim=True) * (1 - beta2))
    denom = exp_avg_sq.sqrt() / bc2_sqrt + eps
    param.sub_(exp_avg / denom * (lr / bc1))


def _canonical(block: Block) -> tuple[tuple[int, ...], tuple[int, ...], int | None] | None:
    """(shape, v shape, dim) of the block as a 1-D or 2-D problem, or None when its reduce dims
    are neither leading nor trailing. Few canonical forms keep `torch.compile` to few graphs."""
    view, reduce = block.view, block.reduce
    n = math.prod(view)
    if reduce is None:
        return (n,), (n,), None
    if len(reduce) == len(view):
        return (n,), (1,), 0
    k = len(view) - len(reduce)
    if reduce == tuple(range(k, len(view))):
        rows = math.prod(view[:k])
        return (rows, n // rows), (rows, 1), 1
    if reduce == tuple(range(len(reduce))):
        rows = math.prod(view[:len(reduce)])
        return (rows, n // rows), (1, n // rows), 0
    return None


_compiled_fn: Callable | None = None


def _compiled() -> Callable:
    global _compiled_fn
    if _compiled_fn is None:
        _compiled_fn = torch.compile(_compiled_update, dynamic=True, fullgraph=True)
    return _compiled_fn


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
        foreach: True for the batched fast path, False for the readable single-tensor path,
            None to choose (the fast path).
        compiled: use `torch.compile` for each single-block tensor's update (first steps compile).
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
                 compiled: bool = False, state_dtype: torch.dtype | None = None):
        check_hparams(lr, betas, eps, weight_decay)
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
                        foreach=foreach, compiled=compiled)
        super().__init__(groups, defaults)
        for g in self.param_groups:   # per-group overrides are checked as eagerly as the defaults
            check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
        layers = plan.layers if plan is not None else {}
        # Keyed by the parameter tensor (as `self.state` is), so deepcopy keeps them consistent.
        self._names: dict[torch.Tensor, str] = {}
        self._layouts: dict[torch.Tensor, Layout] = {}
        self._sharded: dict[torch.Tensor, ShardedLayout] = {}   # FSDP2 parameters: this rank's share
        for g in self.param_groups:
            for p in g["params"]:
                name = names[id(p)]
                self._names[p] = name
                self._layouts[p] = layout_of(tuple(p.shape), layers.get(name))
                if is_sharded(p):
                    self._sharded[p] = sharded_layout(self._layouts[p], tuple(p.shape), row_shards(p, name))

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            work = [p for p in group["params"] if p.grad is not None]
            for p in work:
                check_grad(p.grad, self._names[p], type(self).__name__)
                self._init_state(p)
                if p.numel() == 0:   # nothing to update; its step counts, as in torch's AdamW
                    self.state[p]["step"] += 1
            work = [p for p in work if p.numel() > 0]
            if not work:
                continue
            sharded = [p for p in work if p in self._sharded]
            if sharded:
                self._sharded_step(sharded, group)
            work = [p for p in work if p not in self._sharded]
            if not work:
                continue
            path = _choose_path(group, work, self)
            if path == "single":
                for p in work:
                    self._single_tensor_step(p, group)
            elif path == "compiled":
                self._compiled_step(work, group)
            else:
                self._foreach_step(work, group)
        return loss

    def _dtype(self, p: torch.Tensor) -> torch.dtype:
        return state_dtype_for(p, self.state_dtype)

    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        if state:
            return
        dtype = self._dtype(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        lay = self._sharded.get(p)
        if lay is not None:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)      # a DTensor sharded like the parameter
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype) if lay.like_param else \
                torch.zeros(lay.v_size, dtype=dtype, device=local(p).device)
            return
        state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(self._layouts[p].v_shape, dtype=dtype, device=p.device)

    def _single_tensor_step(self, p: torch.Tensor, group: dict) -> None:
        """The readable reference path: one tensor at a time, in AdamW's order of operations."""
        state, layout = self.state[p], self._layouts[p]
        lr, (beta1, beta2), eps, wd = as_float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        dtype = self._dtype(p)
        grad = p.grad.to(dtype)
        if group["maximize"]:
            grad = -grad
        param = p if p.dtype == dtype else p.detach().to(dtype)   # low-precision params: via a state-dtype copy
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        state["step"] += 1
        step = state["step"].item()
        param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        step_size = lr / bias_correction1
        for block in layout.blocks:
            g = block.region(grad)
            v = layout.v_region(exp_avg_sq, block)
            if block.reduce is None:
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            else:
                v.mul_(beta2).add_((g * g).mean(dim=block.reduce, keepdim=True), alpha=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            _add_update(param, block, exp_avg, denom, -step_size)
        if param is not p:
            p.copy_(param)

    def _sharded_step(self, params: list[torch.Tensor], group: dict) -> None:
        """The step of row-sharded (FSDP2) parameters on each rank's shard, in the readable path's
        order of operations; the means of g² across ranks take one all-reduce for all of them."""
        lr, (beta1, beta2), eps, wd = as_float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        work = []
        for p in params:
            state, dtype = self.state[p], self._dtype(p)
            grad = local(p.grad).to(dtype)
            if group["maximize"]:
                grad = -grad
            shard = local(p)
            param = shard if shard.dtype == dtype else shard.detach().to(dtype)
            state["step"] += 1
            param.mul_(1 - lr * wd)
            local(state["exp_avg"]).lerp_(grad, 1 - beta1)
            work.append((p, shard, param, grad))
        means = sharded_means([(self._sharded[p], grad) for p, _, _, grad in work], square=True)
        for (p, shard, param, grad), block_means in zip(work, means):
            state, lay = self.state[p], self._sharded[p]
            step = state["step"].item()
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            step_size = lr / (1 - beta1 ** step)
            m, v_all = local(state["exp_avg"]), local(state["exp_avg_sq"]).view(-1)
            for sb, mean in zip(lay.blocks, block_means):
                v = v_all[sb.offset:sb.offset + sb.size]
                if mean is None:
                    g = sb.entries(grad).reshape(-1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                else:
                    v.mul_(beta2).add_(mean, alpha=1 - beta2)
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
                _add_sharded_update(param, sb, m, denom, -step_size)
            if param is not shard:
                shard.copy_(param)

    def _foreach_step(self, params: list[torch.Tensor], group: dict) -> None:
        """The fast path: element-wise work batched with `torch._foreach_*` over tensors of one
        device and dtype, reductions along the contiguous axis (`mean_sq`). Tensors it cannot
        take (low-precision or non-contiguous parameters) go through the readable path."""
        fast: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.dtype == self._dtype(p) and p.is_contiguous() and p.grad.is_contiguous():
                fast.setdefault((p.device, p.dtype), []).append(p)
            else:
                self._single_tensor_step(p, group)
        lr, (beta1, beta2), eps, wd = as_float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        for (device, _), ps in fast.items():
            if device.type == "cpu":
                # Tensors that keep full Adam take torch's fused AdamW kernel: on CPU it is one
                # vectorised pass, several times faster than per-op work (it reads the step from
                # a CPU tensor, so on CUDA, where steps stay on the host, the batched path is used).
                full = [p for p in ps if not self._layouts[p].compressed]
                if full:
                    self._fused_adamw(full, group)
                    ps = [p for p in ps if self._layouts[p].compressed]
                if not ps:
                    continue
            states = [self.state[p] for p in ps]
            grads = [p.grad for p in ps]
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            exp_avgs = [s["exp_avg"] for s in states]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            if wd != 0:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            # One entry per block: its v, grad region, param region, m region, step size, bc2.
            full_v, full_g, red_v, red_sq = [], [], [], []
            blocks = []
            for p, s, g in zip(ps, states, grads):
                layout = self._layouts[p]
                step = s["step"].item()
                step_size = lr / (1 - beta1 ** step)
                bc2_sqrt = (1 - beta2 ** step) ** 0.5
                for block in layout.blocks:
                    v = layout.v_region(s["exp_avg_sq"], block)
                    gb = block.region(g)
                    if block.reduce is None:
                        full_v.append(v)
                        full_g.append(gb)
                    else:
                        red_v.append(v)
                        red_sq.append(mean_sq(gb, block.reduce))
                    blocks.append((p, block, s["exp_avg"], v, step_size, bc2_sqrt))
            if full_v:
                torch._foreach_mul_(full_v, beta2)
                torch._foreach_addcmul_(full_v, full_g, full_g, value=1 - beta2)
            if red_v:
                torch._foreach_mul_(red_v, beta2)
                torch._foreach_add_(red_v, red_sq, alpha=1 - beta2)
            denoms = torch._foreach_sqrt([b[3] for b in blocks])
            torch._foreach_div_(denoms, [b[5] for b in blocks])
            torch._foreach_add_(denoms, eps)
            for (p, block, m, _, step_size, _), denom in zip(blocks, denoms):
                _add_update(p, block, m, denom, -step_size)

    def _fused_adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """Full-Adam tensors through `torch._fused_adamw_` (the kernel of ``AdamW(fused=True)``)."""
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                            lr=as_float(group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1],
                            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                            grad_scale=None, found_inf=None)

    def _compiled_step(self, params: list[torch.Tensor], group: dict) -> None:
        """`torch.compile`d update of single-block contiguous tensors in the state dtype whose
        reduction is leading or trailing (`_canonical`); the others take the foreach path."""
        rest = []
        lr, (beta1, beta2), eps, wd = as_float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        fn = _compiled()
        for p in params:
            layout = self._layouts[p]
            form = None if layout.flat else _canonical(layout.blocks[0])
            # 0-dim tensors stay eager: their in-place update is lost in the compiled graph (torch 2.13).
            if (form is None or p.dim() == 0 or p.dtype != self._dtype(p) or not p.is_contiguous()
                    or group["maximize"]):
                rest.append(p)
                continue
            shape, v_shape, dim = form
            s = self.state[p]
            s["step"] += 1
            step = s["step"].item()
            scalars = [torch.tensor(x, dtype=p.dtype, device=p.device) for x in
                       (lr, wd, beta1, beta2, eps, 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5)]
            with torch._dynamo.config.patch(recompile_limit=max(32, torch._dynamo.config.recompile_limit)):
                fn(p.view(shape), p.grad.reshape(shape), s["exp_avg"].view(shape), s["exp_avg_sq"].view(v_shape),
                   *scalars, dim)
        if rest:
            self._foreach_step(rest, group)

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults, state and groups; the plan and layouts travel too.
        extra = ("plan", "state_dtype", "variant", "_names", "_layouts", "_sharded")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in extra if k in self.__dict__}}

    # -- checkpoints ------------------------------------------------------------------------
    def _lowmem_meta(self) -> dict:
        names = [self._names[p] for g in self.param_groups for p in g["params"]]
        return {"optimizer": type(self).__name__, "kind": self.kind, "names": names,
                "plan": self.plan.to_json() if self.plan is not None else None}

    def state_dict(self) -> dict:
        """torch's state dict plus ``"lowmem"``: the optimizer, parameter names in group order and
        the plan, as plain data (survives ``torch.load(weights_only=True)``).

        For row-sharded (FSDP2) parameters ``exp_avg`` stays a DTensor and a compressed
        ``exp_avg_sq`` is the whole single-process one, the same on every rank (gathered: every
        rank must call this). So `torch.distributed.checkpoint` saves correct state, and the
        checkpoint loads on any number of ranks."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        wholes = self._whole_v(params)
        for i, p in enumerate(params):
            if p in wholes:
                sd["state"][i] = {**sd["state"][i], "exp_avg_sq": wholes[p]}
        sd["lowmem"] = self._lowmem_meta()
        return sd

    def _whole_v(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """The single-process ``exp_avg_sq`` of each sharded parameter whose `v` is a flat local
        tensor (`ShardedLayout.gather`, all-reduced: one collective per group and dtype)."""
        out, pairs = {}, []
        for p in params:
            lay, st = self._sharded.get(p), self.state.get(p)
            if lay is None or lay.like_param or not st or "exp_avg_sq" not in st:
                continue
            out[p] = lay.gather(self._layouts[p], st["exp_avg_sq"])
            pairs.append((out[p], lay.shards.group))
        all_reduce_by_group(pairs)
        return {p: t.view(self._layouts[p].v_shape) for p, t in out.items()}

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
        check_state_dict(self, state_dict, group_keys=("lr", "betas", "eps", "weight_decay"),
                         check_group=lambda g: check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"]),
                         spec=self._state_spec, names=self._names,
                         accepts="its own, another lowmem plan optimizer's under the same plan, or "
                                 "torch.optim.AdamW's",
                         before_states=self._check_checkpoint_plan)   # the plan says why shapes differ
        params = [p for g in self.param_groups for p in g["params"]]
        saved_state = state_dict["state"]
        load_groups(self, state_dict)   # groups and hyper-parameters only
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(saved_ids, params):
            if saved_state.get(pid):
                self._state_from_checkpoint(p, saved_state[pid])

    def _state_spec(self, p: torch.Tensor, group: dict) -> StateSpec:
        """What a loaded state of `p` must hold: ``exp_avg`` like `p`; ``exp_avg_sq`` as kept
        here or, from an AdamW checkpoint, like `p` (global shapes for sharded parameters)."""
        shape, v_shape = tuple(p.shape), self._layouts[p].v_shape
        return {"exp_avg": (shape,), "exp_avg_sq": (v_shape, shape)}, {}

    def _check_checkpoint_plan(self, state_dict: dict) -> None:
        """Refuse a checkpoint whose ``"lowmem"`` entry is unreadable or names another plan."""
        if state_dict.get("lowmem") is None:   # torch's AdamW writes none
            return
        meta = state_dict["lowmem"]
        plan = meta.get("plan") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or not (plan is None or isinstance(plan, dict)) or \
                not isinstance((plan or {}).get("layers") or {}, dict):
            raise PlanError(f"checkpoint: its 'lowmem' entry is unreadable ({_shorten(meta)}); expected what "
                            "state_dict() writes: {'optimizer', 'kind', 'names', 'plan': {'layers': {...}}}")
        theirs = {normalize_name(k): v for k, v in (((plan or {}).get("layers")) or {}).items()}
        ours = self.plan.layers if self.plan is not None else {}
        for p, name in self._names.items():
            if theirs and name not in theirs:   # a plan covers every parameter of its model
                raise PlanError(f"checkpoint: its plan has no entry for parameter {name!r}: it was made for "
                                f"another model (its plan covers {_shorten(sorted(theirs))})")
            a = layout_of(tuple(p.shape), ours.get(name))
            try:
                lp = LayerPlan(**_layer_plan_args(theirs[name])) if name in theirs else None
                b = layout_of(tuple(p.shape), lp)
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise PlanError(f"checkpoint: plan entry for {name!r} is unreadable ({e!r})") from None
            if a.blocks != b.blocks:
                raise PlanError(
                    f"checkpoint was made under another plan: parameter {name!r} keeps v as "
                    f"{_describe(b)} there and as {_describe(a)} here; build the optimizer from the "
                    "checkpoint's plan (state_dict['lowmem']['plan']) or load an AdamW checkpoint instead")

    def _state_from_checkpoint(self, p: torch.Tensor, saved: dict) -> None:
        """Put a checked saved state of `p` in `self.state`, in this optimizer's dtypes and layout."""
        layout, name = self._layouts[p], self._names[p]
        dtype = self._dtype(p)
        out = {}
        for key, value in saved.items():
            if key == "step":
                out[key] = step_tensor(value).cpu()
            elif isinstance(value, torch.Tensor):
                out[key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
            else:
                out[key] = value
        v = out.get("exp_avg_sq")
        lay = self._sharded.get(p)
        if lay is not None:
            for key in ("exp_avg", "exp_avg_sq"):   # a single-process checkpoint: this rank's rows
                t = out.get(key)
                if t is not None and not is_sharded(t) and tuple(t.shape) == tuple(p.shape) and \
                        (key == "exp_avg" or lay.like_param):
                    out[key] = _shard_like(t, p, lay.shards)
            v = None if lay.like_param else out.get("exp_avg_sq")
        if v is not None and lay is not None:
            if tuple(v.shape) == tuple(p.shape) and is_sharded(v):   # a sharded AdamW v: average it per plan
                shard = v.to_local()
                means = sharded_means([(lay, shard)], square=False)[0]
                out["exp_avg_sq"] = torch.cat([sb.entries(shard).reshape(-1) if m is None else m
                                               for sb, m in zip(lay.blocks, means)])
            elif tuple(v.shape) == tuple(p.shape) and layout.compressed:   # a single-process AdamW v
                out["exp_avg_sq"] = lay.take(reduce_v(v, layout))
            elif tuple(v.shape) == layout.v_shape:
                out["exp_avg_sq"] = lay.take(v)
            else:
                raise PlanError(f"checkpoint: exp_avg_sq of {name!r} has shape {tuple(v.shape)}, expected "
                                f"{layout.v_shape} (or the parameter's shape {tuple(p.shape)} for an AdamW checkpoint)")
        elif v is not None and tuple(v.shape) != layout.v_shape:
            if tuple(v.shape) == tuple(p.shape) and layout.compressed:
                out["exp_avg_sq"] = reduce_v(v, layout)   # a full AdamW v: average it per plan
            else:
                raise PlanError(f"checkpoint: exp_avg_sq of {name!r} has shape {tuple(v.shape)}, expected "
                                f"{layout.v_shape} (or the parameter's shape {tuple(p.shape)} for an AdamW checkpoint)")
        for k in ("max_exp_avg_sq",):   # AMSGrad state has no meaning here
            out.pop(k, None)
        self.state[p] = out

    def __repr__(self) -> str:
        src = self.plan.source if self.plan is not None else {"method": "none (full AdamW)"}
        what = src.get("preset") or src.get("method", "?")
        n = sum(len(g["params"]) for g in self.param_groups)
        g0 = self.param_groups[0]
        kept = sum(lay.blocks and sum(b.kept for b in lay.blocks) for lay in self._layouts.values())
        full = sum(p.numel() for p in self._layouts)
        return (f"{type(self).__name__}(plan={what!r}, params={n}, v kept {kept:,} of {full:,}, "
                f"lr={g0['lr']}, betas={g0['betas']}, eps={g0['eps']}, weight_decay={g0['weight_decay']})")


def _shard_like(t: torch.Tensor, p: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """A whole parameter-shaped tensor as a DTensor sharded like `p` (this rank's rows of it)."""
    from torch.distributed.tensor import DTensor

    rows = t[slice(*shards.rows)].contiguous()
    return DTensor.from_local(rows, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def reduce_v(exp_avg_sq: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A full (parameter-shaped) `v` averaged per `layout`: what a compressed optimizer keeps."""
    out = torch.empty(layout.v_shape, dtype=exp_avg_sq.dtype, device=exp_avg_sq.device)
    for block in layout.blocks:
        region = block.region(exp_avg_sq)
        if block.reduce is None:
            kept = region
        elif region.numel() == 0:   # a mean of no entries: v of a 0-element parameter stays 0, as fresh
            kept = region.new_zeros(block.kept_shape)
        else:
            kept = region.mean(dim=block.reduce, keepdim=True)
        layout.v_region(out, block).copy_(kept)
    return out


def _layer_plan_args(d: dict) -> dict:
    parts = [PartPlan(p["name"], p["dim"], p["start"], p["stop"], p["view"], p["reduce"]) for p in d["parts"]] \
        if d.get("parts") else None
    return dict(shape=d["shape"], role=d.get("role", "other"), view=d["view"], reduce=d["reduce"], parts=parts)


def _shorten(x: Any, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n - 3] + "..."


def _describe(layout: Layout) -> str:
    def one(b: Block) -> str:
        where = "" if b.dim is None else f"[{b.start}:{b.stop}] "
        return f"{where}view {list(b.view)} reduce {None if b.reduce is None else list(b.reduce)}"
    return "; ".join(one(b) for b in layout.blocks)


def _choose_path(group: dict, params: list[torch.Tensor], opt: ReducedAdamW) -> str:
    """``single``, ``foreach`` or ``compiled``, as the group asks; the fast path by default
    (unlike torch's AdamW on CPU, the batched path is also the faster one there, because its
    reductions avoid full-size temporaries)."""
    if group.get("compiled"):
        return "compiled"
    if group.get("foreach") is False or torch.jit.is_scripting():
        return "single"
    return "foreach"


__all__ = ["Block", "Layout", "ReducedAdamW", "layout_of", "mean_sq", "reduce_v"]
