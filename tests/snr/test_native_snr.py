"""The native SNR kernel (`lowmem_snr` in kernels/step.c) against numpy float64 and the torch
estimator it replaces on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.optim import native
from lowmem.snr.estimator import axis_subsets, snr_sums
from lowmem.snr.views import View

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel cannot be built")


def numpy_sums(v, subset):
    """[Σ mean²/var, Σ mean², Σ var, count] over the slices along `subset` whose ratio is finite,
    in float64 from the formula (population variance, two passes)."""
    x = np.asarray(v, dtype=np.float64)
    rest = [d for d in range(x.ndim) if d not in subset]
    rows = np.transpose(x, rest + list(subset)).reshape(-1, math.prod(x.shape[d] for d in subset))
    mean = rows.mean(axis=1)
    var = ((rows - mean[:, None]) ** 2).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mean * mean / var
    kept = np.isfinite(ratio)
    return np.array([ratio[kept].sum(), (mean * mean)[kept].sum(), var[kept].sum(), kept.sum()])


def views():
    g = torch.Generator().manual_seed(0)
    fused = torch.rand(96, 3 * 64, generator=g) ** 3              # a Conv1D-style fused q/k/v (in, 3·out)
    # GPT-NeoX's layout: per head its q, k and v rows; the k part's head view
    interleaved = View("k.heads", (4, 12, 40), ("head", "out", "in"), "k", 1, 12, 24, (4, 36, 40))
    inter = torch.rand(4 * 36, 40, generator=g)
    embedding = torch.rand(3000, 96, generator=g) ** 4
    embedding[::3] = 0                                            # rows never seen
    embedding[5] = 0.25                                           # a constant row
    return {
        "matrix": torch.rand(37, 53, generator=g) ** 3,
        "q part (strided)": fused[:, 64:128],
        "q heads (strided)": fused[:, :64].reshape(96, 4, 16),
        "interleaved k heads": interleaved.apply(inter),
        "vector": torch.rand(1000, generator=g),
        "embedding (many items)": embedding,
        "few long rows": torch.rand(3, 400, 700, generator=g),
        "permuted 4-D": torch.rand(3, 4, 5, 6, generator=g).permute(2, 0, 3, 1),
        "transposed": torch.rand(9, 33, generator=g).t(),
    }


@pytest.mark.parametrize("name", list(views()))
def test_every_subset_of_every_view_matches_numpy_float64(name):
    x = views()[name]
    subsets = axis_subsets(x.dim())
    got = native.snr_sums([(x, subsets)])[0]
    assert got.shape == (len(subsets), 4) and got.dtype == torch.float64
    for subset, row in zip(subsets, got):
        want = numpy_sums(x, subset)
        np.testing.assert_allclose(row.numpy(), want, rtol=1e-12, err_msg=f"{name} {subset}")
        # the float32 torch estimator it replaces: the same up to float rounding
        np.testing.assert_allclose(row.numpy(), snr_sums(x, subset).double().numpy(), rtol=1e-5)


def test_constant_never_seen_and_nan_slices_are_left_out_exactly():
    v = torch.rand(6, 7, dtype=torch.float32)
    v[2] = 0.1                      # constant: a float32 mean is inexact, the variance must still be 0
    v[3] = 0                        # never seen
    v[4, 1] = float("nan")
    rows = native.snr_sums([(v, [(1,), (0,), (0, 1)])])[0]
    assert rows[0, 3] == 3          # rows 0, 1, 5 kept
    np.testing.assert_allclose(rows[0].numpy(), numpy_sums(v, (1,)), rtol=1e-12)
    assert rows[1, 3] == 6          # every column but the one with the NaN
    assert rows[2].tolist() == [0, 0, 0, 0]   # the whole tensor holds a NaN
    const = torch.full((5, 300, 4), 3.7e-3)
    assert native.snr_sums([(const, axis_subsets(3))])[0][:, 3].tolist() == [0] * 7


def test_a_variance_below_floats_range_is_measured_as_float64_measures_it():
    # v of about 1e-21 with relative spread 1e-2: the variance (3e-47) is below float32's range,
    # where the float32 estimator makes it 0 and leaves every slice out (at 1e-20 it is a
    # denormal, and the SNR comes out 40% low); the kernel's double sums keep them, as numpy
    # float64 does, and the SNR is the same as at scale 1 (it is invariant to scaling v)
    g = torch.Generator().manual_seed(1)
    u = 1 + 0.01 * torch.rand(4, 64, generator=g)
    tiny, unit = native.snr_sums([(1e-21 * u, [(1,)]), (u, [(1,)])])
    np.testing.assert_allclose(tiny[0].numpy(), numpy_sums(1e-21 * u, (1,)), rtol=1e-9)
    assert tiny[0, 3] == unit[0, 3] == 4
    assert tiny[0, 0].item() == pytest.approx(unit[0, 0].item(), rel=1e-5)
    assert snr_sums(1e-21 * u, (1,))[3] == 0


def test_the_number_of_threads_does_not_change_a_bit():
    entries = [(x, axis_subsets(x.dim())) for x in views().values()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.snr_sums(entries)
        torch.set_num_threads(2)
        two = native.snr_sums(entries)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_scratch_of_a_4096_by_1024_matrix_by_hand():
    # 16 items of 256 rows; the subsets across dim 0, (0,) with 1024 slices and (0, 1) with one,
    # keep two doubles per slice per item: 16·2·1025; (1,) two per row: 2·4096; a float x0 per
    # slice: 5121 floats in 2561 doubles, and one more; three 96-byte subset records
    x = torch.rand(4096, 1024)
    report = {}
    native.snr_sums([(x, [(0,), (1,), (0, 1)])], report)
    assert report["scratch_bytes"] == 8 * (16 * 2 * 1025 + 2 * 4096 + 2561 + 1) + 3 * 96
    assert report["scratch_bytes"] <= 0.03 * 4 * x.numel()


def test_empty_views_and_no_subsets_give_zero_sums_and_bad_input_is_refused():
    got = native.snr_sums([(torch.zeros(0, 8), [(0,), (1,)]), (torch.rand(3, 4), [])])
    assert got[0].tolist() == [[0] * 4] * 2 and got[1].shape == (0, 4)
    with pytest.raises(ValueError, match="fp32 CPU"):
        native.snr_sums([(torch.rand(3, 4, dtype=torch.float64), [(0,)])])
    with pytest.raises(ValueError, match="fp32 CPU"):
        native.snr_sums([(torch.tensor(1.0), [])])
    with pytest.raises(ValueError, match="not subsets"):
        native.snr_sums([(torch.rand(3, 4), [(2,)])])
    with pytest.raises(ValueError, match="not subsets"):
        native.snr_sums([(torch.rand(3, 4), [(0, 0)])])
    # an expanded view of 2^61 entries whose sums would need 2^65 doubles: out of memory, where
    # the sizes once wrapped around to a few bytes and the kernel wrote past them
    huge = torch.rand(1).expand(2, 2**60, 1, 1, 1, 1, 1, 1)
    with pytest.raises(MemoryError, match="could not allocate"):
        native.snr_sums([(huge, [(2,), (3,), (4,), (5,), (6,), (7,), (2, 3), (4, 5)])])


def test_capture_measures_with_the_kernel_what_the_torch_estimator_measures(monkeypatch):
    # the same training run measured through the kernel and through the torch path (as without a
    # compiler): every sample equal up to float rounding
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 50))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        with lowmem.capture(opt, model, every=2) as cap:
            for _ in range(6):
                x = torch.randint(0, 50, (16,))
                nn.functional.cross_entropy(model(x), x).backward()
                opt.step()
                opt.zero_grad()
        return cap.samples

    kernel = run()
    monkeypatch.setattr(native, "snr_reads", lambda x: False)
    torch_path = run()
    assert len(kernel) == len(torch_path) > 0
    for a, b in zip(kernel, torch_path):
        assert (a.step, a.name, a.view, a.subset) == (b.step, b.name, b.view, b.subset)
        for field in ("snr", "mean_sq", "var"):
            x, y = getattr(a, field), getattr(b, field)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-5), (a, b)
