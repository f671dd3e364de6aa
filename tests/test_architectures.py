"""Real third-party architectures built from their libraries' configs (random init, no download):
what lowmem reads each parameter as, against hand-written expectations and, for fused Q/K/V
layouts, against the gradients of the model itself.

timm and torchvision models are tested in tests/test_vision_models.py (in a Python of their own:
their wheels need another torch than the CPU build this suite runs on)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowmem.compress import build_preset
from lowmem.layers import ParamInfo, resolve_layers
from lowmem.snr.views import param_views

transformers = pytest.importorskip("transformers")


def _build(cls, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        config._attn_implementation = "eager"
        return cls(config)


def neox():
    return _build(transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32))


def bloom():
    return _build(transformers.BloomForCausalLM, transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1,
                                                                         n_head=4))


def falcon():
    return _build(transformers.FalconForCausalLM, transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True))


def phi3():
    return _build(transformers.Phi3ForCausalLM, transformers.Phi3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2))


def gpt2():
    return _build(transformers.GPT2LMHeadModel, transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1,
                                                                         n_head=4, n_positions=32))


def falcon1():
    """Falcon's new architecture with one key-value group: q heads, k, v one after the other."""
    return _build(transformers.FalconForCausalLM, transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_kv_heads=1,
        new_decoder_architecture=True))


def falcon_old(multi_query: bool):
    return lambda: _build(transformers.FalconForCausalLM, transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, new_decoder_architecture=False,
        multi_query=multi_query, alibi=False))


def persimmon():
    return _build(transformers.PersimmonForCausalLM, transformers.PersimmonConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32))


def bigcode(multi_query: bool):
    return lambda: _build(transformers.GPTBigCodeForCausalLM, transformers.GPTBigCodeConfig(
        vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, multi_query=multi_query))


# (model, its fused projection's name, the layout lowmem must read, query heads, key-value heads)
FUSED = {
    "gpt-neox": (neox, "gpt_neox.layers.0.attention.query_key_value", "per_head", 4, 4),
    "bloom": (bloom, "transformer.h.0.self_attention.query_key_value", "per_head", 4, 4),
    "falcon-new": (falcon, "transformer.h.0.self_attention.query_key_value", "grouped", 4, 2),
    "phi3": (phi3, "model.layers.0.self_attn.qkv_proj", "contiguous", 4, 2),
    "gpt2": (gpt2, "transformer.h.0.attn.c_attn", "contiguous", 4, 4),
    "gpt-bigcode-mqa": (bigcode(True), "transformer.h.0.attn.c_attn", "contiguous", 4, 1),
    "falcon-new-1kv": (falcon1, "transformer.h.0.self_attention.query_key_value", "contiguous", 4, 1),
    "falcon-old": (falcon_old(False), "transformer.h.0.self_attention.query_key_value", "per_head", 4, 4),
    "falcon-old-mqa": (falcon_old(True), "transformer.h.0.self_attention.query_key_value", "contiguous", 4, 1),
    "persimmon": (persimmon, "model.layers.0.self_attn.query_key_value", "per_head", 4, 4),
    "gpt-bigcode-mha": (bigcode(False), "transformer.h.0.attn.c_attn", "per_head", 4, 4),
}


def _rows(layout: str, hq: int, hkv: int, hd: int) -> dict[str, list[int]]:
    """The q, k, v rows of a fused projection's output as each layout means them (written from the
    libraries' modeling code, not from lowmem)."""
    if layout == "contiguous":
        q, k = hq * hd, hkv * hd
        return {"q": list(range(q)), "k": list(range(q, q + k)), "v": list(range(q + k, q + 2 * k))}
    if layout == "per_head":
        return {p: [h * 3 * hd + i * hd + j for h in range(hq) for j in range(hd)] for i, p in enumerate("qkv")}
    per = hq // hkv + 2   # grouped: each key-value group's query heads, then its key, then its value
    out = {"q": [], "k": [], "v": []}
    for g in range(hkv):
        base = g * per * hd
        out["q"] += list(range(base, base + (per - 2) * hd))
        out["k"] += list(range(base + (per - 2) * hd, base + (per - 1) * hd))
        out["v"] += list(range(base + (per - 1) * hd, base + per * hd))
    return out


@pytest.mark.parametrize("arch", list(FUSED))
def test_fused_qkv_layout_is_read_right_and_checked_by_gradient(arch):
    build, name, layout, hq, hkv = FUSED[arch]
    model = build()
    info: ParamInfo = resolve_layers(model, warn=False)[name + ".weight"]
    assert (info.role, info.qkv_layout, info.heads) == ("attn_qkv", layout, hq)
    hd = 32 // hq
    rows = _rows(layout, hq, hkv, hd)
    # Split into parts exactly where the rows are: each part's view (strided where the layout
    # interleaves) reads the rows of the model's layout, in head order.
    out = info.axes.index("out")
    index = torch.arange(info.shape[out]).view(-1, 1).expand(-1, info.shape[1 - out])
    index = index if out == 0 else index.T
    views = {v.name: v for v in param_views(info)}
    assert set(views) >= {"q", "k", "v"}
    for part in "qkv":
        got = views[part].apply(index).select(1 - out, 0).tolist()
        assert got == rows[part], part
    if layout != "contiguous":
        assert info.part_groups == hkv
    # With every query row zeroed, attention scores no longer depend on the keys: the key rows'
    # gradient vanishes exactly and the value rows' does not, iff `rows` is the model's layout.
    module = model.get_submodule(name)
    conv1d = type(module).__name__ == "Conv1D"
    with torch.no_grad():
        w = module.weight.T if conv1d else module.weight
        w[rows["q"]] = 0
        if module.bias is not None:
            module.bias[rows["q"]] = 0
    model(torch.arange(12).view(1, 12) % 64).logits.square().mean().backward()
    g = module.weight.grad.T if conv1d else module.weight.grad
    assert g[rows["k"]].abs().max() == 0, "key rows moved: the layout is not the one read"
    assert g[rows["v"]].abs().max() > 0


