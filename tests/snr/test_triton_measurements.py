"""The capture's Triton kernels (`lowmem.compress.optim.gpu`): the SNR (`snr_sums`) against numpy
float64 (`test_native_snr.numpy_sums`) and the native CPU kernel, the precision
(`precision_sums`) against numpy float64 (`test_precision.reference_sums`, whose round trips come
from the torch path) and the torch ops. With CUDA they run on the device (and a capture and
`error_sums_all` must take them there, with no host synchronisation); without it in Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by tests/conftest.py for the session).
`test_triton_compiles.py` compiles them for a GPU."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowmem
from lowmem.snr import precision
from lowmem.snr.estimator import axis_subsets

from test_native_snr import numpy_sums, views
from test_precision import native_states, reference_sums

pytest.importorskip("triton", reason="Triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=0)")


# -- the SNR ----------------------------------------------------------------------------------------
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


# -- the precision ----------------------------------------------------------------------------------
def small_states():
    """`test_precision.native_states` but its 600,000-entry one (too slow to interpret): rows
    ending in short blocks (257: a second tile of one entry), 4-D (rows of 495), 1-D and too small
    to quantize, rows of zeros, an all-zero state; then bf16 states, as AdamW keeps them for bf16
    parameters."""
    states = [s for s in native_states() if s[5] != (2, 300_000)]
    g = torch.Generator().manual_seed(1)
    for shape in [(24, 300), (130,)]:
        m = (torch.randn(shape, generator=g) * 1e-3).bfloat16()
        v = (torch.rand(shape, generator=g) ** 2 * 1e-7).bfloat16()
        states.append((m, v, 11, (0.9, 0.999), 1e-8, shape))
    return states


def on_device(state):
    m, v, *rest = state
    return (m.to(DEVICE), v.to(DEVICE), *rest)


def step_of(state) -> int:
    return int(state[2])


def test_precision_sums_equal_numpy_float64_and_the_torch_ops():
    from lowmem.compress.optim import gpu

    states = small_states()
    got = gpu.precision_sums([on_device(s) for s in states])
    for state, sums in zip(states, got):
        m, v = state[0].float(), state[1].float()
        want = reference_sums(m, v, step_of(state), *state[3:])
        assert sums.dtype == torch.float64 and sums.device.type == DEVICE.type and sums.shape == want.shape
        np.testing.assert_allclose(sums.cpu().numpy(), want, rtol=1e-5, atol=0, err_msg=str(state[5]))
        torch_ops = precision.error_sums(m, v, *state[2:])
        np.testing.assert_allclose(sums.cpu().numpy(), torch_ops.numpy(), rtol=1e-5, atol=0, err_msg=str(state[5]))
    zero = [s for s, t in zip(states, got) if not s[0].any()]
    assert zero and all(not t.any() for s, t in zip(states, got) if not s[0].any())   # zero state: zeros


def test_precision_with_eps_zero_adds_nothing_past_a_row():
    # ε = 0: the update of a zero entry is 0/0, but lanes past a row's end (rows of 200 and 3000
    # entries fill 256-entry tiles partly) are no entries: the sums stay those of the entries
    from lowmem.compress.optim import gpu

    g = torch.Generator().manual_seed(3)
    states = [((torch.randn(shape, generator=g) * 1e-3), torch.rand(shape, generator=g) * 1e-6 + 1e-9, 5,
               (0.9, 0.999), 0.0, shape) for shape in [(64, 200), (3000,)]]
    for state, sums in zip(states, gpu.precision_sums([on_device(s) for s in states])):
        want = reference_sums(state[0], state[1], 5, *state[3:])
        assert np.isfinite(want).all()
        np.testing.assert_allclose(sums.cpu().numpy(), want, rtol=1e-5, atol=0, err_msg=str(state[5]))


def test_precision_sums_do_not_depend_on_which_states_are_measured_together():
    # each parameter's sums are its own programs' added in order: alone or among others, the same bits
    from lowmem.compress.optim import gpu

    states = [on_device(s) for s in small_states()]
    together = gpu.precision_sums(states)
    for i in (0, 3, len(states) - 1):
        assert torch.equal(gpu.precision_sums([states[i]])[0], together[i])


def test_a_kernel_that_does_not_compile_leaves_the_precision_to_torch_ops_after_one_warning(monkeypatch):
    from lowmem.compress.optim import gpu

    def broken(states):
        raise gpu.KernelUnavailable("precision_tiles: CompilationError: (test)")

    monkeypatch.setattr(gpu, "precision_sums", broken)
    monkeypatch.setattr(gpu, "_measure_broken", {})
    states = [on_device(s) for s in small_states()[:2]]
    with pytest.warns(RuntimeWarning, match="precision measurement could not be compiled"):
        assert precision._triton_sums(states) is None
    assert not gpu.measurement_runs("precision") and not precision._triton_reads(states[0])
    assert gpu.measurement_runs("snr")   # the other measurement's kernels are not given up
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if CUDA:   # error_sums_all goes on with the torch ops, without warning again
            for state, sums in zip(states, precision.error_sums_all(states)):
                torch.testing.assert_close(sums, precision.error_sums(*state), rtol=1e-6, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_cuda_error_sums_all_takes_the_precision_kernels_without_a_host_sync_and_device_steps_agree(monkeypatch):
    from lowmem.compress.optim import gpu

    calls = []
    real = gpu.precision_sums
    monkeypatch.setattr(gpu, "precision_sums", lambda states: calls.append(len(states)) or real(states))
    states = [on_device(s) for s in small_states()]
    # fused AdamW keeps each step as a float32 tensor on the device
    device_steps = [(s[0], s[1], torch.tensor(float(step_of(s)), device="cuda"), *s[3:]) for s in states]
    host = precision.error_sums_all(states)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        device = precision.error_sums_all(device_steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == [len(states), len(states)]
    for a, b, state in zip(host, device, states):
        want = reference_sums(state[0].float().cpu(), state[1].float().cpu(), step_of(state), *state[3:])
        np.testing.assert_allclose(a.cpu().numpy(), want, rtol=1e-5, atol=0)
        np.testing.assert_allclose(b.cpu().numpy(), want, rtol=1e-5, atol=0)
