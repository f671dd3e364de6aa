"""The Adam-mini paper's Hessian setup: a 4-layer transformer (width 32, 4 heads) on randomly
generated binary sequences of length 42 (Zhang et al. 2024, Appendix B.2, Figure 6).

    lowmem-analyze hessian --example binary          # exact Hessian blocks at initialisation
    lowmem-analyze --example binary                  # or the SNR analysis, like any model.py

A minGPT-style model (fused ``c_attn`` with biases, GELU MLP of width 4×32, tied LM head,
weights N(0, 0.02)) predicts the next bit. The whole dataset is `n_sequences` fixed random
sequences; `dataset()` returns it as one batch, over which the paper computes its Hessians.
`get_batch(step)` draws `batch_size` of them per step for training (the `model.py` contract).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

n_layer = 4
n_head = 4
n_embd = 32
seq_len = 42          # tokens per sequence
vocab = 2             # bits
n_sequences = 16      # the whole dataset
batch_size = 16
seed = 42

LOWMEM = {"steps": 200, "lr": 1e-3, "every": 10}


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence as one batch (x, y): inputs and next-bit targets, (n_sequences, 41) each."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, vocab, (n_sequences, seq_len), generator=g)
    return bits[:, :-1], bits[:, 1:]


def get_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` sequences of the dataset for `step`, the same every call. There is no
    held-out split: the task is fitting these few random sequences, so a comparison on it
    reports training loss."""
    x, y = dataset()
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2 * step)
    rows = torch.randperm(n_sequences, generator=g)[:batch_size]
    return x[rows], y[rows]


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)        # q, k, v stacked along the output
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)               # (B, H, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(seq_len, n_embd),
            h=nn.ModuleList([Block() for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):   # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx):
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build_model() -> nn.Module:
    return GPT()


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of next-bit prediction."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
