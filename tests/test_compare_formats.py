"""`compare` with storage formats, peers and bf16 parameters: a spec's format reaches the
optimizer and its measured bytes equal hand arithmetic, torchao's AdamW8bit in a sweep equals a
hand-written torchao loop, bad specs and missing peers are told apart, and a bf16 sweep trains
a bf16 copy of the same start (AdamW's run equal to torch's AdamW on bf16 weights by hand)."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
import torch

from lowmem.cli.contract import load_task
from cli_runner import cli
from lowmem.compare import (OptimizerSpec, SpecError, SweepMismatch, SweepSettings, make_optimizer, parse_spec,
                            run_file, run_sweep, train_one)
from lowmem.compress.formats import StateFormat
from lowmem.compress.optim.registry import PeerUnavailable

# fc1 (128, 32) and fc2 (256, 128) are large enough for 8-/4-bit states (>= 4,096 entries, and
# whole 256-entry blocks for torchao); the head (10, 256) and the bias stay fp32 in every optimizer.
MODEL = '''\
import torch
from torch import nn
from torch.nn import functional as F


def build_model():
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 256, bias=False), nn.Tanh(),
                         nn.Linear(256, 10, bias=False))


def get_batch(step, split="train"):
    g = torch.Generator().manual_seed(step * 2 + (split != "train"))
    x = torch.randn(16, 32, generator=g)
    return x, (x[:, :10].argmax(1) + step) % 10


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)

LOWMEM = {"steps": 6, "lr": 1e-2}
'''
PARAMS = 32 * 128 + 128 + 128 * 256 + 256 * 10


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    (folder / "model.py").write_text(MODEL)
    return load_task(str(folder / "model.py"))


def settings(**kw) -> SweepSettings:
    return SweepSettings(**{"steps": 6, "warmup": 1, "eval_every": 3, "eval_batches": 2, "tail": 2, **kw})


def lr_at(step: int, lr: float) -> float:   # warm-up 1 step, cosine over steps 1..5 to 0.1·lr
    return lr if step < 1 else lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 4)))


# -- specs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, name, fmt, canonical", [
    ("eve", "eve", None, "eve"),
    ("eve:int8", "eve", StateFormat("int8", "fp32"), "eve:int8"),
    ("SlimAdam:int8:int8", "slimadam", StateFormat("int8", "int8"), "slimadam:int8:int8"),
    ("plan:int4:fp32", "plan", StateFormat("int4", "fp32"), "plan:int4"),
    ("adam-mini:bf16:bf16", "adam-mini", StateFormat("bf16", "bf16"), "adam-mini:bf16:bf16"),
    ("torchao-adamw8bit", "torchao-adamw8bit", None, "torchao-adamw8bit"),
])
def test_a_spec_names_an_optimizer_and_the_storage_of_m_and_v(text, name, fmt, canonical):
    spec = parse_spec(text)
    assert spec == OptimizerSpec(name, fmt) and str(spec) == canonical
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("text, message", [
    ("eve:int9", "'int9' is not a storage format of m"),
    ("eve:int8:int4", "'int4' is not a storage format of v"),
    ("eve:int8:int8:int8", "expected NAME, NAME:M or NAME:M:V"),
    ("adamw:int8", "adamw keeps its state its own way"),
    ("torchao-adamw8bit:int4", "takes no storage format"),
    ("sgd", "unknown optimizer 'sgd'"),
])
def test_a_bad_spec_is_refused_with_the_valid_formats(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_run_files_write_a_specs_colons_as_plus(tmp_path):
    assert run_file(tmp_path, "slimadam:int8:int8", 1e-3).name == "slimadam+int8+int8@0.001.json"


# -- a format reaches the optimizer -----------------------------------------------------------------

def test_a_format_spec_keeps_uint8_codes_and_compare_csv_counts_their_bytes(task, tmp_path):
    torch.manual_seed(0)
    model = task.build_model()
    opt = make_optimizer("eve:int8", model, 1e-2, settings())
    task.loss_fn(model, task.get_batch(0)).backward()
    opt.step()
    fc2 = model[2].weight                                                   # (256, 128)
    assert opt.state[fc2]["exp_avg"].dtype == torch.uint8 and opt.state[fc2]["exp_avg"].shape == (256, 128)
    assert opt.state[fc2]["exp_avg_scale"].shape == (256, 1)                 # one block per row of 128
    assert opt.state[fc2]["exp_avg_sq"].dtype == torch.float32               # Eve's v: one per row, fp32
    assert opt.state[model[4].weight]["exp_avg"].dtype == torch.float32      # head: 2,560 entries, fp32

    run_sweep(task, ["adamw", "eve:int8"], [1e-2], settings(), tmp_path)
    rows = {r["optimizer"]: r for r in csv.DictReader(open(tmp_path / "compare.csv"))}
    # By hand: m in int8 = one byte per entry plus a 4-byte scale per row (rows of <= 256 entries)
    # for the two big matrices, fp32 elsewhere; Eve's v = 4 bytes per output row, the bias's full.
    fc1 = 128 * 32 + 128 * 4 + 128 * 4
    bias = 128 * 4 + 128 * 4
    fc2_bytes = 256 * 128 + 256 * 4 + 256 * 4
    head = 10 * 256 * 4 + 10 * 4
    assert int(rows["eve:int8"]["state_bytes"]) == fc1 + bias + fc2_bytes + head == 51_240
    assert rows["eve:int8"]["state_format"] == "m=int8,v=fp32" and rows["adamw"]["state_format"] == ""
    assert int(rows["adamw"]["state_bytes"]) == 2 * 4 * PARAMS
    assert (tmp_path / "runs" / "eve+int8@0.01.json").exists()


def test_int4_m_takes_half_a_byte_per_entry(task, tmp_path):
    results = run_sweep(task, ["eve:int4"], [1e-2], settings(), tmp_path)
    # 4-bit codes two to a byte, a 4-byte scale per 128-entry block of a row.
    fc1 = 128 * 32 // 2 + 128 * 4 + 128 * 4
    fc2 = 256 * 128 // 2 + 256 * 4 + 256 * 4
    assert results[0].state_bytes == fc1 + (128 * 4 + 128 * 4) + fc2 + (10 * 256 * 4 + 10 * 4)


# -- peers ---------------------------------------------------------------------------------------------

def _peer_sweep_is_the_optimizer_run_by_hand(task, tmp_path, name: str, cls, set_lr) -> None:
    """A sweep's run of peer `name` equals `cls` (its package's 8-bit AdamW) run by hand, bit for
    bit, with the sweep's schedule set by ``set_lr(optimizer, lr)``; its state, measured: 8-bit
    codes, a 4-byte scale per 256 entries and a 256-entry fp32 code map per quantized tensor (m
    and v), fp32 for tensors under 4,096 entries (the bias and the head)."""
    result = run_sweep(task, [name], [1e-2], settings(weight_decay=0.1), tmp_path)[0]
    torch.manual_seed(0)
    model = task.build_model()
    opt = cls(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(6):
        set_lr(opt, lr_at(step, 1e-2))
        loss = task.loss_fn(model, task.get_batch(step))
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        val = sum(float(task.loss_fn(model, task.get_val_batch(i))) for i in range(2)) / 2
    assert result.train_loss == losses                          # the same optimizer: bit for bit
    assert result.final_val_loss == val
    quantized = lambda n: n + n // 256 * 4 + 256 * 4  # noqa: E731
    assert result.state_bytes == 2 * (quantized(128 * 32) + quantized(256 * 128) + 128 * 4 + 10 * 256 * 4)


def test_torchao_adamw8bit_in_a_sweep_is_torchaos_optimizer_run_by_hand(task, tmp_path):
    optim = pytest.importorskip("torchao.optim")   # its lr is a tensor, filled in place
    _peer_sweep_is_the_optimizer_run_by_hand(task, tmp_path, "torchao-adamw8bit", optim.AdamW8bit,
                                             lambda opt, lr: opt.param_groups[0]["lr"].fill_(lr))


def test_bnb_adamw8bit_in_a_sweep_is_bitsandbytes_optimizer_run_by_hand(task, tmp_path):
    optim = pytest.importorskip("bitsandbytes.optim")

    def set_lr(opt, lr):
        for group in opt.param_groups:
            group["lr"] = lr

    _peer_sweep_is_the_optimizer_run_by_hand(task, tmp_path, "bnb-adamw8bit", optim.AdamW8bit, set_lr)


def test_torchao_adamw4bit_state_is_half_a_byte_per_entry(task, tmp_path):
    pytest.importorskip("torchao.optim")
    result = run_sweep(task, ["torchao-adamw4bit"], [1e-2], settings(), tmp_path)[0]
    quantized = lambda n: n // 2 + n // 128 * 4 + 16 * 4  # noqa: E731   (16-value code maps)
    assert result.status == "complete"
    assert result.state_bytes == 2 * (quantized(128 * 32) + quantized(256 * 128) + 128 * 4 + 10 * 256 * 4)


def test_a_missing_peer_is_skipped_with_a_note_and_alone_is_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(MODEL)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)          # as if torchao were not installed
    code, out, err = cli("compare", tmp_path / "model.py", "--optimizers", "adamw,torchao-adamw8bit", "--lrs", "1e-2",
                         "--out", tmp_path / "c", "--format", "json")
    assert code == 0, err
    assert "skipped: optimizer 'torchao-adamw8bit' needs torchao" in err and "pip install 'torchao==0.18.0'" in err
    doc = json.loads(out)
    assert [r["optimizer"] for r in doc["runs"]] == ["adamw"] and list(doc["skipped"]) == ["torchao-adamw8bit"]
    code, out, err = cli("compare", tmp_path / "model.py", "--optimizers", "torchao-adamw8bit", "--lrs", "1e-2",
                         "--out", tmp_path / "d")
    assert code == 2 and "no optimizer left to run" in err and out == ""
    with pytest.raises(PeerUnavailable, match="needs torchao"):     # the library refuses before any run
        run_sweep(load_task(str(tmp_path / "model.py")), ["adamw", "torchao-adamw4bit"], [1e-2], settings(),
                  tmp_path / "e")
    assert not (tmp_path / "e" / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--optimizers", "adamw,eve:int9"], "m: fp32, bf16, int8, int4; v: fp32, bf16, int8"),
    (["--optimizers", "adamw:int8"], "formats apply to lowmem's plan optimizers"),
    (["--optimizers", "plan:int4"], "give --plan"),
    (["--param-rounding", "kahan"], "add --param-dtype bf16"),
    (["--param-dtype", "fp16"], "invalid choice: 'fp16'"),
])
def test_bad_specs_and_sweep_settings_exit_2(tmp_path, flags, message):
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = cli("compare", tmp_path / "model.py", *flags, "--out", tmp_path / "c")
    assert code == 2 and message in err and out == ""


# -- bf16 parameters --------------------------------------------------------------------------------

def test_a_bf16_sweep_trains_a_bf16_copy_of_the_same_start(task, tmp_path):
    """AdamW in a bf16 sweep is torch's AdamW on the seeded model cast to bf16, fed bf16 inputs."""
    s = settings(param_dtype="bf16")
    result = run_sweep(task, ["adamw"], [1e-2], s, tmp_path)[0]
    torch.manual_seed(0)
    model = task.build_model().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(6):
        opt.param_groups[0]["lr"] = lr_at(step, 1e-2)
        x, y = task.get_batch(step)
        loss = task.loss_fn(model, (x.bfloat16(), y))
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert result.train_loss == losses
    assert result.state_bytes == 2 * 2 * PARAMS                      # torch's AdamW keeps bf16 m and v
    assert json.loads((tmp_path / "settings.json").read_text())["param_dtype"] == "bf16"
    # the held-out loss: the trained bf16 weights upcast to fp32, on fp32 batches
    exact = model.float().eval()
    with torch.no_grad():
        want = sum(float(task.loss_fn(exact, task.get_val_batch(i))) for i in range(2)) / 2
    assert result.final_val_loss == pytest.approx(want, rel=1e-6)
    with torch.no_grad():   # in bf16 it is another number: rounded where fp32 is not
        rounded = sum(float(task.loss_fn(model.bfloat16(), (task.get_val_batch(i)[0].bfloat16(), task.get_val_batch(i)[1])))
                      for i in range(2)) / 2
    assert rounded != pytest.approx(want, rel=1e-6)
    param = run_sweep(task, ["adamw"], [1e-2], settings(param_dtype="bf16", eval_dtype="param"), tmp_path / "p")[0]
    assert param.final_val_loss == pytest.approx(rounded, rel=1e-6)


