"""How a parameter's `v` is kept, and the two operations a step needs from it (DESIGN §5).

A plan entry gives each parameter a `view` and `reduce` dims, or `parts` (slices of one dim of
the raw tensor or, interleaved, of the layer's `view`, each with its own view and reduce): a
`Layout` of `Block`s. A step asks a layout for two things
only, and that is all that differs between a single-process and a row-sharded (FSDP2) parameter:

- ``mean_r(g²)`` of each block (`block_means`): local reductions, or on a sharded parameter
  partial sums all-reduced across ranks, one collective per call for all the sharded
  parameters given (a step calls it once per bucket);
- where the update lands (`Layout.land`): a view of the parameter, or the boxes of this rank's
  flat shard of the block.

Both kinds, `Layout` and `ShardedLayout`, answer the same calls: ``v_of(exp_avg_sq, i)`` (block
i's kept `v` entries), ``entries_of(t, i)`` (block i's entries of a parameter-shaped tensor such
as the gradient or `m`; for a full-Adam block shaped like its `v`), ``land(param, i, m, denom,
value)``, ``target(param, i)`` (block i of the parameter as a view, where it is one) and
``blocks[i].reduce`` (None: full Adam). A backend (`lowmem.compress.optim.backends`) steps
either kind without asking which it has.

``exp_avg_sq`` of a single-process parameter has the view's shape with reduced dims of size 1,
the parameter's shape where nothing is reduced, or is a flat vector of every part's kept entries
for a parameter with parts. On a row-sharded parameter a compressed ``exp_avg_sq`` is a flat
tensor of this rank's kept entries (`ShardedLayout`), full Adam's a DTensor like the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowmem.compress.plan import LayerPlan
from lowmem.sharding import RowShards, ShardedRegion, all_reduce_by_group, local_region, region_range, sharded_region


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
        dim, start, stop: the slice of the raw tensor, or of `source` (parts only; `dim` is None
            for the whole tensor).
        offset: where the region's kept entries start in a flat ``exp_avg_sq`` (parts only).
        source: the shape a (contiguous) parameter-shaped tensor is viewed as before slicing:
            interleaved parts, whose slices are strided; None slices the tensor itself.
    """

    view: tuple[int, ...]
    reduce: tuple[int, ...] | None
    dim: int | None = None
    start: int = 0
    stop: int = 0
    offset: int = 0
    source: tuple[int, ...] | None = None

    @property
    def kept_shape(self) -> tuple[int, ...]:
        if self.reduce is None:
            return self.view
        return tuple(1 if d in self.reduce else s for d, s in enumerate(self.view))

    @property
    def kept(self) -> int:
        return math.prod(self.kept_shape)

    def narrow(self, t: torch.Tensor) -> torch.Tensor:
        """The block's slice of `t`, a view of it (updates through it land in `t`)."""
        if self.source is not None:
            t = t.view(self.source)
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

    # The operations a step uses (`ShardedLayout` answers the same ones).
    def v_of(self, exp_avg_sq: torch.Tensor, i: int) -> torch.Tensor:
        """Block i's kept `v` entries, in its kept shape (a view of ``exp_avg_sq``)."""
        return self.v_region(exp_avg_sq, self.blocks[i])

    def entries_of(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Block i's entries of a parameter-shaped tensor in its view shape: for a full-Adam
        block, the shape of its `v`."""
        return self.blocks[i].region(t)

    def land(self, param: torch.Tensor, i: int, m: torch.Tensor, denom: torch.Tensor, value: float) -> None:
        """``param[block i] += value · m[block i] / denom``, in place; `denom` as `v_of`."""
        _add_update(param, self.blocks[i], m, denom, value)

    def target(self, param: torch.Tensor, i: int) -> torch.Tensor | None:
        """Block i of `param` as a view in its view shape, for batched in-place updates, or None
        where it is not viewable (a strided part: the update goes through `land`)."""
        block = self.blocks[i]
        return _view(block.narrow(param), block.view)


def layout_of(shape: tuple[int, ...], lp: LayerPlan | None) -> Layout:
    """The `Layout` a plan entry gives a parameter of `shape` (None: full Adam)."""
    shape = tuple(shape)
    if lp is None or (not lp.parts and not lp.reduce):   # reduce [] averages over nothing: full Adam
        return Layout((Block(shape, None),), shape, False)
    if not lp.parts:
        block = Block(tuple(lp.view), tuple(sorted(lp.reduce)))
        return Layout((block,), block.kept_shape, False)
    blocks, offset = [], 0
    source = tuple(lp.view) if tuple(lp.view) != shape else None
    for part in sorted(lp.parts, key=lambda p: p.start):
        b = Block(tuple(part.view), tuple(sorted(part.reduce)) if part.reduce else None,
                  part.dim, part.start, part.stop, offset, source)
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
    def reduce(self) -> tuple[int, ...] | None:
        return self.block.reduce

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

    def v_of(self, exp_avg_sq: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's entries of block i's kept `v`, flat (a view of the local ``exp_avg_sq``)."""
        sb = self.blocks[i]
        return exp_avg_sq.view(-1)[sb.offset:sb.offset + sb.size]

    def entries_of(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's entries of block i of a shard of a parameter-shaped tensor, flat."""
        return self.blocks[i].entries(t).reshape(-1)

    def land(self, param: torch.Tensor, i: int, m: torch.Tensor, denom: torch.Tensor, value: float) -> None:
        """``param[block i] += value · m[block i] / denom`` on this rank's shard; `denom` as `v_of`."""
        _add_sharded_update(param, self.blocks[i], m, denom, value)

    def target(self, param: torch.Tensor, i: int) -> None:
        """None: a shard's block is boxes of the flat shard, updated through `land`."""
        return None

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's flat `v` from the whole one (`gather`'s inverse)."""
        flat = whole.reshape(-1)
        return torch.cat([flat[sb.block.offset + i:sb.block.offset + j]
                          for sb in self.blocks for i, j in [sb.span or (0, sb.block.kept)]])


def sharded_layout(layout: Layout, shape: tuple[int, ...], shards: RowShards) -> ShardedLayout:
    """This rank's `ShardedLayout` of a parameter of `shape` kept as `layout`.

    Raises:
        ValueError: the layout's parts are interleaved (a strided slice of every row group): a
            rank's rows hold pieces of several parts, which this layout does not split.
    """
    if any(b.source is not None for b in layout.blocks):
        raise ValueError("its q, k, v parts are interleaved (each head's or key-value group's rows together), and a "
                         "row-sharded (FSDP2) parameter cannot keep interleaved parts apart; use a plan that keeps "
                         "it whole or unsharded")
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


def block_means(items: list[tuple[Layout | ShardedLayout, torch.Tensor]]) -> list[list[torch.Tensor | None]]:
    """For each (layout, gradient) — the local shard of a sharded parameter's — ``mean_r(g²)`` of
    each block, shaped as the layout's `v_of` (None for full-Adam blocks). Local reductions take
    `mean_sq` (along the contiguous axis, without full-size temporaries); sharded ones are partial
    sums all-reduced across ranks, one collective per process group and dtype for all of them."""
    out: list[list[torch.Tensor | None] | None] = []
    sharded = []
    for lay, g in items:
        if isinstance(lay, ShardedLayout):
            sharded.append(len(out))
            out.append(None)
            continue
        out.append([None if b.reduce is None else mean_sq(b.region(g), b.reduce) for b in lay.blocks])
    if sharded:
        for k, means in zip(sharded, sharded_means([items[k] for k in sharded], square=True)):
            out[k] = means
    return out


def mean_sq(x: torch.Tensor, reduce: tuple[int, ...]) -> torch.Tensor:
    """``(x * x).mean(reduce, keepdim=True)`` computed along the contiguous axis, without a
    full-size temporary: trailing reductions through `vector_norm`, reductions that keep the last
    dim by squaring row chunks of bounded size (a tensor of one chunk at once). Other layouts fall
    back to the plain formula."""
    n = math.prod(x.shape[d] for d in reduce)
    kept_shape = tuple(1 if d in reduce else s for d, s in enumerate(x.shape))
    k = x.dim() - len(reduce)
    if x.is_contiguous() and tuple(reduce) == tuple(range(k, x.dim())):
        norm = torch.linalg.vector_norm(x.view(*x.shape[:k], -1), 2, dim=-1)
        return norm.square_().div_(n).view(kept_shape)
    if x.is_contiguous() and x.dim() >= 2 and x.dim() - 1 not in reduce:
        if x.numel() * x.element_size() <= _CHUNK_BYTES:   # one chunk: the plain formula takes fewer ops
            return (x * x).mean(dim=reduce, keepdim=True)
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


def _view(t: torch.Tensor, shape) -> torch.Tensor | None:
    """`t` viewed as `shape`, or None where its strides do not allow it (a real tensor raises
    RuntimeError there, a fake one, as in the peak trace, ValueError)."""
    try:
        return t.view(shape)
    except (RuntimeError, ValueError):
        return None


def _add_update(target: torch.Tensor, block: Block, m: torch.Tensor, denom: torch.Tensor, value: float) -> None:
    """``target[block] += value · m[block] / denom``, in place on the parameter."""
    region = block.narrow(target)
    region_view = _view(region, block.view)
    if region_view is None:   # a strided part (interleaved rows) or a non-contiguous parameter: through a copy
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
