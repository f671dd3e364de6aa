"""The tiny attention layer that several tests build their models from: separate q, k, v and o
projections, width 8, 2 heads.

Tests that need a model *file* (the CLI loads a user's ``model.py``) start it with `SOURCE`,
the text of this module above its end marker, and add their own `Net`, batches and loss; tests
that build models in the process import `Attention`, `WIDTH` and `HEADS`. `MLP_MODEL_PY` is a
whole model.py of a tiny MLP.
"""

import torch  # noqa: F401  (the model files that start with SOURCE use it)
from torch import nn
from torch.nn import functional as F

WIDTH, HEADS, T = 8, 2, 5


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = HEADS
        self.q = nn.Linear(WIDTH, WIDTH, bias=False)
        self.k = nn.Linear(WIDTH, WIDTH, bias=False)
        self.v = nn.Linear(WIDTH, WIDTH, bias=False)
        self.o = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, HEADS, C // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


# -- end of SOURCE --
def _source() -> str:
    from pathlib import Path

    text = Path(__file__).read_text()
    return text[:text.index("# -- end of SOURCE --")]


SOURCE = _source()

# The smallest complete model.py the CLI tests feed lowmem-analyze: a 4-8-2 MLP fitting a linear
# map, deterministic batches per step.
MLP_MODEL_PY = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=g)
    return x, x[:, :2] * 2

def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()
"""
