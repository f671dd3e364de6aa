"""The built-in `shakespeare` task with another batch stream per seed, for seed studies.

`lowmem-analyze compare --seed S` changes the initial weights only: the built-in example's
`get_batch(step)` draws its windows from a fixed seed (1337). To repeat a comparison over seeds
that change the initial weights *and* the batches, pair ``--seed S`` with the factory ``seedS``:

    lowmem-analyze compare examples/shakespeare_seeds.py:seed1 --seed 1 --optimizers adamw,eve:int8 --lrs 1e-3

``seed0`` is the built-in example itself (the same batches as ``--example shakespeare``); ``seedS``
draws its windows from batch seed 1337 + S. The held-out windows move with the seed too (always
from the last 10% of the text, never trained on).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lowmem.examples import shakespeare as base


def _task(batch_seed: int) -> SimpleNamespace:
    def get_batch(step: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        ids, _ = base._corpus()
        n_val = int(len(ids) * base.val_fraction)
        data = ids[:-n_val] if split == "train" else ids[-n_val:]
        g = torch.Generator().manual_seed(batch_seed * 1_000_003 + step * 2 + (split != "train"))
        starts = torch.randint(len(data) - base.block_size - 1, (base.batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(base.block_size + 1)        # (B, T+1)
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]                               # (B, T), (B, T)

    return SimpleNamespace(build_model=base.build_model, get_batch=get_batch, loss_fn=base.loss_fn,
                           LOWMEM=dict(base.LOWMEM))


def seed0() -> SimpleNamespace:
    return _task(base.seed)


def seed1() -> SimpleNamespace:
    return _task(base.seed + 1)


def seed2() -> SimpleNamespace:
    return _task(base.seed + 2)