def test_rounding_modes_reach_the_plan_optimizer(task, tmp_path):
    torch.manual_seed(0)
    base = task.build_model()
    runs = {r: train_one(task, "eve:bf16:bf16", 1e-2, settings(param_dtype="bf16", param_rounding=r), base,
                         torch.device("cpu")) for r in ("nearest", "stochastic", "kahan")}
    assert len({r.init_sha for r in runs.values()}) == 1
    assert len({tuple(r.train_loss) for r in runs.values()}) == 3          # three different trajectories
    # Eve in bf16: m bf16 (2 B per entry), v bf16 per output row (the bias: full); Kahan adds a bf16 buffer.
    eve = 2 * PARAMS + 2 * (128 + 128 + 256 + 10)
    assert runs["nearest"].state_bytes == runs["stochastic"].state_bytes == eve
    assert runs["kahan"].state_bytes == eve + 2 * PARAMS
    assert runs["kahan"].state_format == "m=bf16,v=bf16"


def test_a_folder_keeps_one_param_dtype_and_reads_folders_from_before_it(task, tmp_path):
    run_sweep(task, ["adamw"], [1e-2], settings(), tmp_path)
    with pytest.raises(SweepMismatch, match="param_dtype: 'fp32' there, 'bf16' now"):
        run_sweep(task, ["adamw"], [1e-2], settings(param_dtype="bf16"), tmp_path)
    doc = json.loads((tmp_path / "settings.json").read_text())
    for key in ("param_dtype", "param_rounding", "eval_dtype"):            # a folder written before them
        del doc[key]
    (tmp_path / "settings.json").write_text(json.dumps(doc))
    done = []
    run_sweep(task, ["adamw"], [1e-2], settings(), tmp_path, on_run_done=lambda r, was_done: done.append(was_done))
    assert done == [True]


