"""`resolve_layers` and `param_views` on one tiny model per family, against hand-computed numbers.

Every model is built from a config or from code below; nothing is downloaded. The expected
roles, axes, head counts and shapes are worked out by hand in the comments next to them.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from lowmem.layers import ROLES, ModelLayers, normalize_name, resolve_layers
from lowmem.snr.views import param_views


def _lowmem_warnings(fn):
    """(result of fn(), the lowmem warnings it issued), with every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "lowmem" in str(w.message)]


def _views(info) -> dict:
    return {v.name: v for v in param_views(info)}


# -- 1. nanoGPT: fused c_attn as nn.Linear, tied lm_head ----------------------------------------
# d = 24, H = 3 -> head_dim 8; c_attn weight (3*24, 24) = (72, 24).

class NanoAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)


class NanoMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)


class NanoBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = NanoAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = NanoMLP(d)


class NanoGPT(nn.Module):
    def __init__(self, vocab=40, block=16, d=24, n_head=3, n_layer=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d),
            wpe=nn.Embedding(block, d),
            h=nn.ModuleList([NanoBlock(d, n_head) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(d),
        ))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying, as in nanoGPT


def test_nanogpt_fused_c_attn_splits_into_three_equal_parts_with_n_head_each():
    layers, caught = _lowmem_warnings(lambda: resolve_layers(NanoGPT()))
    assert caught == []
    qkv = layers["transformer.h.0.attn.c_attn.weight"]
    assert qkv.shape == (72, 24)
    assert qkv.role == "attn_qkv"
    assert qkv.axes == ("out", "in")
    assert qkv.parts == (("q", 24), ("k", 24), ("v", 24))
    assert qkv.part_heads == (3, 3, 3)
    assert (qkv.heads, qkv.head_dim) == (3, 8)
    assert layers["transformer.h.0.attn.c_attn.bias"].role == "bias"
    assert layers["transformer.h.0.attn.c_attn.bias"].axes == ("out",)


def test_nanogpt_c_proj_role_depends_on_parent_attn_or_mlp():
    layers = resolve_layers(NanoGPT())
    for i in range(2):
        assert layers[f"transformer.h.{i}.attn.c_proj.weight"].role == "attn_out"
        assert layers[f"transformer.h.{i}.mlp.c_fc.weight"].role == "mlp_up"
        assert layers[f"transformer.h.{i}.mlp.c_proj.weight"].role == "mlp_down"
        assert layers[f"transformer.h.{i}.mlp.c_proj.weight"].shape == (24, 96)
        assert layers[f"transformer.h.{i}.ln_1.weight"].role == "norm"
        assert layers[f"transformer.h.{i}.ln_1.bias"].role == "norm"


def test_nanogpt_tied_wte_lm_head_is_one_embedding_with_two_names():
    layers = resolve_layers(NanoGPT())
    wte = layers["transformer.wte.weight"]
    assert wte.names == ("transformer.wte.weight", "lm_head.weight")
    assert wte.aliases == ("lm_head.weight",)
    assert wte.tied
    assert wte.role == "embedding"
    assert wte.axes == ("token", "model")
    assert wte.shape == (40, 24)
    assert "lm_head.weight" not in layers.params          # one parameter, listed once
    assert layers["lm_head.weight"] is wte                # but found under either name
    # params: wte, wpe, ln_f (2), and per block ln_1 (2) + c_attn (2) + c_proj (2) + ln_2 (2)
    # + c_fc (2) + mlp.c_proj (2) = 12 -> 2 + 2 + 2 * 12 = 28.
    assert len(layers) == 28


def test_layers_json_keeps_every_name_of_a_tied_weight():
    layers = resolve_layers(NanoGPT())
    doc = json.loads(json.dumps(layers.to_json()))
    record = next(r for r in doc["params"] if r["name"] == "transformer.wte.weight")
    assert record["names"] == ["transformer.wte.weight", "lm_head.weight"]
    back = ModelLayers.from_json(doc)
    assert [(i.name, i.names, i.shape, i.role, i.axes) for i in back] == \
        [(i.name, i.names, i.shape, i.role, i.axes) for i in layers]
    assert back["lm_head.weight"].aliases == ("lm_head.weight",)


