"""The signal-to-noise ratio of a second-moment tensor along a subset of its axes (pure math).

    SNR_K(V) = mean over K' of [ (mean_K V)^2 / var_K V ]

with the population variance (no Bessel correction), no epsilon, and slices whose ratio is not
finite (zero variance, never-seen embedding rows) left out of the mean over K'. The value is
invariant to scaling V, so raw and bias-corrected `exp_avg_sq` give the same SNR.

Reference: Kalra, Kirchenbauer, Barkeshli, Goldstein, "When Can You Get Away with Low Memory
Adam?", 2025.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from itertools import combinations

import torch


@dataclass(frozen=True)
class SnrValue:
    """SNR along one axis subset, with the two averages it is made of (each over the kept slices)."""

    snr: float
    mean_sq: float
    var: float


def axis_subsets(ndim: int) -> list[tuple[int, ...]]:
    """All non-empty subsets of ``range(ndim)``, smallest first: (0,), (1,), (0, 1), …"""
    return [c for k in range(1, ndim + 1) for c in combinations(range(ndim), k)]


def snr_terms(v: torch.Tensor, subset: tuple[int, ...], work: torch.Tensor | None = None) -> torch.Tensor:
    """SNR, mean_sq and var along `subset` of `v` as one 3-element tensor on `v`'s device.

    Stays on the device (no host synchronisation), so a caller can stack many of these and move
    them to the host in one transfer. A subset whose every slice is non-finite gives NaN.
    `work`, a buffer of at least ``v.numel()`` entries of the computing dtype, spares the
    full-size temporary (a caller measuring many tensors reuses one).
    """
    sums = snr_sums(v, subset, work)
    return sums[:3] / sums[3]    # 0/0 -> NaN flags "no finite slice"


CHUNK = 1 << 20   # entries: past this, `snr_sums` works through dim 0 in pieces of about this size


def work_size(shape) -> int:
    """Entries of the `work` buffer `snr_sums` needs for a tensor of `shape`: all of it up to
    `CHUNK`, else whole dim-0 rows of about `CHUNK` entries (one row at least)."""
    n = math.prod(shape)
    if n <= CHUNK or len(shape) == 0:
        return n
    row = n // shape[0]
    return max(1, CHUNK // max(row, 1)) * row


def snr_sums(v: torch.Tensor, subset: tuple[int, ...], work: torch.Tensor | None = None) -> torch.Tensor:
    """The sums over the kept slices of SNR, mean_sq and var, and their count: `snr_terms` before
    its division, so the sums of shards of `v` (whole slices each) add up to those of `v`."""
    return slice_sums(*slice_stats(v, subset, work))


def slice_stats(v: torch.Tensor, subset: tuple[int, ...], work: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the population variance of each slice of `v` along `subset`: two tensors of
    `v`'s shape with the `subset` axes of size 1 (float32, or float64 for a float64 `v`).

    A tensor of more than `CHUNK` entries is worked through along dim 0, `work_size` entries of
    temporaries at a time: slices that do not span dim 0 chunk by chunk; slices that do with their
    means first, then the deviations' sums accumulated over the chunks (the same arithmetic)."""
    x = v if v.dtype in (torch.float32, torch.float64) else v.float()
    if x.numel() <= CHUNK or x.dim() == 0:
        return _whole_stats(x, subset, work)
    size = work_size(tuple(x.shape))
    if work is None or work.dtype != x.dtype or work.device != x.device or work.numel() < size:
        work = torch.empty(size, dtype=x.dtype, device=x.device)
    rows = size // (x.numel() // x.shape[0])
    pieces = range(0, x.shape[0], rows)
    if 0 not in subset:              # each chunk holds whole slices
        parts = [_whole_stats(x[a:a + rows], subset, work) for a in pieces]
        return torch.cat([m for m, _ in parts]), torch.cat([var for _, var in parts])
    m = x.mean(dim=subset, keepdim=True)
    c = torch.zeros_like(m)
    square = torch.zeros_like(m)
    for a in pieces:
        part = x[a:a + rows]
        dev = torch.sub(part, m, out=work[: part.numel()].view(part.shape))
        c += dev.sum(dim=subset, keepdim=True)
        square += dev.mul_(dev).sum(dim=subset, keepdim=True)
    count = math.prod(x.shape[i] for i in subset)
    c = c.div_(count)
    var = (square.div_(count) - c * c).clamp_(min=0)
    return m.add_(c), var


