"""The decision table at the end of an analysis: each candidate optimizer's state, the traced peak
of a training step with it, the largest micro-batch within ``--fit`` and the loss gap of
``--validate``; in ``peak.json`` for ``lowmem-analyze report``; and an analysis whose step cannot
be traced keeps everything else.
"""

from __future__ import annotations

import json

import pytest
import torch

import lowmem
from cli_runner import cli
from lowmem.compress.peak import resized_batch, trace_peak
from lowmem.cli.contract import load_task

MODEL = '''\
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8)){cast}

def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 64, generator=g){cast}
    return x, x[:, :8] * 2

def loss_fn(model, batch):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y){extra}
    return loss

LOWMEM = {{"steps": 8, "every": 4}}
'''


def write(tmp_path, cast: str = "", extra: str = ""):
    path = tmp_path / "model.py"
    path.write_text(MODEL.format(cast=cast, extra=extra))
    return path


def _shapes():
    return [p.numel() for p in torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 256),
                                                   torch.nn.Linear(256, 8)).parameters()]


def test_the_analysis_ends_with_state_peak_largest_batch_and_loss_gap(tmp_path):
    model = write(tmp_path)
    budget = 2_000_000
    code, out, err = cli(model, "--out", tmp_path / "out", "--fit", budget, "--validate", 6, "--format", "json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    rows = {r["optimizer"]: r for r in doc["decision"]}
    assert json.loads((tmp_path / "out" / "peak.json").read_text()) == doc["peak"]
    assert doc["peak"]["budget"] == budget and doc["peak"]["param_dtype"] == "fp32"
    # AdamW's state by hand: fp32 m and v of every parameter, and one fp32 step counter per tensor
    numel = _shapes()
    assert rows["adamw"]["state_bytes"] == 8 * sum(numel) + 4 * len(numel)
    # the plan's state: what its optimizer, built for real and stepped once, keeps
    task = load_task(str(model))
    net = task.build_model()
    opt = lowmem.optimizer_from_plan(net, tmp_path / "out" / "plan.json", lr=1e-3)
    task.loss_fn(net, task.get_batch(0)).backward()
    opt.step()
    kept = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    assert rows["plan"]["state_bytes"] == kept < rows["adamw"]["state_bytes"]
    # the largest batch, checked with the trace of whole steps (not the analysis's combined parts)
    for name in ("adamw", "plan"):
        fits = rows[name]["largest_batch"]
        assert fits >= 1 and rows[name]["peak_bytes"] > 0

        def peak_at(b, name=name):
            make = ((lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)) if name == "adamw" else
                    (lambda m: lowmem.optimizer_from_plan(m, tmp_path / "out" / "plan.json", lr=1e-3,
                                                          backend="foreach")))
            return trace_peak(task.build_model, lambda: resized_batch(task.get_batch(0), b), task.loss_fn, make).peak

        assert peak_at(fits) <= budget < peak_at(fits + 1), name
    # the loss gap is the validation's own: the plan's held-out loss minus AdamW's, same steps and lr
    assert rows["plan"]["loss_gap"] == pytest.approx(doc["validation"]["loss_gap"], abs=1e-12)
    assert rows["adamw"]["loss_gap"] == 0.0 and rows["eve"]["loss_gap"] is None


def test_the_report_rebuilds_the_decision_from_the_folder(tmp_path):
    code, out, err = cli(write(tmp_path), "--out", tmp_path / "out", "-q")
    assert code == 0, err
    assert "The decision" in out and "max batch" not in out        # no --fit: no budget column
    code, again, err = cli("report", tmp_path / "out", "--no-html", "-q")
    assert code == 0, err
    assert again[again.index("The decision"):] == out[out.index("The decision"):out.index("What next")].rstrip() + "\n"
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="decision-table"' in html


def test_bf16_parameters_are_traced_as_built(tmp_path):
    code, out, err = cli(write(tmp_path, cast=".to(torch.bfloat16)"), "--out", tmp_path / "out", "--format", "json",
                         "-q")
    assert code == 0, err
    peak = json.loads(out)["peak"]
    assert peak["param_dtype"] == "bf16"
    assert peak["rows"][0]["weights"] == 2 * sum(_shapes())