def test_presets_on_an_unsplit_fused_projection_keep_rows_or_full_adam_and_say_why():
    # GPT-2's cross-attention c_attn (keys and values only): not split
    model = _build(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=64, n_embd=48, n_layer=1, n_head=4, n_positions=32, add_cross_attention=True))
    name = "transformer.h.0.crossattention.c_attn.weight"   # Conv1D: (in, out)
    eve = build_preset("eve", model).layers[name]
    assert eve.reduce == [0] and "not split" in eve.why   # one v per row (out): a row is one of k or v
    slim = build_preset("slimadam-rules", model).layers[name]
    assert slim.reduce is None and "not split" in slim.why   # its rules differ between q/k and v


@pytest.mark.parametrize("arch", ["gpt-neox", "falcon-new"])
def test_presets_on_interleaved_parts_keep_what_each_part_rule_says(arch):
    # SlimAdam's rules per part, counted by hand: q, k average over fan_in (one v per row of the
    # part), v over fan_out (one per input column).
    build, name, _, hq, hkv = FUSED[arch]
    model = build()
    lp = build_preset("slimadam-rules", model).layers[name + ".weight"]
    hd = 32 // hq
    kept = {p.name: p.v_kept for p in lp.parts}
    assert kept == {"q": hq * hd, "k": hkv * hd, "v": 32}
    assert lp.v_kept == hq * hd + hkv * hd + 32


def test_names_of_neox_phi3_and_slimadams_reference_code():
    roles = {i.name: i.role for i in resolve_layers(neox(), warn=False)}
    assert roles["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == "mlp_up"
    assert roles["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"] == "mlp_down"
    assert roles["gpt_neox.layers.0.attention.dense.weight"] == "attn_out"
    roles = {i.name: i.role for i in resolve_layers(phi3(), warn=False)}
    assert roles["model.layers.0.mlp.gate_up_proj.weight"] == "mlp_up"   # gate and up, fused

    class Block(torch.nn.Module):   # as SlimAdam's reference code names a GPT-2 block's layers
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Module()
            self.attn.qkv_proj = torch.nn.Linear(16, 48)
            self.attn.output_proj = torch.nn.Linear(16, 16)
            self.mlp = torch.nn.Module()
            self.mlp.mlp_up = torch.nn.Linear(16, 64)
            self.mlp.mlp_proj = torch.nn.Linear(64, 16)

    roles = {i.name: i.role for i in resolve_layers(Block(), heads=4, warn=False) if not i.is_bias}
    assert roles == {"attn.qkv_proj.weight": "attn_qkv", "attn.output_proj.weight": "attn_out",
                     "mlp.mlp_up.weight": "mlp_up", "mlp.mlp_proj.weight": "mlp_down"}


def vit():
    return _build(transformers.ViTForImageClassification, transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8,
        num_labels=5))


def convnext():
    return _build(transformers.ConvNextForImageClassification, transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5))


def t5():
    return _build(transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))


def bert():
    return _build(transformers.BertForMaskedLM, transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))


def llama():
    return _build(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))


def resnet():
    return _build(transformers.ResNetForImageClassification, transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5))


def deepseek_v3():
    """Multi-head latent attention (MLA): queries through a rank-16 compression, keys and values
    through a rank-8 one plus a shared 4-wide rope key; 4 heads."""
    return _build(transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1))


def deepseek_v2():
    """MLA without the queries' compression (DeepSeek-V2-Lite): q_proj straight from the hidden width."""
    return _build(transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))


def mamba():
    return _build(transformers.MambaForCausalLM, transformers.MambaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8))


def mamba2():
    return _build(transformers.Mamba2ForCausalLM, transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8, num_heads=8, head_dim=8, n_groups=1))


