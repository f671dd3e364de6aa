"""The precision measurement's Triton kernels (`lowmem.compress.optim.gpu.precision_sums`) against
numpy float64 (`test_precision.reference_sums`, whose round trips come from the torch path) and
the torch ops. With CUDA they run on the device (and `error_sums_all` must take them there,
with no host synchronisation); without it in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set by tests/conftest.py for the session)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from lowmem.snr import precision

from test_precision import native_states, reference_sums

pytest.importorskip("triton", reason="Triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=0)")


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


def test_triton_sums_equal_numpy_float64_and_the_torch_ops():
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


def test_with_eps_zero_the_entries_past_a_row_add_nothing():
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


def test_triton_sums_do_not_depend_on_which_states_are_measured_together():
    # each parameter's sums are its own programs' added in order: alone or among others, the same bits
    from lowmem.compress.optim import gpu

    states = [on_device(s) for s in small_states()]
    together = gpu.precision_sums(states)
    for i in (0, 3, len(states) - 1):
        assert torch.equal(gpu.precision_sums([states[i]])[0], together[i])


def test_a_kernel_that_does_not_compile_leaves_the_measurement_to_torch_ops_after_one_warning(monkeypatch):
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
def test_on_cuda_error_sums_all_takes_the_kernels_without_a_host_sync_and_device_steps_agree(monkeypatch):
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
