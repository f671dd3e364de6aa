"""Shapes of published language models, built on the meta device for memory accounting.

Each config builds an `nn.Module` whose parameters have the names and shapes of the Hugging Face
`transformers` model of the same family (``GPT2LMHeadModel``, ``LlamaForCausalLM``), so
`lowmem.layers.resolve_layers` gives them their roles and heads, and a plan made on the real
model fits them (same names, same shapes, same fingerprint). Built under
``torch.device("meta")`` they hold no memory: a 70B model costs nothing to describe.

The modules are parameter layouts only: they have no ``forward``. Tied weights are one
parameter with two names (GPT-2's LM head is its token embedding), so they count once.

Parameter counts (published; checked in the tests): gpt2-124m 124,439,808; gpt2-1.5b
1,557,611,200; tinyllama-1.1b 1,100,048,384; llama2-7b 6,738,415,616; llama2-70b
68,976,648,192; llama3-8b 8,030,261,248.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))       # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters, with `transformers.GPT2Config`'s names. The LM head is tied."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 50257
    n_positions: int = 1024

    def build(self, device: torch.device | str = "meta") -> nn.Module:
        with torch.device(device):
            return GPT2LMHeadModel(self)


@dataclass(frozen=True)
class LlamaConfig:
    """Llama hyper-parameters, with `transformers.LlamaConfig`'s names. No biases; RMSNorm weights."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def build(self, device: torch.device | str = "meta") -> nn.Module:
        with torch.device(device):
            return LlamaForCausalLM(self)


# -- GPT-2 (transformer.h.N.attn.c_attn, …, lm_head tied to transformer.wte) -------------------

class _GPT2Attention(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.num_heads = c.n_head
        self.c_attn = Conv1D(3 * c.n_embd, c.n_embd)             # fused q, k, v: (C, 3C)
        self.c_proj = Conv1D(c.n_embd, c.n_embd)


class _GPT2MLP(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(4 * c.n_embd, c.n_embd)               # (C, 4C)
        self.c_proj = Conv1D(c.n_embd, 4 * c.n_embd)             # (4C, C)


class _GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = _GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = _GPT2MLP(c)


class _GPT2Model(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.h = nn.ModuleList(_GPT2Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)


class GPT2LMHeadModel(nn.Module):
    """The parameters of `transformers.GPT2LMHeadModel` (no forward)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = _GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


# -- Llama (model.layers.N.self_attn.q_proj, …, lm_head) --------------------------------------

class _LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv, bias=False)    # GQA: fewer key-value heads
        self.v_proj = nn.Linear(c.hidden_size, kv, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class _LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _LlamaDecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.self_attn = _LlamaAttention(c)
        self.mlp = _LlamaMLP(c)
        self.input_layernorm = nn.RMSNorm(c.hidden_size)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size)


class _LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(_LlamaDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size)


class LlamaForCausalLM(nn.Module):
    """The parameters of `transformers.LlamaForCausalLM` (no forward)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = _LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


# -- the named configs ----------------------------------------------------------------------

CONFIGS: dict[str, GPT2Config | LlamaConfig] = {
    # Radford et al., "Language Models are Unsupervised Multitask Learners" (2019).
    "gpt2-124m": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-1.5b": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
    # Zhang et al., "TinyLlama: An Open-Source Small Language Model" (2024).
    "tinyllama-1.1b": LlamaConfig(22, 2048, 5632, 32, 4),
    # Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models" (2023).
    "llama2-7b": LlamaConfig(32, 4096, 11008, 32, 32),
    "llama2-70b": LlamaConfig(80, 8192, 28672, 64, 8),
    # Grattafiori et al., "The Llama 3 Herd of Models" (2024).
    "llama3-8b": LlamaConfig(32, 4096, 14336, 32, 8, vocab_size=128256),
}


def build_config_model(name: str, device: torch.device | str = "meta") -> nn.Module:
    """The model of a named config (see `CONFIGS`), on the meta device unless told otherwise.

    Raises:
        ValueError: `name` is not a known config; the message lists the known ones.
    """
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, CONFIGS, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}.{hint}")
    return CONFIGS[name].build(device)