def test_settings_refuse_a_rounding_without_bf16_parameters():
    with pytest.raises(ValueError, match="needs param_dtype 'bf16'"):
        SweepSettings(steps=4, param_rounding="stochastic")
    with pytest.raises(ValueError, match="param_dtype must be one of fp32, bf16"):
        SweepSettings(steps=4, param_dtype="fp16")


def test_seed_factories_change_the_batches_and_seed0_is_the_built_in_example():
    """examples/shakespeare_seeds.py: seed0 is `--example shakespeare`'s batches, seed1/seed2
    other windows of the same text (RESULTS.md pairs them with --seed S)."""
    from pathlib import Path

    from lowmem.cli.contract import load_example
    target = Path(__file__).resolve().parents[1] / "examples" / "shakespeare_seeds.py"
    builtin = load_example("shakespeare")
    tasks = [load_task(f"{target}:seed{k}") for k in range(3)]
    for split in ("train", "val"):
        b = [t.get_batch(5, split=split)[0] for t in tasks]
        assert torch.equal(b[0], builtin.get_batch(5, split=split)[0])
        assert not torch.equal(b[0], b[1]) and not torch.equal(b[1], b[2])
    assert tasks[1].get_val_batch is not None                      # a held-out split, as the example has


def test_the_command_records_specs_and_the_bf16_sweep_settings(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = cli("compare", tmp_path / "model.py", "--optimizers", "adamw,Eve:BF16:bf16", "--lrs", "1e-2",
                         "--param-dtype", "bf16", "--param-rounding", "kahan", "--out", tmp_path / "c", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["settings"]["param_dtype"], doc["settings"]["param_rounding"]) == ("bf16", "kahan")
    assert [(r["optimizer"], r["state_format"]) for r in doc["runs"]] == [("adamw", ""), ("eve:bf16:bf16", "m=bf16,v=bf16")]
    code, _, err = cli("compare", tmp_path / "model.py", "--optimizers", "adamw", "--lrs", "1e-2", "--param-dtype", "bf16",
                       "--out", tmp_path / "c")
    assert code == 2 and "param_rounding: 'kahan' there, 'nearest' now" in err


def test_a_bf16_folder_from_before_eval_dtype_is_refused_not_mixed(task, tmp_path):
    # Its held-out losses were computed in bf16: new runs (fp32) would not compare with them.
    run_sweep(task, ["adamw"], [1e-2], settings(param_dtype="bf16"), tmp_path)
    doc = json.loads((tmp_path / "settings.json").read_text())
    del doc["eval_dtype"]
    (tmp_path / "settings.json").write_text(json.dumps(doc))
    with pytest.raises(SweepMismatch, match="eval_dtype: 'param' there, 'fp32' now"):
        run_sweep(task, ["adamw"], [1e-2], settings(param_dtype="bf16"), tmp_path)


HOLDS = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        self.last_hidden = h          # a tensor of the forward pass, kept (not deep-copyable)
        return self.b(h)


def build_model():
    return Net()


def get_batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 32, generator=g, dtype=torch.float64)   # the task's own float dtype
    return x, (x[:, :10].argmax(1) + step) % 10


