"""Row-sharded tensors (FSDP2): which rows each rank holds, and how a reduction over a reshaped
region of the tensor is computed from per-shard partial sums.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each parameter along dim 0 as `torch.chunk`
does: with W ranks and N rows, rank r holds rows ``[min(r·c, N), min((r+1)·c, N))``, c = ⌈N/W⌉.
In the tensor's row-major order those rows are one contiguous range, and they stay one contiguous
range of any region that narrows another dim (a fused q/k/v part) or reshapes the tensor (a head
split, a plan's `view`). A contiguous range of an array of shape V is the union of at most
2·len(V)−1 boxes, each fixing the leading indices, taking a range of one dim and all of the dims
after it (`boxes`). A reduction of the region over some dims is then the sum over ranks and boxes
of each box's partial reduction: a sum into the kept entries, all-reduced across the ranks.

A reduction stays on each rank, with no communication, when no averaged slice crosses a rank
boundary. With d the first reduced dim and B = prod(V[d:]), every slice lies in one aligned
window of B entries, so the reduction is local when every boundary falls on a multiple of B:
per-row means of a row-sharded matrix always, per-head means when each rank holds whole heads.
Each rank then sees its range as ``(windows, *V[d:])`` and keeps the matching contiguous range
of the kept entries (`ShardedRegion.local`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RowShards:
    """How a DTensor is split along dim 0: rank r of `group` holds rows ``[bounds[r], bounds[r+1])``.

    The same for every rank, so every rank takes the same decisions and joins the same collectives.
    """

    bounds: tuple[int, ...]
    rank: int
    group: object | None = None

    @property
    def rows(self) -> tuple[int, int]:
        return self.bounds[self.rank], self.bounds[self.rank + 1]

    def __deepcopy__(self, memo) -> "RowShards":
        return self            # immutable; a copied optimizer uses the same process group

    def __reduce__(self):
        # A process group cannot be pickled: an unpickled RowShards (torch.save of a whole
        # optimizer) reduces over the default group, which is the shard group of plain FSDP2.
        return (RowShards, (self.bounds, self.rank, None))


def row_shards(t: torch.Tensor, name: str) -> RowShards:
    """The row sharding of DTensor `t` (parameter `name`).

    Raises:
        NotImplementedError: naming the parameter, for a layout other than dim 0 sharded over one
            mesh dim (replicated over any others): FSDP2's `fully_shard` and HSDP are supported,
            tensor parallelism is not.
    """
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    shard_dims = [i for i, pl in enumerate(placements) if not pl.is_replicate()]
    if (t.dim() == 0 or len(shard_dims) != 1 or type(placements[shard_dims[0]]) is not Shard
            or placements[shard_dims[0]].dim != 0):
        raise NotImplementedError(
            f"parameter {name!r} is a DTensor sharded as {placements}: lowmem supports DTensors sharded along "
            "dim 0 over one mesh dim and replicated over any others (FSDP2's fully_shard, HSDP), not tensor "
            "parallel layouts; shard this parameter with fully_shard's default placement")
    i = shard_dims[0]
    mesh = t.device_mesh
    world, rank, n = mesh.size(i), mesh.get_local_rank(i), t.shape[0]
    c = -(-n // world)
    bounds = tuple(min(r * c, n) for r in range(world + 1))
    local = t.to_local().shape[0]
    if local != bounds[rank + 1] - bounds[rank]:
        raise NotImplementedError(f"parameter {name!r}: this rank holds {local} of its {n} rows, not the "
                                  f"{bounds[rank + 1] - bounds[rank]} that torch.chunk gives rank {rank} of {world}")
    return RowShards(bounds, rank, mesh.get_group(i))


def region_range(shape: tuple[int, ...], rows: tuple[int, int], dim: int | None = None, start: int = 0,
                 stop: int = 0) -> tuple[int, int]:
    """The flat range ``[lo, hi)``, in the region's own row-major order, of the entries that rows
    ``[a, b)`` of a tensor of `shape` hold; the region is the tensor narrowed along `dim` to
    ``[start, stop)``, or the whole tensor when `dim` is None."""
    a, b = rows
    row = math.prod(shape[1:])
    if dim == 0:
        a, b = max(a, start) - start, min(b, stop) - start
        if b <= a:
            return 0, 0
    elif dim is not None:
        row = row // shape[dim] * (stop - start)
    return a * row, b * row


@dataclass(frozen=True)
class Box:
    """A box of an array: entries ``[lo, hi)`` of its flat order, which are ``index`` (one slice
    per dim) and have ``shape``."""

    lo: int
    hi: int
    index: tuple[slice, ...]
    shape: tuple[int, ...]

    def kept_index(self, reduce: tuple[int, ...]) -> tuple[slice, ...]:
        """Where the box's reduction over `reduce` (with keepdim) lands among the kept entries."""
        return tuple(slice(0, 1) if d in reduce else s for d, s in enumerate(self.index))


def boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[Box]:
    """The flat range ``[lo, hi)`` of an array of `shape` as at most ``2·len(shape)−1`` boxes."""
    out: list[Box] = []

    def split(lo: int, hi: int, dim: int, prefix: tuple[slice, ...], base: int) -> None:
        if lo >= hi:
            return
        inner = math.prod(shape[dim + 1:])
        rest = tuple(slice(0, s) for s in shape[dim + 1:])
        i0, i1 = -(-lo // inner), hi // inner          # whole sub-arrays i0..i1-1
        if i0 > i1:                                     # inside one sub-array
            i = lo // inner
            split(lo - i * inner, hi - i * inner, dim + 1, (*prefix, slice(i, i + 1)), base + i * inner)
            return
        if lo < i0 * inner:
            i = i0 - 1
            split(lo - i * inner, inner, dim + 1, (*prefix, slice(i, i + 1)), base + i * inner)
        if i1 > i0:
            index = (*prefix, slice(i0, i1), *rest)
            out.append(Box(base + i0 * inner, base + i1 * inner, index, tuple(s.stop - s.start for s in index)))
        if hi > i1 * inner:
            split(0, hi - i1 * inner, dim + 1, (*prefix, slice(i1, i1 + 1)), base + i1 * inner)

    split(lo, hi, 0, (), 0)
    return out


@dataclass(frozen=True)
class ShardedRegion:
    """One rank's share of a region of `view` shape, reduced over `reduce`.

    Attributes:
        lo, hi: this rank's flat range of the region.
        window: B of the module docstring when the reduction is local on every rank, else None.
        boxes: the range as boxes of `view` (used when the reduction is not local).
    """

    view: tuple[int, ...]
    reduce: tuple[int, ...]
    lo: int
    hi: int
    window: int | None
    boxes: tuple[Box, ...]

    @property
    def is_local(self) -> bool:
        return self.window is not None

    def piece(self, flat: torch.Tensor, box: Box) -> torch.Tensor:
        """`box` of `flat` (this rank's range of the region, flattened), in the box's shape."""
        return flat[box.lo - self.lo:box.hi - self.lo].view(box.shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """This rank's entries as ``(windows, *view[d:])`` (local reductions only)."""
        d = min(self.reduce)
        return ((self.hi - self.lo) // self.window, *self.view[d:])

    @property
    def local_kept_shape(self) -> tuple[int, ...]:
        return tuple(1 if d in self.local_reduce else s for d, s in enumerate(self.local_shape))

    @property
    def local_reduce(self) -> tuple[int, ...]:
        d = min(self.reduce)
        return tuple(r - d + 1 for r in self.reduce)

    @property
    def local_kept(self) -> tuple[int, int]:
        """This rank's contiguous range of the region's flat kept entries (local reductions only)."""
        d = min(self.reduce)
        per_window = math.prod(s for i, s in enumerate(self.view) if i >= d and i not in self.reduce)
        return self.lo // self.window * per_window, self.hi // self.window * per_window

    @property
    def kept_shape(self) -> tuple[int, ...]:
        return tuple(1 if d in self.reduce else s for d, s in enumerate(self.view))

    @property
    def count(self) -> int:
        """Entries averaged into each kept entry."""
        return math.prod(self.view[d] for d in self.reduce)


def sharded_region(shards: RowShards, shape: tuple[int, ...], view: tuple[int, ...], reduce: tuple[int, ...],
                   dim: int | None = None, start: int = 0, stop: int = 0) -> ShardedRegion:
    """This rank's `ShardedRegion` of the region (`dim`, `start`, `stop` as `region_range`) of a
    row-sharded tensor of `shape`, viewed as `view` and reduced over the non-empty `reduce`."""
    ranges = [region_range(shape, (a, b), dim, start, stop) for a, b in zip(shards.bounds, shards.bounds[1:])]
    lo, hi = ranges[shards.rank]
    d = min(reduce)
    window = math.prod(view[d:])
    total = math.prod(view)
    cuts = {x for r in ranges for x in r if 0 < x < total}
    local = all(x % window == 0 for x in cuts)
    return ShardedRegion(tuple(view), tuple(reduce), lo, hi, window if local else None,
                         () if local else tuple(boxes(tuple(view), lo, hi)))


def local_region(local: torch.Tensor, rows: tuple[int, int], dim: int | None = None, start: int = 0,
                 stop: int = 0) -> torch.Tensor:
    """This rank's entries of a region (as `region_range`) of its shard `local` (rows ``[a, b)``),
    a view of `local` whose row-major order is the region's flat range ``[lo, hi)``."""
    if dim is None:
        return local
    if dim == 0:
        a, b = rows
        s, e = max(a, start), min(b, stop)
        return local.narrow(0, s - a, e - s) if e > s else local[:0]
    return local.narrow(dim, start, stop - start)


def all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sum each tensor over the ranks of `group` in place, in one collective per dtype and device."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view(t.shape))


def all_reduce_by_group(pairs: list[tuple[torch.Tensor, object]]) -> None:
    """`all_reduce_sum` of each (tensor, process group) pair over its group: one call per group,
    in the order the groups first appear (the same on every rank, as the pairs are)."""
    by_group: dict[object, list[torch.Tensor]] = {}
    for t, group in pairs:
        by_group.setdefault(group, []).append(t)
    for group, ts in by_group.items():
        all_reduce_sum(ts, group)


__all__ = ["Box", "RowShards", "ShardedRegion", "all_reduce_by_group", "all_reduce_sum", "boxes", "local_region",
           "region_range", "row_shards", "sharded_region"]
