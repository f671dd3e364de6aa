"""The row-sharding arithmetic behind FSDP2 support (`lowmem.sharding`), in one process: every
rank's share of a region is simulated, and the sum of their partial reductions is compared with a
dense numpy reduction in float64."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lowmem.sharding import RowShards, boxes, local_region, region_range, sharded_region


def chunk_bounds(n: int, world: int) -> tuple[int, ...]:
    c = -(-n // world)
    return tuple(min(r * c, n) for r in range(world + 1))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)])
def test_boxes_cover_a_flat_range_exactly_once(shape):
    a = np.arange(math.prod(shape)).reshape(shape)
    n = a.size
    for lo, hi in itertools.combinations(range(n + 1), 2):
        got = boxes(shape, lo, hi)
        assert len(got) <= 2 * len(shape) - 1
        seen = np.concatenate([a[b.index].reshape(-1) for b in got])
        assert seen.tolist() == list(range(lo, hi)), (lo, hi)           # in flat order, no gaps or overlaps
        for b in got:
            assert a[b.index].shape == b.shape and a[b.index].min() == b.lo and a[b.index].max() == b.hi - 1


def _dense_region(t, dim, start, stop, view):
    r = t if dim is None else np.take(t, range(start, stop), axis=dim)
    return r.reshape(view)


CASES = [
    # shape, region (dim, start, stop), view, reduce
    ((13, 8), (None, 0, 0), (13, 8), (1,)),           # per-row means of an uneven vocabulary shard: local
    ((13, 8), (None, 0, 0), (13, 8), (0,)),           # column means across the shards
    ((13, 8), (None, 0, 0), (13, 8), (0, 1)),         # one scalar
    ((12, 5), (None, 0, 0), (3, 4, 5), (1, 2)),       # per head, 3 heads of 4 rows
    ((12, 5), (None, 0, 0), (3, 4, 5), (0,)),         # across heads
    ((12, 5), (None, 0, 0), (60,), (0,)),             # a flattening view
    ((24, 4), (0, 8, 16), (2, 4, 4), (1, 2)),         # the k part of a fused qkv (out along dim 0), per head
    ((24, 4), (0, 16, 24), (8, 4), (0,)),             # the v part, column means
    ((5, 18), (1, 6, 12), (5, 2, 3), (0, 2)),         # a part of a Conv1D-style (in, out) weight
    ((6, 2, 3, 3), (None, 0, 0), (6, 2, 3, 3), (2, 3)),   # a conv kernel, per (out, in) pair
]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape,region,view,reduce", CASES)
def test_partial_sums_over_ranks_equal_the_dense_reduction(shape, region, view, reduce, world):
    rng = np.random.default_rng(0)
    dense = rng.random(shape)
    dim, start, stop = region
    want = _dense_region(dense, dim, start, stop, view).sum(axis=reduce, keepdims=True)
    bounds = chunk_bounds(shape[0], world)
    got = np.zeros_like(want)
    local_everywhere = set()
    for rank in range(world):
        shards = RowShards(bounds, rank)
        sr = sharded_region(shards, shape, view, reduce, dim, start, stop)
        local_everywhere.add(sr.is_local)
        x = local_region(torch.from_numpy(dense[slice(*shards.rows)]), shards.rows, dim, start, stop)
        assert x.numel() == sr.hi - sr.lo == region_range(shape, shards.rows, dim, start, stop)[1] - sr.lo
        flat = x.reshape(-1)
        if sr.is_local:
            part = flat.reshape(sr.local_shape).sum(dim=sr.local_reduce, keepdim=True).reshape(-1)
            k0, k1 = sr.local_kept
            got.reshape(-1)[k0:k1] += part.numpy()
        else:
            for b in sr.boxes:
                xb = sr.piece(flat, b)
                got[b.kept_index(reduce)] += xb.sum(dim=reduce, keepdim=True).numpy()
    assert len(local_everywhere) == 1, "every rank takes the same decision"
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("world,local", [(1, True), (2, True), (3, True), (4, False), (6, True), (8, False)])
def test_per_head_means_stay_local_exactly_when_every_rank_holds_whole_heads(world, local):
    # 6 heads of 4 rows: rows per rank are ceil(24 / world) = 24, 12, 8, 6, 4, 3
    sr = sharded_region(RowShards(chunk_bounds(24, world), 0), (24, 16), (6, 4, 16), (1, 2))
    assert sr.is_local is local


def test_row_means_are_local_and_column_means_are_not():
    shards = RowShards(chunk_bounds(50257, 8), 7)
    assert sharded_region(shards, (50257, 64), (50257, 64), (1,)).is_local
    assert not sharded_region(shards, (50257, 64), (50257, 64), (0,)).is_local