# Per architecture: roles and axes of the parameters that are easy to get wrong, and every
# parameter left `other` (hand-written from each library's modeling code).
EXPECTED = {
    "vit": (vit, {
        "vit.embeddings.cls_token": ("embedding", ("token", "token", "model")),
        "vit.embeddings.position_embeddings": ("embedding", ("token", "token", "model")),
        "vit.embeddings.patch_embeddings.projection.weight": ("conv", ("out", "in", "kh", "kw")),
        "classifier.weight": ("lm_head", ("out", "in")),
    }, []),
    "convnext": (convnext, {
        "convnext.encoder.stages.0.layers.0.pwconv1.weight": ("mlp_up", ("out", "in")),     # 8 -> 32
        "convnext.encoder.stages.0.layers.0.pwconv2.weight": ("mlp_down", ("out", "in")),   # 32 -> 8
        "classifier.weight": ("lm_head", ("out", "in")),
    }, []),
    # The classifier is `classifier.1` (a Sequential: Flatten, Linear): no name says head; it is
    # the last layer, outside the stages, fed by the last stage's 16 channels, read by nothing.
    "resnet": (resnet, {
        "classifier.1.weight": ("lm_head", ("out", "in")),
        "resnet.embedder.embedder.convolution.weight": ("conv", ("out", "in", "kh", "kw")),
    }, []),
    "t5": (t5, {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": ("embedding", ("token", "head")),
        "encoder.block.0.layer.1.DenseReluDense.wi.weight": ("mlp_up", ("out", "in")),
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": ("mlp_down", ("out", "in")),
    }, []),
    "bert": (bert, {
        "bert.encoder.layer.0.intermediate.dense.weight": ("mlp_up", ("out", "in")),
        "bert.encoder.layer.0.output.dense.weight": ("mlp_down", ("out", "in")),
        "bert.encoder.layer.0.attention.output.dense.weight": ("attn_out", ("out", "in")),
    }, ["cls.predictions.transform.dense.weight"]),   # the MLM head's square transform: axes known
    "gpt-neox": (neox, {"gpt_neox.layers.0.mlp.dense_h_to_4h.weight": ("mlp_up", ("out", "in"))}, []),
    "phi3": (phi3, {"model.layers.0.mlp.gate_up_proj.weight": ("mlp_up", ("out", "in"))}, []),
    "llama-gqa": (llama, {"model.layers.0.self_attn.k_proj.weight": ("attn_k", ("out", "in"))}, []),
    "gpt2": (gpt2, {"transformer.h.0.mlp.c_fc.weight": ("mlp_up", ("in", "out"))}, []),
    # MLA: q_b_proj makes the queries (4 heads of 6 + 4), kv_b_proj each head's key and value; the two
    # compressions (32 -> 16 for queries, 32 -> 8 + 4 for keys and values) have no role of ours
    "deepseek-v3": (deepseek_v3, {
        "model.layers.0.self_attn.q_b_proj.weight": ("attn_q", ("out", "in")),
        "model.layers.0.self_attn.kv_b_proj.weight": ("attn_qkv", ("out", "in")),
        "model.layers.0.self_attn.o_proj.weight": ("attn_out", ("out", "in")),
    }, ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]),
    "deepseek-v2": (deepseek_v2, {
        "model.layers.0.self_attn.q_proj.weight": ("attn_q", ("out", "in")),
        "model.layers.0.self_attn.kv_b_proj.weight": ("attn_qkv", ("out", "in")),
    }, ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]),
    # Mamba: in_proj widens the model width into the scan's input and its gate, out_proj writes it
    # back, as an MLP's pair (not attention, whatever the names); x_proj, dt_proj and the state
    # matrix A_log (channels x states) have no role of ours
    "mamba": (mamba, {
        "backbone.layers.0.mixer.in_proj.weight": ("mlp_up", ("out", "in")),
        "backbone.layers.0.mixer.out_proj.weight": ("mlp_down", ("out", "in")),
        "backbone.layers.0.mixer.conv1d.weight": ("conv", ("out", "in", "kw")),
    }, ["backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.x_proj.weight",
        "backbone.layers.0.mixer.dt_proj.weight"]),
    "mamba2": (mamba2, {
        "backbone.layers.0.mixer.in_proj.weight": ("mlp_up", ("out", "in")),
        "backbone.layers.0.mixer.out_proj.weight": ("mlp_down", ("out", "in")),
    }, []),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_roles_and_axes_of_real_architectures(arch):
    build, expected, unknown = EXPECTED[arch]
    layers = resolve_layers(build(), warn=False)
    for name, (role, axes) in expected.items():
        assert (layers[name].role, layers[name].axes) == (role, axes), name
    assert layers.unknown == unknown


def test_an_mlp_without_names_is_read_from_its_widths():
    # torchvision's ViT MLPBlock (a Sequential: Linear, GELU, Dropout, Linear, Dropout), a gated
    # MLP of unknown names (two H -> X, one X -> H) and two square Linears (nothing to read: other)
    seq = torch.nn.Module()
    seq.mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Dropout(), torch.nn.Linear(64, 16))
    seq.gated = torch.nn.Module()
    seq.gated.a, seq.gated.b, seq.gated.c = torch.nn.Linear(16, 40), torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)
    seq.square = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    roles = {i.name: i.role for i in resolve_layers(seq, warn=False) if not i.is_bias}
    assert roles == {"mlp.0.weight": "mlp_up", "mlp.3.weight": "mlp_down", "gated.a.weight": "mlp_up",
                     "gated.b.weight": "mlp_up", "gated.c.weight": "mlp_down", "square.0.weight": "other",
                     "square.1.weight": "other"}


