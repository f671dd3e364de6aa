"""Capture on CUDA: no host synchronisation in the hook between measurements, and the measured
SNR equals a float64 numpy computation from the optimizer's state. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowmem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_capture_on_cuda_syncs_only_when_a_measurement_may_be_due():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)    # fused keeps `step` on the GPU
    x, y = torch.randn(64, 16, device="cuda"), torch.randn(64, 4, device="cuda")
    every, calls, strict = 5, [0], []

    def enter(*_):   # registered before capture's hook: strict while it runs on a step it must not read
        calls[0] += 1
        if calls[0] > 1 and calls[0] % every:   # the first call reads the step once, as documented
            torch.cuda.set_sync_debug_mode("error")
            strict.append(calls[0])

    enter_handle = opt.register_step_post_hook(enter)
    cap = lowmem.capture(opt, model, every=every)
    leave_handle = opt.register_step_post_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"))
    try:
        for _ in range(20):
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        cap.close()
        enter_handle.remove()
        leave_handle.remove()
    assert len(strict) == 15 and cap.measured_steps == [5, 10, 15, 20]
    v = opt.state[model[2].weight]["exp_avg_sq"].double().cpu().numpy()     # (4, 32): (out, in)
    sample = {s.subset: s for s in cap.samples if s.step == 20 and s.name == "2.weight"}
    for subset, axis in (((0,), 0), ((1,), 1)):
        mean, var = v.mean(axis=axis), v.var(axis=axis)
        assert sample[subset].snr == pytest.approx(np.mean(mean ** 2 / var), rel=1e-4)


def _train_captured(stream: bool, steps: int = 12, precision_every=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)     # foreach: `step` stays on the host
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(64, 16, device="cuda", generator=g), torch.randn(64, 4, device="cuda", generator=g))
               for _ in range(steps)]
    cap = lowmem.capture(opt, model, every=3, precision=True, stream=stream, precision_every=precision_every)
    seen_before_close = []
    try:
        for i, (x, y) in enumerate(batches):
            F.mse_loss(model(x), y).backward()
            # nothing in the hook or the side-stream launch synchronises with the host, once the
            # first measurement (step 3) has put the quantization maps on the device
            if stream and i >= 3:
                torch.cuda.set_sync_debug_mode("error")
            opt.step()
            torch.cuda.set_sync_debug_mode("default")
            opt.zero_grad(set_to_none=True)
        seen_before_close = list(cap.samples)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        cap.close()
    return model, cap, seen_before_close


def test_side_stream_measures_the_same_numbers_without_blocking_training():
    plain_model, plain, _ = _train_captured(stream=False)
    side_model, side, before_close = _train_captured(stream=True)
    assert side.measured_steps == plain.measured_steps == [3, 6, 9, 12]
    key = lambda s: (s.step, s.name, s.view, s.subset)
    assert sorted(map(key, side.samples)) == sorted(map(key, plain.samples))
    for a, b in zip(sorted(side.samples, key=key), sorted(plain.samples, key=key)):
        assert (a.snr, a.mean_sq, a.var) == pytest.approx((b.snr, b.mean_sq, b.var), rel=1e-6, nan_ok=True)
    pkey = lambda s: (s.step, s.name, s.state, s.format)
    for a, b in zip(sorted(side.precision_samples, key=pkey), sorted(plain.precision_samples, key=pkey)):
        assert pkey(a) == pkey(b)
        assert (a.state_error, a.update_error) == pytest.approx((b.state_error, b.update_error), rel=1e-6)
    # the last measurement (launched by the last step's hook) arrives at close; training is
    # unchanged by the side stream
    assert {s.step for s in before_close} <= {3, 6, 9} and 12 in {s.step for s in side.samples}
    for p, q in zip(plain_model.parameters(), side_model.parameters()):
        assert torch.equal(p, q)


def test_side_stream_with_precision_every_measures_the_precision_at_the_first_and_its_multiples_only():
    _, plain, _ = _train_captured(stream=False)
    _, side, _ = _train_captured(stream=True, precision_every=6)
    assert side.measured_steps == [3, 6, 9, 12] and {s.step for s in side.precision_samples} == {3, 6, 12}
    pkey = lambda s: (s.step, s.name, s.state, s.format)
    want = {pkey(s): s for s in plain.precision_samples if s.step in (3, 6, 12)}
    assert sorted(map(pkey, side.precision_samples)) == sorted(want)
    for a in side.precision_samples:
        b = want[pkey(a)]
        assert (a.state_error, a.update_error) == pytest.approx((b.state_error, b.update_error), rel=1e-6)


def test_lowmem_analyze_with_a_side_stream_measures_what_it_measures_without(tmp_path):
    # the front door on the built-in example: --side-stream changes where the measurements run,
    # not what they are; the plans make the same choices (CUDA's embedding backward adds in no
    # fixed order, so two runs agree to float rounding, not bit for bit)
    from cli_runner import cli
    from lowmem.snr.precision import read_precision
    from lowmem.snr.trajectory import read_trajectory

    runs = {}
    for name, extra in (("plain", []), ("side", ["--side-stream"])):
        out = tmp_path / name
        code, _, err = cli("--example", "shakespeare", "--device", "cuda", "--steps", "12", "--every", "4",
                           "--no-peak", "--no-html", "-q", "--out", out, *extra)
        assert code == 0, err
        runs[name] = out
    key = lambda s: (s.step, s.name, s.view, s.subset)
    plain = sorted(read_trajectory(runs["plain"] / "snr.csv"), key=key)
    side = sorted(read_trajectory(runs["side"] / "snr.csv"), key=key)
    assert [key(s) for s in side] == [key(s) for s in plain] and {s.step for s in side} == {4, 8, 12}
    for a, b in zip(side, plain):
        assert a.snr == pytest.approx(b.snr, rel=1e-3, nan_ok=True)
    assert len(read_precision(runs["side"] / "precision.csv")) == len(read_precision(runs["plain"] / "precision.csv"))
    from lowmem.compress import Plan

    plans = {name: Plan.load(out / "plan.json") for name, out in runs.items()}
    choices = lambda plan: {n: (lp.view, lp.reduce, [(p.name, p.reduce) for p in lp.parts or []], lp.state)
                            for n, lp in plan.layers.items()}
    assert choices(plans["side"]) == choices(plans["plain"])
