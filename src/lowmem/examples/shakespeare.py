"""A small character-level GPT on twelve Shakespeare plays (bundled, public domain).

Run it through lowmem:  lowmem-analyze --example shakespeare
or as a `model.py`:     lowmem-analyze src/lowmem/examples/shakespeare.py

It follows the `model.py` contract (DESIGN §7): `build_model`, `get_batch(step)`, `loss_fn`,
and `LOWMEM` defaults. Batches are deterministic per step; the last 10% of the text is held
out (`get_batch(step, split="val")`).
"""

from __future__ import annotations

import gzip
import math
from functools import lru_cache
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

# -- configuration -----------------------------------------------------------------------------
n_layer = 4          # transformer blocks
n_head = 4           # attention heads
n_embd = 128         # model width
block_size = 128     # context length in characters
batch_size = 16      # sequences per step
seed = 1337          # batch sampling seed (the model's init follows torch's global seed)
val_fraction = 0.1   # last share of the text held out

LOWMEM = {"steps": 400, "lr": 1e-3, "every": 10}


@lru_cache(maxsize=1)
def _corpus() -> tuple[torch.Tensor, str]:
    """The text as a uint8 tensor of character ids, and the vocabulary (sorted characters)."""
    raw = resources.files("lowmem.examples").joinpath("data/shakespeare.txt.gz").read_bytes()
    text = gzip.decompress(raw).decode("ascii")
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.uint8)
    return ids, vocab


def vocab_size() -> int:
    return len(_corpus()[1])


def get_batch(step: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for `step`: random windows of the train (first 90%) or val split, same every call."""
    ids, _ = _corpus()
    n_val = int(len(ids) * val_fraction)
    data = ids[:-n_val] if split == "train" else ids[-n_val:]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(block_size + 1)            # (B, T+1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]                               # (B, T), (B, T)


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd, bias=False)
        self.k = nn.Linear(n_embd, n_embd, bias=False)
        self.v = nn.Linear(n_embd, n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)               # (B, H, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT-style GPT-2 architecture: separate q/k/v, no biases, tied LM head."""

    def __init__(self, vocab: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block() for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=False),
        ))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):   # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)    # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))                # (B, T, vocab)


def build_model() -> nn.Module:
    return GPT(vocab_size())


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of next-character prediction."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