def test_every_role_says_how_it_was_found_and_plans_say_it_in_why(tmp_path):
    found = {i.name: i.found for i in resolve_layers(convnext(), warn=False)}
    assert found["convnext.encoder.stages.0.layers.0.pwconv1.weight"] == \
        "structure: maps the hidden width 8 to 32, and a sibling Linear maps it back"
    assert found["convnext.encoder.stages.0.layers.0.pwconv2.weight"] == \
        "structure: maps 32 back to the hidden width 8 that a sibling Linear read"
    assert found["classifier.weight"] == "name classifier"
    layers = resolve_layers(resnet(), warn=False)
    assert layers["classifier.1.weight"].found.startswith("structure: an output layer of the model")
    assert layers["resnet.embedder.embedder.normalization.weight"].found == "module type BatchNorm2d"
    g = resolve_layers(gpt2(), roles={"transformer.h.0.attn.c_proj.weight": "mlp_down"}, warn=False)
    assert g["transformer.h.0.mlp.c_fc.weight"].found == "name c_fc"
    assert (g["transformer.h.0.attn.c_proj.weight"].role, g["transformer.h.0.attn.c_proj.weight"].found) == \
        ("mlp_down", "given")
    assert all(i.found for i in g)
    # layers.json keeps it; every preset's and plan's why ends with it.
    from lowmem.layers import ModelLayers
    import json
    doc = json.loads(json.dumps(layers.to_json()))
    assert {i.name: i.found for i in ModelLayers.from_json(doc)} == {i.name: i.found for i in layers}
    doc["params"][0]["found"] = None     # a record without it says nothing, never "None"
    del doc["params"][1]["found"]
    assert [i.found for i in ModelLayers.from_json(doc)][:2] == ["", ""]
    plan = build_preset("slimadam-rules", resnet(), layers)
    fc = plan.layers["classifier.1.weight"]
    assert fc.reduce == [1] and fc.why == ("published rule for lm_head: average over fan_in; role lm_head: "
                                           + layers["classifier.1.weight"].found)


def test_the_output_layer_rule_needs_every_sign():
    nn = torch.nn

    def named(**mods):
        m = nn.Module()
        for k, v in mods.items():
            setattr(m, k, v)
        return m

    # fed by the body (8 wide) and read by nothing: the output layer
    assert resolve_layers(named(body=nn.Linear(4, 8), out=nn.Linear(8, 3)), warn=False)["out.weight"].role == "lm_head"
    # registered last but read by another layer (its 4 outputs are `side`'s input): not an output
    assert resolve_layers(named(body=nn.Linear(3, 8), side=nn.Linear(4, 6), back=nn.Linear(8, 4)),
                          warn=False)["back.weight"].role == "other"
    # fed by no layer (nothing writes its 5 inputs): not known to be an output
    assert resolve_layers(named(body=nn.Linear(4, 8), out=nn.Linear(5, 3)), warn=False)["out.weight"].role == "other"
    # inside a repeated block: not the model's output
    blocks = named(body=nn.Linear(4, 8), h=nn.ModuleList([named(fc=nn.Linear(8, 3))]))
    assert resolve_layers(blocks, warn=False)["h.0.fc.weight"].role == "other"
    # the last of a ModuleList of like layers is one of many; the last member of a Sequential is the output
    many = named(body=nn.Linear(4, 8), heads=nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)]))
    assert resolve_layers(many, warn=False)["heads.1.weight"].role == "other"
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert resolve_layers(seq, warn=False)["2.weight"].role == "lm_head"
    # two heads after the blocks (a detector's classes and boxes): both are outputs; a stem
    # registered before the blocks is not, whatever reads it
    two = named(stem=nn.Linear(4, 6), h=nn.ModuleList([named(fc=nn.Linear(6, 8))]), cls_out=nn.Linear(8, 10),
                box_out=nn.Linear(8, 5))
    roles = {i.name: i.role for i in resolve_layers(two, warn=False) if not i.is_bias}
    assert roles == {"stem.weight": "other", "h.0.fc.weight": "other", "cls_out.weight": "lm_head",
                     "box_out.weight": "lm_head"}
    # the model itself is no output layer of itself
    assert resolve_layers(nn.Linear(8, 3), warn=False)["weight"].role == "other"


def test_a_wrapped_model_keeps_its_own_layout():
    # DDP, Lightning or a user's module around the transformers model: the layout is still the
    # model's (per head), read from the nearest config, never the contiguous default.
    wrapper = torch.nn.Module()
    wrapper.model = neox()
    info = resolve_layers(wrapper, warn=False)["model.gpt_neox.layers.0.attention.query_key_value.weight"]
    assert (info.qkv_layout, info.part_groups) == ("per_head", 4)   # split per head, not in three blocks


