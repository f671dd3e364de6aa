"""The real `lowmem-analyze` command in a subprocess: exit codes, messages, nothing lost."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lowmem.compress import Plan
from lowmem.snr.trajectory import HEADER
from tiny_models import MLP_MODEL_PY

TINY = MLP_MODEL_PY


def run(tmp_path, *args, source=None, name="model.py", timeout=120):
    if source is not None:
        (tmp_path / name).write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", *map(str, args), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def measured_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == HEADER
    return sorted({int(r[0]) for r in rows[1:]})


def test_missing_file_and_folder_are_usage_errors(tmp_path):
    r = run(tmp_path, "nope.py")
    assert r.returncode == 2 and "nope.py: no such file" in r.stderr and r.stdout == ""
    (tmp_path / "pkg").mkdir()
    r = run(tmp_path, "pkg")
    assert r.returncode == 2 and "is a folder" in r.stderr


def test_missing_function_suggests_the_near_name(tmp_path):
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=TINY.replace("def build_model", "def build_modle"))
    assert r.returncode == 3
    assert "build_model: not found. Did you mean 'build_modle'?" in r.stderr
    src = TINY + "\nclass T: pass\ndef factory():\n    import sys\n    return sys.modules[__name__]\n"
    r = run(tmp_path, "model.py:factroy", "--steps", "2", "--every", "1", source=src)
    assert r.returncode == 3 and "has no function 'factroy'. Did you mean 'factory'?" in r.stderr


@pytest.mark.parametrize("patch, expected", [
    (("return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))", "return {'model': 1}"),
     "build_model() in model.py must return a torch.nn.Module, it returned dict"),
    (("return ((model(x) - y) ** 2).mean()", "return float(((model(x) - y) ** 2).mean())"),
     "must return a scalar torch.Tensor, it returned float at step 0"),
    (("return ((model(x) - y) ** 2).mean()", "return ((model(x) - y) ** 2)"),
     "must return a scalar (mean-reduced) loss, it returned a tensor of shape (16, 2) at step 0; use reduction='mean'"),
])
def test_wrong_return_types_and_non_scalar_loss(tmp_path, patch, expected):
    r = run(tmp_path, "model.py", "--steps", "3", "--every", "1", source=TINY.replace(*patch))
    assert r.returncode == 3, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr


def test_build_optimizer_returning_a_string(tmp_path):
    r = run(tmp_path, "model.py", "--steps", "2", "--every", "1", source=TINY + "\ndef build_optimizer(model):\n    return 'adam'\n")
    assert r.returncode == 3 and "build_optimizer(model) in model.py must return a torch.optim.Optimizer, it returned str" in r.stderr


def test_user_error_mid_run_names_file_and_line_and_keeps_samples(tmp_path):
    src = TINY.replace("    x, y = batch\n", "    x, y = batch\n    if x.shape[0] and torch.equal(x, get_batch(7)[0]):\n        raise ValueError('bad row')\n")
    r = run(tmp_path, "model.py", "--steps", "20", "--every", "2", "--out", "out", source=src)
    assert r.returncode == 3
    assert "loss_fn(model, batch) in model.py raised ValueError: bad row" in r.stderr
    assert 'model.py", line' in r.stderr
    # Steps 0..6 ran: 7 optimizer steps, measurements at 2, 4, 6 are kept.
    assert measured_steps(tmp_path / "out" / "snr.csv") == [2, 4, 6]


def test_nan_loss_stops_keeps_samples_and_writes_plan_from_them(tmp_path):
    src = TINY.replace("    return x, x[:, :2] * 2", "    y = x[:, :2] * 2\n    return x, (y * float('nan') if step == 5 else y)")
    r = run(tmp_path, "model.py", "--steps", "20", "--every", "2", "--out", "out", source=src)
    assert r.returncode == 3
    assert "loss is nan at step 5 (get_batch(5))" in r.stderr
    out = tmp_path / "out"
    assert measured_steps(out / "snr.csv") == [2, 4]          # 5 optimizer steps ran before the NaN
    plan = Plan.load(out / "plan.json")
    assert plan.source["status"] == "nonfinite_loss" and plan.source["steps_done"] == 5
    assert "wrote" in r.stderr and "plan.json" in r.stderr


def test_optimizer_without_adam_state_and_shadow_v(tmp_path):
    src = TINY + "\ndef build_optimizer(model):\n    return torch.optim.SGD(model.parameters(), lr=0.1)\n"
    r = run(tmp_path, "model.py", "--steps", "4", "--every", "2", "--out", "out", source=src)
    assert r.returncode == 3
    assert "SGD keeps no 'exp_avg_sq'" in r.stderr and "--shadow-v" in r.stderr
    r = run(tmp_path, "model.py", "--steps", "4", "--every", "2", "--out", "out", "--shadow-v", "-q")
    assert r.returncode == 0, r.stderr
    assert measured_steps(tmp_path / "out" / "snr.csv") == [2, 4]
    assert Plan.load(tmp_path / "out" / "plan.json").summary["v_full"] == 4 * 8 + 8 + 8 * 2 + 2


def test_plan_for_another_model_and_corrupt_plans(tmp_path):
    r = run(tmp_path, "model.py", "--preset", "slimadam-rules", "--out", "a", "-q", source=TINY)
    assert r.returncode == 0, r.stderr
    plan_path = tmp_path / "a" / "plan.json"
    r = run(tmp_path, "model.py", "--plan", plan_path, "-q")
    assert r.returncode == 0 and "Compression plan" in r.stdout
    r = run(tmp_path, "other.py", "--plan", plan_path, source=TINY.replace("nn.Linear(8, 2)", "nn.Linear(8, 3)"), name="other.py")
    assert r.returncode == 2
    assert "2.weight (plan [2, 8], model [3, 8])" in r.stderr and "2.bias (plan [2], model [3])" in r.stderr
    broken = tmp_path / "broken.json"
    broken.write_text(plan_path.read_text()[:100])
    r = run(tmp_path, "model.py", "--plan", broken)
    assert r.returncode == 2 and "broken.json: line" in r.stderr and "column" in r.stderr
    doc = json.loads(plan_path.read_text())
    del doc["layers"]["0.weight"]["reduce"]
    broken.write_text(json.dumps(doc))
    r = run(tmp_path, "model.py", "--plan", broken)
    assert r.returncode == 2 and "layers['0.weight']: missing key 'reduce'" in r.stderr
    r = run(tmp_path, "model.py", "--plan", "nope.json")
    assert r.returncode == 2 and "nope.json: no such plan file" in r.stderr and "Traceback" not in r.stderr


def test_bad_flags_and_require_saved_bar(tmp_path):
    for flags, text in ((["--every", "0"], "expected a positive integer, got '0'"),
                        (["--window", "5:2"], "window start 5 is after its end 2"),
                        (["--threshold", "-1"], "expected a finite number >= 0"),
                        (["--side-stream"], "--side-stream measures on a CUDA side stream; this run trains on cpu"),
                        (["--side-stream", "--preset", "eve"], "--plan and --preset run no probe")):
        r = run(tmp_path, "model.py", *flags, source=TINY)
        assert r.returncode == 2 and text in r.stderr, (flags, r.stderr)
    r = run(tmp_path, "model.py", "--steps", "4", "--every", "2", "--require-saved", "0.99999", "--out", "o", "-q")
    assert r.returncode == 1 and "below --require-saved" in r.stderr
    assert (tmp_path / "o" / "plan.json").exists()


def test_json_format_is_one_document_equal_to_plan_json(tmp_path):
    r = run(tmp_path, "model.py", "--steps", "6", "--every", "3", "--format", "json", "--out", "o", source=TINY)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["plan"] == json.loads((tmp_path / "o" / "plan.json").read_text())
    assert doc["memory"]["adamw_bytes"] == 2 * 4 * (4 * 8 + 8 + 8 * 2 + 2)
    assert doc["run"]["steps_done"] == 6


def test_ctrl_c_keeps_trajectory_and_writes_plan_from_it(tmp_path):
    (tmp_path / "slow.py").write_text(textwrap.dedent(TINY).replace(
        "def get_batch(step):\n", "def get_batch(step):\n    import time; time.sleep(0.02)\n"))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "lowmem.cli.main", "slow.py", "--steps", "100000", "--every", "5",
                             "--out", str(out), "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    part = out / "snr.csv.part"
    deadline = time.time() + 60
    while time.time() < deadline and not (part.exists() and len(part.read_text().splitlines()) > 20):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert not part.exists()
    steps = measured_steps(out / "snr.csv")
    assert steps and steps == list(range(5, steps[-1] + 1, 5))
    plan = Plan.load(out / "plan.json")
    assert plan.source["status"] == "interrupted"
    assert "interrupted at step" in stderr and "from what was captured" in stderr
    assert "Compression plan" in stdout
    report = (out / "report.html").read_text()
    assert "status: interrupted" in report and "lowmem-plan" in report


def test_a_killed_run_can_still_be_reported(tmp_path):
    """SIGKILL leaves no plan.json, only layers.json and snr.csv.part; `report` rebuilds the plan."""
    (tmp_path / "slow.py").write_text(textwrap.dedent(TINY).replace(
        "def get_batch(step):\n", "def get_batch(step):\n    import time; time.sleep(0.02)\n"))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "lowmem.cli.main", "slow.py", "--steps", "100000", "--every", "5",
                             "--out", str(out), "--device", "cpu", "-q"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = out / "snr.csv.part"
    deadline = time.time() + 60
    while time.time() < deadline and not (part.exists() and len(part.read_text().splitlines()) > 20):
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=60)
    assert not (out / "plan.json").exists() and (out / "layers.json").exists()
    r = subprocess.run([sys.executable, "-m", "lowmem.cli.main", "report", "o"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "plan rebuilt from the trajectory" in r.stderr and "Compression plan" in r.stdout
    assert "state formats below 5% update error" in r.stderr
    assert "status: interrupted" in (out / "report.html").read_text()
    # a precision file with no measurement (a run stopped before its --precision-every step): said
    precision = out / "precision.csv.part"
    precision.write_text(precision.read_text().splitlines()[0] + "\n")
    r = subprocess.run([sys.executable, "-m", "lowmem.cli.main", "report", "o"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no precision measurement: fp32 state" in r.stderr


def test_builtin_example_end_to_end(tmp_path):
    r = run(tmp_path, "--example", "shakespeare", "--steps", "20", "--every", "10", "--out", "o", "-q", timeout=300)
    assert r.returncode == 0, r.stderr
    from lowmem.examples import shakespeare
    Plan.load(tmp_path / "o" / "plan.json").validate(shakespeare.build_model())
    assert measured_steps(tmp_path / "o" / "snr.csv") == [10, 20]
    assert "Summary" in r.stdout and "SNR by role" in r.stdout
