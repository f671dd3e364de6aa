"""The optimizer registry every check runs over, and the small models the checks train.

One registry (as torch's OptimizerInfo and optax's test lists): each entry builds an optimizer
for a model and says which checks do not apply to it and why. Test files import it by this
module's name (unique under tests/: ``from conftest import`` would find whichever conftest.py
was imported first, e.g. tests/snr's); the fixtures over it are in conftest.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

import lowmem
from lowmem.compress import build_preset


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(d, d, bias=False)       # (d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=True)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):                            # (B, T, d)
        B, T, d = x.shape
        h = self.n_head
        q, k, v = (f(x).view(B, T, h, d // h).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)   # (B, h, T, T)
        return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, d))


class Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 2 * d)             # (2d, d)
        self.c_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


class TinyLM(nn.Module):
    """Embedding, one attention block with 2 heads, an MLP, norms, biases, an untied LM head and
    a 0-dim gain: every kind of tensor a plan treats differently. Vocabulary 13, width 8."""

    def __init__(self, vocab: int = 13, d: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d, 2)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = Mlp(d)
        self.gain = nn.Parameter(torch.tensor(1.0))  # 0-dim
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):                          # (B, T) -> (B, T, vocab)
        x = self.wte(idx)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return self.lm_head(x * self.gain)


def tiny_batch(step: int, vocab: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, vocab, (4, 6), generator=g)
    return x, (x * 3 + 1) % vocab                    # a learnable map


def tiny_loss(model: nn.Module, step: int) -> torch.Tensor:
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in tiny_batch(step))
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def tiny_model(dtype=torch.float32, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


@dataclass
class OptimInfo:
    """One optimizer of the battery: how to build it and which checks it skips (with the reason)."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    lr: float = 1e-2
    skips: dict[str, str] = field(default_factory=dict)
    fast_paths: tuple[dict, ...] = ({"foreach": True},)
    readable: dict = field(default_factory=lambda: {"foreach": False})
    plan_preset: str | None = None     # the preset whose v the state follows (memory check)

    def __call__(self, model, **kw):
        return self.build(model, **{"lr": self.lr, **kw})

    def __repr__(self) -> str:
        return self.name


def _adamem_infos() -> list[OptimInfo]:
    try:
        from lowmem.compress.optim.adamem import AdafactorMomentum, AdaMeM
    except ImportError:   # AdaMeM lands separately
        return []
    no_paths = {"fast_path": "one path (matmul-bound, no foreach variant)"}
    return [
        OptimInfo("adamem", lambda m, **kw: AdaMeM(m, rank=2, update_proj_gap=3, **kw), lr=1e-2,
                  skips={**no_paths, "empty_plan": "not a plan optimizer",
                         "memory": "checked against (m + n)·r + statistics in test_adamem.py",
                         "adamw_checkpoint": "keeps no Adam v"}, fast_paths=(), readable={}),
        OptimInfo("adafactor-momentum", lambda m, **kw: AdafactorMomentum(m, **kw), lr=1e-2,
                  skips={**no_paths, "empty_plan": "not a plan optimizer",
                         "memory": "Adafactor statistics, checked in test_adamem.py",
                         "adamw_checkpoint": "keeps no Adam v"}, fast_paths=(), readable={}),
    ]


PLAN_OPTIMIZERS = [
    OptimInfo("adamw-engine", lambda m, **kw: lowmem.ReducedAdamW(m, None, **kw),
              fast_paths=({"foreach": True}, {"compiled": True})),
    OptimInfo("slimadam", lambda m, **kw: lowmem.SlimAdam(m, **kw), plan_preset="slimadam-rules",
              fast_paths=({"foreach": True}, {"compiled": True})),
    OptimInfo("eve", lambda m, **kw: lowmem.Eve(m, **kw), plan_preset="eve"),
    OptimInfo("adam-mini", lambda m, **kw: lowmem.AdamMini(m, **kw), plan_preset="adam-mini"),
    OptimInfo("adam-mini-paper", lambda m, **kw: lowmem.AdamMini(m, variant="paper", **kw),
              plan_preset="adam-mini-paper"),
    OptimInfo("adalayer", lambda m, **kw: lowmem.AdaLayer(m, **kw), plan_preset="adalayer"),
]

OPTIMIZERS = PLAN_OPTIMIZERS + _adamem_infos()


def skip_unless(info: OptimInfo, check: str) -> None:
    if check in info.skips:
        pytest.skip(f"{info.name}: {info.skips[check]}")


def preset_plan(info: OptimInfo, model):
    return build_preset(info.plan_preset, model) if info.plan_preset else None