def test_fused_projections_whose_widths_are_not_q_k_v_are_not_split():
    # GPT-2's cross-attention c_attn holds keys and values only (2H rows); q comes from q_attn.
    model = _build(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=64, n_embd=48, n_layer=1, n_head=4, n_positions=32, add_cross_attention=True))
    layers = resolve_layers(model, warn=False)
    cross = layers["transformer.h.0.crossattention.c_attn.weight"]
    assert (cross.qkv_layout, cross.parts) == ("unknown", None)
    assert layers["transformer.h.0.attn.c_attn.weight"].parts == (("q", 48), ("k", 48), ("v", 48))

    # GPT-BigCode's cross-attention (per head, keys and values only: 2H rows): not split either
    model = _build(transformers.GPTBigCodeForCausalLM, transformers.GPTBigCodeConfig(
        vocab_size=64, n_embd=48, n_layer=1, n_head=4, n_positions=32, multi_query=False, add_cross_attention=True))
    info = resolve_layers(model, warn=False)["transformer.h.0.crossattention.c_attn.weight"]
    assert (info.parts, info.part_groups) == (None, None)

    # timm EfficientFormer's attention (no transformers config): per head [key, key, 4·key] rows of
    # unequal widths, 1536 rows from 448 inputs: not the q, k, v of one width one after the other.
    class Attention(torch.nn.Module):
        def __init__(self, dim=448, key_dim=32, num_heads=8, attn_ratio=4):
            super().__init__()
            self.num_heads = num_heads
            self.qkv = torch.nn.Linear(dim, key_dim * num_heads * 2 + attn_ratio * key_dim * num_heads)
            self.proj = torch.nn.Linear(attn_ratio * key_dim * num_heads, dim)

    mixer = torch.nn.Module()
    mixer.token_mixer = Attention()
    info = resolve_layers(mixer, warn=False)["token_mixer.qkv.weight"]
    assert (info.qkv_layout, info.parts) == ("unknown", None)
    # nanoGPT's c_attn (3H rows from H) without a config is split, as it lies
    nano = torch.nn.Module()
    nano.attn = torch.nn.Module()
    nano.attn.n_head, nano.attn.c_attn = 4, torch.nn.Linear(32, 96)
    assert resolve_layers(nano, warn=False)["attn.c_attn.weight"].parts == (("q", 32), ("k", 32), ("v", 32))


def test_a_classifiers_out_proj_is_its_output_layer():
    # RoBERTa's classification head: classifier.dense (H -> H), classifier.out_proj (H -> labels)
    model = _build(transformers.RobertaForSequenceClassification, transformers.RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        num_labels=3))
    layers = resolve_layers(model, warn=False)
    assert layers["classifier.out_proj.weight"].role == "lm_head"
    assert layers["roberta.encoder.layer.0.attention.output.dense.weight"].role == "attn_out"


def _snr(x, axis):
    """mean over the other axes' slices of (mean along `axis`)² / variance along it, float64."""
    import numpy as np
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, x.shape[axis])
    mean, var = x.mean(axis=1), x.var(axis=1)
    return float((mean * mean / var).mean())


def _trained_with_capture(model, tokens: int, steps: int = 2):
    """(optimizer, capture) after `steps` AdamW steps of `model` (vocabulary 64) on `tokens` tokens
    each, SNR captured at every step."""
    from lowmem.snr.capture import capture
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cap = capture(opt, model, every=1)
    for step in range(steps):
        opt.zero_grad()
        model(torch.arange(step, step + tokens).view(1, tokens) % 64).logits.square().mean().backward()
        opt.step()
    return opt, cap


def test_interleaved_parts_are_measured_on_the_models_own_rows():
    # GPT-NeoX trained for two steps, SNR captured: each part's SNR is that of the rows the model
    # uses for it (each head's q, k, v rows, from its modeling code), in numpy from exp_avg_sq.
    model = neox()
    opt, cap = _trained_with_capture(model, 12)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    v = opt.state[model.get_submodule(name.rpartition(".")[0]).weight]["exp_avg_sq"].numpy()
    rows = _rows("per_head", 4, 4, 8)
    got = {(s.view.name, s.subset): s.snr for s in cap.samples if s.name == name and s.step == 2}
    for part in "qkv":
        x = v[rows[part]]                                   # (heads·head_dim, in), head-major
        assert got[(part, (1,))] == pytest.approx(_snr(x, 1), rel=1e-5)              # fan_in
        assert got[(part, (0,))] == pytest.approx(_snr(x, 0), rel=1e-5)              # fan_out
        assert got[(f"{part}.heads", (1,))] == pytest.approx(_snr(x.reshape(4, 8, 32), 1), rel=1e-5)


