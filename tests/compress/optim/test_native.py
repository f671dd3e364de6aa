"""The native backend (a C kernel, `lowmem.compress.optim.native`) against independent numbers:
the numpy float64 oracle of DESIGN §5 (`test_oracle.NumpyPlanAdamW`) in float32, an encoder
written here in numpy, and the torch-ops backends on stored formats; and its build: one warning
and the foreach backend without a compiler, a shared cache under concurrent builds."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress.optim import native
from lowmem.compress.optim.engine import ReducedAdamW
from lowmem.compress.optim.quant import quantization_map

from test_oracle import BETAS, CASES, EPS, SCENARIOS, STEPS, NumpyPlanAdamW, _scenario, loss_at, tiny_gpt

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernel cannot be built")


# -- the encoder, cell by cell --------------------------------------------------------------------
def numpy_codes(x: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """Nearest map value with torchao's rule, in float32 numpy: between neighbours lo < hi, x
    takes hi when ``x − q[lo] >= (q[hi] − q[lo]) · 0.5``."""
    x = x.astype(np.float32)
    hi = np.clip(np.searchsorted(qmap, x, side="left"), 1, len(qmap) - 1)
    lo = hi - 1
    up = (x - qmap[lo]) >= (qmap[hi] - qmap[lo]) * np.float32(0.5)
    return np.where(up, hi, lo).astype(np.uint8)


def kernel_codes(which: str, fmt: str, x: np.ndarray) -> np.ndarray:
    lib = native.library()
    lib.lowmem_encode.argtypes = [ctypes.POINTER(native._Codec), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.shape, dtype=np.uint8)
    lib.lowmem_encode(ctypes.byref(native._codec(which, fmt)), x.ctypes.data, x.size, out.ctypes.data)
    return out


@pytest.mark.parametrize("which, fmt, kind, bits", [("m", "int8", "dynamic", 8), ("m", "int4", "dynamic", 4),
                                                    ("v", "int8", "dynamic-unsigned", 8)])
def test_encoder_equals_a_numpy_nearest_value_search_on_every_switch_point_and_at_random(which, fmt, kind, bits):
    qmap = quantization_map(kind, bits).numpy()
    rng = np.random.default_rng(0)
    lo = -1.0 if qmap[0] < 0 else 0.0
    # the switch points lie between map values: each midpoint and the floats just around it
    mids = ((qmap[:-1] + qmap[1:]) * np.float32(0.5)).astype(np.float32)
    around = np.concatenate([np.nextafter(mids, np.float32(-2)), mids, np.nextafter(mids, np.float32(2)), qmap])
    # every binade the maps use, evenly in log scale, and uniform values
    mags = np.exp(rng.uniform(np.log(1e-9), 0, 200_000)).astype(np.float32)
    signed = mags * (rng.integers(0, 2, mags.size) * 2 - 1 if lo < 0 else 1)
    x = np.concatenate([around, signed, rng.uniform(lo, 1, 200_000), [0.0, -0.0, 1.0, lo]]).astype(np.float32)
    x = x[(x >= lo) & (x <= 1)]
    np.testing.assert_array_equal(kernel_codes(which, fmt, x), numpy_codes(x, qmap))


@pytest.mark.parametrize("which, fmt, kind, bits", [("m", "int8", "dynamic", 8), ("m", "int4", "dynamic", 4),
                                                    ("v", "int8", "dynamic-unsigned", 8)])
def test_encoder_codes_a_nan_as_the_torch_encoder_does_wherever_it_falls(which, fmt, kind, bits):
    # A NaN block (a NaN gradient) is coded, not skipped: the 4-bit map's search, which a NaN
    # would fall through, hands such runs to the table, so the codes equal the torch path's.
    from lowmem.compress.optim.quant import _encoder

    qmap = quantization_map(kind, bits)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.0 if qmap[0] < 0 else 0.0, 1.0, 100).astype(np.float32)
    x[[0, 17, 40, 41, 99]] = np.float32("nan")
    x[63] = -np.float32("nan")
    want = _encoder(qmap, torch.device("cpu")).nearest(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(kernel_codes(which, fmt, x), want)


# -- fp32: the numpy oracle -----------------------------------------------------------------------
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("info", CASES, ids=lambda i: i.name)
def test_native_steps_equal_the_numpy_oracle_in_float32(info, scenario):
    model = tiny_gpt().float()
    params = dict(model.named_parameters())
    kw, hparams, maximize = _scenario(scenario, model)
    opt = info(model, betas=BETAS, eps=EPS, **kw, backend="native")
    layers = opt.plan.to_json()["layers"] if opt.plan is not None else {}
    start = {n: p.detach().double().numpy().copy() for n, p in params.items()}
    oracle = NumpyPlanAdamW(start, layers, hparams, BETAS, EPS, maximize)
    for step in range(STEPS):
        opt.zero_grad()
        loss_at(model, step).backward()
        if step == 0 and opt.plan is not None:   # the kernel runs every tensor whose v it averages in one block
            ran = {n: opt.backend_of(p).name for n, p in params.items()}
            assert "native" in ran.values(), ran
        oracle.step({n: p.grad.detach().double().numpy().copy() for n, p in params.items()})
        opt.step()
        for n, p in params.items():
            at = f"{info.name}/{scenario}: {n} after step {step + 1}"
            state = opt.state[p]
            # float32 arithmetic against float64: a few ulps per step, relative to each tensor's scale
            for got, want, what in ((p, oracle.theta[n], "param"), (state["exp_avg"], oracle.m[n], "exp_avg"),
                                    (state["exp_avg_sq"], oracle.exp_avg_sq(n), "exp_avg_sq")):
                got = got.detach().double().numpy().reshape(np.shape(want))
                scale = max(np.abs(want).max(), 1e-30)
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * scale, err_msg=f"{what} of {at}")


def test_native_results_do_not_depend_on_the_number_of_threads():
    # Reductions add in an order fixed by the shapes, so 1 and 2 threads give the same bits.
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(300, 700), nn.Linear(700, 64))
            opt = lowmem.AdamMini(model, lr=1e-2, state_format="m=int8")
            for step in range(3):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                opt.step()
            assert "native" in {opt.backend_of(p).name for p in model.parameters()}
            results.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# -- stored formats: against the torch-ops backends -----------------------------------------------
def _pair(fmt: str, dtype: torch.dtype, rounding: str, preset: str, backend: str = "native", device="cpu"):
    """Two copies of one model and optimizer state after three foreach steps, ready for one step
    on the foreach backend and on `backend` with the same gradient."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(320, 256), nn.LayerNorm(256), nn.Linear(256, 96, bias=False)).to(dtype)
    grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * s + i)).to(dtype)
              for i, p in enumerate(base.parameters())] for s in range(4)]
    build = {"eve": lowmem.Eve, "adam-mini": lowmem.AdamMini, "slimadam": lowmem.SlimAdam,
             "adamw": lambda m, **kw: ReducedAdamW(m, None, **kw)}[preset]
    opt = build(base, lr=1e-2, weight_decay=0.1, state_format=fmt, param_rounding=rounding, backend="foreach")
    for s in range(3):
        for p, g in zip(base.parameters(), grads[s]):
            p.grad = g.clone()
        opt.step()
    out = []
    for name in ("foreach", backend):
        model = nn.Sequential(nn.Linear(320, 256), nn.LayerNorm(256), nn.Linear(256, 96, bias=False)).to(dtype)
        model.load_state_dict(base.state_dict())
        model.to(device)
        o = build(model, lr=1e-2, weight_decay=0.1, state_format=fmt, param_rounding=rounding, backend=name)
        o.load_state_dict(opt.state_dict())
        for g in o.param_groups:   # (a state dict brings its groups' options, as torch's do)
            g["backend"] = name
        for p, g in zip(model.parameters(), grads[3]):
            p.grad = g.clone().to(device)
        out.append((model, o))
    return out


