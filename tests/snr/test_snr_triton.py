"""The SNR measurement's Triton kernels (`lowmem.compress.optim.gpu.snr_sums`) against numpy
float64 (`test_native_snr.numpy_sums`) and the native CPU kernel. With CUDA they run on the
device (and a capture must take them there); without it in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by tests/conftest.py for the session)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowmem
from lowmem.snr.estimator import axis_subsets

from test_native_snr import numpy_sums, views

pytest.importorskip("triton", reason="Triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=0)")


def device_views() -> dict[str, torch.Tensor]:
    """`test_native_snr.views` (strided parts and heads of a fused matrix, an interleaved head
    view, a permuted 4-D tensor, a transposed one, an embedding with zero and constant rows, a
    vector) on the device, but its 840,000-entry one (too slow to interpret), with their strides."""
    out = {}
    for name, x in views().items():
        if name == "few long rows":
            continue
        base = x._base if x._base is not None else x
        moved = base.to(DEVICE)
        out[name] = moved.as_strided(x.shape, x.stride(), x.storage_offset())
    return out


def assert_sums_match(got: torch.Tensor, x: torch.Tensor, subsets, what: str):
    assert got.dtype == torch.float64 and got.shape == (len(subsets), 4)
    for row, subset in zip(got.cpu().numpy(), subsets):
        want = numpy_sums(x.float().cpu(), subset)
        assert row[3] == want[3], (what, subset)   # the same slices kept
        np.testing.assert_allclose(row, want, rtol=1e-9, atol=0, err_msg=f"{what} along {subset}")


def test_every_subset_of_every_view_matches_numpy_float64_in_one_call():
    from lowmem.compress.optim import gpu

    xs = device_views()
    entries = [(x, axis_subsets(x.dim())) for x in xs.values()]
    for (name, x), got, (_, subsets) in zip(xs.items(), gpu.snr_sums(entries), entries):
        assert_sums_match(got, x, subsets, name)


def test_slices_longer_than_a_program_are_added_in_pieces_and_constant_ones_left_out():
    from lowmem.compress.optim import gpu

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 70_000, generator=g) ** 3).to(DEVICE)   # rows of 70,000 > SNR_SEG: two pieces
    x[1] = 0.5                                                   # a constant row: its variance is 0
    assert x.shape[1] > gpu.SNR_SEG
    entries = [(x, [(1,), (0, 1), (0,)]), (x.t(), [(0,), (0, 1)])]
    got = gpu.snr_sums(entries)
    for (view, subsets), sums in zip(entries, got):
        assert_sums_match(sums, view, subsets, str(tuple(view.shape)))
    assert got[0][0, 3].item() == 2   # the constant row is not a slice of the (1,) subset


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_views_and_grouping_do_not_change_the_numbers(dtype):
    # AdamW keeps v in the parameters' dtype: bf16 or fp16 (`.half()` models)
    from lowmem.compress.optim import gpu

    g = torch.Generator().manual_seed(2)
    x = (torch.rand(48, 40, generator=g) ** 2).to(dtype).to(DEVICE)
    alone = gpu.snr_sums([(x, [(0,), (1,)])])[0]
    assert_sums_match(alone, x, [(0,), (1,)], str(dtype))
    assert_sums_match(gpu.snr_sums([(x.t(), [(0,)])])[0], x.t(), [(0,)], f"{dtype}, transposed")
    others = list(device_views().values())[:3]
    together = gpu.snr_sums([(others[0], [(0,)]), (x, [(0,), (1,)]), (others[1], [(1,)])])
    assert torch.equal(together[1], alone)   # each task's programs add in order, whatever else runs


def test_a_kernel_that_does_not_compile_leaves_the_snr_to_torch_ops_after_one_warning(monkeypatch):
    from lowmem.compress.optim import gpu

    def broken(entries):
        raise gpu.KernelUnavailable("snr_whole: CompilationError: (test)")

    monkeypatch.setattr(gpu, "snr_sums", broken)
    monkeypatch.setattr(gpu, "_measure_broken", {})
    with pytest.warns(RuntimeWarning, match="snr measurement could not be compiled"):
        assert gpu.measured("snr", lambda: gpu.snr_sums([])) is None
    assert not gpu.measurement_runs("snr") and gpu.measurement_runs("precision")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_capture_on_cuda_measures_with_the_kernels_and_agrees_with_the_torch_ops(monkeypatch):
    from lowmem.compress.optim import gpu

    calls = []
    real = gpu.snr_sums
    monkeypatch.setattr(gpu, "snr_sums", lambda entries: calls.append(len(entries)) or real(entries))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 16, device="cuda"), torch.randn(64, 4, device="cuda")
    for _ in range(3):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cap = lowmem.capture(opt, model, every=10**9)
    cap.detach()
    kernels = cap.measure(3)
    assert len(calls) == 1 and calls[0] > 0, calls   # one call for every view
    monkeypatch.setattr(gpu, "_measure_broken", {"snr": "(test: the torch ops)"})
    torch_ops = cap.measure(3)
    cap.close()
    assert len(calls) == 1 and len(kernels) == len(torch_ops) > 0
    for a, b in zip(kernels, torch_ops):
        assert (a.name, a.view, a.subset) == (b.name, b.view, b.subset)
        np.testing.assert_allclose([a.snr, a.mean_sq, a.var], [b.snr, b.mean_sq, b.var], rtol=1e-4, err_msg=a.name)
