"""Run by tests/test_integrations_lightning.py (not a test itself): the Lightning callback under
FSDP2, through Lightning's own ModelParallelStrategy on 2 CPU processes (gloo).

    python tests/lightning_fsdp_run.py OUT.csv STEPS BATCH

Lightning starts the second process by running this command again. The module is the one of
test_integrations_lightning.py, sharded with `fully_shard` in ``configure_model``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from test_integrations_lightning import Module, _data  # noqa: E402

from lowmem.integrations.lightning import LowmemCallback  # noqa: E402


class Sharded(Module):
    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def train_dataloader(self):
        # Step s of rank r: samples 2·s·B + r·B … 2·s·B + (r+1)·B − 1, so the two ranks' batches of
        # step s are the samples 2·s·B … 2·(s+1)·B − 1 of one process with batch 2·B.
        b, r = self.batch, self.trainer.global_rank
        data = _data()
        mine = [i for s in range(len(data) // (2 * b)) for i in range(2 * s * b + r * b, 2 * s * b + (r + 1) * b)]
        return torch.utils.data.DataLoader(torch.utils.data.Subset(data, mine), batch_size=b, shuffle=False)


def main(out: str, steps: int, batch: int) -> None:
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=2, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[LowmemCallback(every=2, out=out)])
    trainer.fit(Sharded(batch))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
