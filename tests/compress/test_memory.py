"""Optimizer-state memory: estimates from shapes against the bytes of real state tensors after a
step, against the Adam-mini paper's Table 1 and the Eve paper's per-matrix count, and the shape
configs against their published parameter counts and against Hugging Face's models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.compress import PlanMismatchError, slimadam_rules
from lowmem.compress.optim import registry
from lowmem.compress.configs import CONFIGS, GPT2Config, LlamaConfig, build_config_model
from lowmem.compress.memory import StateCount, estimate_state_memory, optimizer_state_bytes
from lowmem.compress.optim.adamem import AdafactorMomentum
from lowmem.compress.plan import model_shapes
from lowmem.layers import resolve_layers

from memory_rows import OPTIMIZERS  # noqa: E402  (every row and the optimizer that keeps its state)


def tiny_gpt2() -> nn.Module:
    """HF GPT-2 layout with real tensors: fused Conv1D c_attn, biases, LayerNorms, tied head."""
    torch.manual_seed(0)
    return GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=8).build("cpu")


def tiny_llama() -> nn.Module:
    """HF Llama layout with real tensors: GQA (4 query, 2 key-value heads), gated MLP, RMSNorm."""
    torch.manual_seed(0)
    return LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=40).build("cpu")


def shakespeare_gpt() -> nn.Module:
    """The built-in example: separate q/k/v, no biases, tied head."""
    from lowmem.examples import shakespeare
    torch.manual_seed(0)
    return shakespeare.build_model()


def unlike_any_preset(model: nn.Module):
    """The published rules, but the first plain compressed layer keeps one scalar `v`."""
    plan = slimadam_rules(model)
    lp = next(lp for lp in plan.layers.values() if lp.reduce and not lp.parts)
    lp.reduce = list(range(len(lp.view)))
    return plan


# -- estimate against the real state tensors ------------------------------------------------------

def tiny_qwen2_moe() -> nn.Module:
    """transformers' Qwen2-MoE from a config: stacks of experts (expert, out, in), a router, a
    shared expert and its gate."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=24, intermediate_size=40, moe_intermediate_size=20, shared_expert_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2))


def tiny_gpt_oss() -> nn.Module:
    """transformers' gpt-oss from a config: stacks of experts as bmm reads them (expert, in, out),
    with stacks of biases."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=64, hidden_size=24, intermediate_size=20, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"]))


def tiny_neox() -> nn.Module:
    """transformers' GPT-NeoX: a fused Q/K/V laid out per head, kept whole."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))


def tiny_vit() -> nn.Module:
    """transformers' ViT: raw-parameter position embeddings and class token (1, tokens, width)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8,
        num_labels=5))


def tiny_resnet() -> nn.Module:
    """transformers' ResNet: convolutions, batch norms, and a classifier found by structure."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5))


def _hf(model_cls: str, config_cls: str, **config) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))


def tiny_mixtral() -> nn.Module:
    return _hf("MixtralForCausalLM", "MixtralConfig", vocab_size=64, hidden_size=24, intermediate_size=40,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
               num_experts_per_tok=2)


def tiny_bert() -> nn.Module:
    return _hf("BertForMaskedLM", "BertConfig", vocab_size=64, hidden_size=32, num_hidden_layers=1,
               num_attention_heads=4, intermediate_size=64)


def tiny_t5() -> nn.Module:
    return _hf("T5ForConditionalGeneration", "T5Config", vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
               num_heads=4)


def tiny_phi3() -> nn.Module:
    return _hf("Phi3ForCausalLM", "Phi3Config", vocab_size=64, hidden_size=32, intermediate_size=48,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
               bos_token_id=2)


def hf_gpt2() -> nn.Module:
    """transformers' own GPT-2 (lowmem's layout copy is `tiny_gpt2`): Conv1D projections."""
    return _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16)


def hf_llama() -> nn.Module:
    return _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=64, hidden_size=32, intermediate_size=48,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def hf_convnext() -> nn.Module:
    """ConvNeXt: depthwise convolutions, pointwise Linears, layer scale."""
    return _hf("ConvNextForImageClassification", "ConvNextConfig", num_channels=3, num_stages=2,
               hidden_sizes=[8, 16], depths=[1, 1], num_labels=5, image_size=32)


def hf_olmoe() -> nn.Module:
    return _hf("OlmoeForCausalLM", "OlmoeConfig", vocab_size=64, hidden_size=24, intermediate_size=16,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)


def hf_dbrx() -> nn.Module:
    """DBRX: experts as 2-D stacks (experts x rows, in), read as (experts, rows, in)."""
    return _hf("DbrxForCausalLM", "DbrxConfig", vocab_size=64, d_model=24, n_layers=1, n_heads=4,
               ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2),
               attn_config=dict(kv_n_heads=2, rope_theta=10000.0))