def test_layers_json_that_lists_all_names_under_aliases_still_loads():
    # layers.json as lowmem wrote it before "names": "aliases" held every name, canonical first.
    doc = resolve_layers(NanoGPT()).to_json()
    for r in doc["params"]:
        r["aliases"] = r.pop("names")
    back = ModelLayers.from_json(doc)
    wte = back["lm_head.weight"]
    assert (wte.name, wte.names, wte.aliases) == ("transformer.wte.weight",
                                                  ("transformer.wte.weight", "lm_head.weight"), ("lm_head.weight",))
    assert back["transformer.wpe.weight"].names == ("transformer.wpe.weight",)


# -- 2. The built-in Shakespeare example: separate q/k/v, tied head ---------------------------
# n_embd 128, n_head 4 -> head_dim 32; 4 blocks.

def test_shakespeare_example_separate_qkv_have_four_heads_of_32():
    from lowmem.examples.shakespeare import build_model, vocab_size

    layers, caught = _lowmem_warnings(lambda: resolve_layers(build_model()))
    assert caught == []
    for i in range(4):
        for proj, role in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
            info = layers[f"transformer.h.{i}.attn.{proj}.weight"]
            assert (info.role, info.axes, info.shape) == (role, ("out", "in"), (128, 128))
            assert (info.heads, info.head_dim) == (4, 32)
        assert layers[f"transformer.h.{i}.attn.c_proj.weight"].role == "attn_out"
        assert layers[f"transformer.h.{i}.mlp.c_fc.weight"].role == "mlp_up"
        assert layers[f"transformer.h.{i}.mlp.c_proj.weight"].role == "mlp_down"
    wte = layers["lm_head.weight"]
    assert wte.name == "transformer.wte.weight"
    assert wte.names == ("transformer.wte.weight", "lm_head.weight")
    assert wte.role == "embedding"
    assert wte.shape == (vocab_size(), 128)
    # wte, wpe, ln_f + 4 blocks * (ln_1, q, k, v, c_proj, ln_2, c_fc, c_proj) = 3 + 32.
    assert len(layers) == 35


# -- 3. Hugging Face GPT-2: Conv1D weights are (in, out) ---------------------------------------
# n_embd 32, n_head 4 -> head_dim 8; c_attn weight (32, 96), parts along dim 1.

@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_conv1d_axes_are_transposed_and_c_attn_parts_lie_along_dim_1(gpt2):
    layers = resolve_layers(gpt2)
    qkv = layers["transformer.h.0.attn.c_attn.weight"]
    assert qkv.module == "Conv1D"
    assert qkv.shape == (32, 96)
    assert qkv.axes == ("in", "out")
    assert qkv.role == "attn_qkv"
    assert qkv.parts == (("q", 32), ("k", 32), ("v", 32))
    assert qkv.part_heads == (4, 4, 4)
    assert qkv.head_dim == 8
    assert qkv.fan_in_dims == (0,) and qkv.fan_out_dims == (1,)
    for i in range(2):
        assert layers[f"transformer.h.{i}.attn.c_proj.weight"].role == "attn_out"
        assert layers[f"transformer.h.{i}.attn.c_proj.weight"].axes == ("in", "out")
        up = layers[f"transformer.h.{i}.mlp.c_fc.weight"]
        assert (up.role, up.axes, up.shape) == ("mlp_up", ("in", "out"), (32, 128))
        down = layers[f"transformer.h.{i}.mlp.c_proj.weight"]
        assert (down.role, down.axes, down.shape) == ("mlp_down", ("in", "out"), (128, 32))


def test_gpt2_biases_norms_and_tied_lm_head(gpt2):
    layers, caught = _lowmem_warnings(lambda: resolve_layers(gpt2))
    assert caught == []
    bias = layers["transformer.h.1.attn.c_attn.bias"]
    assert (bias.role, bias.axes, bias.shape) == ("bias", ("out",), (96,))
    assert layers["transformer.h.1.mlp.c_fc.bias"].role == "bias"
    for name in ("transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
                 "transformer.ln_f.weight", "transformer.ln_f.bias"):
        assert layers[name].role == "norm"
        assert layers[name].axes == ("model",)
    wte = layers["lm_head.weight"]
    assert wte.names == ("transformer.wte.weight", "lm_head.weight")
    assert wte.role == "embedding"
    assert layers["transformer.wpe.weight"].shape == (16, 32)
    # wte, wpe, ln_f (2) + 2 blocks * (ln_1 2, c_attn 2, c_proj 2, ln_2 2, c_fc 2, c_proj 2).
    assert len(layers) == 4 + 2 * 12


