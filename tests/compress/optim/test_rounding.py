"""Stochastic rounding to bf16: always one of the two neighbouring bf16 values, unbiased (the mean
of many roundings equals the value within its standard error), reproducible under a seed."""

from __future__ import annotations

import math

import pytest
import torch

from lowmem.compress.optim.rounding import round_to_bf16_stochastic


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values at or below and at or above each fp32 entry: its bits truncated to the top
    16 (toward zero), and the next bf16 pattern away from zero."""
    bits = x.view(torch.int32)
    toward_zero = bits & -(1 << 16)
    away = torch.where(bits == toward_zero, toward_zero, toward_zero + (1 << 16))
    a, b = toward_zero.view(torch.float32), away.view(torch.float32)
    return torch.minimum(a, b), torch.maximum(a, b)


def test_result_is_one_of_the_two_bf16_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.logspace(-20, 20, 10_000)
    low, high = _neighbours(x)
    got = round_to_bf16_stochastic(x, torch.Generator().manual_seed(1)).float()
    assert torch.all((got == low) | (got == high))
    assert torch.any(got == low) and torch.any(got == high)


def test_bf16_values_and_non_finite_values_are_kept():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf"), float("nan")])
    for seed in range(5):
        got = round_to_bf16_stochastic(x, torch.Generator().manual_seed(seed))
        assert torch.equal(got[:4], x[:4].to(torch.bfloat16))
        assert got[5] == float("inf") and got[6] == float("-inf") and torch.isnan(got[7])


@pytest.mark.parametrize("value", [1.0 + 2 ** -9, -3.0 - 0.3 * 2 ** -6, 1e-3 * (1 + 0.77 * 2 ** -7)])
def test_mean_of_many_roundings_is_the_value(value):
    n = 40_000
    x = torch.full((n,), value, dtype=torch.float32)
    got = round_to_bf16_stochastic(x, torch.Generator().manual_seed(2)).double()
    low, high = (t[0].item() for t in _neighbours(x[:1]))
    p = (float(x[0]) - low) / (high - low)                       # the chance of rounding to `high`
    stderr = (high - low) * math.sqrt(p * (1 - p) / n)
    assert 0 < p < 1 and abs(got.mean().item() - float(x[0])) < 4 * stderr
    assert round_to_bf16_stochastic(x[:1]).item() in (low, high)


def test_same_seed_same_rounding():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    a = round_to_bf16_stochastic(x, torch.Generator().manual_seed(4))
    b = round_to_bf16_stochastic(x, torch.Generator().manual_seed(4))
    c = round_to_bf16_stochastic(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
