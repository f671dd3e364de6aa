"""Mixture-of-experts models: stacks of expert matrices and routers, read from structure on real
transformers models built from their configs (no download), and the optimizers that treat each
expert's matrix as its own: presets, the SNR plan's candidates, AdaMeM."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress import build_preset
from lowmem.compress.builders import is_candidate
from lowmem.compress.optim.adamem import AdaMeM
from lowmem.layers import resolve_layers
from lowmem.snr.views import param_views

transformers = pytest.importorskip("transformers")

H, I, E = 24, 40, 4   # hidden, expert intermediate, experts: no two alike, so every axis is told apart


def _quiet(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build()


def qwen2_moe():
    c = transformers.Qwen2MoeConfig(vocab_size=96, hidden_size=H, intermediate_size=56, moe_intermediate_size=I,
                                    shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_experts=E, num_experts_per_tok=2,
                                    max_position_embeddings=32)
    return _quiet(lambda: transformers.Qwen2MoeForCausalLM(c))


def mixtral():
    c = transformers.MixtralConfig(vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                   num_experts_per_tok=2, max_position_embeddings=32)
    return _quiet(lambda: transformers.MixtralForCausalLM(c))


def gpt_oss():
    """Experts stored as `torch.bmm` reads them, (expert, in, out), with biases."""
    c = transformers.GptOssConfig(vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
                                  num_experts_per_tok=2, layer_types=["full_attention"])
    return _quiet(lambda: transformers.GptOssForCausalLM(c))


def gpt_oss_square():
    """gpt-oss as released: the model's and the experts' widths equal, so `down_proj` is square
    and only its sibling `gate_up_proj` shows the (expert, in, out) layout."""
    c = transformers.GptOssConfig(vocab_size=96, hidden_size=H, intermediate_size=H, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=E,
                                  num_experts_per_tok=2, layer_types=["full_attention"])
    return _quiet(lambda: transformers.GptOssForCausalLM(c))


def switch():
    """Switch Transformers: experts in a ModuleDict (expert_0, …), the router's `classifier`."""
    c = transformers.SwitchTransformersConfig(vocab_size=96, d_model=H, d_kv=6, d_ff=I, num_layers=2,
                                              num_decoder_layers=2, num_heads=4, num_experts=E, encoder_sparse_step=1,
                                              decoder_sparse_step=1)
    return _quiet(lambda: transformers.SwitchTransformersForConditionalGeneration(c))


def dbrx():
    """DBRX: each expert projection a 2-D stack (experts·rows, hidden), `w2` read as x @ w2[e]; the
    router a Linear inside `router`."""
    c = transformers.DbrxConfig(vocab_size=96, d_model=H, n_layers=1, n_heads=4, max_seq_len=32,
                                attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                ffn_config={"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": 2})
    return _quiet(lambda: transformers.DbrxForCausalLM(c))


class GroupedExperts(nn.Module):
    """torchtitan's layout and names: `dim` the model's width, `hidden_dim` the FFN's, w1/w3 (E, F, D)."""

    def __init__(self):
        super().__init__()
        self.dim, self.hidden_dim, self.num_experts = H, I, E
        self.w1 = nn.Parameter(torch.randn(E, I, H))
        self.w2 = nn.Parameter(torch.randn(E, H, I))
        self.w3 = nn.Parameter(torch.randn(E, I, H))


def titan():
    moe = nn.Module()
    moe.router, moe.experts = nn.Linear(H, E, bias=False), GroupedExperts()
    model = nn.Module()
    model.moe = moe
    return model