STORED_CASES = [("m=int8", torch.float32, "nearest"), ("m=int4", torch.float32, "nearest"),
                ("m=int8,v=int8", torch.float32, "nearest"), ("m=bf16,v=bf16", torch.float32, "nearest"),
                ("m=fp32", torch.bfloat16, "nearest"), ("m=int8,v=bf16", torch.bfloat16, "nearest")]


@pytest.mark.parametrize("preset", ["eve", "adam-mini", "slimadam", "adamw"])
@pytest.mark.parametrize("fmt, dtype, rounding", STORED_CASES + [("m=bf16,v=bf16", torch.bfloat16, "kahan")])
def test_one_native_step_on_stored_formats_equals_the_staged_torch_step(preset, fmt, dtype, rounding):
    (ref, ref_opt), (model, opt) = _pair(fmt, dtype, rounding, preset)
    ran = {opt.backend_of(p).name for p in model.parameters()}
    assert "native" in ran, ran
    ref_opt.step()
    opt.step()
    assert_steps_agree(ref, ref_opt, model, opt, fmt, dtype)


def assert_steps_agree(ref, ref_opt, model, opt, fmt: str, dtype: torch.dtype) -> None:
    """One step of `opt` on `model` (any device) against the staged torch step of `ref_opt`:
    states equal up to fp32 rounding (codes one step apart in under 0.1% of entries),
    parameters up to what one code apart moves them."""
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        sa, sb = ({k: t.cpu() if isinstance(t, torch.Tensor) else t for k, t in o.state[q].items()}
                  for o, q in ((ref_opt, a), (opt, b)))
        a, b = a.detach().cpu(), b.detach().cpu()
        assert set(sa) == set(sb), name
        for key in sa:
            x, y = sa[key], sb[key]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, key)
            if x.dtype == torch.uint8:   # codes: the same but where fp32 rounding moved an entry across a switch
                lo_x, hi_x = (x & 15, x >> 4) if fmt.startswith("m=int4") and key == "exp_avg" else (x, x)
                lo_y, hi_y = (y & 15, y >> 4) if fmt.startswith("m=int4") and key == "exp_avg" else (y, y)
                diff = torch.maximum((lo_x.int() - lo_y.int()).abs(), (hi_x.int() - hi_y.int()).abs())
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (name, key, diff.max())
            elif key == "kahan_comp":   # what rounding lost: compared below as part of the parameter it belongs to
                # (the buffer is bf16: one fp32 rounding apart can round it one bf16 step apart)
                torch.testing.assert_close(b.float() + y.float(), a.float() + x.float(), rtol=1e-5,
                                           atol=8e-3 * x.float().abs().max().item(),
                                           msg=f"parameter + Kahan buffer of {name}")
            elif key != "step":
                tol = 1e-5 if x.dtype == torch.float32 else 8e-3   # bf16: one rounding apart at most
                torch.testing.assert_close(y.float(), x.float(), rtol=tol, atol=tol * x.float().abs().max().item(),
                                           msg=f"{key} of {name}")
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        # one code apart in m moves a parameter by at most lr · (one map step) / denominator
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=2e-3 if "int4" in fmt else 1e-3 if "int8" in fmt
                                   else tol, msg=name)


