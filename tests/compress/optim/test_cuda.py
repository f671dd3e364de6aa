"""The optimizers on CUDA: every path equals the readable one there, the empty plan equals
`torch.optim.AdamW`'s CUDA kernels, and states live on the GPU. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import lowmem

from optim_cases import OPTIMIZERS, PLAN_OPTIMIZERS, tiny_loss, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(info, dtype, steps=6, **kw):
    model = tiny_model(dtype).cuda()
    opt = info(model, **kw)
    for s in range(steps):
        opt.zero_grad()
        tiny_loss(model, s).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.fast_paths], ids=lambda i: i.name)
def test_cuda_fast_paths_equal_the_readable_path_in_float64(info):
    ref, ref_opt = _run(info, torch.float64, **info.readable)
    for kw in info.fast_paths:
        model, opt = _run(info, torch.float64, **kw)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[a][k], ref_opt.state[b][k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", [{"foreach": True}, {"fused": True}])
def test_cuda_empty_plan_equals_torch_adamw(kernel):
    model = tiny_model(torch.float32).cuda()
    ref = copy.deepcopy(model)
    ours = lowmem.ReducedAdamW(model, None, lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, **kernel)
    for s in range(30):
        for m, o in ((model, ours), (ref, adamw)):
            o.zero_grad()
            tiny_loss(m, s).backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_cuda_states_live_on_the_gpu_and_bf16_keeps_fp32_state(info):
    model, opt = _run(info, torch.bfloat16, steps=3)
    for p in model.parameters():
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.device.type == "cuda", (k, v.device)
                assert v.dtype == torch.float32, (k, v.dtype)


@pytest.mark.parametrize("info", PLAN_OPTIMIZERS, ids=lambda i: i.name)
def test_cuda_run_matches_the_cpu_run(info):
    gpu, _ = _run(info, torch.float64)
    model = tiny_model(torch.float64)
    opt = info(model)
    for s in range(6):
        opt.zero_grad()
        tiny_loss(model, s).backward()
        opt.step()
    # The forward and backward passes themselves round differently on the GPU (~1e-9 here, which
    # Adam's normalisation carries into the update); an optimizer bug would show at 1e-2.
    for a, b in zip(gpu.parameters(), model.parameters()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{"foreach": True}, {"foreach": False}], ids=["batched", "readable"])
@pytest.mark.parametrize("info", PLAN_OPTIMIZERS, ids=lambda i: i.name)
def test_cuda_steps_make_no_host_sync(info, kw):
    """After the first step (state allocation), a step runs with CUDA's sync debug mode set to
    'error': the step counters live on the host, so nothing waits for the GPU."""
    model = tiny_model(torch.float32).cuda()
    opt = info(model, **kw)
    for s in range(4):
        opt.zero_grad()
        tiny_loss(model, s).backward()
        torch.cuda.set_sync_debug_mode("error" if s else "default")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
