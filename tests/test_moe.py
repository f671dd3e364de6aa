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


# Per model: (name fragment -> (role, axes)) for one layer's MoE tensors, written from each
# library's modeling code (F.linear(x, w[e]) reads w[e] as (out, in); x @ w[e] as (in, out)).
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
    for name, (role, axes, shape) in expected.items():
        info = by_suffix[name]
        assert (info.role, info.axes, info.shape) == (role, axes, shape), name
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