# Per model: (name fragment -> (role, axes, shape[, view])) for one layer's MoE tensors, written
# from each library's modeling code (F.linear(x, w[e]) reads w[e] as (out, in); x @ w[e] as (in,
# out)); the view where the axes name a reshape of the tensor (`ParamInfo.view`), else None.
EXPECTED = {
    "qwen2-moe": (qwen2_moe, {
        "layers.0.mlp.gate.weight": ("router", ("out", "in"), (E, H)),
        "layers.0.mlp.experts.gate_up_proj": ("mlp_up", ("expert", "out", "in"), (E, 2 * I, H)),
        "layers.0.mlp.experts.down_proj": ("mlp_down", ("expert", "out", "in"), (E, H, I)),
        "layers.0.mlp.shared_expert_gate.weight": ("router", ("out", "in"), (1, H)),
        "layers.0.mlp.shared_expert.gate_proj.weight": ("mlp_gate", ("out", "in"), (48, H)),
        "layers.0.mlp.shared_expert.down_proj.weight": ("mlp_down", ("out", "in"), (H, 48)),
    }),
    "mixtral": (mixtral, {
        "layers.0.mlp.gate.weight": ("router", ("out", "in"), (E, H)),
        "layers.0.mlp.experts.gate_up_proj": ("mlp_up", ("expert", "out", "in"), (E, 2 * I, H)),
        "layers.0.mlp.experts.down_proj": ("mlp_down", ("expert", "out", "in"), (E, H, I)),
    }),
    "gpt-oss": (gpt_oss, {
        "layers.0.mlp.router.weight": ("router", ("out", "in"), (E, H)),
        "layers.0.mlp.router.bias": ("bias", ("out",), (E,)),
        "layers.0.mlp.experts.gate_up_proj": ("mlp_up", ("expert", "in", "out"), (E, H, 2 * I)),
        "layers.0.mlp.experts.gate_up_proj_bias": ("bias", ("expert", "out"), (E, 2 * I)),
        "layers.0.mlp.experts.down_proj": ("mlp_down", ("expert", "in", "out"), (E, I, H)),
        "layers.0.mlp.experts.down_proj_bias": ("bias", ("expert", "out"), (E, H)),
    }),
    "gpt-oss-square": (gpt_oss_square, {
        "layers.0.mlp.experts.gate_up_proj": ("mlp_up", ("expert", "in", "out"), (E, H, 2 * H)),
        "layers.0.mlp.experts.down_proj": ("mlp_down", ("expert", "in", "out"), (E, H, H)),
    }),
    "switch": (switch, {
        "encoder.block.0.layer.1.mlp.router.classifier.weight": ("router", ("out", "in"), (E, H)),
        "encoder.block.0.layer.1.mlp.experts.expert_0.wi.weight": ("mlp_up", ("out", "in"), (I, H)),
        "encoder.block.0.layer.1.mlp.experts.expert_0.wo.weight": ("mlp_down", ("out", "in"), (H, I)),
    }),
    "dbrx": (dbrx, {
        "transformer.blocks.0.ffn.router.layer.weight": ("router", ("out", "in"), (E, H)),
        "transformer.blocks.0.ffn.experts.mlp.w1": ("mlp_gate", ("expert", "out", "in"), (E * I, H), (E, I, H)),
        "transformer.blocks.0.ffn.experts.mlp.v1": ("mlp_up", ("expert", "out", "in"), (E * I, H), (E, I, H)),
        "transformer.blocks.0.ffn.experts.mlp.w2": ("mlp_down", ("expert", "in", "out"), (E * I, H), (E, I, H)),
    }),
    "torchtitan": (titan, {
        "moe.router.weight": ("router", ("out", "in"), (E, H)),
        "moe.experts.w1": ("mlp_gate", ("expert", "out", "in"), (E, I, H)),
        "moe.experts.w2": ("mlp_down", ("expert", "out", "in"), (E, H, I)),
        "moe.experts.w3": ("mlp_up", ("expert", "out", "in"), (E, I, H)),
    }),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_expert_stacks_and_routers_resolve_to_their_roles_and_axes(arch):
    build, expected = EXPECTED[arch]
    layers = resolve_layers(build(), warn=False)
    by_suffix = {info.name.removeprefix("model."): info for info in layers}
    for name, (role, axes, shape, *view) in expected.items():
        info = by_suffix[name]
        assert (info.role, info.axes, info.shape, info.view) == (role, axes, shape, (view or [None])[0]), name
    assert layers.unknown == []   # nothing of these models falls to `other`


def test_the_hidden_axis_is_found_by_a_gradient():
    # Structure, checked by what the model computes: zero one hidden unit of the experts' input and
    # the gradient of the first projection vanishes along the axis the resolver calls `in` there.
    model = qwen2_moe()
    experts = model.model.layers[0].mlp.experts
    info = resolve_layers(model, warn=False)["model.layers.0.mlp.experts.gate_up_proj"]
    x = torch.randn(6, H)
    x[:, 5] = 0
    idx = torch.tensor([[0, 1]] * 6)
    out = experts(x, idx, torch.full((6, 2), 0.5))
    out.square().sum().backward()
    g = experts.gate_up_proj.grad
    d = info.axes.index("in")
    assert g.select(d, 5).abs().max() == 0 and g.abs().max() > 0


def test_dbrx_expert_and_hidden_axes_are_found_by_a_gradient():
    # DBRX's own forward picks expert e's matrices out of its 2-D stacks: route every token to
    # experts 0 and 2 only and exactly those slices of lowmem's view get a gradient; zero hidden
    # unit 5 of the input and the first projections' gradient vanishes along their `in` axis.
    model = dbrx()
    experts = model.transformer.blocks[0].ffn.experts
    layers = resolve_layers(model, warn=False)
    x = torch.randn(6, H)
    x[:, 5] = 0
    experts(x, torch.tensor([[0, 2]] * 6), torch.full((6, 2), 0.5)).square().sum().backward()
    for attr in ("w1", "v1", "w2"):
        info = layers[f"transformer.blocks.0.ffn.experts.mlp.{attr}"]
        g = getattr(experts.mlp, attr).grad.view(info.view)
        e = info.axes.index("expert")
        hit = [bool(g.select(e, k).abs().max() > 0) for k in range(E)]
        assert hit == [True, False, True, False], attr
        if attr != "w2":
            assert g.select(info.axes.index("in"), 5).abs().max() == 0, attr


def test_presets_keep_an_expert_axis_and_never_average_over_it():
    model = qwen2_moe()
    stack = "model.layers.0.mlp.experts.gate_up_proj"   # (E, 2I, H): (expert, out, in)
    want = {  # kept v entries of the stack, by hand
        "eve": E * 2 * I,                 # one per row of each expert
        "adam-mini": E * 2 * I,           # the same (MLP rows)
        "adam-mini-paper": E,             # one scalar per expert
        "adalayer": E,
        "slimadam-rules": E * H,          # mlp_up averages over fan_out: one per column of each expert
    }
    for preset, kept in want.items():
        lp = build_preset(preset, model).layers[stack]
        assert lp.reduce is not None and 0 not in lp.reduce, preset
        n = 1
        for d, s in enumerate(lp.view):
            n *= 1 if d in lp.reduce else s
        assert n == kept, preset
    router = build_preset("eve", model).layers["model.layers.0.mlp.gate.weight"]
    assert router.reduce == [1]   # one v per expert's routing row
    # DBRX's 2-D stacks, (E·I, H) read as (E, I, H): the same rules on each expert's matrix
    model = dbrx()
    want = {  # kept v entries of w1 (expert, out, in) and w2 (expert, in, out), by hand
        "eve": (E * I, E * H),            # one per row (output unit) of each expert
        "adam-mini": (E * I, E * H),
        "adam-mini-paper": (E, E),        # one scalar per expert
        "adalayer": (E, E),
        "slimadam-rules": (E * H, E * I),  # averaged over fan_out: one per input unit of each expert
    }
    for preset, kept in want.items():
        plan = build_preset(preset, model)
        for attr, k in zip(("w1", "w2"), kept):
            lp = plan.layers[f"transformer.blocks.0.ffn.experts.mlp.{attr}"]
            assert lp.view == [E, I, H] and lp.reduce is not None and 0 not in lp.reduce, (preset, attr)
            assert lowmem.compress.plan.kept_entries(lp.view, lp.reduce) == k, (preset, attr)


def test_the_snr_plan_never_averages_over_experts():
    info = resolve_layers(qwen2_moe(), warn=False)["model.layers.0.mlp.experts.down_proj"]
    (raw,) = param_views(info)
    e = raw.axes.index("expert")
    assert not is_candidate(raw, (e,)) and not is_candidate(raw, (e, 1, 2))
    assert is_candidate(raw, (1,)) and is_candidate(raw, (2,))


def test_unnamed_axes_are_never_averaged_by_a_preset():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(5, 7))   # a raw parameter: axes d0, d1
            self.proj = nn.Linear(7, 3)

    model = Odd()
    assert resolve_layers(model, warn=False)["table"].axes == ("d0", "d1")
    for preset in ("eve", "adam-mini", "adam-mini-paper", "adalayer", "slimadam-rules"):
        assert build_preset(preset, model).layers["table"].reduce is None, preset


