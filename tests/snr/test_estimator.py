"""The SNR estimator against an independent float64 reference and against known distributions."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch

from lowmem.snr import SnrValue, axis_subsets, estimate_snr


def _every_subset(ndim):
    return [s for k in range(1, ndim + 1) for s in combinations(range(ndim), k)]


def _with_masked_slices(v, rng):
    """Zero some rows (never-seen embedding rows: 0/0) and make others constant (c/0)."""
    v = v.copy()
    rows = v.reshape(v.shape[0], -1)
    rows[0] = 0.0
    rows[3] = 3.0        # exactly representable, so the reference's mean and var are exact
    if v.shape[0] > 5:
        rows[5] = 0.25
    # A constant fibre along the last axis: zero variance along that axis only.
    idx = tuple(rng.integers(0, s) for s in v.shape[:-1])
    v[idx] = 2.0
    return v


SHAPES = [(7, 5), (9, 1), (6, 4, 3), (5, 3, 4, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_estimate_snr_matches_float64_reference_on_every_subset(shape, masked, dtype, rtol, reference_snr):
    rng = np.random.default_rng(sum(shape))
    v = rng.standard_normal(shape) ** 2 * rng.uniform(0.1, 10.0, size=shape)
    if masked:
        v = _with_masked_slices(v, rng)
    t = torch.from_numpy(v).to(dtype)
    ref_input = t.double().numpy()   # the values the estimator actually sees
    got = estimate_snr(t)
    assert list(got) == _every_subset(len(shape))
    for subset, value in got.items():
        want = reference_snr(ref_input, subset)
        assert isinstance(value, SnrValue)
        np.testing.assert_allclose([value.snr, value.mean_sq, value.var], want, rtol=rtol,
                                   err_msg=f"subset {subset}")


def test_zero_and_constant_slices_are_left_out_not_averaged_as_zero_or_inf():
    # Rows: random, zero (0/0), constant 4 (4^2/0 = inf), random.
    a = np.array([1.0, 2.0, 4.0, 9.0])
    b = np.array([3.0, 1.0, 1.0, 7.0])
    v = torch.tensor(np.stack([a, np.zeros(4), np.full(4, 4.0), b]), dtype=torch.float64)
    got = estimate_snr(v, [(1,)])[(1,)]
    ra = a.mean() ** 2 / a.var()
    rb = b.mean() ** 2 / b.var()
    assert got.snr == pytest.approx((ra + rb) / 2, rel=1e-12)
    assert got.mean_sq == pytest.approx((a.mean() ** 2 + b.mean() ** 2) / 2, rel=1e-12)
    assert got.var == pytest.approx((a.var() + b.var()) / 2, rel=1e-12)


@pytest.mark.parametrize("shape, constant", [((6, 7), 0.1), ((5, 1000), 0.3), ((3, 4, 130), 1.7),
                                             ((3, 300_000), 0.37)])
def test_an_exactly_constant_float32_slice_is_left_out(reference_snr, shape, constant):
    # A float32 sum of n copies of c is inexact, so a float32 two-pass variance of a constant slice
    # came out ~1e-17, not 0, and its SNR (~1e13) swamped the mean: the audit's case is the first.
    rng = np.random.default_rng(0)
    v = rng.exponential(size=shape).astype(np.float32)
    v[2] = constant
    for subset in _every_subset(len(shape)):
        if 0 in subset:
            continue                       # slices along dim 0 cross the constant row
        want = reference_snr(v, subset)[0]  # float64: the constant slices have variance exactly 0
        got = estimate_snr(torch.from_numpy(v), [subset])[subset].snr
        assert got == pytest.approx(want, rel=1e-4), subset
        assert got < 1e3


def test_subset_with_no_finite_slice_gives_nan(reference_snr):
    v = torch.zeros(4, 6)
    v[1] = 2.5                                  # constant rows: every slice along dim 1 is 0/0 or c/0
    got = estimate_snr(v)
    assert math.isnan(got[(1,)].snr) and math.isnan(got[(1,)].mean_sq) and math.isnan(got[(1,)].var)
    # Along dim 0 the columns are (0, 2.5, 0, 0): finite, and equal to the reference.
    np.testing.assert_allclose([got[(0,)].snr], [reference_snr(v.numpy(), (0,))[0]], rtol=1e-6)
    assert math.isnan(estimate_snr(torch.zeros(3, 3))[(0, 1)].snr)


# Sampling model for the sanity values. For one slice of n i.i.d. values X the ratio
# r = mean(X)^2 / var_pop(X) has, by the delta method (checked by simulation to within a few %):
#   Gaussian g, X = g^2 (chi^2_1: E=1, Var=2, mu3=8, mu4=60): r0 = 1/2, Var r ~ 1.5/n, bias ~ 4.5/n
#   exponential X (E=1, Var=1, mu3=2, mu4=9):                 r0 = 1,   Var r ~ 4/n,   bias ~ 6/n
# Averaging over the N/n slices of K' leaves sd(SNR) ~ sqrt(c/N). The tolerance is five standard
# deviations plus 20/n^2 for the higher-order bias terms left out of the expansion.
SANITY = [
    ("gaussian_v_first_step", 0.5, 4.5, 1.5),
    ("exponential_v", 1.0, 6.0, 4.0),
]


@pytest.mark.parametrize("kind,r0,bias,var_const", SANITY, ids=[s[0] for s in SANITY])
@pytest.mark.parametrize("shape", [(512, 384), (32, 48, 64), (16, 20, 24, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sanity_value_along_every_subset(kind, r0, bias, var_const, shape):
    gen = torch.Generator().manual_seed(0)
    if kind == "gaussian_v_first_step":
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        v = (1 - 0.999) * g * g            # Adam's raw v after the first step
    else:
        v = torch.empty(shape, dtype=torch.float64).exponential_(generator=gen)
    total = v.numel()
    for subset, value in estimate_snr(v).items():
        n = math.prod(shape[d] for d in subset)
        expected = r0 + bias / n
        tol = 5 * math.sqrt(var_const / total) + 20 / n ** 2
        assert abs(value.snr - expected) < tol, (subset, value.snr, expected, tol)


def test_snr_is_invariant_to_scaling_v():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64) ** 2
    v[2] = 0.0
    base = estimate_snr(v)
    for scale in (1e-8, 1e6):
        scaled = estimate_snr(v * scale)
        for subset, value in base.items():
            assert scaled[subset].snr == pytest.approx(value.snr, rel=1e-9)
            assert scaled[subset].mean_sq == pytest.approx(value.mean_sq * scale ** 2, rel=1e-9)
            assert scaled[subset].var == pytest.approx(value.var * scale ** 2, rel=1e-9)


def test_scale_invariance_holds_in_float32_for_tiny_v():
    # Raw v early in training is ~1e-8 * g^2; float32 must not lose the ratio.
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(16, 8, generator=gen) ** 2
    base = estimate_snr(v)
    for scale in (1e-8, 1e6):
        scaled = estimate_snr(v * scale)
        for subset, value in base.items():
            assert scaled[subset].snr == pytest.approx(value.snr, rel=1e-4)


def test_half_precision_input_is_measured_in_float32(reference_snr):
    gen = torch.Generator().manual_seed(3)
    v = (torch.randn(8, 12, generator=gen) ** 2).to(torch.bfloat16)
    got = estimate_snr(v)
    for subset, value in got.items():
        np.testing.assert_allclose(value.snr, reference_snr(v.double().numpy(), subset)[0], rtol=1e-4)


def test_axis_subsets_order_and_count():
    assert axis_subsets(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert [len(axis_subsets(d)) for d in range(1, 6)] == [2 ** d - 1 for d in range(1, 6)]
    assert axis_subsets(0) == []


def test_explicit_subsets_only_and_empty_list(reference_snr):
    v = torch.rand(3, 4, 5, dtype=torch.float64)
    got = estimate_snr(v, [(2,), (0, 2)])
    assert list(got) == [(2,), (0, 2)]
    assert got[(0, 2)].snr == pytest.approx(reference_snr(v.numpy(), (0, 2))[0], rel=1e-9)
    assert estimate_snr(v, []) == {}


@pytest.mark.parametrize("shape", [(37, 11), (9, 6, 13), (200, 3)])
def test_in_chunks_along_dim_0_every_subset_matches_float64(monkeypatch, reference_snr, shape):
    # A tensor past estimator.CHUNK entries is worked through along dim 0 (slices within a chunk,
    # or sums of deviations accumulated over chunks); here CHUNK is made tiny so every path runs
    # in many pieces, against numpy float64. Row 2 is constant: its slices stay left out.
    from lowmem.snr import estimator

    monkeypatch.setattr(estimator, "CHUNK", 20)
    rng = np.random.default_rng(1)
    v = rng.exponential(size=shape).astype(np.float32)
    v[2] = 0.3
    for subset in _every_subset(len(shape)):
        want = reference_snr(v, subset)
        got = estimate_snr(torch.from_numpy(v), [subset])[subset]
        assert got.snr == pytest.approx(want[0], rel=1e-4), subset
        assert got.mean_sq == pytest.approx(want[1], rel=1e-4), subset
        assert got.var == pytest.approx(want[2], rel=1e-4), subset


@pytest.mark.parametrize("chunk", [None, 20], ids=["whole", "chunked"])
@pytest.mark.parametrize("shape", [(37, 11), (9, 6, 13), (5, 3, 4, 2)])
def test_subsets_combined_from_finer_ones_equal_direct_and_float64(monkeypatch, reference_snr, shape, chunk):
    # snr_terms_many reads the tensor once per subset that no smaller requested one divides and
    # combines the others from slice statistics (law of total variance); every subset against
    # the direct one-subset estimator and numpy float64, with a constant block whose coarser
    # slices are constant too (left out, exactly) and a zero row.
    from lowmem.snr import estimator

    if chunk:
        monkeypatch.setattr(estimator, "CHUNK", chunk)
    rng = np.random.default_rng(2)
    v = (rng.exponential(size=shape) * rng.uniform(0.1, 10, size=shape[-1])).astype(np.float32)
    v[2] = 0.3
    v[0] = 0.0
    t = torch.from_numpy(v)
    subsets = _every_subset(len(shape))
    many = estimator.snr_terms_many(t, subsets)
    for subset, got in zip(subsets, many):
        direct = estimator.snr_terms(t, subset)
        want = reference_snr(v, subset)
        np.testing.assert_allclose(got.numpy(), direct.numpy(), rtol=1e-5, err_msg=str(subset))
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, err_msg=str(subset))
    # a subset asked alone, or beside only coarser ones, is read directly: the same numbers
    assert torch.equal(estimator.snr_terms_many(t, [subsets[-1]])[0], estimator.snr_terms(t, subsets[-1]))


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5)])
def test_stacked_tensors_give_each_ones_numbers(reference_snr, shape):
    # snr_sums_stacked measures same-shaped tensors stacked along a new dim 0 in one set of
    # passes: each row equals that tensor measured alone and numpy float64, a zero tensor (no
    # finite slice: NaN) and one with a constant row among them.
    from lowmem.snr import estimator

    rng = np.random.default_rng(3)
    members = [rng.exponential(size=shape).astype(np.float32) for _ in range(4)]
    members[1][:] = 0.0
    members[2][1] = 0.7
    stacked = torch.from_numpy(np.stack(members))
    subsets = _every_subset(len(shape))
    sums = estimator.snr_sums_stacked(stacked, subsets)
    for subset, per_member in zip(subsets, sums):
        assert per_member.shape == (4, 4)
        for i, v in enumerate(members):
            alone = estimator.snr_sums_many(torch.from_numpy(v), [subset])[0]
            np.testing.assert_allclose(per_member[i].numpy(), alone.numpy(), rtol=1e-5, err_msg=f"{subset} {i}")
            got = (per_member[i, :3] / per_member[i, 3]).double().numpy()
            if i == 1:
                assert np.isnan(got).all()
            else:
                np.testing.assert_allclose(got, reference_snr(v, subset), rtol=1e-4, err_msg=f"{subset} {i}")
