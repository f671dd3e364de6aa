"""`lowmem-analyze` run for real in a subprocess on broken model.py files.

Every case checks the exit code, the message on stderr (stdout stays clean of errors, no
traceback from lowmem's own frames) and that nothing already computed is lost: the samples
measured before a failure stay in snr.csv, and the plan written from them matches them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lowmem
from lowmem import Plan
from lowmem.compress import build_plan
from lowmem.snr.precision import PrecisionTrajectory
from lowmem.snr.trajectory import SnrTrajectory

LOWMEM_DIR = os.path.dirname(os.path.abspath(lowmem.__file__))
HEADER_LINE = "step,name,shape,view,subset,snr,mean_sq,var"

# A tiny regression task; the tests patch single lines of it (see `patched`).
MODEL = '''\
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    return x, x[:, :2] - x[:, 2:]

def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)
'''


def patched(old: str, new: str, source: str = MODEL) -> str:
    assert old in source, old
    return source.replace(old, new)


def write(tmp_path: Path, source: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


# One intra-op thread: the models are tiny, and on a small shared runner torch's default of one
# thread per core makes the example's 20 steps take 50 s instead of 8.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def lowmem_analyze(cwd: Path, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", *map(str, args), "--device", "cpu"],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def failed(r: subprocess.CompletedProcess, code: int) -> str:
    """Assert `r` exited with `code`, printed nothing on stdout and no lowmem traceback; its stderr."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr and LOWMEM_DIR not in r.stderr, r.stderr
    assert "lowmem-analyze: error: " in r.stderr, r.stderr
    return r.stderr


