"""An MLP student learning a random teacher's classes: a second, cheap task for `compare`.

    lowmem-analyze compare examples/teacher_mlp.py --optimizers adamw,eve:int8 --lrs 3e-3
    lowmem-analyze compare examples/teacher_mlp.py:seed1 --seed 1 ...     # other init and batches

Inputs are Gaussian vectors; labels are drawn from a fixed random two-layer teacher's softmax
(so the best possible held-out loss is the teacher's entropy, above 0). The student is a
4-layer MLP with LayerNorm: three of its matrices have 8,192 or more entries, so 8- and 4-bit
states apply to them (tensors under 4,096 entries stay fp32 in every 8-/4-bit optimizer).
Batches are deterministic per step; ``split="val"`` draws from another stream (held out).
``--seed S`` changes the student's initial weights; the factory ``seedS`` also the batches.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

# -- configuration -----------------------------------------------------------------------------
d_in = 32            # input features
n_class = 10         # classes
width = 256          # student's hidden width
teacher_width = 64   # teacher's hidden width
sharpness = 4.0      # teacher logits are scaled by this before the softmax labels are drawn from
batch_size = 256     # examples per step
teacher_seed = 7     # the teacher's weights (the same task for every seed)
batch_seed = 2024    # the batch stream of seed 0

LOWMEM = {"steps": 400, "lr": 3e-3, "every": 10}


def _teacher() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(teacher_seed)
    w1 = torch.randn(d_in, teacher_width, generator=g) / d_in ** 0.5             # (D, H)
    w2 = torch.randn(teacher_width, n_class, generator=g) / teacher_width ** 0.5   # (H, K)
    return w1, w2


def _batch(seed: int, step: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
    x = torch.randn(batch_size, d_in, generator=g)                                # (B, D)
    w1, w2 = _teacher()
    logits = sharpness * torch.tanh(x @ w1) @ w2                                   # (B, K)
    y = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g).squeeze(1)   # (B,)
    return x, y


def get_batch(step: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    return _batch(batch_seed, step, split)


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.LayerNorm(width), nn.GELU(),
        nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(),
        nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(),
        nn.Linear(width, n_class),
    )


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of the teacher's labels."""
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def _seeded(k: int) -> SimpleNamespace:
    return SimpleNamespace(build_model=build_model, loss_fn=loss_fn, LOWMEM=dict(LOWMEM),
                           get_batch=lambda step, split="train": _batch(batch_seed + k, step, split))


def seed0() -> SimpleNamespace:
    return _seeded(0)


def seed1() -> SimpleNamespace:
    return _seeded(1)


def seed2() -> SimpleNamespace:
    return _seeded(2)