def test_an_optimizer_on_interleaved_parts_checkpoints_and_loads_adamw_state_per_part():
    import copy

    import lowmem
    model = neox().double()
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    weight = model.get_submodule(name.rpartition(".")[0]).weight

    def train(m, opt, steps, start=0):
        for step in range(start, start + steps):
            opt.zero_grad()
            m(torch.arange(step, step + 12).view(1, 12) % 64).logits.square().mean().backward()
            opt.step()

    # An AdamW checkpoint loads with v averaged per part over the model's own rows (by hand).
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, adamw, 2)
    full = adamw.state[weight]["exp_avg_sq"]
    opt = lowmem.SlimAdam(model, lr=1e-3)
    opt.load_state_dict(adamw.state_dict())
    rows = _rows("per_head", 4, 4, 8)
    want = torch.cat([full[rows["q"]].mean(1), full[rows["k"]].mean(1), full[rows["v"]].mean(0)])
    torch.testing.assert_close(opt.state[weight]["exp_avg_sq"], want, rtol=1e-14, atol=0)
    # ... and its own checkpoint continues bit-identically.
    train(model, opt, 2, start=2)
    clone = copy.deepcopy(model)
    opt2 = lowmem.SlimAdam(clone, lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 2, start=4)
    train(clone, opt2, 2, start=4)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_a_row_sharded_parameter_with_interleaved_parts_is_refused_with_a_reason():
    from lowmem.compress.optim.layout import layout_of, sharded_layout
    from lowmem.sharding import RowShards
    model = neox()
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    lp = build_preset("eve", model).layers[name]
    layout = layout_of(tuple(lp.shape), lp)
    assert all(b.source == (4, 24, 32) for b in layout.blocks)
    with pytest.raises(ValueError, match="interleaved"):
        sharded_layout(layout, tuple(lp.shape), RowShards((0, 48, 96), 0))
    # a contiguous split (GPT-2's c_attn) shards as before
    lp = build_preset("eve", gpt2()).layers["transformer.h.0.attn.c_attn.weight"]
    sharded_layout(layout_of(tuple(lp.shape), lp), tuple(lp.shape), RowShards((0, 16, 32), 0))


def test_hessian_pieces_of_interleaved_parts_are_the_models_rows():
    # `piece` selects a part's entries (strided: each head's rows) and a head within it (one
    # contiguous span), as flat indices into the weight: checked against the rows by hand.
    from lowmem.hessian.exact import HessianError, piece
    model = neox()
    name = "gpt_neox.layers.0.attention.query_key_value.weight"     # (96, 32): 4 heads × (q, k, v) × 8
    rows = _rows("per_head", 4, 4, 8)
    index = torch.arange(96 * 32).view(96, 32)
    for part in "qkv":
        p = piece(model, f"{name}[part={part}]")
        assert p.index.tolist() == index[rows[part]].reshape(-1).tolist() and p.box == (32, 32)
        p = piece(model, f"{name}[part={part}, head=2]")
        assert p.index.tolist() == index[rows[part][16:24]].reshape(-1).tolist()
    with pytest.raises(HessianError, match="interleaved"):
        piece(model, f"{name}[part=q, 0:4]")


@pytest.mark.parametrize("build", [deepseek_v3, deepseek_v2], ids=["deepseek-v3", "deepseek-v2"])
def test_mla_heads_and_key_value_rows_are_read_right_and_checked_by_gradient(build):
    # kv_b_proj's rows per head: 6 of the key (no position), then 8 of the value (DeepSeek's
    # `view(..., heads, 6 + 8)` and split). Zero the rows lowmem calls `v` and the attention's
    # output is zero, so no gradient reaches o_proj; zero those it calls `k` and it is not (the
    # rope part of the keys still varies the scores): only the values' rows silence it.
    layers = resolve_layers(build(), warn=False)
    q_name = "model.layers.0.self_attn." + ("q_b_proj" if build is deepseek_v3 else "q_proj") + ".weight"
    q = layers[q_name]
    assert (q.heads, q.head_dim) == (4, 10)
    kv = layers["model.layers.0.self_attn.kv_b_proj.weight"]
    assert (kv.parts, kv.part_heads, kv.part_groups, kv.qkv_layout) == ((("k", 6), ("v", 8)), (4, 4), 4, "per_head")
    views = {v.name: v for v in param_views(kv)}
    assert views["k"].shape == (24, 8) and views["v.heads"].shape == (4, 8, 8)
    silenced = {}
    for part in ("k", "v"):
        model = build()
        attn = model.model.layers[0].self_attn
        with torch.no_grad():
            rows = views[part].apply(torch.arange(kv.shape[0] * kv.shape[1]).view(kv.shape)).reshape(-1)
            attn.kv_b_proj.weight.view(-1)[rows] = 0
        model(torch.arange(10).view(1, 10) % 64).logits.square().mean().backward()
        silenced[part] = bool(attn.o_proj.weight.grad.abs().max() == 0)
    assert silenced == {"k": False, "v": True}
    for preset in ("eve", "adam-mini", "slimadam-rules"):   # per part, as any fused projection
        lp = build_preset(preset, build()).layers["model.layers.0.self_attn.kv_b_proj.weight"]
        assert [p.name for p in lp.parts] == ["k", "v"], preset


def test_mla_key_and_value_parts_are_measured_on_the_models_own_rows():
    # DeepSeek-V3 trained for two steps, SNR captured: kv_b_proj's k and v parts (of unequal
    # widths, 6 and 8 rows per head) are measured on each head's rows that its modeling code
    # takes for keys and values, in numpy from exp_avg_sq.
    model = deepseek_v3()
    opt, cap = _trained_with_capture(model, 10)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    v = opt.state[model.model.layers[0].self_attn.kv_b_proj.weight]["exp_avg_sq"].numpy().reshape(4, 14, 8)
    got = {(s.view.name, s.subset): s.snr for s in cap.samples if s.name == name and s.step == 2}
    for part, rows in (("k", slice(0, 6)), ("v", slice(6, 14))):
        x = v[:, rows].reshape(-1, 8)                        # (heads·width, in), head-major
        assert got[(part, (1,))] == pytest.approx(_snr(x, 1), rel=1e-5)                    # fan_in
        assert got[(f"{part}.heads", (1,))] == pytest.approx(_snr(v[:, rows], 1), rel=1e-5)  # per head