class _Experts(nn.Module):
    """A stack as `torch.bmm` reads it: gate_up (E, H, 2I), down (E, I, H)."""

    def __init__(self, bmm: bool):
        super().__init__()
        self.num_experts, self.hidden_dim = E, H
        shape_up, shape_down = ((E, H, 2 * I), (E, I, H)) if bmm else ((E, 2 * I, H), (E, H, I))
        self.gate_up_proj = nn.Parameter(torch.randn(shape_up) / H ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(shape_down) / I ** 0.5)


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(H, 2 * I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)


def _twins(bmm: bool):
    """An MoE block with a stack of experts, and the same experts as separate Linear modules."""
    torch.manual_seed(0)
    stacked = nn.Module()
    stacked.mlp = nn.Module()
    stacked.mlp.gate = nn.Linear(H, E, bias=False)
    stacked.mlp.experts = _Experts(bmm)
    separate = nn.Module()
    separate.mlp = nn.Module()
    separate.mlp.gate = nn.Linear(H, E, bias=False)
    separate.mlp.experts = nn.ModuleList(_Expert() for _ in range(E))
    with torch.no_grad():
        separate.mlp.gate.weight.copy_(stacked.mlp.gate.weight)
        for e, ex in enumerate(separate.mlp.experts):
            up, down = stacked.mlp.experts.gate_up_proj[e], stacked.mlp.experts.down_proj[e]
            ex.gate_up_proj.weight.copy_(up.T if bmm else up)
            ex.down_proj.weight.copy_(down.T if bmm else down)
    return stacked, separate


