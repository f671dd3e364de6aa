"""The lowmem loop in a Hugging Face `Trainer`: probe with AdamW, build a plan, train with it.

    pip install -e '.[hf]' && python examples/hf_trainer.py [--steps 60] [--out lowmem-out/hf]

A small GPT-2 built from a config (no download) trains on the built-in Shakespeare text. First
AdamW runs with `LowmemCallback`, which records the SNR of `v`. A plan is built from that
trajectory. Then a fresh model trains with the plan's optimizer, handed to the Trainer as
``optimizers=(opt, None)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import lowmem
from lowmem.examples import shakespeare
from lowmem.integrations.hf import LowmemCallback

# -- configuration ---------------------------------------------------------------------------------
n_layer, n_head, n_embd = 2, 4, 64
block_size = 64                     # tokens per sequence
batch_size = 16
lr = 1e-3


class ShakespeareWindows(torch.utils.data.Dataset):
    """Deterministic windows of the built-in text: item i is get_batch's i-th row of its step."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        x, _ = shakespeare.get_batch(i // shakespeare.batch_size)                # (B, T)
        ids = x[i % shakespeare.batch_size, :block_size]
        return {"input_ids": ids, "labels": ids}


def _model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size,
                                     vocab_size=shakespeare.vocab_size(), bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _train(model, optimizer, steps: int, out: Path, callbacks=()):
    training = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=ShakespeareWindows(batch_size * steps),
                                   optimizers=(optimizer, None), callbacks=list(callbacks))
    return trainer.train().training_loss


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="lowmem-out/hf")
    args = p.parse_args(argv)
    out = Path(args.out)

    probe = _model()
    adamw = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    probe_loss = _train(probe, adamw, args.steps, out, [LowmemCallback(every=5, out=out / "snr.csv")])
    plan = lowmem.build_plan(probe, lowmem.SnrTrajectory.read(out / "snr.csv"))
    plan.save(out / "plan.json")

    model = _model()
    optimizer = lowmem.optimizer_from_plan(model, plan, lr=lr, weight_decay=0.0)
    loss = _train(model, optimizer, args.steps, out)
    adamw_bytes = lowmem.compress.optimizer_state_bytes(adamw).without_step
    plan_bytes = lowmem.compress.optimizer_state_bytes(optimizer).without_step
    fmt = lowmem.compress.format_bytes
    print(f"AdamW probe: train loss {probe_loss:.3f}, state {fmt(adamw_bytes)}; plan ({plan.summary['v_saved']:.1%} "
          f"of v saved) -> {out / 'plan.json'}; plan optimizer: train loss {loss:.3f}, state {fmt(plan_bytes)}")
    return {"probe_loss": probe_loss, "loss": loss, "adamw_bytes": adamw_bytes, "plan_bytes": plan_bytes,
            "plan": out / "plan.json"}


if __name__ == "__main__":
    main()