# Every parameter of each model, as (pattern of names, role, axes), each name matched by exactly
# one pattern; written from the libraries' modeling code (HF Conv1D is (in, out); tied embeddings
# and LM heads are one parameter, named as the embedding).
_L, _C1D, _V, _N = ("out", "in"), ("in", "out"), ("out",), ("model",)
_TOK = ("token", "model")
EVERY = {
    "gpt2": (gpt2, [
        (r"transformer\.w[tp]e\.weight", "embedding", _TOK), (r"transformer\.(h\.\d\.ln_[12]|ln_f)\.(weight|bias)", "norm", _N),
        (r"transformer\.h\.\d\.attn\.c_attn\.weight", "attn_qkv", _C1D), (r"transformer\.h\.\d\.attn\.c_proj\.weight", "attn_out", _C1D),
        (r"transformer\.h\.\d\.mlp\.c_fc\.weight", "mlp_up", _C1D), (r"transformer\.h\.\d\.mlp\.c_proj\.weight", "mlp_down", _C1D),
        (r"transformer\.h\.\d\.(attn|mlp)\.c_\w+\.bias", "bias", _V)]),
    "llama-gqa": (llama, [
        (r"model\.embed_tokens\.weight", "embedding", _TOK),
        (r"model\.(layers\.\d\.(input|post_attention)_layernorm|norm)\.weight", "norm", _N),
        *[(rf"model\.layers\.\d\.self_attn\.{x}_proj\.weight", f"attn_{r}", _L) for x, r in
          (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))],
        *[(rf"model\.layers\.\d\.mlp\.{x}_proj\.weight", f"mlp_{x}", _L) for x in ("gate", "up", "down")],
        (r"lm_head\.weight", "lm_head", _L)]),
    "bert": (bert, [
        (r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight", "embedding", _TOK),
        (r"(bert\.embeddings|bert\.encoder\.layer\.\d\.(attention\.)?output|cls\.predictions\.transform)\.LayerNorm\."
         r"(weight|bias)", "norm", _N),
        *[(rf"bert\.encoder\.layer\.\d\.attention\.self\.{x}\.weight", f"attn_{x[0]}", _L) for x in ("query", "key", "value")],
        (r"bert\.encoder\.layer\.\d\.attention\.output\.dense\.weight", "attn_out", _L),
        (r"bert\.encoder\.layer\.\d\.intermediate\.dense\.weight", "mlp_up", _L),
        (r"bert\.encoder\.layer\.\d\.output\.dense\.weight", "mlp_down", _L),
        (r"cls\.predictions\.transform\.dense\.weight", "other", _L),   # the MLM head's square transform
        (r"(bert\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|"
         r"output\.dense)|cls\.predictions(\.transform\.dense)?)\.bias", "bias", _V)]),
    "t5": (t5, [
        (r"shared\.weight", "embedding", _TOK),
        (r"(encoder|decoder)\.block\.\d\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "embedding",
         ("token", "head")),
        (r"((encoder|decoder)\.block\.\d\.layer\.\d\.layer_norm|(encoder|decoder)\.final_layer_norm)\.weight", "norm", _N),
        *[(rf"(encoder|decoder)\.block\.\d\.layer\.[01]\.(SelfAttention|EncDecAttention)\.{x}\.weight", f"attn_{r}", _L)
          for x, r in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))],
        (r"(encoder|decoder)\.block\.\d\.layer\.[12]\.DenseReluDense\.wi\.weight", "mlp_up", _L),
        (r"(encoder|decoder)\.block\.\d\.layer\.[12]\.DenseReluDense\.wo\.weight", "mlp_down", _L)]),
    "gpt-neox": (neox, [
        (r"gpt_neox\.embed_in\.weight", "embedding", _TOK),
        (r"gpt_neox\.(layers\.\d\.(input|post_attention)_layernorm|final_layer_norm)\.(weight|bias)", "norm", _N),
        (r"gpt_neox\.layers\.\d\.attention\.query_key_value\.weight", "attn_qkv", _L),
        (r"gpt_neox\.layers\.\d\.attention\.dense\.weight", "attn_out", _L),
        (r"gpt_neox\.layers\.\d\.mlp\.dense_h_to_4h\.weight", "mlp_up", _L),
        (r"gpt_neox\.layers\.\d\.mlp\.dense_4h_to_h\.weight", "mlp_down", _L),
        (r"gpt_neox\.layers\.\d\.(attention\.(query_key_value|dense)|mlp\.dense_\w+)\.bias", "bias", _V),
        (r"lm_head\.weight", "lm_head", _L)]),
    "phi3": (phi3, [
        (r"model\.embed_tokens\.weight", "embedding", _TOK),
        (r"model\.(layers\.\d\.(input|post_attention)_layernorm|norm)\.weight", "norm", _N),
        (r"model\.layers\.\d\.self_attn\.qkv_proj\.weight", "attn_qkv", _L),
        (r"model\.layers\.\d\.self_attn\.o_proj\.weight", "attn_out", _L),
        (r"model\.layers\.\d\.mlp\.gate_up_proj\.weight", "mlp_up", _L),
        (r"model\.layers\.\d\.mlp\.down_proj\.weight", "mlp_down", _L), (r"lm_head\.weight", "lm_head", _L)]),
    "vit": (vit, [
        (r"vit\.embeddings\.(cls_token|position_embeddings)", "embedding", ("token", "token", "model")),
        (r"vit\.embeddings\.patch_embeddings\.projection\.weight", "conv", ("out", "in", "kh", "kw")),
        (r"vit\.(layers\.\d\.layernorm_(before|after)|layernorm)\.(weight|bias)", "norm", _N),
        *[(rf"vit\.layers\.\d\.attention\.{x}_proj\.weight", f"attn_{r}", _L) for x, r in
          (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))],
        (r"vit\.layers\.\d\.mlp\.fc1\.weight", "mlp_up", _L), (r"vit\.layers\.\d\.mlp\.fc2\.weight", "mlp_down", _L),
        (r"classifier\.weight", "lm_head", _L),
        (r"(vit\.embeddings\.patch_embeddings\.projection|vit\.layers\.\d\.(attention\.[qkvo]_proj|mlp\.fc[12])|"
         r"classifier)\.bias", "bias", _V)]),
}


