"""The real `lowmem-analyze` in a subprocess, given plans it must refuse and a plan window that holds
no measured step: exit 2, one message naming the layer (or the steps), no traceback, nothing lost."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lowmem.snr.trajectory import HEADER
from tiny_models import MLP_MODEL_PY

TINY = MLP_MODEL_PY


def run(cwd, *args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """model.py and the plan.json of its published rules (a valid plan to edit)."""
    tmp = tmp_path_factory.mktemp("plans")
    (tmp / "model.py").write_text(textwrap.dedent(TINY))
    r = run(tmp, "model.py", "--preset", "slimadam-rules", "--out", "a", "-q", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return tmp


# (edit of layer 0.weight, (8, 4) in the model; words the message must hold)
BAD = {
    "negative-view": (dict(view=[-8, -4]), "view [-8, -4] must be integers >= 0"),
    "huge-shape": (dict(shape=[1e30, 4]), '"shape" must be a list of integers, found [1e+30, 4]'),
    "reduce-all": (dict(reduce="all"), '"reduce" must be null (full Adam) or a list of view dims (integers), found "all"'),
    "reduce-half": (dict(reduce=[0.5]), '"reduce" must be null (full Adam) or a list of view dims (integers), found [0.5]'),
    # consistent in itself, the model's fingerprint kept: only the comparison with the model finds it
    "edited-shape": (dict(shape=[16, 4], view=[16, 4]), "0.weight (plan [16, 4], model [8, 4])"),
}


@pytest.mark.parametrize("command", [[], ["memory"]], ids=["analyze", "memory"])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_plan_is_a_usage_error_naming_the_layer(folder, command, case):
    edit, words = BAD[case]
    doc = json.loads((folder / "a" / "plan.json").read_text())
    doc["layers"]["0.weight"].update(edit)
    bad = folder / f"{case}.json"
    bad.write_text(json.dumps(doc))
    extra = ["--device", "cpu", "--out", f"out-{case}"] if not command else []
    r = run(folder, *command, "model.py", "--plan", bad.name, *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert "0.weight" in r.stderr and words in r.stderr


def test_a_window_without_measured_steps_exits_2_and_keeps_the_probes_files(tmp_path):
    (tmp_path / "model.py").write_text(textwrap.dedent(TINY))
    # a window past the probe's last step is refused before training: nothing to lose
    r = run(tmp_path, "model.py", "--steps", "20", "--every", "1", "--window", "1000:2000", "--out", "o",
            "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert "--window 1000:2000 starts after the last step the probe runs (20)" in r.stderr
    assert not (tmp_path / "o").exists()
    # a window between measurements is found empty after training: the probe's files stay
    r = run(tmp_path, "model.py", "--steps", "20", "--every", "10", "--window", "3:7", "--out", "o",
            "--device", "cpu")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "window [3, 7] holds no measured step; the 2 measured steps are 10, 20" in r.stderr
    out = tmp_path / "o"
    with open(out / "snr.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == HEADER
    assert sorted({int(row[0]) for row in rows[1:]}) == [10, 20]
    layers = json.loads((out / "layers.json").read_text())
    assert [p["name"] for p in layers["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not (out / "plan.json").exists()