@pytest.mark.parametrize("bmm", [False, True], ids=["linear-layout", "bmm-layout"])
def test_adamem_projects_each_expert_as_its_own_matrix(bmm):
    # Against AdaMeM on the same experts as separate Linear weights (its per-matrix path), over
    # four steps with a projector refresh at steps 1 and 3.
    stacked, separate = _twins(bmm)
    layers = resolve_layers(stacked, warn=False)
    assert layers["mlp.experts.gate_up_proj"].axes == (("expert", "in", "out") if bmm else ("expert", "out", "in"))
    assert layers["mlp.gate.weight"].role == "router"
    kw = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=2, rank_fraction=0.25)
    opt_s, opt_p = AdaMeM(stacked, **kw), AdaMeM(separate, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g_up = torch.randn(stacked.mlp.experts.gate_up_proj.shape, generator=gen)
        g_down = torch.randn(stacked.mlp.experts.down_proj.shape, generator=gen)
        g_gate = torch.randn(E, H, generator=gen)
        stacked.mlp.experts.gate_up_proj.grad, stacked.mlp.experts.down_proj.grad = g_up, g_down
        stacked.mlp.gate.weight.grad = g_gate
        separate.mlp.gate.weight.grad = g_gate.clone()
        for e, ex in enumerate(separate.mlp.experts):
            ex.gate_up_proj.weight.grad = (g_up[e].T if bmm else g_up[e]).clone()
            ex.down_proj.weight.grad = (g_down[e].T if bmm else g_down[e]).clone()
        opt_s.step()
        opt_p.step()
    for e, ex in enumerate(separate.mlp.experts):
        up, down = stacked.mlp.experts.gate_up_proj[e], stacked.mlp.experts.down_proj[e]
        torch.testing.assert_close(up.T if bmm else up, ex.gate_up_proj.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(down.T if bmm else down, ex.down_proj.weight, rtol=1e-5, atol=1e-6)
    proj = opt_s.state[stacked.mlp.experts.gate_up_proj]["proj"]
    assert proj.shape == (E, H, H // 4)   # (E, m, r): m = min(H, 2I), r = m / 4


def test_adamem_refuses_nothing_and_counts_expert_states():
    model = qwen2_moe()
    opt = AdaMeM(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[model.model.layers[0].mlp.experts.down_proj]   # (E, H, I) = (4, 24, 40): m = 24, r = 6
    assert {k: tuple(v.shape) for k, v in st.items() if k != "step"} == {
        "proj": (E, H, 6), "exp_avg": (E, 6, I), "row_var": (E, 6), "col_var": (E, I), "res_col_var": (E, I)}
    assert lowmem.compress.optim.adamem_state_numel(model) == sum(
        v.numel() for s in opt.state.values() for k, v in s.items() if k != "step")


class _FlatExperts(nn.Module):
    """DBRX's layout and names: w1 (gate), v1 (up), w2 (down), each (E·I, H); w2[e] read as (in, out)."""

    def __init__(self):
        super().__init__()
        self.moe_num_experts, self.hidden_size = E, H
        self.w1 = nn.Parameter(torch.randn(E * I, H) / H ** 0.5)
        self.v1 = nn.Parameter(torch.randn(E * I, H) / H ** 0.5)
        self.w2 = nn.Parameter(torch.randn(E * I, H) / I ** 0.5)


def test_adamem_projects_each_expert_of_a_2d_stack_as_its_own_matrix():
    # DBRX-style 2-D stacks against AdaMeM on each expert's matrices as separate Linear weights
    # (its per-matrix path), over four steps with a projector refresh at steps 1 and 3.
    torch.manual_seed(0)
    stacked = nn.Module()
    stacked.ffn = nn.Module()
    stacked.ffn.router = nn.Module()
    stacked.ffn.router.layer = nn.Linear(H, E, bias=False)
    stacked.ffn.experts = nn.Module()
    stacked.ffn.experts.mlp = _FlatExperts()
    separate = nn.Module()
    separate.mlp = nn.Module()
    separate.mlp.gate = nn.Linear(H, E, bias=False)
    separate.mlp.experts = nn.ModuleList()
    mlp = stacked.ffn.experts.mlp
    with torch.no_grad():
        separate.mlp.gate.weight.copy_(stacked.ffn.router.layer.weight)
        for e in range(E):
            ex = nn.Module()
            ex.gate_proj, ex.up_proj, ex.down_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), \
                nn.Linear(I, H, bias=False)
            ex.gate_proj.weight.copy_(mlp.w1.view(E, I, H)[e])
            ex.up_proj.weight.copy_(mlp.v1.view(E, I, H)[e])
            ex.down_proj.weight.copy_(mlp.w2.view(E, I, H)[e].T)
            separate.mlp.experts.append(ex)
    layers = resolve_layers(stacked, warn=False)
    assert layers["ffn.router.layer.weight"].role == "router" and layers["ffn.experts.mlp.w2"].view == (E, I, H)
    kw = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=2, rank_fraction=0.25)
    opt_s, opt_p = AdaMeM(stacked, **kw), AdaMeM(separate, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = {a: torch.randn(E * I, H, generator=gen) for a in ("w1", "v1", "w2")}
        g_gate = torch.randn(E, H, generator=gen)
        for a, g in grads.items():
            getattr(mlp, a).grad = g
        stacked.ffn.router.layer.weight.grad = g_gate
        separate.mlp.gate.weight.grad = g_gate.clone()
        for e, ex in enumerate(separate.mlp.experts):
            ex.gate_proj.weight.grad = grads["w1"].view(E, I, H)[e].clone()
            ex.up_proj.weight.grad = grads["v1"].view(E, I, H)[e].clone()
            ex.down_proj.weight.grad = grads["w2"].view(E, I, H)[e].T.clone()
        opt_s.step()
        opt_p.step()
    for e, ex in enumerate(separate.mlp.experts):
        torch.testing.assert_close(mlp.w1.view(E, I, H)[e], ex.gate_proj.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mlp.v1.view(E, I, H)[e], ex.up_proj.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mlp.w2.view(E, I, H)[e].T, ex.down_proj.weight, rtol=1e-5, atol=1e-6)
    assert opt_s.state[mlp.w1]["proj"].shape == (E, H, H // 4)   # (E, m, r): m = min(I, H), r = m / 4
    assert lowmem.compress.optim.adamem_state_numel(stacked) == sum(
        v.numel() for s in opt_s.state.values() for k, v in s.items() if k != "step")


def _snr(x, axis):
    """mean over the other axes' slices of (mean along `axis`)² / variance along it, float64."""
    import numpy as np
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, x.shape[axis])
    mean, var = x.mean(axis=1), x.var(axis=1)
    return float((mean * mean / var).mean())


def test_dbrx_end_to_end_measures_plans_and_steps_each_experts_matrix(tmp_path):
    # DBRX trained for three steps with SNR captured: the SNR of its 2-D stacks is measured per
    # expert's matrix (numpy on exp_avg_sq read as DBRX's own (E, I, H)); the plan built from it
    # keeps the view, and the optimizer it describes steps with one v per kept (expert, row).
    from lowmem.snr.capture import capture
    model = dbrx()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    csv = tmp_path / "snr.csv"
    with capture(opt, model, every=1, out=csv):
        for step in range(3):
            opt.zero_grad()
            model(torch.arange(step, step + 12).view(1, 12) % 96).logits.square().mean().backward()
            opt.step()
    name = "transformer.blocks.0.ffn.experts.mlp.w1"
    w1 = model.transformer.blocks[0].ffn.experts.mlp.w1
    v = opt.state[w1]["exp_avg_sq"].numpy().reshape(E, I, H)
    traj = lowmem.SnrTrajectory.read(csv)
    got = {(s.view.name, s.subset): s.snr for s in traj.samples if s.name == name and s.step == 3}
    assert got[("raw", (2,))] == pytest.approx(_snr(v, 2), rel=1e-5)    # fan_in of each expert's rows
    assert got[("raw", (1,))] == pytest.approx(_snr(v, 1), rel=1e-5)    # fan_out of each expert's columns
    import json
    from lowmem.layers import ModelLayers
    layers = resolve_layers(model, warn=False)
    assert ModelLayers.from_json(json.loads(json.dumps(layers.to_json())))[name].view == (E, I, H)   # layers.json
    plan = lowmem.build_plan(model, traj, threshold=0.0, prefer="compression")
    lp = plan.layers[name]
    assert lp.view == [E, I, H] and lp.reduce is not None and 0 not in lp.reduce
    reduced = lowmem.optimizer_from_plan(model, plan, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    reduced.step()
    kept = E * (1 if 1 in lp.reduce else I) * (1 if 2 in lp.reduce else H)
    assert reduced.state[w1]["exp_avg_sq"].numel() == kept


# Every parameter of the MoE models, as (pattern of names, role, axes[, view]), each name matched
# by exactly one pattern (from the modeling code, as EXPECTED above).
_ATTN = [(rf"model\.layers\.\d\.self_attn\.{x}_proj\.weight", f"attn_{r}", ("out", "in")) for x, r in
         (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))]
_LLAMA_REST = [(r"model\.embed_tokens\.weight", "embedding", ("token", "model")),
               (r"model\.(layers\.\d\.(input|post_attention)_layernorm|norm)\.weight", "norm", ("model",)),
               (r"lm_head\.weight", "lm_head", ("out", "in")), (r"model\.layers\.\d\.mlp\.gate\.weight", "router", ("out", "in")),
               (r"model\.layers\.\d\.mlp\.experts\.gate_up_proj", "mlp_up", ("expert", "out", "in")),
               (r"model\.layers\.\d\.mlp\.experts\.down_proj", "mlp_down", ("expert", "out", "in"))]
EVERY = {
    "qwen2-moe": (qwen2_moe, [*_ATTN, *_LLAMA_REST,
                              (r"model\.layers\.\d\.self_attn\.[qkv]_proj\.bias", "bias", ("out",)),
                              *[(rf"model\.layers\.\d\.mlp\.shared_expert\.{x}_proj\.weight", f"mlp_{x}", ("out", "in"))
                                for x in ("gate", "up", "down")],
                              (r"model\.layers\.\d\.mlp\.shared_expert_gate\.weight", "router", ("out", "in"))]),
    "mixtral": (mixtral, [*_ATTN, *_LLAMA_REST]),
    "dbrx": (dbrx, [
        (r"transformer\.wte\.weight", "embedding", ("token", "model")),
        (r"transformer\.(blocks\.0\.norm_attn_norm\.norm_[12]|norm_f)\.weight", "norm", ("model",)),
        (r"transformer\.blocks\.0\.norm_attn_norm\.attn\.Wqkv\.weight", "attn_qkv", ("out", "in")),
        (r"transformer\.blocks\.0\.norm_attn_norm\.attn\.out_proj\.weight", "attn_out", ("out", "in")),
        (r"transformer\.blocks\.0\.ffn\.router\.layer\.weight", "router", ("out", "in")),
        (r"transformer\.blocks\.0\.ffn\.experts\.mlp\.w1", "mlp_gate", ("expert", "out", "in"), (E, I, H)),
        (r"transformer\.blocks\.0\.ffn\.experts\.mlp\.v1", "mlp_up", ("expert", "out", "in"), (E, I, H)),
        (r"transformer\.blocks\.0\.ffn\.experts\.mlp\.w2", "mlp_down", ("expert", "in", "out"), (E, I, H)),
        (r"lm_head\.weight", "lm_head", ("out", "in"))]),
}


@pytest.mark.parametrize("arch", list(EVERY))
def test_every_parameter_of_the_moe_models(arch):
    from expectations import check_every

    build, expected = EVERY[arch]
    expected = [row if len(row) == 4 else (*row, None) for row in expected]   # (pattern, role, axes, view)
    check_every([(i.name, (i.role, i.axes, i.view)) for i in resolve_layers(build(), warn=False)], expected)


def test_a_dense_mlp_of_raw_matrices_in_an_moe_model_is_no_stack():
    # A model whose config counts experts, with a dense MLP kept as raw (I, H) matrices named like
    # experts' (w1, w2): rows divisible by the experts count, but no module of its own says it
    # holds experts, so it is not read as a stack (DBRX's holder carries moe_num_experts itself).
    class DenseMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden_size = H
            self.w1, self.w2 = nn.Parameter(torch.randn(I, H)), nn.Parameter(torch.randn(I, H))

    model = nn.Module()
    model.config = type("Config", (), {"num_experts": E, "hidden_size": H})()
    model.mlp = DenseMLP()
    layers = resolve_layers(model, warn=False)
    assert layers["mlp.w1"].view is None and layers["mlp.w1"].role == "other"
    model.mlp.moe_num_experts = E          # the holder says it: a stack, read per expert
    assert resolve_layers(model, warn=False)["mlp.w1"].view == (E, I // E, H)


def _small_flat_stack():
    """DBRX's layout, small enough for a dense Hessian: 2 experts of (6, 4), w2 read as (in, out)."""
    mlp = _FlatExperts.__new__(_FlatExperts)
    nn.Module.__init__(mlp)
    mlp.moe_num_experts, mlp.hidden_size = 2, 4
    mlp.w1, mlp.v1, mlp.w2 = (nn.Parameter(torch.randn(12, 4)) for _ in range(3))
    model = nn.Module()
    model.ffn = nn.Module()
    model.ffn.router = nn.Module()
    model.ffn.router.layer = nn.Linear(4, 2, bias=False)
    model.ffn.experts = nn.Module()
    model.ffn.experts.mlp = mlp
    return model


def test_hessian_blocks_of_a_2d_stack_are_sliced_and_read_per_expert():
    # Selectors slice the (experts, rows, hidden) view; rows of the Hessian are (expert, output
    # unit) pairs, so a Hessian that is block-diagonal per (expert, output unit) gives one group
    # per pair and a plan with one v per output unit of each expert; a dense one is still split
    # by expert (one learning rate is never shared across experts).
    from lowmem.cli.hessian import analyze_block, rows_first
    from lowmem.hessian import HessianError, piece
    from lowmem.hessian.plans import plan_from_partitions
    model = _small_flat_stack()
    layers = resolve_layers(model, warn=False)
    name = "ffn.experts.mlp.w2"                       # view (2, 6, 4): (expert, in, out)
    assert piece(model, f"{name}[1]", layers).box == (1, 6, 4)
    assert piece(model, f"{name}[1]", layers).index.tolist() == list(range(24, 48))   # expert 1's rows
    with pytest.raises(HessianError, match=r"a stack of experts.*no heads.*w2\[0:2\], of 2"):
        piece(model, f"{name}[head=0]", layers)
    p = piece(model, name, layers)
    perm, shape = rows_first(p, layers[name])
    assert shape == (8, 6)                              # 2 experts x 4 output units, 6 inputs each
    flat = torch.arange(48).view(2, 6, 4)
    pair = (flat // 24) * 4 + flat % 4                  # (expert, output unit) of every entry, by hand
    labels = pair.reshape(-1)
    block = (labels[:, None] == labels[None, :]).double() * (1.0 + torch.rand(48, 48, dtype=torch.float64))
    block = block + block.T + 48 * torch.eye(48, dtype=torch.float64)
    _, use, _, _ = analyze_block(block, p, layers[name])
    assert len(use) == 8
    lp = plan_from_partitions(model, {name: use}, layers=layers).layers[name]
    assert lp.view == [2, 6, 4] and lp.reduce == [1]    # one v per output unit of each expert
    a = torch.randn(48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, use, _, _ = analyze_block(a @ a.T, p, layers[name])    # dense: one group
    assert len(use) == 1
    lp = plan_from_partitions(model, {name: use}, layers=layers).layers[name]
    assert lp.reduce is not None and 0 not in lp.reduce and \
        lowmem.compress.plan.kept_entries(lp.view, lp.reduce) == 2   # one per expert, not one in all