def _mlp_stack(dtype) -> nn.Module:
    """MLP matrices (named as GPT-2's, so every preset averages their `v`) of odd shapes: long
    rows (9001 entries), short ones (7), many rows (20001)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.h = nn.ModuleList(nn.Module() for _ in range(2))
    for block, (a, b) in zip(model.h, ((9001, 16), (7, 20001))):
        block.mlp = nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = nn.Linear(a, b), nn.Linear(b, a)
    return model.to(dtype)


@pytest.mark.parametrize("preset", ["eve", "slimadam", "adalayer"])
@pytest.mark.parametrize("fmt, dtype", [("m=fp32", torch.float32), ("m=int8", torch.float32),
                                        ("m=int8,v=bf16", torch.bfloat16)])
def test_long_short_and_many_rows_equal_the_foreach_step(preset, fmt, dtype):
    # The kernel sums g² per row in groups of rows of about 4096 entries (GROUP in step.c), and
    # per column or over the whole tensor in chunks of rows (8 here, of uneven length: read four
    # at a time; fewer in the smaller tensors, one after the other): rows of 9001 entries (a group
    # each), of 7 (585 a group), of 16, against the foreach backend over three steps.
    build = {"eve": lowmem.Eve, "slimadam": lowmem.SlimAdam, "adalayer": lowmem.AdaLayer}[preset]
    ref, model = _mlp_stack(dtype), _mlp_stack(dtype)
    opts = [build(m, lr=1e-2, weight_decay=0.1, state_format=fmt, backend=b)
            for m, b in ((ref, "foreach"), (model, "native"))]
    assert {opts[1].backend_of(p).name for p in model.parameters() if p.dim() == 2} == {"native"}
    for step in range(3):
        for a, b in zip(ref.parameters(), model.parameters()):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
            b.grad = a.grad.clone()
        for o in opts:
            o.step()
    kept = {p.shape: opts[1].state[p]["exp_avg_sq"].numel() for p in model.parameters() if p.dim() == 2}
    assert set(kept.values()) < {1, 7, 16, 9001, 20001}, kept   # v averaged over rows, columns or all
    for x, y in zip(ref.parameters(), model.parameters()):
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        torch.testing.assert_close(y.float(), x.float(), rtol=tol, atol=2e-3 if "int8" in fmt else tol)


# -- the build ------------------------------------------------------------------------------------
_STEP = textwrap.dedent("""
    import warnings, torch, lowmem
    from torch import nn
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        model = nn.Linear(64, 48)
        opt = lowmem.Eve(model, lr=1e-2)
        for _ in range(2):
            model(torch.ones(3, 64)).sum().backward()
            opt.step()
    print(opt.backend_of(model.weight).name)
    print(sum("native CPU step kernel could not be built" in str(w.message) for w in caught))
