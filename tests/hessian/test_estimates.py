"""HVP estimates against the exact numbers of explicit symmetric matrices (numpy float64 references)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lowmem.hessian.estimates import (Estimate, _partition_samples, cross_block_mass, extreme_eigenvalues,
                                      frobenius_mass, hutchinson_diagonal, hutchinson_trace, lanczos,
                                      partition_mass, spectral_density)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _oracle(h: np.ndarray):
    """HVP of an explicit matrix: rows of V are vectors, H V as rows."""
    ht = torch.from_numpy(h)
    return lambda v: v @ ht


def _dense(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return (a + a.T) / 2


def _planted(sizes: list[int], noise: float, seed: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Dense symmetric blocks on a random permutation of the indices, plus small dense noise."""
    rng = np.random.default_rng(seed)
    d = sum(sizes)
    perm = rng.permutation(d)
    groups = [torch.from_numpy(g.copy()) for g in np.split(perm, np.cumsum(sizes)[:-1])]
    h = noise * _dense(d, seed + 1)
    for g in groups:
        idx = g.numpy()
        h[np.ix_(idx, idx)] += _dense(len(idx), seed + 2 + len(idx))
    return h, groups


def _with_spectrum(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    h = q @ np.diag(eigenvalues) @ q.T
    return (h + h.T) / 2


def _within(est: Estimate, exact: float, sigmas: float = 4.0) -> bool:
    return abs(est.value - exact) <= sigmas * est.error


# --------------------------------------------------------------------------------------------- Hutchinson


def test_hutchinson_diagonal_within_its_standard_error():
    h = _dense(100, seed=0)
    est = hutchinson_diagonal(_oracle(h), 100, probes=400, generator=_gen(1), batch=64)
    exact = torch.from_numpy(np.diag(h).copy())
    inside = ((est.diagonal - exact).abs() <= 4 * est.stderr).double().mean()
    assert inside >= 0.95
    # Per-entry variance is Σ_{j≠i} H_ij²: the stated error matches it.
    true_se = np.sqrt(((h ** 2).sum(1) - np.diag(h) ** 2) / 400)
    np.testing.assert_allclose(est.stderr.numpy(), true_se, rtol=0.25)
    assert _within(est.trace, float(np.trace(h)))
    assert est.probes == 400 and est.trace.count == 400


def test_hutchinson_error_shrinks_as_one_over_sqrt_probes():
    h = _dense(80, seed=2)
    exact = torch.from_numpy(np.diag(h).copy())
    few = hutchinson_diagonal(_oracle(h), 80, probes=64, generator=_gen(3))
    many = hutchinson_diagonal(_oracle(h), 80, probes=1024, generator=_gen(4))
    se_ratio = float(few.stderr.mean() / many.stderr.mean())
    rms_ratio = float((few.diagonal - exact).pow(2).mean().sqrt() / (many.diagonal - exact).pow(2).mean().sqrt())
    assert 3.2 <= se_ratio <= 4.8          # √(1024 / 64) = 4
    assert 2.5 <= rms_ratio <= 6.5


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    h = np.diag(np.arange(1.0, 11.0))
    est = hutchinson_diagonal(_oracle(h), 10, probes=8, generator=_gen(0))
    assert torch.equal(est.diagonal, torch.arange(1.0, 11.0, dtype=torch.float64))
    assert float(est.stderr.max()) == 0.0
    assert hutchinson_trace(_oracle(h), 10, probes=8, generator=_gen(0)).value == 55.0


def test_estimates_are_deterministic_given_the_seed():
    h = _dense(30, seed=5)
    a = hutchinson_diagonal(_oracle(h), 30, probes=16, generator=_gen(7))
    b = hutchinson_diagonal(_oracle(h), 30, probes=16, generator=_gen(7))
    assert torch.equal(a.diagonal, b.diagonal) and torch.equal(a.stderr, b.stderr)


def test_probe_dtype_and_device_follow_the_oracles_attributes():
    h32 = torch.from_numpy(_dense(20, seed=6)).float()

    class Operator:
        dtype, device = torch.float32, torch.device("cpu")

        def __call__(self, v):
            assert v.dtype == torch.float32
            return v @ h32

    est = hutchinson_trace(Operator(), 20, probes=200, generator=_gen(8))
    assert _within(est, float(torch.trace(h32)))


# --------------------------------------------------------------------------------------------- Frobenius masses


def test_frobenius_mass_within_its_standard_error():
    h = _dense(60, seed=9)
    est = frobenius_mass(_oracle(h), 60, probes=300, generator=_gen(10))
    assert _within(est, float((h ** 2).sum()))


def test_cross_block_mass_dense_and_sub_block():
    h = _dense(70, seed=11)
    a, b = torch.arange(0, 20), torch.arange(35, 70)
    cross = cross_block_mass(_oracle(h), 70, a, b, probes=300, generator=_gen(12))
    assert _within(cross, float((h[np.ix_(a.numpy(), b.numpy())] ** 2).sum()))
    sub = cross_block_mass(_oracle(h), 70, a, a, probes=300, generator=_gen(13))
    assert _within(sub, float((h[np.ix_(a.numpy(), a.numpy())] ** 2).sum()))


def test_cross_block_mass_is_exactly_zero_between_planted_blocks():
    h, groups = _planted([12, 20, 8], noise=0.0, seed=14)
    est = cross_block_mass(_oracle(h), 40, groups[0], groups[1], probes=16, generator=_gen(15))
    assert est.value == 0.0 and est.error == 0.0


@pytest.mark.parametrize("sizes, noise", [([10, 25, 5, 20], 0.05), ([15, 15, 15, 15], 1.0)])
def test_partition_mass_matches_the_exact_blocks(sizes, noise):
    h, groups = _planted(sizes, noise=noise, seed=16)
    d = h.shape[0]
    inside = sum(float((h[np.ix_(g.numpy(), g.numpy())] ** 2).sum()) for g in groups)
    total = float((h ** 2).sum())
    est = partition_mass(_oracle(h), d, groups, probes=600, generator=_gen(17), batch=100)
    assert _within(est.inside, inside) and _within(est.total, total) and _within(est.share, inside / total)
    assert est.groups == len(sizes) and est.share.count == 600


def test_partition_mass_of_a_dense_matrix_is_near_the_size_baseline():
    h = _dense(90, seed=18)
    groups = list(torch.randperm(90, generator=_gen(19)).split([10, 30, 50]))
    exact = sum(float((h[np.ix_(g.numpy(), g.numpy())] ** 2).sum()) for g in groups) / float((h ** 2).sum())
    est = partition_mass(_oracle(h), 90, groups, probes=800, generator=_gen(20))
    assert _within(est.share, exact)
    assert abs(exact - (10 ** 2 + 30 ** 2 + 50 ** 2) / 90 ** 2) < 0.05   # the matrix is dense indeed


def test_partition_samples_are_unbiased_over_every_sign_pattern():
    """E over all z ∈ {±1}^6 and s, s' ∈ {±1}^3 equals Σ_g ‖H_gg‖_F² and ‖H‖_F² exactly."""
    h = _dense(6, seed=21)
    groups = [torch.tensor([0, 4]), torch.tensor([1, 2, 5]), torch.tensor([3])]
    group_of = torch.tensor([0, 1, 1, 2, 0, 1])
    signs = lambda n: torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=torch.float64)
    z, s, s2 = signs(6), signs(3), signs(3)
    rows = torch.tensor(list(itertools.product(range(len(z)), range(len(s)), range(len(s2)))))
    inside, total = _partition_samples(_oracle(h), z[rows[:, 0]], s[rows[:, 1]], s2[rows[:, 2]], group_of)
    exact_inside = sum(float((h[np.ix_(g.numpy(), g.numpy())] ** 2).sum()) for g in groups)
    assert float(inside.mean()) == pytest.approx(exact_inside, rel=1e-12)
    assert float(total.mean()) == pytest.approx(float((h ** 2).sum()), rel=1e-12)


