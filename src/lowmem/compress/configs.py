"""Shapes of published language models, built on the meta device for memory accounting.

Each config builds an `nn.Module` whose parameters have the names and shapes of the Hugging Face
`transformers` model of the same family (``GPT2LMHeadModel``, ``LlamaForCausalLM``), so
`lowmem.layers.resolve_layers` gives them their roles and heads, and a plan made on the real
model fits them (same names, same shapes, same fingerprint). Built under
``torch.device("meta")`` they hold no memory: a 70B model costs nothing to describe.

``model(input_ids)`` gives the logits, (B, T, vocab), that transformers' model computes in eval
mode with no attention mask, padding or KV cache (tested against transformers in float64):
GPT-2 is pre-LN blocks over token plus learned position embeddings, a fused ``c_attn`` split into
q, k, v, causal attention, a tanh-GELU ("gelu_new") MLP, ``ln_f`` and the tied head; Llama is
RMSNorm (normalized in float32, as transformers does), rotary position embeddings (``rope_theta``,
rotate-half convention), grouped-query attention, a SwiGLU MLP and its own ``lm_head``. Attention
is `torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``. The forward has no
data-dependent control flow, so it runs on the meta device and under ``FakeTensorMode`` (to trace
a training step's memory) as well as on real tensors. Tied weights are one parameter with two
names (GPT-2's LM head is its token embedding), so they count once.

Parameter counts (published; checked in the tests): gpt2-124m 124,439,808; gpt2-1.5b
1,557,611,200; tinyllama-1.1b 1,100,048,384; llama2-7b 6,738,415,616; llama2-70b
68,976,648,192; llama3-8b 8,030,261,248.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))       # (in, out)
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters, with `transformers.GPT2Config`'s names. The LM head is tied and the
    MLP's activation is "gelu_new" (GELU, tanh approximation) in every published size."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5

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
    rms_norm_eps: float = 1e-5            # Llama 2, Llama 3 and TinyLlama alike (transformers' default: 1e-6)
    rope_theta: float = 10000.0           # Llama 2 and TinyLlama; Llama 3: 500,000

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                   # (B, T, C) each
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))   # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)                       # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _GPT2MLP(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(4 * c.n_embd, c.n_embd)               # (C, 4C)
        self.c_proj = Conv1D(c.n_embd, 4 * c.n_embd)             # (4C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(_gelu_new(self.c_fc(x)))


class _GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.attn = _GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.mlp = _GPT2MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _GPT2Model(nn.Module):
    def __init__(self, c: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.h = nn.ModuleList(_GPT2Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than n_positions={self.wpe.num_embeddings}")
        positions = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)              # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' "gelu_new" (``NewGELUActivation``), op for op, so a trace saves what it saves."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2LMHeadModel(nn.Module):
    """`transformers.GPT2LMHeadModel`: its parameters, and its logits from ``forward``."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = _GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits, (B, T, vocab_size), of token ids (B, T).

        Raises:
            ValueError: T is larger than ``n_positions``.
        """
        return self.lm_head(self.transformer(input_ids))


# -- Llama (model.layers.N.self_attn.q_proj, …, lm_head) --------------------------------------

class LlamaRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` computed as transformers' ``LlamaRMSNorm``: in float32 whatever the input's dtype
    (so a bf16 trace holds float32 intermediates, as training with transformers does), cast back,
    then scaled by the weight: ``weight * (x / sqrt(mean(x²) + eps))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding tables, (T, head_dim) each, in float32 then cast to `dtype` (as transformers).

    Frequency i of the head_dim/2 is theta^(-2i/head_dim); each appears twice, in the two halves
    (transformers' rotate-half layout, not the interleaved pairs of Meta's reference code).
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021).
    """
    even = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (theta ** (even / head_dim))                  # (D/2,)
    freqs = positions[:, None].float() * inv_freq                  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                         # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _LlamaAttention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        kv = c.num_key_value_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, kv, bias=False)    # GQA: fewer key-value heads
        self.v_proj = nn.Linear(c.hidden_size, kv, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)         # (B, H, T, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)         # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        # As transformers' sdpa path with no mask: SDPA repeats the key-value heads itself.
        gqa = self.num_key_value_heads != self.num_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _LlamaDecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.self_attn = _LlamaAttention(c)
        self.mlp = _LlamaMLP(c)
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(_LlamaDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.head_dim, self.rope_theta = c.head_dim, c.rope_theta

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                           # (B, T, C)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = _rotary_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)   # (T, D) each
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`transformers.LlamaForCausalLM`: its parameters, and its logits from ``forward``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = _LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits, (B, T, vocab_size), of token ids (B, T)."""
        return self.lm_head(self.model(input_ids))


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
    "llama3-8b": LlamaConfig(32, 4096, 14336, 32, 8, vocab_size=128256, rope_theta=500000.0),
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
