"""The lowmem loop in PyTorch Lightning: probe with AdamW, build a plan, train with it.

    pip install -e '.[lightning]' && python examples/lightning_fit.py [--steps 60] [--out lowmem-out/pl]

The built-in Shakespeare GPT (`lowmem.examples.shakespeare`) is wrapped in a LightningModule.
`LowmemCallback` records the SNR of `v` while AdamW trains, a plan is built from it, and a fresh
module whose ``configure_optimizers`` returns the plan's optimizer trains again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

import lowmem
from lowmem.examples import shakespeare
from lowmem.integrations.lightning import LowmemCallback

lr = 1e-3


class Steps(torch.utils.data.Dataset):
    """Item i is the built-in example's batch of step i (already a batch: use batch_size=None)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, step: int):
        return shakespeare.get_batch(step)


class GPT(L.LightningModule):
    def __init__(self, plan: lowmem.Plan | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.model = shakespeare.build_model()
        self.plan = plan

    def training_step(self, batch, _):
        return shakespeare.loss_fn(self.model, batch)

    def configure_optimizers(self):
        if self.plan is None:
            return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        # The plan names parameters as the callback saw them: this module's ("model.transformer…").
        return lowmem.optimizer_from_plan(self, self.plan, lr=lr, weight_decay=0.0)


def _fit(module: GPT, steps: int, out: Path, callbacks=()) -> float:
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        default_root_dir=str(out))
    trainer.fit(module, torch.utils.data.DataLoader(Steps(steps), batch_size=None))
    return float(trainer.callback_metrics.get("train_loss", torch.tensor(float("nan"))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="lowmem-out/pl")
    args = p.parse_args(argv)
    out = Path(args.out)

    probe = GPT()
    _fit(probe, args.steps, out, [LowmemCallback(every=5, out=out / "snr.csv")])
    plan = lowmem.build_plan(probe, lowmem.SnrTrajectory.read(out / "snr.csv"))
    plan.save(out / "plan.json")
    module = GPT(plan)
    _fit(module, args.steps, out)
    fmt = lowmem.compress.format_bytes
    adamw_bytes = 8 * sum(p.numel() for p in module.model.parameters())
    plan_bytes = lowmem.compress.plan_state_memory(plan).plan_bytes
    print(f"plan ({plan.summary['v_saved']:.1%} of v saved) -> {out / 'plan.json'}; trained with it for "
          f"{args.steps} steps; optimizer state {fmt(plan_bytes)} instead of AdamW's {fmt(adamw_bytes)}")
    return {"plan": out / "plan.json", "plan_bytes": plan_bytes, "adamw_bytes": adamw_bytes}


if __name__ == "__main__":
    main()