@pytest.mark.parametrize("arch", list(EVERY))
def test_every_parameter_of_real_architectures(arch):
    from expectations import check_every

    build, expected = EVERY[arch]
    check_every([(i.name, (i.role, i.axes)) for i in resolve_layers(build(), warn=False)], expected)


def test_a_lone_square_proj_in_an_mlp_is_not_its_down_projection():
    # gMLP (timm's layout): the spatial gating unit's `proj` is a Linear over token positions
    # (seq x seq), alone in its module: no MLP projection. A square MLP's c_proj beside its c_fc
    # (GPT-2 with n_inner = n_embd) still is one.
    block = torch.nn.Module()
    block.mlp_channels = torch.nn.Module()
    block.mlp_channels.fc1 = torch.nn.Linear(16, 64)
    block.mlp_channels.gate = torch.nn.Module()
    block.mlp_channels.gate.norm = torch.nn.LayerNorm(32)
    block.mlp_channels.gate.proj = torch.nn.Linear(10, 10)       # 10 token positions
    block.mlp_channels.fc2 = torch.nn.Linear(32, 16)
    roles = {i.name: i.role for i in resolve_layers(block, warn=False) if not i.is_bias and i.role != "norm"}
    assert roles == {"mlp_channels.fc1.weight": "mlp_up", "mlp_channels.gate.proj.weight": "other",
                     "mlp_channels.fc2.weight": "mlp_down"}
    square = _build(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_inner=32, n_layer=1, n_head=4, n_positions=16))
    assert resolve_layers(square, warn=False)["transformer.h.0.mlp.c_proj.weight"].role == "mlp_down"


def test_linear_attention_with_a_decay_is_no_state_space_mixer():
    # Qwen3-Next's gated delta net holds A_log (a decay) and a short conv, but no D: its projections
    # are attention's, as their names say, not an MLP pair (Mamba's mixer holds A_log and D).
    attn = torch.nn.Module()
    attn.A_log, attn.dt_bias = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    attn.conv1d = torch.nn.Conv1d(64, 64, 4, groups=64)
    attn.in_proj_qkvz, attn.out_proj, attn.hidden_size = torch.nn.Linear(32, 64), torch.nn.Linear(32, 32), 32
    model = torch.nn.Module()
    model.linear_attn = attn
    layers = resolve_layers(model, warn=False)
    assert layers["linear_attn.out_proj.weight"].role == "attn_out"
    assert layers["linear_attn.in_proj_qkvz.weight"].role == "other"
    attn.D = torch.nn.Parameter(torch.ones(4))          # with D it is Mamba's mixer: an MLP pair by widths
    layers = resolve_layers(model, warn=False)
    assert layers["linear_attn.in_proj_qkvz.weight"].role == "mlp_up"


def test_a_square_bert_intermediate_is_still_its_up_projection():
    square = _build(transformers.BertForMaskedLM, transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32))
    layers = resolve_layers(square, warn=False)
    assert layers["bert.encoder.layer.0.intermediate.dense.weight"].role == "mlp_up"
    assert layers["bert.encoder.layer.0.output.dense.weight"].role == "mlp_down"


def test_hessian_heads_of_mla_key_and_value_parts():
    # kv_b_proj's k part is 4 heads of 6 rows, its v part 4 heads of 8 (per-head interleaved)
    from lowmem.cli.hessian import heads_of
    from lowmem.hessian import piece
    model = deepseek_v3()
    layers = resolve_layers(model, warn=False)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    for part, rows in (("k", 24), ("v", 32)):
        p = piece(model, f"{name}[part={part}]", layers)
        assert p.box == (rows, 8) and heads_of(p, layers[name]) == 4
    assert heads_of(piece(model, f"{name}[part=v, head=1]", layers), layers[name]) is None   # one head
