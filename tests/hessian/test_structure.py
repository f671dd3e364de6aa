"""Structure of dense Hessian blocks on synthetic matrices with planted structure: candidate
partitions by hand, mass against a numpy loop, found partitions against the planted blocks (also
permuted and noisy), the classification rule at its threshold, spectra against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowmem.hessian.structure import (BLOCK_DIAGONAL_BY_HEADS, BLOCK_DIAGONAL_BY_ROWS, BLOCK_DIAGONAL_FOUND, DENSE, ZERO, Partition,
                                      block_spectrum, candidate_partitions, classify, find_partition,
                                      partition_mass)


def sets(partition: Partition) -> set[frozenset[int]]:
    return {frozenset(g.tolist()) for g in partition.groups}


def random_symmetric(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return (a + a.T) / 2


def planted(sizes: list[int], gen: torch.Generator) -> torch.Tensor:
    """Block-diagonal: a dense random symmetric block per size, zeros between."""
    d = sum(sizes)
    h = torch.zeros(d, d, dtype=torch.float64)
    start = 0
    for s in sizes:
        h[start:start + s, start:start + s] = random_symmetric(s, gen)
        start += s
    return h


def planted_rows(row_sizes: list[int], cols: int, gen: torch.Generator) -> torch.Tensor:
    """Block-diagonal over runs of whole rows of a (rows, cols) weight."""
    return planted([r * cols for r in row_sizes], gen)


def run_sets(sizes: list[int], scale: int = 1) -> set[frozenset[int]]:
    """The planted groups: consecutive runs of `sizes` (times `scale` entries each)."""
    out, start = set(), 0
    for s in sizes:
        out.add(frozenset(range(start * scale, (start + s) * scale)))
        start += s
    return out


def permuted(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """H in new coordinates: new index i is old index perm[i]."""
    return h[perm][:, perm]


def relabel(groups: set[frozenset[int]], perm: torch.Tensor) -> set[frozenset[int]]:
    """Planted groups (old indices) in the permuted coordinates."""
    new_of_old = torch.empty_like(perm)
    new_of_old[perm] = torch.arange(perm.numel())
    return {frozenset(int(new_of_old[i]) for i in g) for g in groups}


# -- partitions -------------------------------------------------------------------------------


def test_candidate_partitions_of_a_weight_by_hand():
    parts = candidate_partitions((6, 4), heads=3)                   # 3 heads of 2 rows, 4 columns
    assert list(parts) == ["per head", "per row", "per column", "whole"]
    assert sets(parts["per head"]) == {frozenset(range(0, 8)), frozenset(range(8, 16)), frozenset(range(16, 24))}
    assert sets(parts["per row"]) == {frozenset(range(4 * r, 4 * r + 4)) for r in range(6)}
    assert sets(parts["per column"]) == {frozenset({c, c + 4, c + 8, c + 12, c + 16, c + 20}) for c in range(4)}
    assert sets(parts["whole"]) == {frozenset(range(24))}


def test_candidate_partitions_of_a_conv_and_a_vector_flatten_the_rest():
    conv = candidate_partitions((4, 2, 3), heads=2)                 # rows of 6 entries
    assert sets(conv["per head"]) == {frozenset(range(12)), frozenset(range(12, 24))}
    assert sets(conv["per column"]) == {frozenset({j, j + 6, j + 12, j + 18}) for j in range(6)}
    vec = candidate_partitions((5,), heads=2)                       # 2 does not divide 5: no per head
    assert "per head" not in vec
    assert sets(vec["per row"]) == {frozenset({i}) for i in range(5)}
    assert sets(vec["per column"]) == {frozenset(range(5))}


def test_partition_from_labels_orders_groups_by_smallest_index():
    p = Partition.from_labels("x", torch.tensor([7, 7, 0, 3, 0]))
    assert [g.tolist() for g in p.groups] == [[0, 1], [2, 4], [3]]
    assert p.sizes == [2, 2, 1] and p.size == 5 and p.labels().tolist() == [0, 0, 1, 2, 1]


@pytest.mark.parametrize("groups", [[torch.tensor([0, 1]), torch.tensor([1, 2])],     # overlap
                                    [torch.tensor([0, 1]), torch.tensor([3])],        # gap at 2
                                    [torch.tensor([0]), torch.tensor([], dtype=torch.long)]])
def test_partition_rejects_overlaps_gaps_and_empty_groups(groups):
    with pytest.raises(ValueError, match="partition 'bad'"):
        Partition("bad", groups)


# -- mass -------------------------------------------------------------------------------------


def test_partition_mass_of_a_two_by_two_by_hand():
    h = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    m = partition_mass(h, candidate_partitions((2, 1))["per row"])   # two singletons
    assert m.inside == pytest.approx(10 / 18) and m.cross == pytest.approx(8 / 18)
    assert m.baseline == 0.5 and m.ratio == pytest.approx(10 / 9)
    assert m.excess == pytest.approx((10 / 18 - 0.5) / 0.5)


def test_partition_mass_matches_a_numpy_loop_on_a_random_matrix():
    gen = torch.Generator().manual_seed(1)
    h = random_symmetric(6, gen)
    p = Partition.from_labels("x", torch.tensor([0, 1, 0, 2, 1, 1]))   # sizes 2, 3, 1
    hn = h.numpy()
    total = np.sum(hn ** 2)
    inside = sum(np.sum(hn[np.ix_(g, g)] ** 2) for g in ([0, 2], [1, 4, 5], [3]))
    m = partition_mass(h, p)
    assert m.inside == pytest.approx(inside / total, rel=1e-12)
    assert m.cross == pytest.approx(1 - inside / total, rel=1e-12)
    assert m.baseline == pytest.approx((4 + 9 + 1) / 36)


def test_partition_mass_of_a_planted_block_diagonal_is_all_inside():
    gen = torch.Generator().manual_seed(2)
    h = planted([4, 4, 4], gen)
    m = partition_mass(h, candidate_partitions((6, 2), heads=3)["per head"])
    assert m.inside == 1.0 and m.cross == 0.0 and m.excess == 1.0 and m.baseline == pytest.approx(1 / 3)


def test_partition_mass_rejects_a_partition_of_another_size():
    with pytest.raises(ValueError, match="covers 6 indices, the block is 4 x 4"):
        partition_mass(torch.eye(4), candidate_partitions((3, 2))["whole"])


# -- found partitions -------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [3, 5, 8, 16]])
def test_find_partition_recovers_permuted_planted_blocks_of_entries(sizes):
    gen = torch.Generator().manual_seed(3)
    h = planted(sizes, gen)
    perm = torch.randperm(sum(sizes), generator=gen)
    assert sets(find_partition(h)) == run_sets(sizes)
    assert sets(find_partition(permuted(h, perm))) == relabel(run_sets(sizes), perm)


def test_find_partition_tolerates_small_dense_noise_on_entries():
    gen = torch.Generator().manual_seed(4)
    sizes = [3, 5, 8, 16]
    h = planted(sizes, gen)
    for _ in range(5):
        perm = torch.randperm(32, generator=gen)
        noisy = permuted(h + 0.05 * random_symmetric(32, gen), perm)
        assert sets(find_partition(noisy)) == relabel(run_sets(sizes), perm)


def test_find_partition_with_row_atoms_recovers_permuted_unequal_row_blocks_under_noise():
    gen = torch.Generator().manual_seed(5)
    rows, cols, row_sizes = 16, 4, [2, 3, 5, 6]
    h = planted_rows(row_sizes, cols, gen)
    atoms = candidate_partitions((rows, cols))["per row"]
    for _ in range(5):
        row_perm = torch.randperm(rows, generator=gen)
        perm = (row_perm[:, None] * cols + torch.arange(cols)).reshape(-1)   # whole rows move together
        noisy = permuted(h + 0.2 * random_symmetric(rows * cols, gen), perm)
        assert sets(find_partition(noisy, atoms)) == relabel(run_sets(row_sizes, cols), perm)


@pytest.mark.parametrize("n", [16, 64, 128])
def test_find_partition_calls_a_dense_random_matrix_one_group(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(3):
        assert len(find_partition(random_symmetric(n, gen))) == 1
        assert len(find_partition(random_symmetric(4 * n, gen), candidate_partitions((n, 4))["per row"])) == 1


def test_find_partition_of_a_diagonal_matrix_is_every_entry_alone():
    h = torch.diag(torch.arange(1.0, 7.0))
    assert sets(find_partition(h)) == {frozenset({i}) for i in range(6)}


def test_find_partition_respects_max_groups_and_is_deterministic():
    gen = torch.Generator().manual_seed(6)
    h = planted([4, 4, 4, 4], gen)
    assert len(find_partition(h, max_groups=1)) == 1
    capped = find_partition(h, max_groups=3)
    assert len(capped) <= 3 and all(any(g <= c for c in sets(capped)) for g in run_sets([4, 4, 4, 4]))
    noisy = h + 0.05 * random_symmetric(16, gen)
    a, b = find_partition(noisy, seed=3), find_partition(noisy, seed=3)
    assert [g.tolist() for g in a.groups] == [g.tolist() for g in b.groups]


# -- classification ---------------------------------------------------------------------------


def test_classify_calls_planted_heads_with_noise_block_diagonal_by_heads():
    gen = torch.Generator().manual_seed(7)
    rows, cols, heads = 16, 8, 4                                      # 4 heads of 4 rows: 4 blocks of 32
    h = planted_rows([4] * 4, cols, gen) + 0.05 * random_symmetric(rows * cols, gen)
    c = classify(h, (rows, cols), heads)
    assert (c.label, c.hessian_class) == (BLOCK_DIAGONAL_BY_HEADS, 1)
    assert c.partition.name == "per head" and c.baseline == 0.25
    assert c.inside == pytest.approx(partition_mass(h, candidate_partitions((rows, cols), heads)["per head"]).inside)
    assert sets(c.found) == run_sets([4] * 4, cols)


def test_classify_finds_permuted_planted_blocks_without_heads():
    gen = torch.Generator().manual_seed(8)
    rows, cols = 12, 3
    h = planted_rows([3, 4, 5], cols, gen)
    row_perm = torch.randperm(rows, generator=gen)
    perm = (row_perm[:, None] * cols + torch.arange(cols)).reshape(-1)
    c = classify(permuted(h, perm), (rows, cols))
    assert (c.label, c.hessian_class) == (BLOCK_DIAGONAL_FOUND, 1)
    assert sets(c.partition) == relabel(run_sets([3, 4, 5], cols), perm)
    assert c.inside == pytest.approx(1.0) and c.baseline == pytest.approx((9 ** 2 + 12 ** 2 + 15 ** 2) / 36 ** 2)


def test_classify_calls_a_dense_random_matrix_dense():
    gen = torch.Generator().manual_seed(9)
    for heads in (None, 2, 4):
        c = classify(random_symmetric(128, gen), (16, 8), heads)
        assert (c.label, c.hessian_class) == (DENSE, 2)
        assert len(c.found) == 1
        # per head (or per row) holds about what a dense matrix gives: its baseline
        assert c.mass.excess < 0.1 and c.baseline == {None: 1 / 16, 2: 0.5, 4: 0.25}[heads]


@pytest.mark.parametrize("t2, label", [(0.14, BLOCK_DIAGONAL_BY_HEADS), (0.15, DENSE)])
def test_classify_threshold_is_on_the_excess_over_the_dense_baseline(t2, label):
    # Shape (4, 1), 2 heads: in-head entries 1 (8 of them), cross-head entries t (8 of them).
    # inside = 8 / (8 + 8 t²), baseline 1/2, excess = 2·inside − 1 = (1 − t²)/(1 + t²):
    # 0.7544 for t² = 0.14, 0.7391 for t² = 0.15, against the default threshold 0.75.
    t = math.sqrt(t2)
    h = torch.full((4, 4), t, dtype=torch.float64)
    h[:2, :2] = h[2:, 2:] = 1.0
    c = classify(h, (4, 1), heads=2)
    assert c.label == label and c.threshold == 0.75
    assert c.mass.excess == pytest.approx((1 - t2) / (1 + t2))


def test_classify_a_zero_block_says_so():
    c = classify(torch.zeros(6, 6), (3, 2), heads=3)
    assert c.label == ZERO and c.hessian_class is None


# -- spectra ----------------------------------------------------------------------------------


def test_block_spectrum_matches_numpy_eigvalsh_for_the_block_and_its_groups():
    gen = torch.Generator().manual_seed(10)
    h = random_symmetric(12, gen).to(torch.float32)
    p = candidate_partitions((4, 3), heads=2)["per head"]
    s = block_spectrum(h, p)
    hn = h.numpy().astype(np.float64)
    np.testing.assert_allclose(s.eigenvalues.numpy(), np.linalg.eigvalsh(hn), rtol=0, atol=1e-12)
    for g, sub in zip(p.groups, s.groups):
        np.testing.assert_allclose(sub.eigenvalues.numpy(), np.linalg.eigvalsh(hn[np.ix_(g, g)]), rtol=0, atol=1e-12)
    assert s.eigenvalues.dtype == torch.float64 and len(s.groups) == 2


def test_block_spectrum_condition_number_skips_zero_eigenvalues():
    s = block_spectrum(torch.diag(torch.tensor([4.0, -2.0, 1.0, 0.0], dtype=torch.float64)))
    assert (s.lambda_max, s.lambda_min) == (4.0, -2.0)
    assert s.condition == 4.0 and s.null_count == 1          # max|λ| 4 over the smallest nonzero |λ| 1
    z = block_spectrum(torch.zeros(3, 3))
    assert math.isnan(z.condition) and z.null_count == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_structure_of_a_cuda_block_matches_the_cpu():
    gen = torch.Generator().manual_seed(11)
    h = planted_rows([2, 3], 4, gen) + 0.05 * random_symmetric(20, gen)
    p = candidate_partitions((5, 4))["per row"]
    cpu, cuda = partition_mass(h, p), partition_mass(h.cuda(), p)
    assert cuda.inside == pytest.approx(cpu.inside, rel=1e-12)
    assert sets(find_partition(h.cuda(), p)) == sets(find_partition(h, p)) == run_sets([2, 3], 4)
    torch.testing.assert_close(block_spectrum(h.cuda(), p).groups[1].eigenvalues.cpu(),
                               block_spectrum(h, p).groups[1].eigenvalues)


def test_classify_finds_one_dense_block_per_output_row():
    # Rows are find_partition's atoms, so per-row structure is tested on its own; with 2 heads
    # the per-head test comes first and also holds (rows lie inside heads), so use no heads.
    gen = torch.Generator().manual_seed(3)
    h = planted_rows([1] * 8, 6, gen) + 0.02 * random_symmetric(48, gen)
    c = classify(h, (8, 6))
    assert (c.label, c.hessian_class) == (BLOCK_DIAGONAL_BY_ROWS, 1)
    assert sets(c.partition) == {frozenset(range(6 * r, 6 * r + 6)) for r in range(8)}
    assert c.mass.inside == pytest.approx(
        sum(float(h[6 * r:6 * r + 6, 6 * r:6 * r + 6].square().sum()) for r in range(8)) / float(h.square().sum()))