def test_a_step_that_cannot_be_traced_keeps_the_analysis_and_shows_state_only(tmp_path):
    # a loss_fn that reads a value (.item()) trains fine but cannot be traced on fake tensors
    model = write(tmp_path, extra="\n    assert loss.item() >= 0")
    code, out, err = cli(model, "--out", tmp_path / "out")
    assert code == 0, err
    assert "peak memory not traced" in err and "model.py" in err and "loss.item()" in err
    assert (tmp_path / "out" / "plan.json").is_file() and not (tmp_path / "out" / "peak.json").exists()
    tail = out[out.index("The decision"):]
    assert "state only" in tail and "peak" not in tail.split("\n")[1]          # the header: no peak column
    memory = json.loads((tmp_path / "out" / "memory.json").read_text())
    adamw = next(r for r in memory["optimizers"] if r["name"] == "adamw")
    assert lowmem.compress.format_bytes(adamw["total_bytes"]) in tail


@pytest.mark.parametrize("args, message", [(("--fit", "12XB"), "invalid size"),
                                           (("--fit", "1GiB", "--no-peak"), "--no-peak"),
                                           (("--fit", "1GiB", "--plan", "plan.json"), "--plan plan.json --peak --fit SIZE")])
def test_bad_budgets_are_usage_errors(tmp_path, args, message):
    code, _, err = cli(write(tmp_path), "--out", tmp_path / "out", *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_no_peak_writes_no_peak_json(tmp_path):
    code, out, err = cli(write(tmp_path), "--out", tmp_path / "out", "--no-peak", "--format", "json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["peak"] is None and not (tmp_path / "out" / "peak.json").exists()
    assert [r["optimizer"] for r in doc["decision"]][:2] == ["adamw", "slimadam"]


CUSTOM_BACKWARD = '''\
import torch
from torch import nn

class Through(torch.autograd.Function):
    """The identity, with a backward that goes through numpy: fine for real, not on fake tensors."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.numpy().copy())

def build_model():
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))

def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=g)
    return x, x[:, :4]

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(Through.apply(model(x)), y)

LOWMEM = {"steps": 8, "every": 4}
'''


def test_a_backward_that_fails_on_fake_tensors_is_a_note_not_a_failure(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(CUSTOM_BACKWARD)
    code, out, err = cli(path, "--out", tmp_path / "out")
    assert code == 0, err
    assert "peak memory not traced" in err and "cannot run on fake tensors" in err
    assert (tmp_path / "out" / "report.html").is_file() and "The decision" in out
    assert not (tmp_path / "out" / "peak.json").exists()


def test_a_batch_that_cannot_be_resized_keeps_its_own_peak_without_a_largest_batch(tmp_path):
    # the batch carries a (4,) weight that is not batched: at its own size the step traces, but
    # no other size along dimension 0 works, so --fit finds no largest batch and says why
    model = write(tmp_path).read_text().replace(
        "    return x, x[:, :8] * 2", "    return x, x[:, :8] * 2, torch.ones(4)").replace(
        "    x, y = batch\n", "    x, y, w = batch\n").replace(
        "mse_loss(model(x), y)", "mse_loss(model(x), y) + (x[:, :4] * w).mean()")
    (tmp_path / "model.py").write_text(model)
    code, out, err = cli(tmp_path / "model.py", "--out", tmp_path / "out", "--fit", "1GiB", "--format", "json", "-q")
    assert code == 0, err
    rows = {r["optimizer"]: r for r in json.loads(out)["decision"]}
    assert rows["adamw"]["peak_bytes"] > 0 and rows["adamw"]["largest_batch"] is None
    assert "dimension 0" in rows["adamw"]["error"]
    assert json.loads(out)["peak"]["batch"] == 32            # the batch's own size, as traced


def test_a_validation_of_another_plan_gives_the_folders_plan_no_loss_gap(tmp_path):
    model = write(tmp_path)
    assert cli(model, "--out", tmp_path / "o", "--no-peak", "-q")[0] == 0
    assert cli(model, "--preset", "adam-mini", "--out", tmp_path / "p", "--no-peak", "-q")[0] == 0
    code, _, err = cli(model, "--plan", tmp_path / "p" / "plan.json", "--validate", 4, "--out", tmp_path / "o", "-q")
    assert code == 0, err
    code, out, err = cli("report", tmp_path / "o", "--no-html", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    rows = {r["optimizer"]: r for r in doc["decision"]}
    assert rows["plan"]["loss_gap"] is None and rows["adamw"]["loss_gap"] == 0.0
    assert any("another plan" in n for n in doc["notes"])
    # validated with the folder's own plan, the gap is there
    code, _, err = cli(model, "--plan", tmp_path / "o" / "plan.json", "--validate", 4, "--out", tmp_path / "o", "-q")
    assert code == 0, err
    doc = json.loads(cli("report", tmp_path / "o", "--no-html", "--format", "json")[1])
    assert {r["optimizer"]: r for r in doc["decision"]}["plan"]["loss_gap"] is not None