def hf_deepseek_v3() -> nn.Module:
    """Multi-head latent attention (kv_b_proj split per head into key and value parts) and MoE."""
    return _hf("DeepseekV3ForCausalLM", "DeepseekV3Config", vocab_size=64, hidden_size=32, intermediate_size=48,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
               qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=16, n_group=1, topk_group=1)


def hf_mamba() -> nn.Module:
    return _hf("MambaForCausalLM", "MambaConfig", vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, shakespeare_gpt, tiny_qwen2_moe, tiny_gpt_oss, tiny_neox,
                                   tiny_vit, tiny_resnet, tiny_mixtral, tiny_bert, tiny_t5, tiny_phi3, hf_gpt2,
                                   hf_llama, hf_convnext, hf_olmoe, hf_dbrx, hf_deepseek_v3, hf_mamba],
                         ids=["gpt2", "llama-gqa", "shakespeare", "qwen2-moe", "gpt-oss", "gpt-neox", "vit", "resnet",
                              "mixtral", "bert", "t5", "phi3", "hf-gpt2", "hf-llama-gqa", "convnext", "olmoe", "dbrx",
                              "deepseek-v3", "mamba"])
def test_estimate_equals_the_bytes_of_real_state_tensors_after_one_step(build, tmp_path):
    model = build()
    plan_path = unlike_any_preset(model).save(tmp_path / "plan.json")
    estimate = estimate_state_memory(model, plan_path)
    assert [r.name for r in estimate.rows] == list(OPTIMIZERS)
    params = list(model.parameters())                              # tied weights once
    n = sum(p.numel() for p in params)
    assert estimate.parameters == n and estimate["adamw"].total_bytes == 2 * 4 * n
    for row in estimate.rows:
        optimizer = OPTIMIZERS[row.name](model, plan_path)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        got = optimizer_state_bytes(optimizer)
        assert got.without_step == row.total_bytes, row.name
        assert got.step == 4 * len(params), row.name               # one float32 step per parameter
        if row.m_bytes is not None:                                # m is exp_avg, v all the rest
            assert (got.exp_avg, got.without_step - got.exp_avg) == (row.m_bytes, row.v_bytes), row.name
        if row.name not in ("adamem", "adafactor-momentum"):      # Adam's keys, nothing else
            assert set(got.by_key) == {"step", "exp_avg", "exp_avg_sq"}, row.name


def test_bf16_states_of_torch_adamw_match_two_bytes_per_entry():
    model = tiny_llama().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    estimate = estimate_state_memory(model, bytes_per_state=2, optimizers=())
    assert optimizer_state_bytes(optimizer).without_step == estimate["adamw"].total_bytes


def test_state_bytes_of_adamw_on_a_linear_by_hand():
    lin = nn.Linear(3, 2)                                          # 6 weights + 2 biases
    optimizer = torch.optim.AdamW(lin.parameters())
    assert optimizer_state_bytes(optimizer).total == 0             # no state before the first step
    lin.weight.grad, lin.bias.grad = torch.ones(2, 3), torch.ones(2)
    optimizer.step()
    got = optimizer_state_bytes(optimizer)
    assert got.by_key == {"step": 8, "exp_avg": 32, "exp_avg_sq": 32}
    assert (got.total, got.without_step) == (72, 64)


# -- published figures ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, adamw_gb, adam_mini_gb", [
    ("gpt2-1.5b", 12.48, 6.56), ("tinyllama-1.1b", 8.80, 4.92), ("llama2-7b", 53.92, 28.04)])
def test_adam_mini_paper_table_1_within_one_percent(name, adamw_gb, adam_mini_gb):
    # Zhang et al. 2024, Table 1: float32 m and v, GB = 1e9 bytes.
    model = build_config_model(name)
    assert all(p.is_meta for p in model.parameters())               # nothing allocated
    estimate = estimate_state_memory(model, optimizers=("adam-mini-paper",))
    assert estimate["adamw"].total_bytes / 1e9 == pytest.approx(adamw_gb, rel=0.01)
    assert estimate["adam-mini-paper"].total_bytes / 1e9 == pytest.approx(adam_mini_gb, rel=0.01)


def test_eve_keeps_m_times_n_plus_one_entries_of_a_matrix_against_adamw_two_m_n():
    # Tomar et al. 2024, §2: an M×N weight keeps M×(N+1) values under Eve, 2·M·N under AdamW.
    M, N = 6, 10
    with torch.device("meta"):
        lin = nn.Linear(N, M, bias=False)                          # weight (M, N)
    estimate = estimate_state_memory(lin, optimizers=("eve",))
    assert estimate["eve"].total_bytes == 4 * M * (N + 1) == 264
    assert estimate["adamw"].total_bytes == 4 * 2 * M * N == 480
    assert estimate["eve"].v_saved == pytest.approx(1 - M / (M * N))
    assert estimate["eve"].total_saved == pytest.approx(1 - 264 / 480)


