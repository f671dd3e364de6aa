"""The triton backend (`lowmem.compress.optim.gpu`) against independent numbers: the numpy
float64 oracle of DESIGN §5 in float32, `quant.quantize_rows` for the codes it writes, and the
staged torch step on stored formats. On a machine without CUDA the kernels run in Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``, which tests/conftest.py sets for the session
before anything imports Triton); with CUDA they run on the device, and a step must not
synchronise with the host."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.formats import block_of
from lowmem.compress.optim.quant import quantize_rows
from lowmem.compress.optim.state import _qmap

from test_native import STORED_CASES, _pair, assert_steps_agree
from test_oracle import BETAS, CASES, EPS, NumpyPlanAdamW, _scenario, loss_at, tiny_gpt

triton = pytest.importorskip("triton", reason="Triton is not installed")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=0)")


def _ran(opt, model) -> set[str]:
    """The backends that step `model`'s parameters (the interpreter's counts as triton)."""
    return {opt.backend_of(p).name.removesuffix("-interpreter") for p in model.parameters()}


@pytest.mark.parametrize("scenario", ["groups", "maximize"])
@pytest.mark.parametrize("info", CASES, ids=lambda i: i.name)
def test_triton_steps_equal_the_numpy_oracle_in_float32(info, scenario):
    model = tiny_gpt().float().to(DEVICE)
    params = dict(model.named_parameters())
    kw, hparams, maximize = _scenario(scenario, model)
    opt = info(model, betas=BETAS, eps=EPS, **kw, backend="triton")
    layers = opt.plan.to_json()["layers"] if opt.plan is not None else {}
    start = {n: p.detach().double().cpu().numpy().copy() for n, p in params.items()}
    oracle = NumpyPlanAdamW(start, layers, hparams, BETAS, EPS, maximize)
    for step in range(3):
        opt.zero_grad()
        loss_at(model, step).backward()
        if step == 0:
            assert "triton" in _ran(opt, model)
        oracle.step({n: p.grad.detach().double().cpu().numpy().copy() for n, p in params.items()})
        opt.step()
        for n, p in params.items():
            state = opt.state[p]
            for got, want, what in ((p, oracle.theta[n], "param"), (state["exp_avg"], oracle.m[n], "exp_avg"),
                                    (state["exp_avg_sq"], oracle.exp_avg_sq(n), "exp_avg_sq")):
                got = got.detach().double().cpu().numpy().reshape(np.shape(want))
                scale = max(np.abs(want).max(), 1e-30)
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * scale,
                                           err_msg=f"{what} of {info.name}/{scenario}: {n} after step {step + 1}")


# SlimAdam holds row, column and full-Adam tensors, plain AdamW full ones: every format on both;
# Eve and Adam-mini (rows, one mean per tensor) on 8-bit m. (The interpreter runs each program in
# Python: the cases are chosen to keep the suite short.)
@pytest.mark.parametrize("preset, fmt, dtype, rounding", [
    (preset, *case) for preset in ("slimadam", "adamw") for case in STORED_CASES]
    + [("eve", "m=int8", torch.float32, "nearest"), ("adam-mini", "m=int8", torch.float32, "nearest")])
def test_one_triton_step_on_stored_formats_equals_the_staged_torch_step(preset, fmt, dtype, rounding):
    (ref, ref_opt), (model, opt) = _pair(fmt, dtype, rounding, preset, backend="triton", device=DEVICE)
    assert "triton" in _ran(opt, model)
    ref_opt.step()
    opt.step()
    assert_steps_agree(ref, ref_opt, model, opt, fmt, dtype)


@pytest.mark.parametrize("fmt", ["m=int8", "m=int4", "m=int8,v=int8"])
def test_with_beta1_and_beta2_zero_the_codes_are_those_of_quantize_rows(fmt):
    # m = g and (full Adam) v = g² exactly, so what the kernel stores must be quantize_rows of
    # them, code for code and scale for scale; a row of 300 entries ends in a short block.
    torch.manual_seed(0)
    model = nn.Linear(300, 40, bias=False).to(DEVICE)
    opt = lowmem.ReducedAdamW(model, None, lr=1e-3, betas=(0.0, 0.0), state_format=fmt, backend="triton")
    g = torch.randn(40, 300) * torch.logspace(-6, 0, 300)   # entries over six decades
    model.weight.grad = g.to(DEVICE)
    opt.step()
    assert _ran(opt, model) == {"triton"}
    state = {k: t.cpu() for k, t in opt.state[model.weight].items()}
    for which, key, x in (("m", "exp_avg", g), ("v", "exp_avg_sq", g * g)):
        f = dict(p.split("=") for p in fmt.split(",")).get(which, "fp32")
        if f == "fp32":
            continue
        codes, scales = quantize_rows(x, _qmap(which, f, torch.device("cpu")), block_of(f))
        if f == "int4":
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        assert torch.equal(state[key], codes), key
        assert torch.equal(state[key + "_scale"], scales), key


def test_tensors_the_kernels_cannot_take_step_on_the_torch_backends():
    # A non-contiguous exp_avg and Kahan rounding: those parameters step on foreach (through the
    # staged path), the others in the kernels, and the results equal an all-foreach run.
    runs = []
    for backend in ("foreach", "triton"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64, bias=False)).to(DEVICE)
        opt = lowmem.Eve(model, lr=1e-2, backend=backend)
        for step in range(3):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).to(DEVICE)
            opt.step()
            if step == 0:
                w = model[1].weight
                opt.state[w]["exp_avg"] = opt.state[w]["exp_avg"].t().contiguous().t()
        runs.append(model)
    for x, y in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())


def test_kahan_and_stochastic_rounding_are_left_to_the_staged_path():
    model = nn.Linear(64, 32).to(torch.bfloat16).to(DEVICE)
    for rounding in ("kahan", "stochastic"):
        opt = lowmem.Eve(model, lr=1e-2, param_rounding=rounding, backend="triton")
        model(torch.ones(2, 64, dtype=torch.bfloat16, device=DEVICE)).sum().backward()
        assert opt.backend_of(model.weight).name == "foreach"
        opt.step()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_triton_step_does_not_synchronise_with_the_host():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 256)).cuda()
    opt = lowmem.AdamMini(model, lr=1e-3, state_format="m=int8")
    for step in range(3):
        model(torch.randn(8, 512, device="cuda")).square().mean().backward()
        if step == 0:
            opt.step()   # (the first step builds the tables: a pinned, asynchronous copy)
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    assert _ran(opt, model) == {"triton"}


def test_a_non_finite_gradient_stores_what_the_staged_path_stores():
    # An infinity or a NaN in a block: its scale is NaN and every entry decodes to NaN, as
    # quant.quantize_rows stores it (codes of NaN entries: the code of 0).
    states = []
    for backend in ("foreach", "triton"):
        torch.manual_seed(0)
        model = nn.Linear(300, 40, bias=False).to(DEVICE)
        opt = lowmem.Eve(model, lr=1e-2, state_format="m=int8", backend=backend)
        g = torch.randn(40, 300)
        g[3, 7], g[5, 290], g[20, 0] = float("inf"), float("-inf"), float("nan")
        model.weight.grad = g.to(DEVICE)
        opt.step()
        states.append({k: t.cpu() for k, t in opt.state[model.weight].items()})
    ref, got = states
    torch.testing.assert_close(got["exp_avg_scale"], ref["exp_avg_scale"], equal_nan=True)
    assert torch.equal(got["exp_avg"], ref["exp_avg"])


def test_tables_are_built_once_per_bucket_make_up_whatever_the_gradients_addresses(monkeypatch):
    # zero_grad() frees the gradients, so each step's are new tensors; and with many buckets
    # (staged buckets of at most STAGE_ENTRIES entries) each keeps its tables.
    from lowmem.compress.optim import engine, gpu

    built = []
    tables = gpu._tables
    monkeypatch.setattr(gpu, "_tables", lambda *a: built.append(1) or tables(*a))
    monkeypatch.setattr(engine, "STAGE_ENTRIES", 1024)
    model = nn.Sequential(*(nn.Linear(32, 16 + i, bias=False) for i in range(9))).to(DEVICE)
    opt = lowmem.Eve(model, lr=1e-2, state_format="m=bf16", backend="triton")
    for step in range(2):
        opt.zero_grad()
        sum(layer(torch.randn(4, 32, device=DEVICE)).square().mean() for layer in model).backward()
        opt.step()
    assert _ran(opt, model) == {"triton"}
    assert len(built) == 9   # one per staged bucket (one matrix each, all shapes differ), on the first step


def test_a_kernel_that_does_not_compile_warns_once_and_the_step_runs_on_foreach(monkeypatch):
    # A compiler error is met before any kernel runs: that step and the later ones run the
    # torch-ops path, with the same results as foreach.
    from lowmem.compress.optim import gpu

    real = gpu._kernels()

    class Broken:
        __name__ = "update"

        def run(self, *args, warmup, **kw):
            raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(gpu, "_kernels", lambda: (*real[:5], Broken()))
    monkeypatch.setattr(gpu, "_compiled", set())
    monkeypatch.setattr(gpu, "_broken", None)
    runs = []
    for backend in ("foreach", "triton"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 16)).to(DEVICE)
        opt = lowmem.Eve(model, lr=1e-2, state_format="m=int8", backend=backend)
        with pytest.warns(RuntimeWarning, match="could not be compiled") if backend == "triton" else _nothing():
            for step in range(2):
                for i, p in enumerate(model.parameters()):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).to(DEVICE)
                opt.step()
        runs.append((model, opt))
    assert gpu._broken is not None and "triton" not in _ran(runs[1][1], runs[1][0])
    for x, y in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(x, y)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
