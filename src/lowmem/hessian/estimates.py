"""Curvature estimates through Hessian-vector products, for blocks too large to form (DESIGN §6).

Every function takes an HVP oracle ``hvp(V) -> H V`` on a batch of row vectors V of shape
(k, d) (a batch, so a caller can vmap its products), the dimension d, and a seeded
``torch.Generator``. Random vectors are drawn on the generator's device (same seed, same
numbers on every machine) and moved to ``device``; ``dtype`` and ``device`` default to the
oracle's own ``dtype``/``device`` attributes (as `lowmem.hessian.exact` operators carry), else
float64 on the generator's device. H must be symmetric (a Hessian). Statistics accumulate in
float64.

Each result says what it is: the value, how many probes or Lanczos iterations it took, and its
error (standard error over probes, or a residual bound), and prints as
``trace 12.3 estimate (256 probes, ± 0.41 standard error)``.

- `hutchinson_diagonal`, `hutchinson_trace`: diag H = E[z ⊙ Hz], tr H = E[zᵀHz], Rademacher z.
- `frobenius_mass`, `partition_mass`, `cross_block_mass`: ‖H‖_F², Σ_g ‖H_gg‖_F² over a partition
  (and its share of ‖H‖_F²), and ‖H_AB‖_F², without forming any block.
- `lanczos`, `extreme_eigenvalues`: Ritz values with full reorthogonalisation; λmax and λmin
  with residual bounds.
- `spectral_density`: stochastic Lanczos quadrature.

References: Hutchinson, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines", 1989; Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of
a matrix", 2007; Paige, "Computational variants of the Lanczos method for the eigenproblem",
1972; Lin, Saad, Yang, "Approximating spectral densities of large matrices", 2016; Ghorbani,
Krishnan, Xiao, "An investigation into neural net optimization via Hessian eigenvalue density",
2019; Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural networks through the lens of the
Hessian", 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]
"""(k, d) batch of row vectors V -> (k, d) batch H V."""

DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Estimate:
    """One estimated number with its count and its error.

    ``error`` is a standard error over independent probes (``unit="probes"``), or for Lanczos a
    residual bound ‖Hy − θy‖ (``unit="Lanczos iterations"``): some eigenvalue of H lies within it.
    """

    quantity: str
    value: float
    error: float
    count: int
    unit: str = "probes"
    error_kind: str = "standard error"

    def __str__(self) -> str:
        return (f"{self.quantity} {self.value:.6g} estimate "
                f"({self.count:,} {self.unit}, ± {self.error:.2g} {self.error_kind})")


@dataclass(frozen=True)
class DiagonalEstimate:
    """Hutchinson's diagonal, its standard error per entry, and the trace from the same probes."""

    diagonal: torch.Tensor   # (d,) float64
    stderr: torch.Tensor     # (d,) float64
    trace: Estimate
    probes: int

    def __str__(self) -> str:
        return (f"diagonal of {self.diagonal.numel():,} entries estimate ({self.probes:,} probes, "
                f"± {float(self.stderr.max()):.2g} largest standard error)")


@dataclass(frozen=True)
class PartitionMass:
    """Squared Frobenius mass of H inside a partition's diagonal blocks, of all of H, and their ratio."""

    inside: Estimate
    total: Estimate
    share: Estimate
    groups: int

    def __str__(self) -> str:
        return "\n".join(str(e) for e in (self.share, self.inside, self.total))


@dataclass(frozen=True)
class LanczosResult:
    """Ritz values θ_i of H on one Krylov space, with quadrature weights and residual bounds.

    ``weights[i]`` = (first component of the i-th eigenvector of the tridiagonal T)², so
    Σ_i weights[i] f(θ_i) ≈ qᵀ f(H) q for the unit start vector q; ``residuals[i]`` = β_m |s_mi|
    = ‖H y_i − θ_i y_i‖ for the Ritz vector y_i (exact arithmetic): some eigenvalue of H lies
    within it of θ_i.
    """

    ritz_values: torch.Tensor   # (m,) float64, ascending
    weights: torch.Tensor       # (m,) float64, sum 1
    residuals: torch.Tensor     # (m,) float64
    iterations: int

    def __str__(self) -> str:
        lo, hi, r = float(self.ritz_values[0]), float(self.ritz_values[-1]), float(self.residuals.max())
        return (f"Ritz values in [{lo:.6g}, {hi:.6g}] estimate "
                f"({self.iterations:,} Lanczos iterations, ± {r:.2g} largest residual bound)")