# -- rows, arguments, failures --------------------------------------------------------------------

def test_an_extra_row_without_an_m_v_split_reports_its_total_only(monkeypatch):
    with torch.device("meta"):
        lin = nn.Linear(10, 6, bias=False)
    monkeypatch.setitem(registry.REGISTRY, "factored", registry.OptimizerEntry(
        "factored", AdafactorMomentum, "statistics", "-", lambda model, layers: StateCount(None, None, 6 + 10)))
    estimate = estimate_state_memory(lin, optimizers=("factored",))
    assert [r.name for r in estimate.rows] == ["adamw", "factored"]
    row = estimate["factored"]
    assert (row.m_bytes, row.v_bytes, row.total_bytes, row.v_saved) == (None, None, 64, None)
    assert row.total_saved == pytest.approx(1 - 64 / 480)


def test_json_has_raw_bytes_and_rounded_shares():
    with torch.device("meta"):
        lin = nn.Linear(10, 6, bias=False)
    doc = estimate_state_memory(lin, optimizers=("eve",)).to_json()
    assert doc["model"] == {"class": "Linear", "parameters": 60} and doc["bytes_per_state"] == 4
    assert doc["optimizers"][1] == {"name": "eve", "state": {"m": "fp32", "v": "fp32"}, "m_bytes": 240, "v_bytes": 24,
                                    "total_bytes": 264, "bytes_per_param": 4.4, "v_saved": 0.9, "total_saved": 0.45}


def test_a_plan_for_another_model_and_bad_bytes_per_state_are_refused():
    plan = slimadam_rules(build_config_model("gpt2-124m"))
    with pytest.raises(PlanMismatchError, match="GPT2LMHeadModel"):
        estimate_state_memory(build_config_model("tinyllama-1.1b"), plan)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=f"bytes_per_state must be a positive integer, got {bad!r}"):
            estimate_state_memory(nn.Linear(2, 2), bytes_per_state=bad)


# -- the shape configs ----------------------------------------------------------------------------

PUBLISHED_PARAMETERS = {
    "gpt2-124m": 124_439_808,         # Hugging Face gpt2, tied head
    "gpt2-1.5b": 1_557_611_200,       # gpt2-xl
    "tinyllama-1.1b": 1_100_048_384,
    "llama2-7b": 6_738_415_616,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_config_has_the_published_parameter_count(name):
    model = build_config_model(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_configs_are_the_ones_tested():
    assert set(CONFIGS) == set(PUBLISHED_PARAMETERS)


def test_unknown_config_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config 'llama2-7'; known: gpt2-124m, .*llama3-8b\. Did you mean"):
        build_config_model("llama2-7")


def _hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    c = CONFIGS[name]
    with torch.device("meta"):
        if isinstance(c, GPT2Config):
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, vocab_size=c.vocab_size, n_positions=c.n_positions))
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            vocab_size=c.vocab_size, tie_word_embeddings=False))


@pytest.mark.parametrize("name", ["gpt2-124m", "tinyllama-1.1b", "llama3-8b"])
def test_config_has_the_names_shapes_and_roles_of_the_hugging_face_model(name):
    ours, theirs = build_config_model(name), _hf_model(name)
    assert model_shapes(ours) == model_shapes(theirs)             # so a plan made on one fits the other
    fields = ("name", "aliases", "shape", "role", "axes", "heads", "head_dim", "parts", "part_heads")
    resolved = [[tuple(getattr(i, f) for f in fields) for i in resolve_layers(m, warn=False)] for m in (ours, theirs)]
    assert resolved[0] == resolved[1]


def test_quantized_states_of_a_tensor_subclass_count_their_codes_and_scales():
    """torchao keeps 8-/4-bit states as tensor subclasses that look like fp32 tensors of the
    parameter's shape; their bytes are those of the codes, scales and code map inside."""
    optim = pytest.importorskip("torchao.optim")
    for cls, bits, block, qmap in ((optim.AdamW8bit, 8, 256, 256), (optim.AdamW4bit, 4, 128, 16)):
        model = nn.Linear(128, 64, bias=False)                 # 8,192 entries: quantized
        opt = cls(model.parameters(), lr=1e-3)
        model(torch.randn(4, 128)).sum().backward()
        opt.step()
        one = 8192 * bits // 8 + 8192 // block * 4 + qmap * 4  # codes, one fp32 scale per block, the map
        assert optimizer_state_bytes(opt).by_key == {"step": 4, "exp_avg": one, "exp_avg_sq": one}
