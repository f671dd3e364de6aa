"""Shared oracle for the SNR tests: the estimator written from its formula, in numpy float64."""

from __future__ import annotations

import math

import numpy as np
import pytest


def _reference_snr(v, subset):
    """SNR_K(V) = mean over K' of (mean_K V)^2 / var_K V, written from the formula in float64.

    Population variance; slices whose ratio is not finite (0/0, c/0) are left out, and mean_sq and
    var are averaged over the same kept slices. Returns (snr, mean_sq, var); NaNs when none is kept.
    """
    x = np.asarray(v, dtype=np.float64)
    rest = [d for d in range(x.ndim) if d not in subset]
    n_rest = int(np.prod([x.shape[d] for d in rest]))   # 1 when the subset is every axis
    rows = np.transpose(x, rest + list(subset)).reshape(n_rest, -1)   # one row per slice of K'
    n = rows.shape[1]
    mean = rows.sum(axis=1) / n
    var = ((rows - mean[:, None]) ** 2).sum(axis=1) / n
    mean_sq = mean * mean
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mean_sq / var
    kept = np.isfinite(ratio)
    if not kept.any():
        return math.nan, math.nan, math.nan
    return ratio[kept].mean(), mean_sq[kept].mean(), var[kept].mean()


@pytest.fixture
def reference_snr():
    return _reference_snr
