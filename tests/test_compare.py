"""lowmem.compare and `lowmem-analyze compare` / `--validate`: the same start and batches for every
run, AdamW's run against a hand-written torch.optim.AdamW loop, an empty plan against AdamW's
trajectory, resume after an interruption, divergence, the CSV schema, and bad input."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowmem.cli.contract import load_task
from cli_runner import cli
from lowmem.compare import (EXTRA_COLUMNS, OPTIMIZERS, SweepMismatch, SweepSettings, plan_digest, run_sweep,
                            train_one)
from lowmem.compress import Plan
from lowmem.compress.builders import slimadam_rules
from lowmem.compress.memory import plan_state_memory
from lowmem.reports.run import COMPARE_COLUMNS, CURVE_COLUMNS
from tiny_models import SOURCE

MODEL = SOURCE + '''\
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, WIDTH)
        self.ln = nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.c_fc = nn.Linear(WIDTH, 2 * WIDTH)
        self.c_proj = nn.Linear(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 11, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.attn(self.ln(x))
        x = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return self.head(x)


def build_model():
    return Net()


def get_batch(step, split="train"):
    g = torch.Generator().manual_seed(step * 2 + (split != "train"))
    x = torch.randint(0, 11, (4, T + 1), generator=g)
    x[:, 1:] = (x[:, :-1] * 3 + 1) % 11          # learnable: next token = 3x + 1 mod 11
    return x[:, :-1], x[:, 1:]


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))

LOWMEM = {"steps": 12, "lr": 1e-2}
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    (folder / "model.py").write_text(MODEL)
    return load_task(str(folder / "model.py"))


def settings(**kw) -> SweepSettings:
    return SweepSettings(**{"steps": 12, "warmup": 2, "eval_every": 4, "eval_batches": 2, "tail": 3, **kw})


def test_every_run_starts_from_the_same_weights_and_sees_the_same_batches(task, tmp_path):
    results = run_sweep(task, ["eve", "adamw", "adam-mini"], [1e-3, 1e-2], settings(), tmp_path)
    assert [(r.optimizer, r.lr) for r in results] == [("adamw", 1e-3), ("eve", 1e-3), ("adam-mini", 1e-3),
                                                      ("adamw", 1e-2), ("eve", 1e-2), ("adam-mini", 1e-2)]
    # Independent: the hashes of a fresh seeded model's state and of the first 12 batches.
    from lowmem.compare import _batch_tensors, _sha_tensors
    torch.manual_seed(0)
    model = task.build_model()
    assert {r.init_sha for r in results} == {_sha_tensors(model.state_dict().values()).hexdigest()}
    h = None
    for step in range(12):
        h = _sha_tensors(_batch_tensors(task.get_batch(step)), h)
    assert {r.batches_sha for r in results} == {h.hexdigest()}
    # Different optimizers went different ways from that start.
    assert len({r.train_loss[-1] for r in results}) == len(results)
    assert all(r.train_loss[0] == results[0].train_loss[0] for r in results)      # step 0: same weights, same batch


def test_adamw_run_is_a_hand_written_adamw_loop(task):
    """The sweep's AdamW run equals torch.optim.AdamW driven by hand with the same schedule."""
    s = settings(weight_decay=0.1)
    torch.manual_seed(0)
    base = task.build_model()
    result = train_one(task, "adamw", 3e-3, s, base, torch.device("cpu"))

    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for step in range(12):
        lr = 3e-3 * (step + 1) / 2 if step < 2 else \
            3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 9)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = task.loss_fn(model, task.get_batch(step))
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert result.train_loss == pytest.approx(losses, rel=1e-6)
    assert result.final_train_loss == pytest.approx(sum(losses[-3:]) / 3, rel=1e-6)
    model.eval()
    with torch.no_grad():
        val = sum(float(task.loss_fn(model, task.get_val_batch(i))) for i in range(2)) / 2
    assert result.final_val_loss == pytest.approx(val, rel=1e-6)
    assert result.state_bytes == 2 * 4 * sum(p.numel() for p in model.parameters())   # m and v, fp32


def test_a_plan_that_compresses_nothing_follows_adamws_trajectory(task, tmp_path):
    """SlimAdam from an all-full-Adam plan is AdamW, so its distance to AdamW's weights stays at
    float32 round-off while Eve's grows."""
    torch.manual_seed(0)
    model = task.build_model()
    doc = slimadam_rules(model).to_json()
    for layer in doc["layers"].values():   # every layer full Adam
        layer.update(view=layer["shape"], reduce=None)
        layer.pop("parts", None)
    empty = Plan.from_json(doc)
    assert all(lp.reduce is None for lp in empty.layers.values())
    results = run_sweep(task, ["adamw", "slimadam", "eve"], [1e-2], settings(slimadam=plan_digest(empty)), tmp_path,
                        plan=empty)
    adamw, slim, eve = results
    slim_d = [d for _, _, d in slim.evals if d is not None]
    eve_d = [d for _, _, d in eve.evals if d is not None]
    assert len(slim_d) == len(eve_d) == 4                  # steps 0, 4, 8, 12
    assert slim_d[0] == eve_d[0] == 0.0
    assert max(slim_d) < 1e-4 and eve_d[-1] > 1e-2
    assert slim.train_loss == pytest.approx(adamw.train_loss, rel=1e-5)