def csv_steps(path: Path) -> list[int]:
    """The measured steps in a trajectory file, checking its header."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert ",".join(rows[0]) == HEADER_LINE
    return sorted({int(r[0]) for r in rows[1:]})


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_test_model_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_plan_is_from(out: Path, model_file: Path) -> Plan:
    """plan.json in `out` is the plan built (with the CLI's defaults) from snr.csv and
    precision.csv in `out`."""
    import torch
    torch.manual_seed(0)
    model = load_module(model_file).build_model()
    rebuilt = build_plan(model, SnrTrajectory.read(out / "snr.csv"),
                         precision=PrecisionTrajectory.read(out / "precision.csv")).to_json()
    on_disk = json.loads((out / "plan.json").read_text())
    assert on_disk["layers"] == rebuilt["layers"]
    assert on_disk["summary"] == rebuilt["summary"]
    return Plan.load(out / "plan.json")


def test_missing_file_and_folder_are_usage_errors(tmp_path):
    write(tmp_path, MODEL)
    err = failed(lowmem_analyze(tmp_path, "modle.py", "--steps", "2", "--every", "1"), 2)
    assert "modle.py: no such file." in err and "Did you mean 'model.py'?" in err
    (tmp_path / "models").mkdir()
    err = failed(lowmem_analyze(tmp_path, "models", "--steps", "2", "--every", "1"), 2)
    assert "models: is a folder" in err and "build_model" in err


def test_missing_function_and_factory_suggest_the_near_name(tmp_path):
    write(tmp_path, patched("def build_model():", "def build_modle():"))
    err = failed(lowmem_analyze(tmp_path, "model.py", "--steps", "2", "--every", "1", "-q"), 3)
    assert "model.py does not follow the model.py contract" in err
    assert "build_model: not found. Did you mean 'build_modle'?" in err
    write(tmp_path, MODEL + "\nclass Task:\n    pass\n\ndef factory():\n"
                            "    import sys\n    return sys.modules[__name__]\n")
    err = failed(lowmem_analyze(tmp_path, "model.py:factroy", "--steps", "2", "--every", "1"), 3)
    assert "model.py has no function 'factroy'. Did you mean 'factory'?" in err


@pytest.mark.parametrize("old, new, expected", [
    ("return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))", "return {'net': nn.Linear(4, 2)}",
     ["build_model() in model.py must return a torch.nn.Module, it returned dict"]),
    ("def loss_fn(", "def build_optimizer(model):\n    return 'adamw'\n\ndef loss_fn(",
     ["build_optimizer(model) in model.py must return a torch.optim.Optimizer, it returned str"]),
    ("return nn.functional.mse_loss(model(x), y)", "return nn.functional.mse_loss(model(x), y).item()",
     ["loss_fn(model, batch) in model.py must return a scalar torch.Tensor, it returned float at step 0"]),
    ("return nn.functional.mse_loss(model(x), y)", "return nn.functional.mse_loss(model(x), y, reduction='none')",
     ["must return a scalar (mean-reduced) loss", "shape (8, 2) at step 0", "reduction='mean'", ".mean()"]),
], ids=["build_model-dict", "build_optimizer-str", "loss-float", "loss-not-scalar"])
def test_wrong_return_types(tmp_path, old, new, expected):
    write(tmp_path, patched(old, new))
    err = failed(lowmem_analyze(tmp_path, "model.py", "--steps", "3", "--every", "1", "--out", "o"), 3)
    for text in expected:
        assert text in err


def test_error_raised_in_loss_fn_at_step_k_names_the_line_and_keeps_samples(tmp_path):
    # At step 7 the user's code feeds the model the wrong width: torch raises deep inside
    # nn.Linear, and the message must still point at the user's own line.
    bad_line = "        return nn.functional.mse_loss(model(x[:, :3]), y)   # wrong width"
    source = patched("    x, y = batch\n",
                     "    x, y = batch\n    if torch.equal(x, get_batch(7)[0]):\n" + bad_line + "\n")
    lineno = source.splitlines().index(bad_line) + 1
    model_file = write(tmp_path, source)
    err = failed(lowmem_analyze(tmp_path, "model.py", "--steps", "20", "--every", "2", "--out", "o"), 3)
    assert "loss_fn(model, batch) in model.py raised RuntimeError" in err
    assert f'File "{model_file}", line {lineno}, in loss_fn' in err
    out = tmp_path / "o"
    assert not (out / "snr.csv.part").exists()
    assert csv_steps(out / "snr.csv") == [2, 4, 6]          # steps 0..6 ran: 7 optimizer steps


def test_nan_loss_at_step_5_keeps_every_sample_and_plans_from_them(tmp_path):
    source = patched("def loss_fn(model, batch):\n    x, y = batch\n    return nn.functional.mse_loss(model(x), y)",
                     "calls = 0\n\ndef loss_fn(model, batch):\n    global calls\n    x, y = batch\n"
                     "    loss = nn.functional.mse_loss(model(x), y)\n    calls += 1\n"
                     "    return loss * float('nan') if calls == 6 else loss")
    model_file = write(tmp_path, source)
    err = failed(lowmem_analyze(tmp_path, "model.py", "--steps", "20", "--every", "1", "--out", "o"), 3)
    assert "loss is nan at step 5 (get_batch(5))" in err and "--lr" in err
    assert "kept 5 measurement(s)" in err and "plan.json" in err
    out = tmp_path / "o"
    assert csv_steps(out / "snr.csv") == [1, 2, 3, 4, 5]     # --every 1: one per optimizer step before it
    plan = assert_plan_is_from(out, model_file)
    assert plan.source["status"] == "nonfinite_loss" and plan.source["steps_done"] == 5


def test_optimizer_without_adam_state_then_shadow_v_with_json_output(tmp_path):
    write(tmp_path, patched("def loss_fn(", "def build_optimizer(model):\n"
                                           "    return torch.optim.SGD(model.parameters(), lr=0.05)\n\ndef loss_fn("))
    err = failed(lowmem_analyze(tmp_path, "model.py", "--steps", "4", "--every", "2", "--out", "o", "-q"), 3)
    assert "SGD keeps no 'exp_avg_sq'" in err and "--shadow-v" in err
    # The same file with --shadow-v; --format json prints exactly one JSON document on stdout.
    r = lowmem_analyze(tmp_path, "model.py", "--steps", "4", "--every", "2", "--out", "o", "--shadow-v",
                       "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["plan"] == json.loads((tmp_path / "o" / "plan.json").read_text())
    assert doc["run"]["status"] == "complete" and doc["run"]["steps_done"] == 4
    assert doc["files"] == {"plan": str(Path("o") / "plan.json"), "snr": str(Path("o") / "snr.csv"),
                            "peak": str(Path("o") / "peak.json")}
    assert csv_steps(tmp_path / "o" / "snr.csv") == [2, 4]


def test_plan_for_another_model_and_broken_plan_files(tmp_path):
    write(tmp_path, MODEL, "a.py")
    write(tmp_path, patched("nn.Linear(8, 2)", "nn.Linear(8, 3)"), "b.py")
    r = lowmem_analyze(tmp_path, "a.py", "--preset", "slimadam-rules", "--out", "pa", "-q")
    assert r.returncode == 0, r.stderr
    plan_file = tmp_path / "pa" / "plan.json"
    err = failed(lowmem_analyze(tmp_path, "b.py", "--plan", plan_file), 2)
    assert f"{plan_file} does not fit the model of b.py" in err
    assert "2.weight (plan [2, 8], model [3, 8])" in err and "2.bias (plan [2], model [3])" in err
    assert "0.weight" not in err                              # only the parameters that differ
    r = lowmem_analyze(tmp_path, "a.py", "--plan", plan_file, "-q")
    assert r.returncode == 0, r.stderr
    assert "2.weight" in r.stdout and "error" not in r.stdout
    # Truncated JSON: line and column of the break.
    text = plan_file.read_text()
    broken = tmp_path / "broken.json"
    broken.write_text(text[: len(text) // 2])
    err = failed(lowmem_analyze(tmp_path, "a.py", "--plan", broken), 2)
    assert "broken.json" in err and "line" in err and "column" in err
    # A layer without "reduce": the message names the layer.
    doc = json.loads(text)
    del doc["layers"]["2.weight"]["reduce"]
    broken.write_text(json.dumps(doc))
    err = failed(lowmem_analyze(tmp_path, "a.py", "--plan", broken), 2)
    assert "layers['2.weight']" in err and "'reduce'" in err
    assert json.loads(plan_file.read_text()) == json.loads(text)   # the good plan is untouched


def _default_sigint():
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec; give the child Python's Ctrl-C back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child process")
def test_ctrl_c_keeps_the_trajectory_and_plans_from_what_was_captured(tmp_path):
    model_file = write(tmp_path, patched("def get_batch(step):\n",
                                         "def get_batch(step):\n    import time; time.sleep(0.02)\n"))
    out = tmp_path / "o"
    part = out / "snr.csv.part"
    proc = subprocess.Popen([sys.executable, "-m", "lowmem.cli.main", "model.py", "--steps", "100000",
                             "--every", "2", "--out", "o", "--device", "cpu"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_default_sigint)
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists():
                with open(part, newline="") as f:
                    seen = sorted({int(row[0]) for row in list(csv.reader(f))[1:] if row and row[0].isdigit()})
                if len(seen) >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        assert len(seen) >= 3, "no measurements streamed into snr.csv.part"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert not part.exists()
    steps = csv_steps(out / "snr.csv")
    assert set(seen) <= set(steps)                            # nothing already streamed is lost
    assert steps == list(range(2, steps[-1] + 1, 2))         # every measurement --every 2 implies
    plan = assert_plan_is_from(out, model_file)
    assert plan.source["status"] == "interrupted"
    assert 0 <= plan.source["steps_done"] - steps[-1] < 2
    assert "interrupted at step" in stderr and "from what was captured" in stderr
    assert f"kept {len(steps)} measurement(s)" in stderr
    assert "Traceback" not in stderr
    assert "Compression plan" in stdout and "error:" not in stdout   # the state table speaks of update errors


def test_require_saved_bar_not_met_exits_1_after_writing_everything(tmp_path):
    write(tmp_path, MODEL)
    r = lowmem_analyze(tmp_path, "model.py", "--steps", "2", "--every", "1", "--out", "o", "--require-saved", "0.99999")
    assert r.returncode == 1, r.stderr
    assert "lowmem-analyze: the plan saves" in r.stderr and "below --require-saved" in r.stderr
    assert "Compression plan" in r.stdout and "below" not in r.stdout
    assert (tmp_path / "o" / "plan.json").exists() and csv_steps(tmp_path / "o" / "snr.csv") == [1, 2]


@pytest.mark.parametrize("flags, expected", [
    (["--every", "0"], "argument --every: expected a positive integer, got '0'"),
    (["--window", "5:2"], "argument --window: window start 5 is after its end 2"),
    (["--threshold", "-1"], "argument --threshold: expected a finite number >= 0, got '-1'"),
    (["--precision-threshold", "nan"], "argument --precision-threshold: expected a finite number >= 0, got 'nan'"),
], ids=["every-0", "window-reversed", "threshold-negative", "precision-threshold-nan"])
def test_bad_flag_values_are_usage_errors(tmp_path, flags, expected):
    write(tmp_path, MODEL)
    r = lowmem_analyze(tmp_path, "model.py", *flags, "--out", "o")
    assert r.returncode == 2 and r.stdout == ""
    assert expected in r.stderr and "--help" in r.stderr
    assert not (tmp_path / "o").exists()


def m_format_of(name: str, samples) -> str:
    """By hand, the `m` format a layer gets from these precision samples: the smallest (int4 <
    int8 < bf16) whose largest update error stays below the default 5%, else fp32."""
    worst = {}
    for s in samples:
        if (s.name, s.state) == (name, "m"):
            worst[s.format] = max(worst.get(s.format, 0.0), s.update_error)
    return next((fmt for fmt in ("int4", "int8", "bf16") if worst.get(fmt, 1.0) < 0.05), "fp32")


def test_precision_every_measures_the_precision_at_the_first_step_and_its_multiples_and_the_plan_follows_them(
        tmp_path):
    model_file = write(tmp_path, MODEL)
    r = lowmem_analyze(tmp_path, "model.py", "--steps", "12", "--every", "2", "--precision-every", "6", "--out", "o",
                       "--no-peak", "--no-html")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "o"
    assert csv_steps(out / "snr.csv") == [2, 4, 6, 8, 10, 12]
    precision = PrecisionTrajectory.read(out / "precision.csv")
    assert {s.step for s in precision.samples} == {2, 6, 12}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["precision_every"] == 6
    # each layer's format is the one its largest errors at steps 2, 6 and 12 give
    for name, lp in plan["layers"].items():
        assert lp["state"]["m"] == m_format_of(name, precision.samples), name
    assert_plan_is_from(out, model_file)


def test_a_window_holding_only_the_first_measurement_is_accepted_and_plans_from_it(tmp_path):
    # steps 2 (the first measurement) and 8 measure the precision; the window 1:5 holds step 2 only
    write(tmp_path, MODEL)
    r = lowmem_analyze(tmp_path, "model.py", "--steps", "8", "--every", "2", "--precision-every", "8", "--window",
                       "1:5", "--out", "o", "--no-peak", "--no-html")
    assert r.returncode == 0, r.stderr
    precision = PrecisionTrajectory.read(tmp_path / "o" / "precision.csv")
    assert {s.step for s in precision.samples} == {2, 8}
    at2 = [s for s in precision.samples if s.step == 2]
    for name, lp in json.loads((tmp_path / "o" / "plan.json").read_text())["layers"].items():
        assert lp["state"]["m"] == m_format_of(name, at2), name


def test_a_run_stopped_before_its_windows_first_precision_measurement_says_so_and_keeps_fp32_state(tmp_path):
    source = patched("def loss_fn(model, batch):\n    x, y = batch\n    return nn.functional.mse_loss(model(x), y)",
                     "calls = 0\n\ndef loss_fn(model, batch):\n    global calls\n    x, y = batch\n"
                     "    loss = nn.functional.mse_loss(model(x), y)\n    calls += 1\n"
                     "    return loss * float('nan') if calls == 6 else loss")
    write(tmp_path, source)
    err = failed(lowmem_analyze(tmp_path, "model.py", "--steps", "20", "--every", "2", "--precision-every", "10",
                                "--window", "3:", "--out", "o", "--no-peak", "--no-html"), 3)
    assert "the window 3: holds no precision measurement (every 10 steps): the plan keeps every layer's state in fp32" \
        in err
    out = tmp_path / "o"
    assert csv_steps(out / "snr.csv") == [2, 4]
    assert {s.step for s in PrecisionTrajectory.read(out / "precision.csv").samples} == {2}   # outside the window
    assert {lp["state"]["m"] for lp in json.loads((out / "plan.json").read_text())["layers"].values()} == {"fp32"}


@pytest.mark.parametrize("flags, expected", [
    (["--every", "2", "--precision-every", "3"], "--precision-every 3 must be a multiple of the SNR's every 2 steps"),
    (["--steps", "8", "--every", "2", "--precision-every", "10"], "--precision-every 10 needs at least that many steps"),
    (["--steps", "8", "--every", "2", "--precision-every", "4", "--window", "5:7"],
     "--window 5:7 holds no step that measures the precision (step 2, then every 4 steps up to step 8)"),
    (["--steps", "10", "--every", "2", "--precision-every", "4", "--window", "9:"],
     "--window 9: holds no step that measures the precision (step 2, then every 4 steps up to step 10)"),
    (["--precision-every", "20", "--shadow-v"], "--shadow-v reads no m and measures none"),
    (["--precision-every", "20", "--preset", "eve"], "--plan and --preset run no probe"),
    (["--precision-every", "0"], "argument --precision-every: expected a positive integer, got '0'"),
], ids=["not-a-multiple", "past-the-steps", "window-between", "window-after-the-last", "shadow", "preset", "zero"])
def test_bad_precision_every_is_a_usage_error(tmp_path, flags, expected):
    write(tmp_path, MODEL)
    r = lowmem_analyze(tmp_path, "model.py", *flags, "--out", "o")
    assert r.returncode == 2 and r.stdout == ""
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", [["--prefer", "compression"], ["--depth-average"]])
def test_the_paper_rule_with_options_it_does_not_have_is_a_usage_error(tmp_path, flag):
    write(tmp_path, MODEL)
    r = lowmem_analyze(tmp_path, "model.py", "--rule", "paper", *flag, "--out", "o")
    assert r.returncode == 2 and r.stdout == ""
    assert "--rule paper takes each layer's own highest SNR" in r.stderr
    assert not (tmp_path / "o").exists()


def test_builtin_example_happy_path(tmp_path):
    r = lowmem_analyze(tmp_path, "--example", "shakespeare", "--steps", "20", "--every", "10", "--out", "o", "-q",
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                                     # -q: nothing on stderr
    from lowmem.examples import shakespeare
    Plan.load(tmp_path / "o" / "plan.json").validate(shakespeare.build_model())
    assert (tmp_path / "o" / "snr.csv").read_text().splitlines()[0] == HEADER_LINE
    assert csv_steps(tmp_path / "o" / "snr.csv") == [10, 20]
    assert not (tmp_path / "o" / "snr.csv.part").exists()
    assert "Summary" in r.stdout
    _assert_state_formats_follow_precision_csv(tmp_path / "o")
    assert "Optimizer state formats" in r.stdout and "bytes per parameter" in r.stdout


def _assert_state_formats_follow_precision_csv(out: Path, threshold: float = 0.05) -> None:
    """Every layer's state in plan.json is the smallest format (int4 < int8 < bf16 for the
    example's shapes, whose rows hold 128 entries or more) whose update error in precision.csv
    stays below the threshold at every measurement; v formats only where v is kept whole. And
    precision.csv is the run's own: in the folder's manifest, moved into place."""
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["precision_threshold"] == threshold
    worst: dict[tuple[str, str, str], float] = {}
    with open(out / "precision.csv", newline="") as f:
        for r in csv.DictReader(f):
            key = (r["name"], r["state"], r["format"])
            worst[key] = max(worst.get(key, 0.0), float(r["update_error"]))
    smallest_first = {"m": ["int4", "int8", "bf16"], "v": ["int8", "bf16"]}
    for name, lp in plan["layers"].items():
        whole = lp["reduce"] is None and all(p["reduce"] is None for p in lp.get("parts") or [])
        expected = {}
        for which, formats in smallest_first.items():
            passing = [f for f in formats if (name, which, f) in worst and worst[(name, which, f)] < threshold]
            expected[which] = "fp32" if (which == "v" and not whole) or not passing else passing[0]
        assert lp["state"] == expected, name
        assert "state m " in lp["why"], name
    states = [lp["state"]["m"] for lp in plan["layers"].values()]
    assert "int8" in states and "bf16" in states      # the matrices take 8-bit m, the norms bf16
    assert "precision.csv" in json.loads((out / ".lowmem.json").read_text())["entries"]
    assert not (out / "precision.csv.part").exists()