""")


def _run(env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _STEP], env={**os.environ, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_without_a_compiler_the_engine_warns_once_and_runs_foreach(tmp_path):
    proc = _run({"CC": str(tmp_path / "no-such-cc"), "LOWMEM_CACHE_DIR": str(tmp_path / "cache")}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["foreach", "1"], proc.stdout + proc.stderr
    assert not any(p.suffix in (".so", ".tmp") for p in (tmp_path / "cache").glob("*"))


def test_lowmem_native_0_turns_the_kernel_off_without_a_warning(tmp_path):
    proc = _run({"LOWMEM_NATIVE": "0", "LOWMEM_CACHE_DIR": str(tmp_path / "cache")}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["foreach", "0"], proc.stdout + proc.stderr
    assert not (tmp_path / "cache").exists()


def test_processes_building_at_once_share_one_build(tmp_path):
    env = {**os.environ, "LOWMEM_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _STEP], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["native", "0"], out + err
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".so") and files[1] == files[0] + ".sha256", files   # no temporary left


# -- tensors as checkpoints and callers leave them ------------------------------------------------
def _twins(make):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64, bias=False))
    out = []
    for backend in ("foreach", "native"):
        model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64, bias=False))
        model.load_state_dict(base.state_dict())
        out.append((model, make(model, backend)))
    return out


def _close(a: nn.Module, b: nn.Module, rtol: float = 1e-5) -> None:
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(y, x, rtol=rtol, atol=rtol * x.abs().max().item())


def test_a_checkpoint_in_another_state_dtype_loads_as_fp32_and_steps_like_foreach():
    # Saved with bf16 compute (its fp32-format v in bf16), loaded into the default optimizer: the
    # kernel must see fp32 states (the loader casts them), never reinterpret bf16 bytes.
    torch.manual_seed(0)
    src = nn.Linear(256, 64, bias=False)
    saved = lowmem.AdamMini(src, lr=1e-2, state_format="m=int8", state_dtype=torch.bfloat16, backend="foreach")
    for _ in range(2):
        src.weight.grad = torch.randn(src.weight.shape)
        saved.step()
    runs = []
    for backend in ("foreach", "native"):
        model = nn.Linear(256, 64, bias=False)
        model.load_state_dict(src.state_dict())
        opt = lowmem.AdamMini(model, lr=1e-2, state_format="m=int8")
        opt.load_state_dict(saved.state_dict())
        for g in opt.param_groups:
            g["backend"] = backend
        assert opt.state[model.weight]["exp_avg_sq"].dtype == torch.float32
        assert opt.backend_of(model.weight).name == backend
        model.weight.grad = torch.randn(model.weight.shape, generator=torch.Generator().manual_seed(5))
        opt.step()
        runs.append(model)
    _close(*runs)


def test_a_channels_last_adamw_checkpoint_loads_contiguous_and_steps_like_foreach():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    adamw = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    for _ in range(3):
        conv(torch.randn(2, 8, 10, 10).to(memory_format=torch.channels_last)).square().mean().backward()
        adamw.step()
        adamw.zero_grad()
    assert not adamw.state_dict()["state"][0]["exp_avg"].is_contiguous()
    runs = []
    for backend in ("foreach", "native"):
        model = nn.Conv2d(8, 16, 3)
        model.load_state_dict({k: v.contiguous() for k, v in conv.state_dict().items()})
        opt = lowmem.Eve(model, lr=1e-2, backend=backend)
        opt.load_state_dict(adamw.state_dict())
        for g in opt.param_groups:
            g["backend"] = backend
        assert opt.state[model.weight]["exp_avg"].is_contiguous()
        model(torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(1))).square().mean().backward()
        opt.step()
        runs.append(model)
    _close(*runs)


def test_a_state_the_kernel_cannot_read_as_it_lies_steps_on_the_torch_backends():
    # A non-contiguous exp_avg (put there by hand): that parameter steps through foreach, the
    # others through the kernel, and the results equal an all-foreach run.
    (ref, ref_opt), (model, opt) = _twins(lambda m, b: lowmem.Eve(m, lr=1e-2, backend=b))
    for m_, o in ((ref, ref_opt), (model, opt)):
        for step in range(3):
            for i, p in enumerate(m_.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            o.step()
            if step == 0:
                w = m_[1].weight
                o.state[w]["exp_avg"] = o.state[w]["exp_avg"].t().contiguous().t()   # same values, transposed strides
    _close(ref, model)


def test_the_kernel_counts_its_in_place_writes_so_autograd_refuses_stale_graphs():
    model = nn.Linear(64, 48)
    opt = lowmem.Eve(model, lr=1e-2)
    model(torch.ones(2, 64)).sum().backward()
    opt.step()
    assert opt.backend_of(model.weight).name == "native"
    loss = (model(torch.ones(2, 64, requires_grad=True)) ** 2).sum()   # its backward reads the weight
    before = model.weight._version
    opt.step()
    assert model.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_beta1_zero_keeps_m_equal_to_the_gradient_as_torch_lerp_does():
    # torch's lerp computes from the gradient's end for weights of 0.5 and more: m == g exactly.
    model = nn.Linear(300, 40, bias=False)
    opt = lowmem.Eve(model, lr=1e-3, betas=(0.0, 0.999))
    for scale in (1e4, 1e-3):
        model.weight.grad = torch.randn(model.weight.shape) * scale
        opt.step()
        assert torch.equal(opt.state[model.weight]["exp_avg"], model.weight.grad)


def test_a_nan_gradient_poisons_its_quantization_block_as_in_torch():
    runs = []
    for backend in ("foreach", "native"):
        torch.manual_seed(0)
        model = nn.Linear(512, 64, bias=False)
        opt = lowmem.Eve(model, lr=1e-3, state_format="m=int8", backend=backend)
        g = torch.randn(model.weight.shape)
        g[3, 7] = float("nan")
        model.weight.grad = g
        opt.step()
        state = opt.state[model.weight]
        runs.append((torch.isnan(state["exp_avg_scale"]).sum().item(), torch.isnan(model.weight).sum().item()))
    assert runs[0] == runs[1] and runs[0][0] == 1, runs


# -- the build, continued -------------------------------------------------------------------------
def test_cc_with_flags_and_a_compiler_without_openmp_still_build_the_kernel(tmp_path):
    gcc = native.shutil.which("gcc") or native.shutil.which("cc")
    no_omp = tmp_path / "cc-no-openmp"
    no_omp.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "no libomp" >&2; exit 1; }; '
                      f'done\nexec {gcc} "$@"\n')
    no_omp.chmod(0o755)
    for cc in (f"{gcc} -m64", str(no_omp)):
        proc = _run({"CC": cc, "LOWMEM_CACHE_DIR": str(tmp_path / cc.replace(" ", "_").replace("/", "_"))}, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["native", "0"], cc + proc.stdout + proc.stderr


def test_a_damaged_build_is_built_again_and_builds_are_readable_by_everyone(tmp_path):
    cache = tmp_path / "cache"
    assert _run({"LOWMEM_CACHE_DIR": str(cache)}, tmp_path).stdout.split() == ["native", "0"]
    (so,) = list(cache.glob("*.so"))
    assert so.stat().st_mode & 0o055 == 0o055   # group and others may read and run it (a shared cache)
    so.write_bytes(so.read_bytes()[:1000])      # cut short, as a crash while copying would
    proc = _run({"LOWMEM_CACHE_DIR": str(cache)}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["native", "0"], proc.stdout + proc.stderr
    assert so.stat().st_size > 1000


def test_a_cache_folder_that_cannot_be_written_builds_in_the_temporary_folder(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    (tmp_path / "tmp").mkdir()
    proc = _run({"LOWMEM_CACHE_DIR": str(blocked / "cache"), "TMPDIR": str(tmp_path / "tmp")}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["native", "0"], proc.stdout + proc.stderr
    assert list((tmp_path / "tmp").glob(f"lowmem-{os.getuid()}/lowmem_step_*.so"))   # built there