def test_resume_after_an_interruption_gives_the_same_table(task, tmp_path):
    opts, lrs, s = ["adamw", "eve", "adalayer"], [1e-3, 1e-2], settings()
    whole = run_sweep(task, opts, lrs, s, tmp_path / "whole")

    calls = {"steps": 0}

    def stop_in_the_fourth_run(step, loss):
        calls["steps"] += 1
        if calls["steps"] == 3 * 12 + 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(task, opts, lrs, s, tmp_path / "cut", on_step=stop_in_the_fourth_run)
    assert len(list((tmp_path / "cut" / "runs").glob("*@*.json"))) == 3        # the run in progress is lost
    resumed, trained = [], []
    again = run_sweep(task, opts, lrs, s, tmp_path / "cut",
                      on_run_done=lambda r, was_done: (resumed if was_done else trained).append((r.optimizer, r.lr)))
    assert resumed == [("adamw", 1e-3), ("eve", 1e-3), ("adalayer", 1e-3)]
    assert trained == [("adamw", 1e-2), ("eve", 1e-2), ("adalayer", 1e-2)]

    def table(folder):
        rows = list(csv.DictReader(open(folder / "compare.csv")))
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]   # timings differ

    assert table(tmp_path / "cut") == table(tmp_path / "whole")
    curves = lambda f: (f / "curves.csv").read_text()  # noqa: E731
    assert curves(tmp_path / "cut") == curves(tmp_path / "whole")
    assert [r.train_loss for r in again] == [r.train_loss for r in whole]


def test_a_diverging_learning_rate_is_recorded_and_the_sweep_goes_on(task, tmp_path):
    results = run_sweep(task, ["adamw", "eve"], [1e-2, 1e7], settings(), tmp_path)
    status = {(r.optimizer, r.lr): r.status for r in results}
    assert status[("adamw", 1e-2)] == "complete" and status[("eve", 1e-2)] == "complete"
    assert status[("adamw", 1e7)] == "diverged" and status[("eve", 1e7)] == "diverged"
    rows = {(r["optimizer"], float(r["lr"])): r for r in csv.DictReader(open(tmp_path / "compare.csv"))}
    bad = rows[("adamw", 1e7)]
    assert bad["status"] == "diverged" and bad["final_train_loss"] == "" and int(bad["steps_done"]) < 12
    curve = [r for r in csv.DictReader(open(tmp_path / "curves.csv")) if r["optimizer"] == "adamw" and float(r["lr"]) == 1e7]
    assert not math.isfinite(float(curve[-1]["train_loss"]))          # the loss that stopped it


def test_csv_schema_is_the_documented_one(task, tmp_path):
    run_sweep(task, ["adamw"], [1e-2], settings(), tmp_path)
    assert next(csv.reader(open(tmp_path / "compare.csv"))) == [*COMPARE_COLUMNS, *EXTRA_COLUMNS]
    assert next(csv.reader(open(tmp_path / "curves.csv"))) == list(CURVE_COLUMNS)
    assert COMPARE_COLUMNS == ("optimizer", "lr", "status", "steps_done", "final_train_loss", "final_val_loss",
                               "state_bytes", "step_seconds")
    assert CURVE_COLUMNS == ("optimizer", "lr", "step", "train_loss", "val_loss", "distance_to_adamw")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for column in (*COMPARE_COLUMNS, *EXTRA_COLUMNS, *CURVE_COLUMNS):
        assert f"`{column}`" in readme, column
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert [int(r["step"]) for r in curves] == list(range(13))
    assert [int(r["step"]) for r in curves if r["val_loss"]] == [0, 4, 8, 12]


def test_a_folder_with_another_sweep_is_refused(task, tmp_path):
    run_sweep(task, ["adamw"], [1e-2], settings(), tmp_path)
    with pytest.raises(SweepMismatch, match="steps: 12 there, 10 now"):
        run_sweep(task, ["adamw"], [1e-2], settings(steps=10), tmp_path)