@dataclass(frozen=True)
class ExtremeEigenvalues:
    """λmax and λmin of H from Lanczos, each with its explicitly computed residual ‖Hy − θy‖."""

    largest: Estimate
    smallest: Estimate

    def __str__(self) -> str:
        return f"{self.largest}\n{self.smallest}"


@dataclass(frozen=True)
class SpectralDensity:
    """Gaussian-smoothed eigenvalue density of H by stochastic Lanczos quadrature.

    ``density`` estimates ρ_σ(t) = (1/d) Σ_j N(t; λ_j, σ²) on ``grid``; ``stderr`` is its standard
    error over runs per grid point. ``nodes``/``weights`` (runs, iterations) are each run's Ritz
    values and weights, weight 0 past a run's breakdown.
    """

    grid: torch.Tensor       # (P,) float64
    density: torch.Tensor    # (P,) float64
    stderr: torch.Tensor     # (P,) float64
    sigma: float
    nodes: torch.Tensor      # (runs, m) float64
    weights: torch.Tensor    # (runs, m) float64
    iterations: int
    runs: int

    def __str__(self) -> str:
        return (f"spectral density on {self.grid.numel():,} points in [{float(self.grid[0]):.4g}, "
                f"{float(self.grid[-1]):.4g}], σ = {self.sigma:.3g} estimate ({self.runs:,} runs × "
                f"{self.iterations:,} Lanczos iterations, ± {float(self.stderr.max()):.2g} largest standard error)")


# ---------------------------------------------------------------------------------------------
# Random vectors, batching and moments


def _target(hvp: Hvp, generator: torch.Generator, dtype: torch.dtype | None,
            device: torch.device | str | None) -> tuple[torch.dtype, torch.device]:
    dtype = dtype or getattr(hvp, "dtype", None) or torch.float64
    device = device or getattr(hvp, "device", None) or generator.device
    return dtype, torch.device(device)


def _rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    draw = torch.randint(0, 2, shape, generator=generator, device=generator.device, dtype=dtype)
    return (2 * draw - 1).to(device)


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_indices(name: str, idx: torch.Tensor, d: int) -> torch.Tensor:
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32) or idx.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor, got shape {tuple(idx.shape)} {idx.dtype}")
    if int(idx.min()) < 0 or int(idx.max()) >= d:
        raise ValueError(f"{name} has indices outside [0, {d}): min {int(idx.min())}, max {int(idx.max())}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{name} repeats an index")
    return idx.long()