# -- 4. Llama: GQA, gated MLP, RMSNorm ---------------------------------------------------------
# hidden 64, 8 query heads -> head_dim 8; 2 kv heads -> k_proj/v_proj (2*8, 64) = (16, 64).

def _llama(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=100,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llama():
    return _llama(tie=False)


def test_llama_gqa_k_and_v_have_fewer_heads_than_q(llama):
    layers = resolve_layers(llama)
    for i in range(2):
        q = layers[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert (q.role, q.axes, q.shape, q.heads, q.head_dim) == ("attn_q", ("out", "in"), (64, 64), 8, 8)
        for proj, role in (("k_proj", "attn_k"), ("v_proj", "attn_v")):
            kv = layers[f"model.layers.{i}.self_attn.{proj}.weight"]
            assert (kv.role, kv.shape, kv.heads, kv.head_dim) == (role, (16, 64), 2, 8)
        assert layers[f"model.layers.{i}.self_attn.o_proj.weight"].role == "attn_out"


def test_llama_gated_mlp_and_rmsnorm_roles(llama):
    layers = resolve_layers(llama)
    for i in range(2):
        gate = layers[f"model.layers.{i}.mlp.gate_proj.weight"]
        up = layers[f"model.layers.{i}.mlp.up_proj.weight"]
        down = layers[f"model.layers.{i}.mlp.down_proj.weight"]
        assert (gate.role, gate.shape) == ("mlp_gate", (128, 64))
        assert (up.role, up.shape) == ("mlp_up", (128, 64))
        assert (down.role, down.shape, down.axes) == ("mlp_down", (64, 128), ("out", "in"))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            info = layers[f"model.layers.{i}.{norm}.weight"]
            assert (info.role, info.axes, info.shape) == ("norm", ("model",), (64,))
    assert layers["model.norm.weight"].role == "norm"


def test_llama_untied_lm_head_is_its_own_parameter(llama):
    layers, caught = _lowmem_warnings(lambda: resolve_layers(llama))
    assert caught == []
    head = layers["lm_head.weight"]
    assert (head.role, head.axes, head.shape, head.names, head.aliases) == ("lm_head", ("out", "in"), (100, 64), ("lm_head.weight",), ())
    emb = layers["model.embed_tokens.weight"]
    assert (emb.role, emb.axes, emb.names) == ("embedding", ("token", "model"), ("model.embed_tokens.weight",))
    assert not emb.tied
    # embed, norm, lm_head + 2 layers * (q, k, v, o, gate, up, down, 2 norms) = 3 + 18.
    assert len(layers) == 21


def test_llama_tied_lm_head_is_one_parameter_with_two_names():
    layers = resolve_layers(_llama(tie=True))
    emb = layers["model.embed_tokens.weight"]
    assert emb.names == ("model.embed_tokens.weight", "lm_head.weight")
    assert emb.aliases == ("lm_head.weight",)
    assert emb.role == "embedding"
    assert layers["lm_head.weight"] is emb
    assert len(layers) == 20


def test_heads_overrides_beat_the_config(llama):
    # Claim 4 query heads and 1 kv head: q (64 rows) -> head_dim 16, k (16 rows) -> head_dim 16.
    layers = resolve_layers(llama, heads=4, kv_heads=1)
    q = layers["model.layers.0.self_attn.q_proj.weight"]
    k = layers["model.layers.0.self_attn.k_proj.weight"]
    assert (q.heads, q.head_dim) == (4, 16)
    assert (k.heads, k.head_dim) == (1, 16)


# -- 5. ViT: timm-style fused qkv, conv patch embedding, classifier head -----------------------
# d = 32, 4 heads -> head_dim 8; qkv weight (96, 32); patch embed Conv2d(3, 32, 4, 4).

class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TimmMlp(dim, 4 * dim)


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=4, stride=4)


class TinyViT(nn.Module):
    def __init__(self, dim=32, num_heads=4, depth=2, num_classes=10):
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.blocks = nn.Sequential(*[TimmBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)


def test_vit_fused_qkv_proj_mlp_patch_conv_and_head():
    layers, caught = _lowmem_warnings(lambda: resolve_layers(TinyViT()))
    assert caught == []
    qkv = layers["blocks.0.attn.qkv.weight"]
    assert (qkv.role, qkv.axes, qkv.shape) == ("attn_qkv", ("out", "in"), (96, 32))
    assert qkv.parts == (("q", 32), ("k", 32), ("v", 32))
    assert qkv.part_heads == (4, 4, 4)
    assert qkv.head_dim == 8
    assert layers["blocks.1.attn.proj.weight"].role == "attn_out"
    assert layers["blocks.1.mlp.fc1.weight"].role == "mlp_up"
    assert layers["blocks.1.mlp.fc2.weight"].role == "mlp_down"
    assert layers["blocks.1.mlp.fc2.weight"].shape == (32, 128)
    assert layers["blocks.0.norm1.weight"].role == "norm"
    patch = layers["patch_embed.proj.weight"]
    assert (patch.role, patch.axes, patch.shape) == ("conv", ("out", "in", "kh", "kw"), (32, 3, 4, 4))
    assert layers["patch_embed.proj.bias"].role == "bias"
    head = layers["head.weight"]
    assert (head.role, head.axes, head.shape) == ("lm_head", ("out", "in"), (10, 32))


class GQAFusedAttention(nn.Module):
    """Phi-3-style `qkv_proj` with grouped K/V: out = (8 + 2 * 2) heads * 8 = 96 rows."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.num_kv_heads = 8, 2
        self.qkv_proj = nn.Linear(64, 96, bias=False)
        self.out_proj = nn.Linear(64, 64, bias=False)


def test_fused_qkv_with_gqa_splits_q_larger_than_k_and_v():
    layers = resolve_layers(nn.ModuleDict({"attn": GQAFusedAttention()}))
    qkv = layers["attn.qkv_proj.weight"]
    assert qkv.role == "attn_qkv"
    assert qkv.parts == (("q", 64), ("k", 16), ("v", 16))
    assert qkv.part_heads == (8, 2, 2)
    assert qkv.head_dim == 8
    assert layers["attn.out_proj.weight"].role == "attn_out"


@pytest.mark.parametrize("name", ["query_key_value", "wqkv", "Wqkv"])
def test_a_fused_qkv_whose_layout_codebases_disagree_on_is_kept_whole_without_a_config(name):
    # Megatron's and GPT-NeoX's query_key_value interleave each head's q, k and v rows, ChatGLM's
    # does not; InternLM2's wqkv interleaves per key-value group, MPT's does not. Without a
    # transformers config nothing says which, so the widths alone (3 x 32 rows) must not split it.
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            setattr(self, name, nn.Linear(32, 96))
            self.dense = nn.Linear(32, 32)

    info = resolve_layers(nn.ModuleDict({"attention": Attention()}))[f"attention.{name}.weight"]
    assert info.role == "attn_qkv" and info.qkv_layout == "unknown" and not info.parts
    assert "kept whole" in info.found and "config" in info.found
    # the same widths under a name one convention holds are split, q, k and v one after the other
    class Contiguous(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            self.qkv = nn.Linear(32, 96)

    split = resolve_layers(nn.ModuleDict({"attention": Contiguous()}))["attention.qkv.weight"]
    assert split.parts == (("q", 32), ("k", 32), ("v", 32)) and split.qkv_layout == "contiguous"


def test_torch_multihead_attention_in_proj_is_fused_qkv():
    # embed 16, 4 heads -> in_proj_weight (48, 16), parts of 16, head_dim 4.
    layers = resolve_layers(nn.MultiheadAttention(16, 4))
    qkv = layers["in_proj_weight"]
    assert (qkv.role, qkv.shape, qkv.parts, qkv.part_heads) == (
        "attn_qkv", (48, 16), (("q", 16), ("k", 16), ("v", 16)), (4, 4, 4))
    assert layers["in_proj_bias"].role == "bias"
    assert layers["out_proj.weight"].role == "attn_out"


def test_is_bias_marks_biases_whatever_their_role():
    layers = resolve_layers(nn.ModuleDict(dict(ln=nn.LayerNorm(4), fc=nn.Linear(4, 4), mha=nn.MultiheadAttention(4, 2))),
                            warn=False)
    got = {i.name: (i.role, i.is_bias) for i in layers}
    assert got == {"ln.weight": ("norm", False), "ln.bias": ("norm", True),
                   "fc.weight": ("other", False), "fc.bias": ("bias", True),
                   "mha.in_proj_weight": ("attn_qkv", False), "mha.in_proj_bias": ("bias", True),
                   "mha.out_proj.weight": ("attn_out", False), "mha.out_proj.bias": ("bias", True)}
    doc = json.loads(json.dumps(layers.to_json()))
    assert {i.name: i.is_bias for i in ModelLayers.from_json(doc)} == {n: b for n, (_, b) in got.items()}
    for r in doc["params"]:   # layers.json written before "is_bias": read from the name, as resolved
        del r["is_bias"]
    assert {i.name: i.is_bias for i in ModelLayers.from_json(doc)} == {n: b for n, (_, b) in got.items()}


# -- 6. BERT: query/key/value, dense in attention.output / intermediate / output ---------------
# hidden 32, 4 heads -> head_dim 8; intermediate 64.

@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=60, max_position_embeddings=16)
    return transformers.BertModel(cfg)


def test_bert_query_key_value_and_dense_roles(bert):
    layers, caught = _lowmem_warnings(lambda: resolve_layers(bert))
    # The pooler (Linear + tanh on the [CLS] token) is no known role: the fallback, one warning.
    assert layers.unknown == ["pooler.dense.weight"]
    assert len(caught) == 1
    assert layers["pooler.dense.weight"].axes == ("out", "in")
    for i in range(2):
        pre = f"encoder.layer.{i}"
        for proj, role in (("query", "attn_q"), ("key", "attn_k"), ("value", "attn_v")):
            info = layers[f"{pre}.attention.self.{proj}.weight"]
            assert (info.role, info.shape, info.heads, info.head_dim) == (role, (32, 32), 4, 8)
            assert layers[f"{pre}.attention.self.{proj}.bias"].role == "bias"
        assert layers[f"{pre}.attention.output.dense.weight"].role == "attn_out"
        assert layers[f"{pre}.attention.output.LayerNorm.weight"].role == "norm"
        up = layers[f"{pre}.intermediate.dense.weight"]
        down = layers[f"{pre}.output.dense.weight"]
        assert (up.role, up.shape) == ("mlp_up", (64, 32))
        assert (down.role, down.shape) == ("mlp_down", (32, 64))
        assert layers[f"{pre}.output.LayerNorm.bias"].role == "norm"
    for emb, rows in (("word", 60), ("position", 16), ("token_type", 2)):
        info = layers[f"embeddings.{emb}_embeddings.weight"]
        assert (info.role, info.axes, info.shape) == ("embedding", ("token", "model"), (rows, 32))


# -- 7. A conv net ----------------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=(3, 5), bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.classifier = nn.Linear(16, 10)


def test_conv_net_conv_axes_fan_in_and_batchnorm_roles():
    layers, caught = _lowmem_warnings(lambda: resolve_layers(ConvNet()))
    assert caught == []
    c1, c2 = layers["conv1.weight"], layers["conv2.weight"]
    assert (c1.role, c1.axes, c1.shape) == ("conv", ("out", "in", "kh", "kw"), (8, 3, 3, 3))
    assert (c2.shape, c2.fan_in_dims, c2.fan_out_dims) == ((16, 8, 3, 5), (1, 2, 3), (0,))
    assert layers["conv1.bias"].role == "bias"
    for name in ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"):
        assert layers[name].role == "norm"
    assert layers["classifier.weight"].role == "lm_head"
    assert layers["classifier.bias"].role == "bias"
    # Buffers (running_mean, running_var, num_batches_tracked) are not parameters:
    # conv1 (2) + bn1 (2) + conv2 (1) + bn2 (2) + classifier (2).
    assert len(layers) == 9


def test_conv1d_conv3d_and_transposed_conv_axes():
    net = nn.ModuleDict(dict(
        c1=nn.Conv1d(2, 4, 3, bias=False),
        c3=nn.Conv3d(2, 4, (1, 2, 3), bias=False),
        up=nn.ConvTranspose2d(4, 6, 2, bias=False),    # weight is (in, out, kh, kw)
    ))
    layers = resolve_layers(net)
    assert layers["c1.weight"].axes == ("out", "in", "kw")
    assert layers["c3.weight"].axes == ("out", "in", "kd", "kh", "kw")
    up = layers["up.weight"]
    assert (up.shape, up.axes, up.fan_in_dims, up.fan_out_dims) == ((4, 6, 2, 2), ("in", "out", "kh", "kw"), (0, 2, 3), (1,))


# -- 8. Unknown modules: role "other", one warning, no crash ------------------------------------

class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.blob = nn.Parameter(torch.zeros(3, 4, 5))
        self.router = nn.Linear(4, 6)


class WithUnknowns(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mystery = nn.ModuleList([Mystery(), Mystery()])
        self.out_proj = nn.Linear(4, 4)


def test_unknown_layers_get_role_other_and_exactly_one_warning():
    model = WithUnknowns()
    layers, caught = _lowmem_warnings(lambda: resolve_layers(model))
    assert len(caught) == 1
    unknown = ["mystery.0.blob", "mystery.0.router.weight", "mystery.1.blob", "mystery.1.router.weight"]
    assert layers.unknown == unknown
    for name in unknown:
        assert name in str(caught[0].message)
    blob = layers["mystery.0.blob"]
    assert (blob.role, blob.shape, blob.axes) == ("other", (3, 4, 5), ("d0", "d1", "d2"))
    router = layers["mystery.1.router.weight"]
    assert (router.role, router.axes) == ("other", ("out", "in"))   # a Linear's axes are still known
    assert layers["mystery.1.router.bias"].role == "bias"
    assert layers["embed.weight"].role == "embedding"


def test_warn_false_gives_no_warning_but_still_lists_unknown():
    layers, caught = _lowmem_warnings(lambda: resolve_layers(WithUnknowns(), warn=False))
    assert caught == []
    assert len(layers.unknown) == 4


def test_roles_override_replaces_other_and_silences_the_warning():
    roles = {f"mystery.{i}.{n}": "mlp_up" for i in range(2) for n in ("blob", "router.weight")}
    layers, caught = _lowmem_warnings(lambda: resolve_layers(WithUnknowns(), roles=roles))
    assert caught == []
    assert layers["mystery.0.router.weight"].role == "mlp_up"
    assert layers.unknown == []


def test_roles_override_with_unknown_role_raises_with_the_value():
    with pytest.raises(ValueError, match="'mlp_sideways'"):
        resolve_layers(WithUnknowns(), roles={"embed.weight": "mlp_sideways"})


def test_frozen_parameters_are_left_out():
    model = ConvNet()
    model.conv1.requires_grad_(False)
    layers = resolve_layers(model)
    assert "conv1.weight" not in layers.params
    assert len(layers) == 7
    assert all(info.role in ROLES for info in layers)


# -- 9. Prefix normalisation: torch.compile's `_orig_mod.` and DDP's `module.` -----------------

class DDPLike(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner


class CompiledLike(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def test_normalize_name_strips_wrapper_prefixes():
    assert normalize_name("module._orig_mod.lm_head.weight") == "lm_head.weight"
    assert normalize_name("_orig_mod.module.h.0.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
    # torch.compile applied to a submodule puts `_orig_mod` in the middle of the name.
    assert normalize_name("h.0._orig_mod.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
    assert normalize_name("transformer.wte.weight") == "transformer.wte.weight"
    assert normalize_name("submodule.weight") == "submodule.weight"


@pytest.mark.parametrize("wrap", [DDPLike, CompiledLike, lambda m: DDPLike(CompiledLike(m)), torch.compile],
                         ids=["module", "_orig_mod", "module._orig_mod", "torch.compile"])
def test_wrapped_models_resolve_to_the_unwrapped_names(wrap):
    plain = resolve_layers(NanoGPT())
    wrapped = resolve_layers(wrap(NanoGPT()))
    assert list(wrapped.params) == list(plain.params)
    for a, b in zip(wrapped, plain):
        assert (a.names, a.role, a.axes, a.parts, a.part_heads) == (b.names, b.role, b.axes, b.parts, b.part_heads)
    assert wrapped["module.transformer.h.1.attn.c_attn.weight"].role == "attn_qkv"
    assert wrapped["_orig_mod.lm_head.weight"].name == "transformer.wte.weight"



def test_compiled_submodules_keep_their_module_type_and_role():
    # torch.compile on a leaf Linear: its weight's owner must be the Linear, not the wrapper.
    model = NanoGPT()
    model.transformer.h[0].attn.c_attn = torch.compile(model.transformer.h[0].attn.c_attn)
    model.transformer.h[1] = torch.compile(model.transformer.h[1])
    layers, caught = _lowmem_warnings(lambda: resolve_layers(DDPLike(model)))
    assert caught == []
    for i in range(2):
        qkv = layers[f"transformer.h.{i}.attn.c_attn.weight"]
        assert (qkv.module, qkv.role, qkv.part_heads) == ("Linear", "attn_qkv", (3, 3, 3))
        assert layers[f"transformer.h.{i}.ln_1.weight"].role == "norm"


def test_ddp_wrapped_hf_model_keeps_gqa_heads(llama):
    layers = resolve_layers(DDPLike(llama))
    k = layers["module.model.layers.1.self_attn.k_proj.weight"]
    assert (k.name, k.heads, k.head_dim) == ("model.layers.1.self_attn.k_proj.weight", 2, 8)

# -- 10. param_views ---------------------------------------------------------------------------

def test_views_of_llama_k_proj_split_two_kv_heads(llama):
    info = resolve_layers(llama)["model.layers.0.self_attn.k_proj.weight"]
    views = _views(info)
    assert list(views) == ["raw", "heads"]
    assert (views["raw"].shape, views["raw"].axes) == ((16, 64), ("out", "in"))
    assert (views["heads"].shape, views["heads"].axes) == ((2, 8, 64), ("head", "out", "in"))
    # Row r of k_proj belongs to kv head r // 8 (HF: view(B, T, kv_heads, head_dim)).
    w = torch.arange(16 * 64.0).reshape(16, 64)
    split = views["heads"].apply(w)
    assert torch.equal(split[1, 3], w[8 + 3])


def test_views_of_llama_q_proj_and_unsplit_layers(llama):
    layers = resolve_layers(llama)
    q = _views(layers["model.layers.1.self_attn.q_proj.weight"])
    assert q["heads"].shape == (8, 8, 64)
    # Only attention projections get head views.
    assert list(_views(layers["model.layers.1.self_attn.o_proj.weight"])) == ["raw"]
    assert list(_views(layers["model.layers.1.mlp.up_proj.weight"])) == ["raw"]
    assert list(_views(layers["model.norm.weight"])) == ["raw"]


def test_views_of_gpt2_conv1d_c_attn_slice_dim_1_and_split_out_in_place(gpt2):
    info = resolve_layers(gpt2)["transformer.h.0.attn.c_attn.weight"]
    views = _views(info)
    assert list(views) == ["q", "q.heads", "k", "k.heads", "v", "v.heads"]
    for i, part in enumerate("qkv"):
        v, h = views[part], views[f"{part}.heads"]
        assert (v.part, v.dim, v.start, v.stop) == (part, 1, 32 * i, 32 * (i + 1))
        assert (v.shape, v.axes) == ((32, 32), ("in", "out"))
        assert (h.shape, h.axes) == ((32, 4, 8), ("in", "head", "out"))
    # Column c of c_attn is part c // 32, head (c % 32) // 8, position c % 8 (HF: split, then
    # view(B, T, heads, head_dim)). Check the view puts w[:, 32 + 2*8 + 5] at k head 2, pos 5.
    w = torch.arange(32 * 96.0).reshape(32, 96)
    k_heads = views["k.heads"].apply(w)
    assert torch.equal(k_heads[:, 2, 5], w[:, 32 + 2 * 8 + 5])
    assert str(views["v.heads"].label()) == "v.heads:32x4x8"


def test_views_of_gqa_fused_qkv_use_each_parts_own_heads():
    info = resolve_layers(nn.ModuleDict({"attn": GQAFusedAttention()}))["attn.qkv_proj.weight"]
    views = _views(info)
    assert (views["q"].start, views["q"].stop, views["q.heads"].shape) == (0, 64, (8, 8, 64))
    assert (views["k"].start, views["k"].stop, views["k.heads"].shape) == (64, 80, (2, 8, 64))
    assert (views["v"].start, views["v"].stop, views["v.heads"].shape) == (80, 96, (2, 8, 64))
    assert views["k.heads"].axes == ("head", "out", "in")
    w = torch.arange(96 * 64.0).reshape(96, 64)
    assert torch.equal(views["v.heads"].apply(w)[1, 7], w[80 + 8 + 7])


def test_views_of_nanogpt_c_attn_and_tied_embedding():
    layers = resolve_layers(NanoGPT())
    views = _views(layers["transformer.h.0.attn.c_attn.weight"])
    assert (views["v"].dim, views["v"].start, views["v"].stop) == (0, 48, 72)
    assert views["q.heads"].shape == (3, 8, 24)
    assert list(_views(layers["transformer.wte.weight"])) == ["raw"]


def test_meta_llama_names_w1_gate_w3_up_w2_down_and_t5_wo_is_mlp_down():
    # Meta's reference Llama: attention.wq/wk/wv/wo, feed_forward.w2(silu(w1 x) * w3 x);
    # T5: layer.DenseReluDense.wi/wo, where wo is the MLP's down projection, not attention's.
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_heads, self.n_kv_heads = 4, 2
            self.wq, self.wk = nn.Linear(16, 16, bias=False), nn.Linear(16, 8, bias=False)
            self.wv, self.wo = nn.Linear(16, 8, bias=False), nn.Linear(16, 16, bias=False)

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3 = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
            self.w2 = nn.Linear(32, 16, bias=False)

    class T5Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.wi, self.wo = nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.feed_forward = Attention(), FeedForward()
            self.DenseReluDense = T5Dense()

    layers = resolve_layers(Layer())
    role = {i.name: i.role for i in layers}
    assert role == {
        "attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k",
        "attention.wv.weight": "attn_v", "attention.wo.weight": "attn_out",
        "feed_forward.w1.weight": "mlp_gate", "feed_forward.w3.weight": "mlp_up",
        "feed_forward.w2.weight": "mlp_down",
        "DenseReluDense.wi.weight": "mlp_up", "DenseReluDense.wo.weight": "mlp_down",
    }
    # 4 query heads of 16/4 = 4; GQA: 2 kv heads of 8/2 = 4.
    assert (layers["attention.wq.weight"].heads, layers["attention.wq.weight"].head_dim) == (4, 4)
    assert (layers["attention.wk.weight"].heads, layers["attention.wk.weight"].head_dim) == (2, 4)


@pytest.mark.parametrize("heads, role", [(4, "embedding"), (3, "other")])
def test_a_relative_position_bias_table_is_positions_by_heads(heads, role):
    # Swin's and BEiT's raw (relative positions, heads) table, as T5's relative_attention_bias is
    # read: a row per relative position, a column per head (never averaged over the heads); where
    # its width is not the module's heads it is not such a table and stays unknown
    class WindowAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = heads
            self.relative_position_bias_table = nn.Parameter(torch.zeros(49, 4))
            self.qkv = nn.Linear(16, 48)
            self.proj = nn.Linear(16, 16)

    info = resolve_layers(nn.ModuleDict({"attn": WindowAttention()}))["attn.relative_position_bias_table"]
    assert info.role == role
    if role == "embedding":
        assert info.axes == ("token", "head") and "relative positions by heads" in info.found
    else:
        assert info.axes == ("d0", "d1")