def _whole_stats(x: torch.Tensor, subset: tuple[int, ...], work: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`slice_stats` of `x` (float32 or float64) in one piece."""
    # Passes of the tensor's own dtype only: a float32 reduction accumulating in float64
    # (``mean(dtype=float64)``) ran up to 20x slower on CPU than the float32 one, and var_mean's
    # Welford kernel as slow. So: the mean m of each slice, then the deviations d = x - m and their
    # mean c (the rounding of m, exactly as small as it is), and var = mean(d²) - c². The refined
    # mean m + c and the variance agree with float64 to float32 rounding, and a slice of n equal
    # values v is exact: m - v is a few units in v's last place, so d, n·d, d² and n·d² are exact
    # (while n is below about 2^20), c = d and var = d² - d² = 0: the slice is left out as
    # constant, where a float32 two-pass variance gave ~1e-17 and an SNR of ~1e13.
    m = x.mean(dim=subset, keepdim=True)
    if work is None or work.dtype != x.dtype or work.device != x.device or work.numel() < x.numel():
        dev = x - m
    else:
        dev = torch.sub(x, m, out=work[: x.numel()].view(x.shape))
    c = dev.mean(dim=subset, keepdim=True)
    square = dev.mul_(dev).mean(dim=subset, keepdim=True)
    var = (square - c * c).clamp_(min=0)    # rounding must not make a tiny variance negative
    return m.add_(c), var


def combine_stats(mean: torch.Tensor, var: torch.Tensor, axes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The `slice_stats` of the coarser slices that join the slices of (`mean`, `var`) along
    `axes` (slices of equal size): the mean of the means, and by the law of total variance the
    mean of the variances plus the variance of the means. It reads the slices' statistics, not
    the tensor: a subset's numbers from a finer subset's at a fraction of a pass. The means'
    variance is taken as `_whole_stats` takes one, so slices that are all constant and equal
    give exactly 0."""
    m, between = _whole_stats(mean, axes, None)
    return m, var.mean(dim=axes, keepdim=True).add_(between)


def snr_sums_many(v: torch.Tensor, subsets: list[tuple[int, ...]], work: torch.Tensor | None = None
                  ) -> list[torch.Tensor]:
    """`snr_sums` of `v` along each of `subsets`, reading `v` once per subset that no smaller
    one among them divides: a subset that contains a computed one is combined from that one's
    slice statistics (`combine_stats`, the one with the fewest slices), so the three subsets of
    a matrix take two passes and the seven of a 3-D view three. The same numbers up to float
    rounding."""
    x = v if v.dtype in (torch.float32, torch.float64) else v.float()
    computed = _subset_stats(x, subsets, work, 0)
    return [slice_sums(*computed[s]) for s in subsets]


def snr_sums_stacked(stacked: torch.Tensor, subsets: list[tuple[int, ...]], work: torch.Tensor | None = None
                     ) -> list[torch.Tensor]:
    """`snr_sums_many` of each of ``stacked[0], stacked[1], …`` (same-shaped tensors stacked
    along a new dim 0; `subsets` name their own axes) in one set of passes: for each subset an
    (L, 4) tensor, row i the sums of ``stacked[i]``. Many small tensors of one shape (every
    layer's q, k, v, ...) then cost the ops of one."""
    x = stacked if stacked.dtype in (torch.float32, torch.float64) else stacked.float()
    computed = _subset_stats(x, subsets, work, 1)
    return [slice_sums(*computed[s], batch=True) for s in subsets]


def _subset_stats(x: torch.Tensor, subsets: list[tuple[int, ...]], work: torch.Tensor | None, shift: int
                  ) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
    """`slice_stats` of `x` along each of `subsets` (axes counted from dim `shift` of `x`), each
    combined from a computed finer one where there is one (`snr_sums_many`)."""
    computed: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    for s in sorted(subsets, key=len):
        finer = [k for k in computed if set(k) < set(s)]
        if finer:
            base = min(finer, key=lambda k: computed[k][0].numel())
            stats = combine_stats(*computed[base], tuple(a + shift for a in s if a not in base))
        else:
            stats = slice_stats(x, tuple(a + shift for a in s), work)
        computed[s] = stats
    return computed


def snr_terms_many(v: torch.Tensor, subsets: list[tuple[int, ...]], work: torch.Tensor | None = None
                   ) -> list[torch.Tensor]:
    """`snr_terms` of `v` along each of `subsets` (`snr_sums_many`)."""
    return [sums[:3] / sums[3] for sums in snr_sums_many(v, subsets, work)]


def slice_sums(mean: torch.Tensor, var: torch.Tensor, batch: bool = False) -> torch.Tensor:
    """``[Σ mean²/var, Σ mean², Σ var, count]`` over the slices whose ratio is finite; with
    `batch`, one such row for each index of dim 0 (an (L, 4) tensor)."""
    mean_sq = mean * mean
    ratio = mean_sq / var
    keep = torch.isfinite(ratio)
    rows = mean.shape[0] if batch else 1
    terms = torch.stack([ratio, mean_sq, var]).reshape(3, rows, -1)
    kept = torch.where(keep.reshape(1, rows, -1), terms, 0).sum(dim=2)                     # (3, rows)
    sums = torch.cat([kept, keep.reshape(rows, -1).sum(dim=1).to(kept.dtype).reshape(1, rows)]).t()
    return sums if batch else sums[0]


def estimate_snr(v: torch.Tensor, subsets: list[tuple[int, ...]] | None = None) -> dict[tuple[int, ...], SnrValue]:
    """SNR of `v` along each axis subset (all non-empty subsets by default).

    Args:
        v: the second-moment tensor, or a view of it (e.g. split by heads), any float dtype.
        subsets: axis subsets to evaluate; default `axis_subsets(v.dim())`.

    Returns:
        ``{subset: SnrValue}``; one host transfer for all subsets, each subset that contains
        another one combined from that one's slice statistics (`snr_sums_many`).
    """
    subsets = axis_subsets(v.dim()) if subsets is None else subsets
    if not subsets:
        return {}
    values = torch.stack(snr_terms_many(v, subsets)).double().cpu().tolist()
    return {s: SnrValue(*row) for s, row in zip(subsets, values)}
