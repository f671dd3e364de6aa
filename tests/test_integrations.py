"""The Hugging Face `Trainer` callback against the core API: a tiny GPT-2 built from a config (no
download) trained by `Trainer` with `LowmemCallback` writes the trajectory that `lowmem.capture`
writes around a plain PyTorch loop doing the same training."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowmem  # noqa: E402
from lowmem.integrations import unwrap_optimizer  # noqa: E402
from lowmem.integrations.hf import LowmemCallback  # noqa: E402
from lowmem.snr.trajectory import read_trajectory  # noqa: E402

STEPS, BATCH, VOCAB, T = 6, 4, 50, 12


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=T,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (STEPS * BATCH, T), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


class _InOrder(transformers.Trainer):
    """Batches in dataset order, so a plain loop can take the same ones, and the model's own mean
    loss (recent Trainers divide the summed loss by every label token of the batch instead)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_trainer_callback_writes_the_core_api_trajectory(tmp_path):
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0)
    callback = LowmemCallback(every=2, out=tmp_path / "hf.csv")
    _InOrder(model=model, args=args, train_dataset=_data(), callbacks=[callback]).train()
    assert callback.capture is None                                   # closed at the end of training

    reference = _model()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    data = _data()
    with lowmem.capture(opt, reference, every=2, out=tmp_path / "core.csv"):
        for step in range(STEPS):
            rows = data[step * BATCH:(step + 1) * BATCH]
            ids = torch.stack([r["input_ids"] for r in rows])
            reference(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    hf = {(s.step, s.name, s.view, s.subset): s.snr for s in read_trajectory(tmp_path / "hf.csv")}
    core = {(s.step, s.name, s.view, s.subset): s.snr for s in read_trajectory(tmp_path / "core.csv")}
    assert set(hf) == set(core) and {k[0] for k in core} == {2, 4, 6}
    for key, value in core.items():
        assert hf[key] == pytest.approx(value, rel=1e-4, abs=1e-8), key


def test_unwrap_finds_the_torch_optimizer_inside_accelerates_wrapper():
    from accelerate.optimizer import AcceleratedOptimizer

    inner = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    assert unwrap_optimizer(AcceleratedOptimizer(inner, device_placement=False)) is inner
    assert unwrap_optimizer(inner) is inner


def test_hf_example_runs_the_probe_plan_train_loop(tmp_path):
    """examples/hf_trainer.py end to end: the plan it writes fits the model, and the measured
    state of the plan's optimizer is the plan's estimate (m + reduced v, fp32)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "10", "--out", str(tmp_path)])
    plan = lowmem.Plan.load(result["plan"])
    plan.validate(example._model())
    assert result["plan_bytes"] == lowmem.compress.plan_state_memory(plan).plan_bytes
    assert result["adamw_bytes"] == 8 * sum(p.numel() for p in example._model().parameters())
    assert sorted({s.step for s in read_trajectory(tmp_path / "snr.csv")}) == [5, 10]
