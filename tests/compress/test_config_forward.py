"""The configs' forward against transformers': tiny GPT-2 and Llama models with the same random
weights give the same logits in float64; a 7B config runs forward and backward on the meta device
and under FakeTensorMode, where memory tracing runs it."""

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.compress.configs import CONFIGS, GPT2Config, LlamaConfig, build_config_model

transformers = pytest.importorskip("transformers")

TINY_GPT2 = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
# rope_theta and eps off transformers' defaults (10,000 and 1e-6), so each must be passed through.
TINY_LLAMA = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5, rope_theta=500000.0)


def _hf_model(c: GPT2Config | LlamaConfig) -> torch.nn.Module:
    if isinstance(c, GPT2Config):
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, vocab_size=c.vocab_size,
            n_positions=c.n_positions, layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new"))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        vocab_size=c.vocab_size, tie_word_embeddings=c.tie_word_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, hidden_act="silu"))


def _ours_and_theirs(c: GPT2Config | LlamaConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = c.build("cpu")
    with torch.no_grad():              # off the init, so a dropped bias or norm gain shows
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    theirs = _hf_model(c)
    theirs.load_state_dict(ours.state_dict(), strict=True)    # same names; inv_freq is not persistent
    return ours.double().eval(), theirs.double().eval()


@pytest.mark.parametrize("c", [TINY_GPT2, TINY_LLAMA, replace(TINY_LLAMA, tie_word_embeddings=True)],
                         ids=["gpt2", "llama-gqa", "llama-tied"])
def test_forward_gives_the_logits_of_transformers(c):
    ours, theirs = _ours_and_theirs(c)
    input_ids = torch.randint(0, c.vocab_size, (2, 12))
    with torch.no_grad():
        logits, expected = ours(input_ids), theirs(input_ids).logits
    assert logits.shape == (2, 12, c.vocab_size)
    assert expected.abs().max() > 0.1                              # not a degenerate comparison
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


def test_logits_are_causal():
    torch.manual_seed(0)
    ours = TINY_LLAMA.build("cpu").double()
    input_ids = torch.randint(0, 100, (1, 12))
    changed = input_ids.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 100
    with torch.no_grad():
        a, b = ours(input_ids), ours(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gpt2_refuses_a_sequence_longer_than_its_positions():
    with pytest.raises(ValueError, match="sequence of 33 tokens is longer than n_positions=32"):
        TINY_GPT2.build("meta")(torch.zeros(1, 33, dtype=torch.long, device="meta"))


def test_configs_carry_the_published_rope_theta_and_norm_eps():
    # Hugging Face config.json of each checkpoint.
    assert [(CONFIGS[n].rope_theta, CONFIGS[n].rms_norm_eps) for n in
            ("tinyllama-1.1b", "llama2-7b", "llama2-70b", "llama3-8b")] == \
        [(10000.0, 1e-5), (10000.0, 1e-5), (10000.0, 1e-5), (500000.0, 1e-5)]
    assert CONFIGS["gpt2-124m"].layer_norm_epsilon == CONFIGS["gpt2-1.5b"].layer_norm_epsilon == 1e-5


def test_a_7b_config_runs_forward_and_backward_on_the_meta_device():
    model = build_config_model("llama2-7b")
    logits = model(torch.zeros(1, 16, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 16, 32000) and logits.device.type == "meta"
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("c", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_forward_and_backward_run_under_fake_tensor_mode(c):
    with FakeTensorMode():
        model = c.build("cpu")
        logits = model(torch.randint(0, c.vocab_size, (2, 12)))
        logits.sum().backward()
    assert logits.shape == (2, 12, c.vocab_size)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
