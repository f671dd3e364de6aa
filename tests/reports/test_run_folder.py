"""read_run on run folders whose files belong to different models: refused, naming both files, the
two models and the parameters that differ; `lowmem-analyze report` exits 2 with that message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from torch import nn

from lowmem.compress import model_record, slimadam_rules
from lowmem.layers import resolve_layers
from lowmem.reports.run import RunFolderError, read_run
from lowmem.snr.trajectory import HEADER
from tiny_models import MLP_MODEL_PY

TINY = MLP_MODEL_PY


def net(out: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out))


def write_layers(folder, model: nn.Module) -> None:
    """layers.json as a run writes it (`lowmem.cli.main._start_run`)."""
    folder.mkdir(exist_ok=True)
    doc = {**resolve_layers(model, warn=False).to_json(), "model": model_record(model)}
    (folder / "layers.json").write_text(json.dumps(doc))


def test_a_plan_of_another_model_than_layers_json_is_refused_naming_both(tmp_path):
    write_layers(tmp_path, net(2))
    slimadam_rules(net(3)).save(tmp_path / "plan.json")
    with pytest.raises(RunFolderError) as err:
        read_run(tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'plan.json'} and {tmp_path / 'layers.json'} describe different models" in msg
    # 4·8 + 8 + 8·3 + 3 = 67 parameters in the plan's model, 4·8 + 8 + 8·2 + 2 = 58 in layers.json's
    assert "the plan is for Sequential with 67 parameters (sha256:" in msg
    assert "layers.json for Sequential with 58 parameters (sha256:" in msg
    assert "different shapes: 2.weight (plan [3, 8], layers [2, 8]), 2.bias (plan [3], layers [2])" in msg


def test_names_only_in_one_file_are_listed(tmp_path):
    write_layers(tmp_path, net(2))
    slimadam_rules(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))) \
        .save(tmp_path / "plan.json")
    with pytest.raises(RunFolderError) as err:
        read_run(tmp_path)
    msg = str(err.value)
    # the 3-layer net has 0.*, 2.* (8, 8) and 4.*: 2.* differs in shape, 4.* is only in the plan
    assert "different shapes: 2.weight (plan [8, 8], layers [2, 8]), 2.bias (plan [8], layers [2])" in msg
    assert "only in plan.json: 4.weight, 4.bias" in msg
    assert "only in layers.json" not in msg


def test_the_same_model_with_an_edited_fingerprint_is_read(tmp_path):
    write_layers(tmp_path, net(2))
    plan = slimadam_rules(net(2))
    plan.model["fingerprint"] = "sha256:edited"
    plan.save(tmp_path / "plan.json")
    run = read_run(tmp_path)
    assert list(run.plan.layers) == [info.name for info in run.layers] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_killed_run_whose_trajectory_is_another_models_is_refused(tmp_path):
    write_layers(tmp_path, net(2))
    rows = [f"{step},enc.fc.weight,8x4,raw:8x4,1,2.0,1.0,0.5" for step in (5, 10)]
    (tmp_path / "snr.csv.part").write_text(",".join(HEADER) + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(RunFolderError) as err:
        read_run(tmp_path)
    msg = str(err.value)
    assert "snr.csv.part: no plan can be rebuilt from it with" in msg and "layers.json" in msg
    assert "none of the model's 4 parameters has an SNR sample" in msg and "the trajectory has enc.fc.weight" in msg


def run_cli(cwd, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=180, env=env)


def test_report_of_a_folder_mixing_two_runs_exits_2_naming_both_models(tmp_path):
    (tmp_path / "a.py").write_text(textwrap.dedent(TINY))
    (tmp_path / "b.py").write_text(textwrap.dedent(TINY).replace("nn.Linear(8, 2)", "nn.Linear(8, 3)"))
    for name in ("a", "b"):
        r = run_cli(tmp_path, f"{name}.py", "--preset", "slimadam-rules", "--out", name, "-q", "--no-html",
                    "--device", "cpu")
        assert r.returncode == 0, r.stderr
    shutil.copy(tmp_path / "b" / "plan.json", tmp_path / "a" / "plan.json")    # b's plan in a's folder
    r = run_cli(tmp_path, "report", "a", "--no-html")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert "a/plan.json and a/layers.json describe different models" in r.stderr
    assert "the plan is for Sequential with 67 parameters" in r.stderr
    assert "layers.json for Sequential with 58 parameters" in r.stderr
    assert "2.weight (plan [3, 8], layers [2, 8])" in r.stderr