def test_schedule_warms_up_then_decays_to_the_floor():
    s = SweepSettings(steps=11, warmup=2, min_lr_ratio=0.1)
    assert [s.lr_at(i, 1.0) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert s.lr_at(10, 1.0) == pytest.approx(0.1)
    assert s.lr_at(6, 1.0) == pytest.approx(0.55)
    assert SweepSettings(steps=5, schedule="constant").lr_at(4, 2.0) == 2.0


def test_every_optimizer_name_trains(task, tmp_path):
    results = run_sweep(task, list(OPTIMIZERS), [3e-3], settings(steps=4, eval_every=2), tmp_path)
    assert [r.optimizer for r in results] == list(OPTIMIZERS)
    assert all(r.status == "complete" and r.steps_done == 4 for r in results)
    state = {r.optimizer: r.state_bytes for r in results}
    assert all(state[n] < state["adamw"] for n in OPTIMIZERS if n != "adamw")


# -- the command ---------------------------------------------------------------------------------


def test_compare_command_table_json_and_rerun(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    args = ["compare", tmp_path / "model.py", "--optimizers", "adamw,eve", "--lrs", "1e-2,3e-3,1e7", "--steps", "8",
            "--out", tmp_path / "c"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "lr 0.003" in out and "div" in out and "eve" in out
    assert (tmp_path / "c" / "report.html").exists()
    code, out, err = cli(*args, "--format", "json")
    assert code == 0
    assert err.count("finished earlier") == 6                           # nothing retrained
    doc = json.loads(out)
    assert [(r["optimizer"], r["lr"]) for r in doc["runs"]][:2] == [("adamw", 0.003), ("eve", 0.003)]
    code, _, err = cli(*args[:-2], "--steps", "9", "--out", tmp_path / "c")
    assert code == 2 and "other settings" in err
    code, _, err = cli(*args[:-2], "--steps", "9", "--out", tmp_path / "c", "--fresh")
    assert code == 0, err


@pytest.mark.parametrize("flags, message", [
    (["--optimizers", "adamw,sgd"], "unknown optimizer 'sgd'; known: adamw,"),
    (["--lrs", "1e-3,-1"], "learning rates must be finite and > 0"),
    (["--lrs", "fast"], "expected learning rates"),
    (["--betas", "0.9"], "expected two numbers"),
    (["--warmup", "50"], "--warmup 50 must be below --steps 12"),
])
def test_compare_bad_flags_exit_2(tmp_path, flags, message):
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = cli("compare", tmp_path / "model.py", *flags, "--out", tmp_path / "c")
    assert code == 2 and message in err and out == ""


def test_compare_refuses_a_plan_for_another_model(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    code, _, err = cli("--example", "binary", "--preset", "eve", "--out", tmp_path / "b", "-q")
    assert code == 0
    code, _, err = cli("compare", tmp_path / "model.py", "--plan", tmp_path / "b" / "plan.json", "--out", tmp_path / "c")
    assert code == 2 and "does not fit the model" in err


def test_validate_reports_the_gap_and_the_measured_memory(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = cli(tmp_path / "model.py", "--steps", "12", "--every", "3", "--validate", "10",
                         "--out", tmp_path / "o", "--format", "json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    v = doc["validation"]
    assert v["steps"] == 10 and v["loss_name"] == "held-out loss"
    assert v["loss_gap"] == pytest.approx(v["plan"]["final_val_loss"] - v["adamw"]["final_val_loss"])
    # Measured state of the plan optimizer == the plan's estimate (m + reduced v, fp32), by hand.
    plan = Plan.load(tmp_path / "o" / "plan.json")
    mem = plan_state_memory(plan)
    assert v["adamw_state_bytes"] == mem.adamw_bytes and v["plan_state_bytes"] == mem.plan_bytes
    rows = list(csv.DictReader(open(tmp_path / "o" / "validate" / "compare.csv")))
    assert [r["optimizer"] for r in rows] == ["adamw", "plan"]
    assert 'id="compare-table"' in (tmp_path / "o" / "report.html").read_text()   # the report shows the runs


def test_ctrl_c_keeps_finished_runs_and_the_same_command_resumes(tmp_path):
    (tmp_path / "slow.py").write_text(MODEL.replace("def get_batch(step, split=\"train\"):\n",
                                                    "def get_batch(step, split=\"train\"):\n    import time; time.sleep(0.01)\n"))
    cmd = [sys.executable, "-m", "lowmem.cli.main", "compare", "slow.py", "--optimizers", "adamw,eve,adalayer",
           "--lrs", "1e-2", "--steps", "30", "--out", "c", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "c" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not (runs.exists() and list(runs.glob("eve@*.json"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "run the same command to resume" in stderr and "Traceback" not in stderr
    kept = sorted(p.name for p in runs.glob("*@*.json"))
    assert "adamw@0.01.json" in kept and "eve@0.01.json" in kept
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "adamw lr 0.01: finished earlier" in r.stderr and "eve lr 0.01: finished earlier" in r.stderr
    assert [row["optimizer"] for row in csv.DictReader(open(tmp_path / "c" / "compare.csv"))] == ["adamw", "eve", "adalayer"]


def test_held_out_split_comes_from_get_val_batch_or_a_split_argument(tmp_path):
    (tmp_path / "a.py").write_text(MODEL)
    assert load_task(str(tmp_path / "a.py")).get_val_batch is not None
    (tmp_path / "b.py").write_text(MODEL.replace('def get_batch(step, split="train"):', 'def get_batch(step):').replace(
        '(split != "train")', '0'))
    assert load_task(str(tmp_path / "b.py")).get_val_batch is None
    (tmp_path / "c.py").write_text(MODEL + "\n\ndef get_val_batch(i):\n    return get_batch(1000 + i)\n")
    task = load_task(str(tmp_path / "c.py"))
    x, _ = task.get_val_batch(2)
    assert torch.equal(x, task.get_batch(1002)[0])
    from lowmem.cli.contract import load_example
    assert load_example("binary").get_val_batch is None       # 16 random sequences: nothing to hold out


def test_shakespeare_held_out_windows_come_from_text_never_trained_on():
    """Every held-out window lies in the last 10% of the text and every training window in the
    first 90%, found by searching the raw bytes."""
    from lowmem.cli.contract import load_example
    from lowmem.examples import shakespeare
    ids, _ = shakespeare._corpus()
    n_val = int(len(ids) * shakespeare.val_fraction)
    train, val = bytes(ids[:-n_val].tolist()), bytes(ids[-n_val:].tolist())
    task = load_example("shakespeare")
    for i in range(3):
        for row in task.get_val_batch(i)[0]:
            assert val.find(bytes(row.tolist())) >= 0
        for row in task.get_batch(i)[0]:
            assert train.find(bytes(row.tolist())) >= 0


def test_a_get_batch_that_is_not_deterministic_is_refused(tmp_path):
    # Seeded by a call counter: the second run gets other batches (a global seed would not show it,
    # since every run starts from torch.manual_seed(seed)).
    (tmp_path / "model.py").write_text(MODEL.replace("g = torch.Generator().manual_seed(step * 2 + (split != \"train\"))",
                                                     "g = torch.Generator().manual_seed(next(CALLS))")
                                       + "\nimport itertools\nCALLS = itertools.count()\n")
    code, _, err = cli("compare", tmp_path / "model.py", "--optimizers", "adamw,eve", "--lrs", "1e-2", "--steps", "4",
                       "--out", tmp_path / "c")
    assert code == 3 and "must be deterministic per step" in err


def test_an_edited_model_does_not_join_an_earlier_sweep(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    args = ["compare", tmp_path / "model.py", "--optimizers", "adamw", "--lrs", "1e-2", "--steps", "4", "--out", tmp_path / "c"]
    assert cli(*args)[0] == 0
    (tmp_path / "model.py").write_text(MODEL.replace("self.head = nn.Linear(WIDTH, 11, bias=False)",
                                                     "self.head = nn.Linear(WIDTH, 11, bias=True)"))
    code, _, err = cli(*args)
    assert code == 2 and "initial weights differ" in err


def test_an_unreadable_run_file_is_trained_again(task, tmp_path):
    first = run_sweep(task, ["adamw", "eve"], [1e-2], settings(), tmp_path)
    (tmp_path / "runs" / "eve@0.01.json").write_text('{"optimizer": "eve", "lr": 0.0')      # cut short
    trained = []
    with pytest.warns(UserWarning, match="unreadable"):
        again = run_sweep(task, ["adamw", "eve"], [1e-2], settings(), tmp_path,
                          on_run_done=lambda r, was_done: was_done or trained.append(r.optimizer))
    assert trained == ["eve"]
    assert again[1].train_loss == first[1].train_loss


def test_training_loss_is_named_as_such_without_held_out_batches(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = cli("compare", tmp_path / "model.py", "--optimizers", "adamw", "--lrs", "1e-2", "--steps", "4",
                         "--eval-batches", "0", "--out", tmp_path / "c")
    assert code == 0 and "Final training loss" in out and "--eval-batches 0" in err


def test_validate_runs_for_a_preset_plan_too(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    code, out, err = cli(tmp_path / "model.py", "--preset", "eve", "--validate", "4", "--out", tmp_path / "o",
                         "--format", "json", "-q")
    assert code == 0, err
    v = json.loads(out)["validation"]
    assert v["steps"] == 4 and v["plan_state_bytes"] < v["adamw_state_bytes"]
