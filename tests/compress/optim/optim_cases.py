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
from lowmem.compress.optim import registry


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


# What the battery adds to a registry entry: small ranks so that a few steps see projector
# refreshes, the checks that do not apply and why, and which paths to compare. Compiled paths
# compile once per model; the numpy oracle (test_oracle.py) runs every entry on every backend.
_NOT_ADAM = {"fast_path": "one path (matmul-bound, no foreach variant)", "empty_plan": "not a plan optimizer",
             "adamw_checkpoint": "keeps no Adam v"}
_BATTERY = {
    "slimadam": dict(fast_paths=({"foreach": True}, {"compiled": True})),
    "adamem": dict(kwargs={"rank": 2, "update_proj_gap": 3}, fast_paths=(), readable={},
                   skips={**_NOT_ADAM, "memory": "checked against (m + n)·r + statistics in test_adamem.py"}),
    "adafactor-momentum": dict(fast_paths=(), readable={},
                               skips={**_NOT_ADAM, "memory": "Adafactor statistics, checked in test_adamem.py"}),
}


def _info(e: registry.OptimizerEntry) -> OptimInfo:
    extra = dict(_BATTERY.get(e.name, {}))
    kwargs = extra.pop("kwargs", {})
    return OptimInfo(e.name, lambda m, **kw: e.make(m, **kwargs, **kw), plan_preset=e.preset, **extra)


# Every lowmem optimizer of the registry (torch's AdamW is the reference, not a battery entry),
# and the engine without a plan.
PLAN_OPTIMIZERS = [
    OptimInfo("adamw-engine", lambda m, **kw: lowmem.ReducedAdamW(m, None, **kw),
              fast_paths=({"foreach": True}, {"compiled": True})),
    *(_info(e) for e in registry.REGISTRY.values() if e.preset is not None),
]

OPTIMIZERS = PLAN_OPTIMIZERS + [_info(e) for e in registry.REGISTRY.values()
                                if e.preset is None and e.name != "adamw"]


def skip_unless(info: OptimInfo, check: str) -> None:
    if check in info.skips:
        pytest.skip(f"{info.name}: {info.skips[check]}")


def preset_plan(info: OptimInfo, model):
    return build_preset(info.plan_preset, model) if info.plan_preset else None