def test_partition_mass_mean_over_seeds_is_unbiased():
    h, groups = _planted([6, 10, 14], noise=0.5, seed=22)
    exact = sum(float((h[np.ix_(g.numpy(), g.numpy())] ** 2).sum()) for g in groups)
    values = np.array([partition_mass(_oracle(h), 30, groups, probes=8, generator=_gen(100 + i)).inside.value
                       for i in range(200)])
    assert abs(values.mean() - exact) <= 4 * values.std(ddof=1) / math.sqrt(len(values))


@pytest.mark.parametrize("groups, message", [
    ([torch.tensor([0, 1]), torch.tensor([1, 2, 3])], "overlaps"),
    ([torch.tensor([0, 1]), torch.tensor([2])], "cover all 4"),
    ([torch.tensor([0, 1]), torch.tensor([2, 3, 4])], "outside"),
    ([torch.tensor([0.0, 1.0]), torch.tensor([2, 3])], "integer"),
])
def test_partition_mass_refuses_a_non_partition(groups, message):
    with pytest.raises(ValueError, match=message):
        partition_mass(_oracle(np.eye(4)), 4, groups, probes=4, generator=_gen(0))


# --------------------------------------------------------------------------------------------- Lanczos


def test_extreme_eigenvalues_match_eigvalsh_with_honest_residuals():
    rng = np.random.default_rng(23)
    h = _with_spectrum(np.concatenate([[12.0, -4.0], rng.uniform(-1.0, 5.0, 198)]), seed=24)
    exact = np.linalg.eigvalsh(h)
    est = extreme_eigenvalues(_oracle(h), 200, iters=40, generator=_gen(25))
    assert est.largest.value == pytest.approx(exact[-1], rel=1e-6)
    assert est.smallest.value == pytest.approx(exact[0], rel=1e-6)
    assert abs(est.largest.value - exact[-1]) <= est.largest.error
    assert abs(est.smallest.value - exact[0]) <= est.smallest.error
    assert est.largest.count == 40


