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
