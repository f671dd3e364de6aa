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
from lowmem.snr.precision import read_precision  # noqa: E402
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
    callback = LowmemCallback(every=2, out=tmp_path / "hf.csv", precision_out=tmp_path / "hf-precision.csv",
                              precision_every=4)
    _InOrder(model=model, args=args, train_dataset=_data(), callbacks=[callback]).train()
    assert callback.capture is None                                   # closed at the end of training

    reference = _model()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    data = _data()
    with lowmem.capture(opt, reference, every=2, out=tmp_path / "core.csv",
                        precision_out=tmp_path / "core-precision.csv", precision_every=4):
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
    # the precision, passed through as well: at steps 2 and 4 only, as the core API measures it
    hf = {(s.step, s.name, s.state, s.format): s.update_error for s in read_precision(tmp_path / "hf-precision.csv")}
    core = {(s.step, s.name, s.state, s.format): s.update_error
            for s in read_precision(tmp_path / "core-precision.csv")}
    assert set(hf) == set(core) and {k[0] for k in core} == {2, 4}   # the first measurement, then 4's multiples
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


def _train_with(tmp_path, plan, **kw):
    """A Trainer run with a lowmem optimizer from `optimizer_cls_and_kwargs`, and the same run as a
    plain loop with the optimizer built by hand; both models after training."""
    from lowmem.integrations.hf import optimizer_cls_and_kwargs

    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=0.0, adam_beta1=0.8,
        adam_beta2=0.99, adam_epsilon=1e-7, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        seed=0, dataloader_num_workers=0)
    trainer = _InOrder(model=model, args=args, train_dataset=_data(),
                       optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, plan, args, **kw))
    trainer.train()
    return model, unwrap_optimizer(trainer.optimizer)


@pytest.mark.parametrize("how", ["plan-file", "eve"])
def test_a_trainer_trains_with_the_plans_optimizer_as_a_hand_written_loop(tmp_path, how):
    if how == "plan-file":
        plan = lowmem.build_preset("slimadam-rules", _model())
        plan.save(tmp_path / "plan.json")
        model, opt = _train_with(tmp_path, str(tmp_path / "plan.json"))
        make = lambda m, groups: lowmem.SlimAdam(m, plan=plan, lr=3e-3, betas=(0.8, 0.99), eps=1e-7,  # noqa: E731
                                                 weight_decay=0.1, param_groups=groups)
        assert type(opt) is lowmem.SlimAdam
    else:
        model, opt = _train_with(tmp_path, "eve", state_format="m=int8")
        make = lambda m, groups: lowmem.Eve(m, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1,  # noqa: E731
                                            param_groups=groups, state_format="m=int8")
        assert type(opt) is lowmem.Eve
    # weight decay where the Trainer puts it: not on biases, LayerNorms (by hand: GPT-2's names)
    no_decay = {n for n, _ in model.named_parameters() if n.endswith(".bias") or ".ln_" in n or n.startswith("transformer.ln_f")}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) not in decayed} == no_decay
    assert {g["lr"] for g in opt.param_groups} == {3e-3}

    reference = _model()
    named = dict(reference.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n not in no_decay]},
              {"params": [named[n] for n in named if n in no_decay], "weight_decay": 0.0}]
    ref_opt = make(reference, groups)
    data = _data()
    for step in range(STEPS):
        rows = data[step * BATCH:(step + 1) * BATCH]
        ids = torch.stack([r["input_ids"] for r in rows])
        reference(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_an_unknown_optimizer_name_or_plan_file_is_refused(tmp_path):
    from lowmem.integrations.hf import optimizer_cls_and_kwargs

    with pytest.raises(FileNotFoundError):
        optimizer_cls_and_kwargs(_model(), str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="Trainer's own"):
        optimizer_cls_and_kwargs(_model(), "adamw")