class _Moments:
    """Running mean and sum of squared deviations over probes, batch by batch (Chan, Golub,
    LeVeque's pairwise update), so a diagonal estimate keeps O(d) memory for any probe count."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | float = 0.0
        self.m2: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor) -> None:   # x: (k, ...) samples
        x = x.double()
        k = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.n + k
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * k / n)
        self.n = n

    def stderr(self) -> torch.Tensor:
        return (self.m2 / (self.n - 1) / self.n) ** 0.5


def _probe_estimate(quantity: str, samples: torch.Tensor) -> Estimate:
    """Mean of i.i.d. per-probe samples with its standard error std/√N."""
    samples = samples.double()
    n = samples.numel()
    return Estimate(quantity, float(samples.mean()), float(samples.std() / math.sqrt(n)), n)


# ---------------------------------------------------------------------------------------------
# Hutchinson


def hutchinson_diagonal(hvp: Hvp, d: int, probes: int, generator: torch.Generator, *,
                        batch: int = DEFAULT_BATCH, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> DiagonalEstimate:
    """Diagonal (and trace) of H from Rademacher probes.

    Args:
        hvp: (k, d) -> H V for symmetric H.
        d: dimension of H.
        probes: number of probes N (>= 2); one HVP each.
        generator: seeded source of the probes.
        batch: probes per `hvp` call.

    Returns:
        `DiagonalEstimate` with diag ≈ (1/N) Σ_n z_n ⊙ H z_n and per-entry standard errors.

    For z with i.i.d. ±1 entries, z_i (Hz)_i = H_ii + Σ_{j≠i} H_ij z_i z_j: mean H_ii, variance
    Σ_{j≠i} H_ij², so an entry is exact (standard error 0) when its row is zero off the
    diagonal. Summing over i gives Hutchinson's trace zᵀHz, variance 2 Σ_{i≠j} H_ij².
    (Hutchinson 1989; Bekas, Kokiopoulou, Saad 2007.)
    """
    _check_count("d", d, 1)
    _check_count("probes", probes, 2)
    _check_count("batch", batch, 1)
    dtype, device = _target(hvp, generator, dtype, device)
    diag, traces = _Moments(), []
    for k in _chunks(probes, batch):
        z = _rademacher((k, d), generator, dtype, device)    # (k, d)
        sample = z * hvp(z)                                   # (k, d)
        diag.add(sample)
        traces.append(sample.double().sum(1))
    trace = _probe_estimate("trace", torch.cat(traces))
    return DiagonalEstimate(diag.mean, diag.stderr(), trace, probes)


def hutchinson_trace(hvp: Hvp, d: int, probes: int, generator: torch.Generator, *,
                     batch: int = DEFAULT_BATCH, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> Estimate:
    """tr H ≈ (1/N) Σ_n z_nᵀ H z_n with Rademacher z (Hutchinson 1989); see `hutchinson_diagonal`."""
    return hutchinson_diagonal(hvp, d, probes, generator, batch=batch, dtype=dtype, device=device).trace


# ---------------------------------------------------------------------------------------------
# Frobenius masses


def frobenius_mass(hvp: Hvp, d: int, probes: int, generator: torch.Generator, *,
                   batch: int = DEFAULT_BATCH, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Estimate:
    """‖H‖_F² ≈ (1/N) Σ_n ‖H z_n‖², Rademacher z in all d dimensions, one HVP per probe.

    E‖Hz‖² = E[zᵀ HᵀH z] = tr(HᵀH) = ‖H‖_F² since E[zzᵀ] = I.
    """
    _check_count("d", d, 1)
    _check_count("probes", probes, 2)
    _check_count("batch", batch, 1)
    dtype, device = _target(hvp, generator, dtype, device)
    samples = []
    for k in _chunks(probes, batch):
        u = hvp(_rademacher((k, d), generator, dtype, device)).double()   # (k, d)
        samples.append((u * u).sum(1))
    return _probe_estimate("‖H‖_F²", torch.cat(samples))


def cross_block_mass(hvp: Hvp, d: int, rows: torch.Tensor, cols: torch.Tensor, probes: int,
                     generator: torch.Generator, *, batch: int = DEFAULT_BATCH,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Estimate:
    """‖H_AB‖_F² for index sets A = `rows`, B = `cols` (equal for a diagonal sub-block), one HVP per probe.

    ‖H_AB‖_F² = E‖P_A H P_B z‖²: a Rademacher z on B only (zero elsewhere), H applied, rows A kept;
    E[z_B z_Bᵀ] = I_B gives tr(H_ABᵀ H_AB). Exact (standard error 0) when H_AB = 0.
    """
    _check_count("d", d, 1)
    _check_count("probes", probes, 2)
    _check_count("batch", batch, 1)
    rows, cols = _check_indices("rows", rows, d), _check_indices("cols", cols, d)
    dtype, device = _target(hvp, generator, dtype, device)
    rows, cols = rows.to(device), cols.to(device)
    samples = []
    for k in _chunks(probes, batch):
        v = torch.zeros(k, d, dtype=dtype, device=device)
        v[:, cols] = _rademacher((k, cols.numel()), generator, dtype, device)
        u = hvp(v)[:, rows].double()                        # (k, |A|)
        samples.append((u * u).sum(1))
    return _probe_estimate("‖H_AB‖_F²", torch.cat(samples))


def _group_of(groups: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """(d,) group number of every index; the groups must partition range(d)."""
    if not groups:
        raise ValueError("groups must hold at least one index group")
    group_of = torch.full((d,), -1, dtype=torch.long)
    for g, idx in enumerate(groups):
        idx = _check_indices(f"groups[{g}]", idx.cpu(), d)
        if bool((group_of[idx] >= 0).any()):
            raise ValueError(f"groups[{g}] overlaps an earlier group")
        group_of[idx] = g
    missing = int((group_of < 0).sum())
    if missing:
        raise ValueError(f"groups must cover all {d} indices; {missing} are in no group")
    return group_of


def _partition_samples(hvp: Hvp, z: torch.Tensor, s: torch.Tensor, s2: torch.Tensor,
                       group_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-probe samples (inside, total) of `partition_mass` from z (k, d) and group signs s, s2 (k, G)."""
    k = z.shape[0]
    u = hvp(torch.cat([s[:, group_of] * z, s2[:, group_of] * z])).double()   # (2k, d)
    u, u2 = u[:k], u[k:]
    inside = ((s * s2)[:, group_of].double() * u * u2).sum(1)
    total = ((u * u).sum(1) + (u2 * u2).sum(1)) / 2
    return inside, total