def test_lanczos_residual_bounds_hold_before_convergence():
    h = _dense(150, seed=26)          # semicircle spectrum, no gap at the edges
    exact = np.linalg.eigvalsh(h)
    res = lanczos(_oracle(h), 150, iters=12, generator=_gen(27))
    theta, r = res.ritz_values.numpy(), res.residuals.numpy()
    nearest = np.abs(theta[:, None] - exact[None, :]).min(1)
    assert np.all(nearest <= r * (1 + 1e-9))
    assert exact[0] <= theta[0] and theta[-1] <= exact[-1]       # Cauchy interlacing
    est = extreme_eigenvalues(_oracle(h), 150, iters=12, generator=_gen(27))
    assert est.largest.value == pytest.approx(theta[-1], rel=1e-12)
    assert np.abs(est.largest.value - exact).min() <= est.largest.error
    assert float(res.weights.sum()) == pytest.approx(1.0, rel=1e-12)


def test_lanczos_with_d_iterations_finds_every_eigenvalue():
    h = _dense(40, seed=28)
    res = lanczos(_oracle(h), 40, iters=100, generator=_gen(29))
    assert res.iterations == 40
    np.testing.assert_allclose(res.ritz_values.numpy(), np.linalg.eigvalsh(h), atol=1e-9)


def test_lanczos_stops_when_the_krylov_space_is_invariant():
    h = _with_spectrum(np.concatenate([[3.0, 1.0, -2.0, 0.5], np.zeros(56)]), seed=30)   # rank 4
    res = lanczos(_oracle(h), 60, iters=30, generator=_gen(31))
    assert res.iterations <= 5                                   # rank + 1 (the null space)
    found = np.sort(res.ritz_values.numpy())
    for lam in (3.0, 1.0, -2.0, 0.5):
        assert np.abs(found - lam).min() < 1e-8
    assert float(res.residuals.max()) < 1e-6


# --------------------------------------------------------------------------------------------- spectral density


def _smoothed(eigenvalues: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    z = (grid[:, None] - eigenvalues[None, :]) / sigma
    return np.exp(-0.5 * z ** 2).sum(1) / (len(eigenvalues) * sigma * math.sqrt(2 * math.pi))


def test_spectral_density_matches_the_smoothed_exact_density():
    rng = np.random.default_rng(32)
    spectrum = np.concatenate([rng.normal(0.0, 0.3, 200), rng.normal(4.0, 0.5, 80), [9.0, 10.0]])
    h = _with_spectrum(spectrum, seed=33)
    d = len(spectrum)
    grid = torch.linspace(-3.0, 13.0, 800, dtype=torch.float64)
    est = spectral_density(_oracle(h), d, iters=60, runs=30, generator=_gen(34), grid=grid, sigma=0.3)
    exact = _smoothed(np.linalg.eigvalsh(h), grid.numpy(), 0.3)
    l1 = np.trapezoid(np.abs(est.density.numpy() - exact), grid.numpy())
    other = _smoothed(spectrum + 0.5, grid.numpy(), 0.3)               # a shifted spectrum, for scale
    assert l1 < 0.1
    assert np.trapezoid(np.abs(other - exact), grid.numpy()) > 5 * l1
    assert float(torch.trapezoid(est.density, grid)) == pytest.approx(1.0, abs=1e-6)
    # Trace identity: ∫ t ρ(t) dt = mean over runs of vᵀHv, a trace estimate of tr(H)/d.
    first = (est.weights * est.nodes).sum(1)                           # (runs,) vᵀHv per run
    mean = float(torch.trapezoid(grid * est.density, grid))
    assert mean == pytest.approx(float(first.mean()), rel=1e-6)
    assert abs(mean - np.trace(h) / d) <= 4 * float(first.std()) / math.sqrt(est.runs)


def test_spectral_density_default_grid_integrates_to_one():
    h = _dense(50, seed=35)
    est = spectral_density(_oracle(h), 50, iters=20, runs=4, generator=_gen(36), batch=3)
    assert float(torch.trapezoid(est.density, est.grid)) == pytest.approx(1.0, abs=1e-3)
    assert est.nodes.shape == (4, 20) and est.iterations == 20


# --------------------------------------------------------------------------------------------- labels


def test_estimates_print_their_sample_counts_and_errors():
    h = _dense(10, seed=37)
    text = str(hutchinson_trace(_oracle(h), 10, probes=1000, generator=_gen(38)))
    assert text.startswith("trace ") and "estimate (1,000 probes, ± " in text and text.endswith("standard error)")
    text = str(extreme_eigenvalues(_oracle(h), 10, iters=10, generator=_gen(39)).largest)
    assert text.startswith("λmax ") and "estimate (10 Lanczos iterations, ± " in text and "residual bound" in text
    text = str(partition_mass(_oracle(h), 10, [torch.arange(5), torch.arange(5, 10)], probes=8, generator=_gen(40)))
    assert text.splitlines()[0].startswith("in-partition share ") and "(8 probes, ± " in text