def get_val_batch(i: int):
    return get_batch(1000 + i)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)
'''


def test_a_bf16_sweep_evaluates_models_that_hold_tensors_and_float64_batches(tmp_path):
    # The fp32 evaluation upcasts the model in place (no copy: a model holding a tensor of its
    # forward pass cannot be deep-copied) and casts every float input to fp32 (float64 too).
    (tmp_path / "model.py").write_text(HOLDS)
    task = load_task(str(tmp_path / "model.py"))
    result = run_sweep(task, ["adamw"], [1e-2], settings(param_dtype="bf16"), tmp_path / "c")[0]
    assert result.status == "complete" and result.final_val_loss is not None
    torch.manual_seed(0)
    model = task.build_model().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(6):
        opt.param_groups[0]["lr"] = lr_at(step, 1e-2)
        x, y = task.get_batch(step)
        task.loss_fn(model, (x.bfloat16(), y)).backward()
        opt.step()
        opt.zero_grad()
    exact = model.float()
    with torch.no_grad():
        want = sum(float(task.loss_fn(exact, (task.get_val_batch(i)[0].float(), task.get_val_batch(i)[1])))
                   for i in range(2)) / 2
    assert result.final_val_loss == pytest.approx(want, rel=1e-6)


def test_a_settings_file_that_is_not_an_object_is_refused_by_name(task, tmp_path):
    (tmp_path / "settings.json").write_text("[1, 2]")
    with pytest.raises(SweepMismatch, match="not a settings object"):
        run_sweep(task, ["adamw"], [1e-2], settings(), tmp_path)
