"""State kept in storage formats (bf16, int8, int4) and low-precision parameters, against
independent numbers: a numpy float64 step over a numpy quantizer of the same scheme, torchao's
AdamW8bit where installed, torch's AdamW, and bytes by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lowmem.compress.formats import StateFormat
from lowmem.compress.optim.engine import ReducedAdamW
from lowmem.compress.optim.quant import quantization_map
from lowmem.compress.plan import LayerPlan, PartPlan, Plan, model_record
from lowmem.compress.memory import optimizer_state_bytes

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1


def numpy_quantize_rows(x: np.ndarray, qmap: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: blocks of `block` entries (the last shorter), absmax scale (>= 1e-12), each entry /
    scale (float32) to the nearest map value, ties upward; by searching, entry by entry."""
    rows, length = x.shape
    codes = np.zeros((rows, length), dtype=np.uint8)
    scales = np.zeros((rows, -(-length // block)), dtype=np.float32)
    for r in range(rows):
        for j, start in enumerate(range(0, length, block)):
            chunk = x[r, start:start + block].astype(np.float32)
            scale = np.float32(max(np.abs(chunk).max(), np.float32(1e-12)))
            scales[r, j] = scale
            normed = chunk / scale
            below = np.clip(np.searchsorted(qmap, normed, side="right") - 1, 0, qmap.size - 1)
            above = np.minimum(below + 1, qmap.size - 1)
            up = (normed - qmap[below]).astype(np.float32) >= ((qmap[above] - qmap[below]) * np.float32(0.5))
            codes[r, start:start + block] = np.where(up, above, below)
    return codes, scales


def numpy_dequantize_rows(codes, scales, qmap, block):
    return qmap[codes] * np.repeat(scales, block, axis=1)[:, :codes.shape[1]]


class Wide(nn.Module):
    """Rows of 300 entries (a ragged last block of 44 for int8, 44 for int4) and of 512; a bias
    and a small matrix that stay fp32 (below the size where formats apply)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(300, 64)          # weight (64, 300): 4,096+ entries, bias (64,) fp32
        self.b = nn.Linear(64, 512, bias=False)
        self.small = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum(-1, keepdim=True) + self.small(x[:, :8]).sum(-1, keepdim=True)


def _batches(n):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 300, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _row_plan(model) -> Plan:
    """v averaged per row for every matrix (Eve-like), full Adam for the rest."""
    layers = {}
    for name, p in model.named_parameters():
        shape = list(p.shape)
        layers[name] = LayerPlan(shape, "other", shape, [1] if p.dim() == 2 else None)
    return Plan(model=model_record(model), layers=layers)


@pytest.mark.parametrize("fmt", ["m=int8", "m=int4", "m=int8,v=int8", "m=bf16,v=bf16"])
@pytest.mark.parametrize("averaged", [False, True])
def test_formats_follow_a_numpy_float64_step_over_a_numpy_quantizer(fmt, averaged):
    fmt = StateFormat.parse(fmt)
    if averaged and fmt.v == "int8":
        pytest.skip("an averaged v stays fp32")
    torch.manual_seed(0)
    model = Wide().double().float()
    plan = _row_plan(model) if averaged else None
    opt = ReducedAdamW(model, plan, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_format=fmt)
    w = model.a.weight
    batches = _batches(3)
    qm = {"int8": quantization_map("dynamic", 8).numpy(), "int4": quantization_map("dynamic", 4).numpy()}
    qv = quantization_map("dynamic-unsigned", 8).numpy()
    block = {"int8": 256, "int4": 128}
    p = w.detach().numpy().astype(np.float64)
    m_store = np.zeros_like(p, dtype=np.float32)
    v_store = np.zeros((64, 1) if averaged else p.shape, dtype=np.float32)
    for t, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        g = w.grad.detach().numpy().astype(np.float64)
        opt.step()
        b1, b2 = BETAS
        m = b1 * m_store.astype(np.float64) + (1 - b1) * g
        g2 = (g * g).mean(axis=1, keepdims=True) if averaged else g * g
        v = b2 * v_store.astype(np.float64) + (1 - b2) * g2
        p = p * (1 - LR * WD) - LR / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + EPS)
        np.testing.assert_allclose(w.detach().numpy(), p, rtol=1e-5, atol=1e-6)
        st = opt.state[w]
        if fmt.m in qm:
            codes, scales = numpy_quantize_rows(m.astype(np.float32), qm[fmt.m], block[fmt.m])
            got = st["exp_avg"].numpy()
            if fmt.m == "int4":
                got = np.stack((got & 0x0F, got >> 4), axis=2).reshape(64, -1)[:, :300]
            np.testing.assert_allclose(st["exp_avg_scale"].numpy(), scales, rtol=1e-6)
            differ = got.astype(int) - codes.astype(int)
            assert np.abs(differ).max() <= 1 and (differ != 0).mean() < 1e-3   # float32 vs float64 ties only
            m_store = numpy_dequantize_rows(got, st["exp_avg_scale"].numpy(), qm[fmt.m], block[fmt.m])
        elif fmt.m == "bf16":
            assert st["exp_avg"].dtype == torch.bfloat16
            np.testing.assert_allclose(st["exp_avg"].float().numpy(), m, rtol=2 ** -8)
            m_store = st["exp_avg"].float().numpy()
        if fmt.v == "int8":
            codes, scales = numpy_quantize_rows(v.astype(np.float32), qv, 256)
            differ = st["exp_avg_sq"].numpy().astype(int) - codes.astype(int)
            assert np.abs(differ).max() <= 1 and (differ != 0).mean() < 1e-3
            v_store = numpy_dequantize_rows(st["exp_avg_sq"].numpy(), st["exp_avg_sq_scale"].numpy(), qv, 256)
        elif fmt.v == "bf16":
            v_store = st["exp_avg_sq"].float().numpy()
        else:
            v_store = st["exp_avg_sq"].numpy().copy()   # (a view would change with the next step)
    # the bias, the small matrix: fp32 (the formats do not apply below 4,096 entries or to 1-D)
    assert opt.format_of(model.a.bias).m == ("bf16" if fmt.m == "bf16" else "fp32")
    assert opt.state[model.small.weight]["exp_avg"].dtype == (torch.bfloat16 if fmt.m == "bf16" else torch.float32)


def test_state_bytes_of_a_live_optimizer_by_hand():
    model = nn.Linear(1024, 512, bias=False)
    for fmt, m_bytes, v_bytes in (("m=fp32", 2_097_152, 2_097_152),
                                  ("m=int8", 512 * 1024 + 4 * 512 * 4, 2_097_152),
                                  ("m=int4,v=int8", 512 * 512 + 4 * 512 * 8, 512 * 1024 + 4 * 512 * 4),
                                  ("m=bf16,v=bf16", 1_048_576, 1_048_576)):
        opt = ReducedAdamW(model, None, state_format=fmt)
        model(torch.randn(2, 1024)).sum().backward()
        opt.step()
        got = optimizer_state_bytes(opt).by_key
        assert got.get("exp_avg", 0) + got.get("exp_avg_scale", 0) == m_bytes, fmt
        assert got.get("exp_avg_sq", 0) + got.get("exp_avg_sq_scale", 0) == v_bytes, fmt
        model.zero_grad()


def test_a_plan_state_entry_applies_to_its_layer_only():
    model = Wide()
    plan = _row_plan(model)
    plan.layers["b.weight"].state = StateFormat("int4")
    opt = ReducedAdamW(model, Plan.loads(plan.dumps()))
    assert opt.format_of(model.b.weight) == StateFormat("int4") and opt.format_of(model.a.weight).full
    _train(model, opt, _batches(1))
    assert opt.state[model.b.weight]["exp_avg"].shape == (512, 32)       # 64 codes per row, packed
    assert opt.state[model.a.weight]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["m=int8", "m=int4,v=int8", "m=bf16,v=bf16"])
def test_resume_from_a_state_dict_is_bit_identical(fmt):
    torch.manual_seed(0)
    model = Wide()
    batches = _batches(5)
    opt = ReducedAdamW(model, _row_plan(model), lr=LR, state_format=fmt)
    _train(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["lowmem"]["formats"]["a.weight"] == str(opt.format_of(model.a.weight))
    _train(model, opt, batches[3:])
    want = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved_model)
    opt2 = ReducedAdamW(model, _row_plan(model), lr=LR, state_format=fmt)
    opt2.load_state_dict(torch.load(_saved(saved_opt), weights_only=True))
    _train(model, opt2, batches[3:])
    for k, v in want.items():
        assert torch.equal(model.state_dict()[k], v), k


def _saved(sd):
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


def test_an_adamw_checkpoint_loads_quantized_and_an_export_loads_into_adamw():
    torch.manual_seed(0)
    model = Wide()
    adamw = torch.optim.AdamW(model.parameters(), lr=LR)
    _train(model, adamw, _batches(2))
    opt = ReducedAdamW(model, None, lr=LR, state_format="m=int8,v=int8")
    opt.load_state_dict(adamw.state_dict())
    w = model.a.weight
    m = adamw.state[w]["exp_avg"].numpy()
    codes, scales = numpy_quantize_rows(m, quantization_map("dynamic", 8).numpy(), 256)
    np.testing.assert_array_equal(opt.state[w]["exp_avg"].numpy(), codes)
    np.testing.assert_array_equal(opt.state[w]["exp_avg_scale"].numpy(), scales)
    # export: AdamW's keys and shapes, m decoded, a kept v spread over what it averaged
    row = ReducedAdamW(model, _row_plan(model), lr=LR, state_format="m=int8")
    _train(model, row, _batches(2))
    export = row.adamw_state_dict()
    i = [p for g in row.param_groups for p in g["params"]].index(w)
    v_kept = row.state[w]["exp_avg_sq"]                                            # (64, 1)
    torch.testing.assert_close(export["state"][i]["exp_avg_sq"], v_kept.expand(64, 300), rtol=0, atol=0)
    qm = quantization_map("dynamic", 8).numpy()
    np.testing.assert_allclose(export["state"][i]["exp_avg"].numpy(), numpy_dequantize_rows(
        row.state[w]["exp_avg"].numpy(), row.state[w]["exp_avg_scale"].numpy(), qm, 256), rtol=1e-6, atol=0)
    fresh = torch.optim.AdamW(model.parameters(), lr=LR)
    fresh.load_state_dict(export)
    _train(model, fresh, _batches(1))                                              # AdamW steps on from it
    assert torch.isfinite(model.a.weight).all()


def test_matches_torchao_adamw8bit_within_one_quantization_step():
    """Where the schemes coincide (rows of whole 256-entry blocks, signed/unsigned dynamic maps,
    no v averaging) lowmem's int8 m and v follow torchao's AdamW8bit. torchao differs in that it
    quantizes flat blocks across rows (equal here: rows of 512) and keeps tensors under 4,096
    entries in fp32 (so do we)."""
    optim = pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Tanh(), nn.Linear(512, 1, bias=False))
    twin = copy.deepcopy(model)
    ours = ReducedAdamW(model, None, lr=1e-3, weight_decay=0.01, state_format="m=int8,v=int8")
    theirs = optim.AdamW8bit(twin.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = torch.randn(32, 256, generator=g), torch.randn(32, 1, generator=g)
        for mod, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            ((mod(x) - y) ** 2).mean().backward()
            opt.step()
        w, tw = model[0].weight, twin[0].weight
        mine = opt_m = ours.state[w]
        tao = theirs.state[tw]["exp_avg"]
        step = (opt_m["exp_avg_scale"].repeat_interleave(256, dim=1) * 2 * 0.0079)   # map spacing near 1: < 0.0079
        ours_m = quantization_map("dynamic", 8)[mine["exp_avg"].long()] * opt_m["exp_avg_scale"].repeat_interleave(256, 1)
        assert ((ours_m - tao.dequantize()).abs() <= step + 1e-12).all()
        # a code that rounds the other way (float order) changes one weight by part of a step
        assert (w - tw).abs().max() < 2e-4 and ((w - tw).abs() > 1e-6).float().mean() < 1e-3


def _bf16_model():
    torch.manual_seed(0)
    return nn.Linear(64, 64, bias=False).to(torch.bfloat16)


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_updates_smaller_than_a_bf16_step_are_kept_by_stochastic_and_kahan_rounding(rounding):
    """A learning rate whose updates are below half a bf16 step: round-to-nearest never moves
    the weights; stochastic rounding and Kahan compensation follow an fp32 run on average."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))

    def run(dtype, rounding):
        torch.manual_seed(0)
        model = nn.Linear(64, 64, bias=False)
        model.weight.data.fill_(1.0)          # bf16 steps around 1.0: 2^-8 below, 2^-7 above; updates 2e-4
        model.to(dtype)
        opt = ReducedAdamW(model, None, lr=2e-4, weight_decay=0.0, param_rounding=rounding)
        for _ in range(100):
            opt.zero_grad()
            model(x.to(dtype)).float().sum().backward()
            opt.step()
        return model.weight.detach().float(), opt

    want, _ = run(torch.float32, "nearest")
    nearest, _ = run(torch.bfloat16, "nearest")
    got, opt = run(torch.bfloat16, rounding)
    assert torch.equal(nearest, torch.ones_like(nearest))                       # all lost
    moved = (want - 1).abs().mean()                                              # 100 steps of 2e-4: 0.02
    assert moved > 0.015
    err = got - want
    if rounding == "kahan":   # weight + what rounding took from it ≈ the fp32 weight (the buffer is bf16 too)
        comp = opt.state[opt.param_groups[0]["params"][0]]["kahan_comp"]
        assert comp.dtype == torch.bfloat16
        assert (got + comp.float() - want).abs().max() < 0.05 * moved
        assert err.abs().max() <= 2 ** -7                                       # within one bf16 step
    else:   # each weight a random walk around the fp32 path: unbiased over the 4,096 weights
        assert err.mean().abs() < 4 * err.std() / err.numel() ** 0.5
        assert err.std() < moved


def test_nearest_rounding_of_a_bf16_model_is_what_it_was():
    """Round-to-nearest through a state-dtype copy (the default before rounding modes): the same
    numbers as torch's AdamW on an fp32 copy of the model, rounded to bf16 after each step."""
    model = _bf16_model()
    ref = copy.deepcopy(model).float()
    opt = ReducedAdamW(model, None, lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        opt.zero_grad()
        model(x.bfloat16()).float().sum().backward()
        opt.step()
        ref_opt.zero_grad()
        ref.weight.grad = model.weight.grad.float()
        ref_opt.step()
        ref.weight.data = ref.weight.data.bfloat16().float()
        assert torch.equal(model.weight.float(), ref.weight)


def test_pure_bf16_state_takes_half_the_bytes_and_steps():
    model = _bf16_model()
    opt = ReducedAdamW(model, None, lr=1e-3, state_format="m=bf16,v=bf16", param_rounding="stochastic")
    model(torch.randn(4, 64).bfloat16()).float().sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt).without_step == 2 * 2 * 64 * 64                 # as torch AdamW on bf16


@pytest.mark.parametrize("kwargs, words", [
    (dict(state_format="m=int3"), ["m format", "int3", "fp32, bf16, int8, int4"]),
    (dict(state_format="v=int4"), ["v format", "int4"]),
    (dict(param_rounding="up"), ["param_rounding", "'up'", "'stochastic'"]),
    (dict(state_format=8), ["state_format", "int"]),
])
def test_bad_formats_and_roundings_are_refused_when_built(kwargs, words):
    with pytest.raises((ValueError, TypeError)) as e:
        ReducedAdamW(nn.Linear(4, 4), None, **kwargs)
    for w in words:
        assert w in str(e.value)


def test_a_transposed_parameter_steps_as_its_contiguous_twin():
    """A parameter stored transposed (its gradient too): the staged copy must be contiguous
    before torch's fused kernel or the compiled backend reads it. (The native kernel takes
    contiguous tensors only: the torch-ops backends run both, so the twins agree exactly.)"""
    torch.manual_seed(0)
    w = torch.randn(128, 96)
    plain, twisted = nn.Linear(96, 128, bias=False), nn.Linear(96, 128, bias=False)
    plain.weight.data = w.clone()
    twisted.weight.data = w.t().contiguous().t()               # same values, strides (1, 128)
    x = torch.randn(8, 96)
    for model in (plain, twisted):
        opt = ReducedAdamW(model, None, lr=1e-2, state_format="m=int8,v=int8", backend="foreach")
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert not twisted.weight.is_contiguous()
    torch.testing.assert_close(twisted.weight, plain.weight, rtol=0, atol=1e-6)


def test_parts_without_averaging_keep_v_fp32_under_an_int8_v():
    torch.manual_seed(0)
    model = nn.Linear(128, 96, bias=False)
    parts = [PartPlan(n, 0, 32 * i, 32 * (i + 1), [32, 128], None) for i, n in enumerate("qkv")]
    plan = Plan(model=model_record(model), layers={"weight": LayerPlan([96, 128], "attn_qkv", [96, 128], None,
                                                                       parts=parts)})
    opt = ReducedAdamW(model, plan, lr=1e-2, state_format="m=int8,v=int8")
    assert opt.format_of(model.weight) == StateFormat("int8", "fp32")
    model(torch.randn(4, 128)).sum().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg_sq"].dtype == torch.float32


def test_a_checkpoint_without_the_lowmem_entry_loads_its_formats_from_its_tensors():
    """torch.distributed.checkpoint's state dict helpers keep only 'state' and 'param_groups':
    the formats are read from the tensors (scales: codes; their width: 8 or 4 bits; bf16)."""
    for fmt in ("m=int8,v=int8", "m=int4", "m=bf16,v=bf16"):
        torch.manual_seed(0)
        model = Wide()
        opt = ReducedAdamW(model, None, lr=LR, state_format=fmt)
        _train(model, opt, _batches(2))
        sd = copy.deepcopy(opt.state_dict())
        del sd["lowmem"]
        for target in (fmt, None):   # into the same format, and decoded into fp32
            other = ReducedAdamW(model, None, lr=LR, state_format=target)
            other.load_state_dict(sd)
            want = opt.adamw_state_dict()["state"][1]["exp_avg"]
            got = other.adamw_state_dict()["state"][1]["exp_avg"]
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_codes_of_the_wrong_dtype_are_refused_before_anything_loads():
    model = Wide()
    opt = ReducedAdamW(model, None, state_format="m=int8")
    _train(model, opt, _batches(1))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].float()
    before = opt.state[model.a.weight]["exp_avg"].clone()
    with pytest.raises(ValueError, match="uint8 codes"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state[model.a.weight]["exp_avg"], before)


def test_a_state_dict_before_any_step_loads_and_one_missing_its_scales_is_refused():
    # accelerate (a Hugging Face Trainer) reloads a fresh optimizer's own state dict when it wraps it
    model = Wide()
    opt = ReducedAdamW(model, None, state_format="m=int8")
    opt.load_state_dict(opt.state_dict())
    assert len(opt.state) == 0
    _train(model, opt, _batches(1))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["exp_avg_scale"]
    with pytest.raises(ValueError, match="lacks 'exp_avg_scale'"):
        opt.load_state_dict(sd)


def test_stochastic_rounding_is_seeded_by_the_optimizer_and_resumes_exactly():
    """The optimizer's own generator: the global RNG does not change the rounding (so replicas
    seeded per rank round alike), and a state dict carries it (a resumed run is bit-identical)."""
    def run(global_seed, steps, sd=None):
        torch.manual_seed(0)
        model = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
        opt = ReducedAdamW(model, None, lr=1e-4, param_rounding="stochastic", state_format="m=bf16")
        if sd is not None:
            model.load_state_dict(sd[0])
            opt.load_state_dict(sd[1])
        torch.manual_seed(global_seed)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
        for _ in range(steps):
            opt.zero_grad()
            model(x).float().sum().backward()
            opt.step()
        return model, opt

    a, _ = run(1, 4)
    b, opt_b = run(2, 4)
    assert torch.equal(a.weight, b.weight)
    half, opt_half = run(3, 2)
    saved = (copy.deepcopy(half.state_dict()), copy.deepcopy(opt_half.state_dict()))
    resumed, _ = run(4, 2, saved)
    assert torch.equal(resumed.weight, a.weight)


def test_an_adamw_checkpoint_of_bf16_parameters_loads_into_bf16_states_averaged_per_plan():
    # torch's AdamW keeps bf16 m and v for bf16 parameters: the formats look like "m=bf16,v=bf16",
    # but its v is whole, so it is averaged per plan, not copied as it lies.
    import lowmem

    torch.manual_seed(0)
    model = nn.Linear(300, 129, bias=False).to(torch.bfloat16)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model.weight.grad = torch.randn(model.weight.shape).to(torch.bfloat16)
        adamw.step()
    opt = lowmem.Eve(model, lr=1e-2, state_format="m=bf16,v=bf16")
    opt.load_state_dict(adamw.state_dict())
    v = opt.state[model.weight]["exp_avg_sq"]
    assert tuple(v.shape) == (129, 1) and v.dtype == torch.bfloat16
    want = adamw.state[model.weight]["exp_avg_sq"].float().mean(dim=1, keepdim=True)
    torch.testing.assert_close(v.float(), want, rtol=8e-3, atol=0)   # one bf16 rounding
    model.weight.grad = torch.randn(model.weight.shape).to(torch.bfloat16)
    opt.step()