def partition_mass(hvp: Hvp, d: int, groups: Sequence[torch.Tensor], probes: int,
                   generator: torch.Generator, *, batch: int = DEFAULT_BATCH,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> PartitionMass:
    """Mass of H inside a partition's diagonal blocks, Σ_g ‖H_gg‖_F², its total ‖H‖_F², and the share.

    Two HVPs per probe whatever the number of groups, so a partition is scored without forming
    any block.

    Args:
        hvp: (k, d) -> H V for symmetric H.
        d: dimension of H.
        groups: 1-D integer index tensors that partition range(d) (any order, not contiguous).
        probes: number of probes N (>= 2); two HVPs each.
        generator: seeded source of the probes.
        batch: probes per `hvp` call (2·batch vectors).

    Returns:
        `PartitionMass`: ``inside``, ``total`` (each mean ± standard error over probes) and
        ``share`` = inside / total with a delta-method standard error.

    The estimator. Draw z ∈ {±1}^d and two independent sign vectors s, s' ∈ {±1}^G, one sign per
    group, write (s∘z)_i = s_{g(i)} z_i, and let u = H(s∘z), u' = H(s'∘z). The sample is
    X = Σ_g ⟨s_g P_g u, s'_g P_g u'⟩. Since P_g u = Σ_h s_h P_g H P_h z,

        X = Σ_g Σ_{h,k} (s_g s_h)(s'_g s'_k) ⟨P_g H P_h z, P_g H P_k z⟩.

    Given z, E[s_g s_h] = δ_gh and E[s'_g s'_k] = δ_gk, and s is independent of s', so every
    cross term (h ≠ g or k ≠ g) vanishes: E[X | z] = Σ_g ‖P_g H P_g z‖². Then E[z zᵀ] = I gives
    E[X] = Σ_g tr(H_ggᵀ H_gg) = Σ_g ‖H_gg‖_F². (One sign vector would not do: ⟨P_g u, P_g u⟩
    keeps E[s_h s_k] = δ_hk and gives Σ_h ‖H_gh‖_F², the whole mass.) The total comes free from
    the same products: s∘z is itself Rademacher, so Y = (‖u‖² + ‖u'‖²)/2 has E[Y] = ‖H‖_F².

    The share R = X̄ / Ȳ is a ratio of means: consistent, with an O(1/N) bias, and standard
    error by the delta method, √((Var X − 2R Cov(X, Y) + R² Var Y) / N) / Ȳ, which uses the
    correlation of X and Y (same z) and so is tighter than the two errors combined.
    """
    _check_count("d", d, 1)
    _check_count("probes", probes, 2)
    _check_count("batch", batch, 1)
    group_of = _group_of(groups, d)
    dtype, device = _target(hvp, generator, dtype, device)
    group_of = group_of.to(device)
    xs, ys = [], []
    for k in _chunks(probes, batch):
        z = _rademacher((k, d), generator, dtype, device)
        s = _rademacher((k, len(groups)), generator, dtype, device)
        s2 = _rademacher((k, len(groups)), generator, dtype, device)
        x, y = _partition_samples(hvp, z, s, s2, group_of)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    inside, total = _probe_estimate("Σ_g ‖H_gg‖_F²", x), _probe_estimate("‖H‖_F²", y)
    ratio = inside.value / total.value
    cov = torch.cov(torch.stack([x, y]))    # (2, 2), Bessel-corrected
    var = float(cov[0, 0] - 2 * ratio * cov[0, 1] + ratio ** 2 * cov[1, 1])
    share_se = math.sqrt(max(var, 0.0) / probes) / abs(total.value)
    share = Estimate("in-partition share", ratio, share_se, probes)
    return PartitionMass(inside, total, share, len(groups))


# ---------------------------------------------------------------------------------------------
# Lanczos


def _lanczos_runs(hvp: Hvp, starts: torch.Tensor, iters: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k Lanczos processes in lockstep (one (k, d) HVP per step), fully reorthogonalised.

    Returns alpha, beta (k, m) float64, the bases (k, m, d), and each run's length L ≤ m: a run
    stops once β_j ≤ √eps · (largest |α|, β seen), its Krylov space being invariant to working
    precision. T_r = tridiag(β[:L-1], α[:L], β[:L-1]) and β[L-1] is the residual factor.
    """
    k, d = starts.shape
    m = min(iters, d)
    tol = math.sqrt(torch.finfo(starts.dtype).eps)
    alpha = torch.zeros(k, m, dtype=torch.float64)
    beta = torch.zeros(k, m, dtype=torch.float64)
    basis = starts.new_zeros(k, m, d)
    length = torch.full((k,), m, dtype=torch.long)
    active = torch.ones(k, dtype=torch.bool, device=starts.device)
    scale = torch.zeros(k, dtype=starts.dtype, device=starts.device)
    q = starts / starts.norm(dim=1, keepdim=True)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(k, dtype=starts.dtype, device=starts.device)
    for j in range(m):
        basis[:, j] = q
        w = hvp(q)                                                    # (k, d)
        a = (w * q).sum(1)
        w = w - a[:, None] * q - b_prev[:, None] * q_prev
        done = basis[:, : j + 1]                                      # (k, j+1, d)
        for _ in range(2):   # Gram-Schmidt twice against the whole basis: "twice is enough" (Parlett)
            w = w - (done.transpose(1, 2) @ (done @ w[:, :, None]))[:, :, 0]
        b = w.norm(dim=1)
        alpha[:, j], beta[:, j] = a.double().cpu(), b.double().cpu()
        scale = torch.maximum(scale, torch.maximum(a.abs(), b))
        stop = active & (b <= tol * scale)
        length[stop.cpu()] = j + 1
        active = active & ~stop
        q_prev = q
        q = torch.where(active[:, None], w / torch.where(active, b, 1)[:, None], 0)
        b_prev = torch.where(active, b, 0)
    return alpha, beta, basis, length


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of one run's tridiagonal T: θ ascending (L,) and eigenvectors S (L, L)."""
    off = beta[: length - 1]
    t = torch.diag(alpha[:length]) + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _lanczos_result(alpha: torch.Tensor, beta: torch.Tensor, length: int) -> LanczosResult:
    theta, s = _ritz(alpha, beta, length)
    return LanczosResult(theta, s[0] ** 2, beta[length - 1] * s[-1].abs(), length)


def lanczos(hvp: Hvp, d: int, iters: int, generator: torch.Generator, *,
            dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LanczosResult:
    """Ritz values of H on the Krylov space of a random start, with full reorthogonalisation.

    Args:
        hvp: (k, d) -> H V for symmetric H (called with k = 1).
        d: dimension of H.
        iters: Lanczos steps m (capped at d); one HVP each.
        generator: seeded source of the Gaussian start vector.

    Returns:
        `LanczosResult`: Ritz values θ_i (eigenvalues of T = QᵀHQ), weights, residual bounds
        r_i = β_m |s_mi|, and the iterations run (fewer than asked when the Krylov space
        becomes invariant).

    Each step orthogonalises H q_j against every earlier q (twice), so the basis stays
    orthonormal and no spurious copies of converged eigenvalues appear; memory m·d. For
    symmetric H and unit Ritz vector y_i, some eigenvalue lies in [θ_i − r_i, θ_i + r_i]
    (Parlett, "The Symmetric Eigenvalue Problem", Thm 4.5.1), and θ_max ≤ λ_max, θ_min ≥ λ_min
    (Cauchy interlacing). A Gaussian start misses no eigenvector with probability 1.
    (Lanczos 1950; Paige 1972.)
    """
    _check_count("d", d, 1)
    _check_count("iters", iters, 1)
    dtype, device = _target(hvp, generator, dtype, device)
    alpha, beta, _, length = _lanczos_runs(hvp, _gaussian((1, d), generator, dtype, device), iters)
    return _lanczos_result(alpha[0], beta[0], int(length[0]))


def extreme_eigenvalues(hvp: Hvp, d: int, iters: int, generator: torch.Generator, *,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> ExtremeEigenvalues:
    """λmax and λmin of H from `lanczos`, each with its residual ‖Hy − θy‖ computed by one more HVP.

    The residual is measured, not taken from β_m |s_mi|, so it also covers rounding in the
    basis. What it bounds: some eigenvalue of H lies within it of θ. θ_max ≤ λ_max always; that
    the eigenvalue within reach is λ_max itself holds once the top of the spectrum has
    converged, i.e. when the residual is small against the gap to the next eigenvalue (then
    λ_max − θ_max ≤ r² / gap, Kato–Temple). Likewise for λmin.

    Args and cost: as `lanczos`, plus one (2, d) HVP.
    """
    _check_count("d", d, 1)
    _check_count("iters", iters, 1)
    dtype, device = _target(hvp, generator, dtype, device)
    alpha, beta, basis, length = _lanczos_runs(hvp, _gaussian((1, d), generator, dtype, device), iters)
    n = int(length[0])
    theta, s = _ritz(alpha[0], beta[0], n)
    ends = s[:, [-1, 0]].to(dtype=basis.dtype, device=basis.device)   # (n, 2): top, bottom
    y = ends.T @ basis[0, :n]                                          # (2, d)
    y = y / y.norm(dim=1, keepdim=True)
    th = theta[[-1, 0]].to(dtype=y.dtype, device=y.device)
    residual = (hvp(y) - th[:, None] * y).double().norm(dim=1).cpu()
    unit = "Lanczos iterations"
    largest = Estimate("λmax", float(theta[-1]), float(residual[0]), n, unit, "residual bound")
    smallest = Estimate("λmin", float(theta[0]), float(residual[1]), n, unit, "residual bound")
    return ExtremeEigenvalues(largest, smallest)


def spectral_density(hvp: Hvp, d: int, iters: int, runs: int, generator: torch.Generator, *,
                     grid: torch.Tensor | None = None, sigma: float | None = None, points: int = 512,
                     batch: int | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> SpectralDensity:
    """Eigenvalue density of H smoothed by a Gaussian, by stochastic Lanczos quadrature.

    Args:
        hvp: (k, d) -> H V for symmetric H.
        d: dimension of H.
        iters: Lanczos steps per run (capped at d).
        runs: independent start vectors (>= 2); iters HVPs each.
        generator: seeded source of the start vectors.
        grid: points t to evaluate the density at; default `points` points from the smallest
            Ritz value − 5σ to the largest + 5σ, so the density integrates to ~1 on it.
        sigma: width of the Gaussian; default 1% of the Ritz values' spread.
        batch: runs advanced in lockstep per `hvp` call (default all); memory batch·iters·d.

    Returns:
        `SpectralDensity` with the smoothed density, its standard error over runs, the nodes and
        weights.

    The target is ρ_σ(t) = (1/d) Σ_j N(t; λ_j, σ²) = (1/d) tr f_t(H), f_t(λ) = N(t; λ, σ²). For a
    unit start v = g/‖g‖ with Gaussian g, E[v vᵀ] = I/d, so E[vᵀ f_t(H) v] = ρ_σ(t), and m Lanczos
    steps from v give the Gauss quadrature vᵀ f(H) v ≈ Σ_i w_i f(θ_i), w_i = (S_1i)², exact for
    polynomials of degree < 2m. The estimate averages Σ_i w_i N(t; θ_i, σ²) over runs; its first
    moment is exactly the mean of vᵀHv, a trace estimate of tr(H)/d. (Lin, Saad, Yang 2016;
    Ghorbani, Krishnan, Xiao 2019; Yao et al., PyHessian, 2020.)
    """
    _check_count("d", d, 1)
    _check_count("iters", iters, 1)
    _check_count("runs", runs, 2)
    _check_count("points", points, 2)
    if batch is not None:
        _check_count("batch", batch, 1)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    dtype, device = _target(hvp, generator, dtype, device)
    m = min(iters, d)
    nodes = torch.zeros(runs, m, dtype=torch.float64)
    weights = torch.zeros(runs, m, dtype=torch.float64)
    used = torch.zeros(runs, m, dtype=torch.bool)
    done = 0
    for k in _chunks(runs, batch or runs):
        alpha, beta, _, length = _lanczos_runs(hvp, _gaussian((k, d), generator, dtype, device), iters)
        for r in range(k):
            n = int(length[r])
            theta, s = _ritz(alpha[r], beta[r], n)
            nodes[done + r, :n], weights[done + r, :n], used[done + r, :n] = theta, s[0] ** 2, True
        done += k
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 0.01 * max(abs(hi), 1.0)
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    grid = grid.double().cpu()
    gauss = torch.exp(-0.5 * ((grid[None, None, :] - nodes[:, :, None]) / sigma) ** 2)   # (runs, m, P)
    per_run = (weights[:, :, None] * gauss).sum(1) / (sigma * math.sqrt(2 * math.pi))     # (runs, P)
    return SpectralDensity(grid, per_run.mean(0), per_run.std(0) / math.sqrt(runs), float(sigma),
                           nodes, weights, m, runs)
