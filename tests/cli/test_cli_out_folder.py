"""Run folders lose nothing: real commands in subprocesses, real SIGKILL, two real concurrent
processes, a real read-only bind mount and a real full tmpfs (where this machine allows mounts).

Every data case takes a byte-for-byte snapshot of the files that existed before and compares it
with what is there afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from lowmem.runfolder import FINISHED, LOCK, MANIFEST, PREVIOUS, REPLACED
from lowmem.snr.trajectory import read_trajectory
from tiny_models import MLP_MODEL_PY

# The tiny MLP, its get_batch slowed (STEP_SLEEP seconds a step) or held at step 5 while the file
# named by GATE exists, so a test can act on a run in progress.
GOOD = MLP_MODEL_PY + """
import os, time
_batch = get_batch

def get_batch(step):
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    while step >= 5 and os.path.exists(os.environ.get("GATE", "")):   # held open by a test
        time.sleep(0.02)
    return _batch(step)
"""

RAISES = "from good import *\n\ndef loss_fn(model, batch):\n    raise RuntimeError('broken loss')\n"
INF = "from good import *\n\ndef loss_fn(model, batch):\n    return (model(batch[0]).sum() * float('inf'))\n"


def write_models(folder: Path) -> None:
    (folder / "good.py").write_text(textwrap.dedent(GOOD))
    (folder / "raises.py").write_text(RAISES)
    (folder / "inf.py").write_text(INF)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "lowmem.cli.main", *map(str, args)]


def run(cwd: Path, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def analyze(cwd: Path, model: str, out: str, *extra, steps=6, env=None) -> subprocess.CompletedProcess:
    return run(cwd, model, "--steps", steps, "--every", 2, "--out", out, "--device", "cpu", "-q", *extra, env=env)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_files(folder: Path) -> dict[str, bytes]:
    """A project folder's own files, which lowmem must never touch."""
    files = {"notes.txt": b"my notes\n", "report.html": b"<html>my own report</html>\n",
             "validate/results.csv": b"a,b\n1,2\n", "plan.json": b'{"mine": true}\n'}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


# -- the user's files ------------------------------------------------------------------------------


def test_out_holding_the_users_files_is_refused_and_left_byte_identical(tmp_path):
    write_models(tmp_path)
    before = snapshot(tmp_path)
    user_files(tmp_path)
    before = snapshot(tmp_path)
    for out, extra in ((".", ()), (".", ("--no-html",)), (".", ("--validate", 2))):
        r = analyze(tmp_path, "good.py", out, *extra)
        assert r.returncode == 2, r.stderr
        assert "lowmem did not write" in r.stderr and "plan.json" in r.stderr
        assert snapshot(tmp_path) == before
    assert not (tmp_path / MANIFEST).exists() and not (tmp_path / LOCK).exists()


def test_no_html_run_beside_the_users_report_leaves_it_alone(tmp_path):
    write_models(tmp_path)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "report.html").write_bytes(b"mine\n")
    (tmp_path / "proj" / "notes.txt").write_bytes(b"notes\n")
    r = analyze(tmp_path, "good.py", "proj", "--no-html")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "proj" / "report.html").read_bytes() == b"mine\n"
    assert (tmp_path / "proj" / "notes.txt").read_bytes() == b"notes\n"
    assert (tmp_path / "proj" / "plan.json").is_file()
    # a second run sets the first aside; the user's files stay where they are, untouched
    r = analyze(tmp_path, "good.py", "proj", "--no-html")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "proj" / "report.html").read_bytes() == b"mine\n"
    assert (tmp_path / "proj" / "notes.txt").read_bytes() == b"notes\n"
    assert sorted(p.name for p in (tmp_path / "proj" / PREVIOUS).iterdir()) == \
        [MANIFEST, "layers.json", "memory.json", "peak.json", "plan.json", "precision.csv", "snr.csv"]


def test_rerun_keeps_the_earlier_run_in_previous(tmp_path):
    write_models(tmp_path)
    assert analyze(tmp_path, "good.py", "out", "--no-html").returncode == 0
    first = snapshot(tmp_path / "out")
    r = analyze(tmp_path, "good.py", "out", "--no-html", "--threshold", "0.5", "--precision-threshold", "0", steps=8)
    assert r.returncode == 0, r.stderr
    kept = snapshot(tmp_path / "out" / PREVIOUS)
    assert {k: v for k, v in kept.items() if k != MANIFEST} == {k: v for k, v in first.items() if k != MANIFEST}
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["source"]["threshold"] == 0.5 and plan["source"]["precision_threshold"] == 0
    assert not any("state" in lp for lp in plan["layers"].values())          # formats off: fp32 state
    assert all("state" in lp for lp in json.loads(first["plan.json"])["layers"].values())
    # a third run replaces the run kept in previous/ by the second: two generations, no more
    second = {k: v for k, v in snapshot(tmp_path / "out").items() if "/" not in k and k != MANIFEST}
    assert analyze(tmp_path, "good.py", "out", "--no-html").returncode == 0
    kept = snapshot(tmp_path / "out" / PREVIOUS)
    assert {k: v for k, v in kept.items() if k != MANIFEST} == second


@pytest.mark.parametrize("model,code", [("raises.py", 3), ("inf.py", 3)])
def test_rerun_failing_at_step_zero_puts_the_complete_run_back(tmp_path, model, code):
    write_models(tmp_path)
    assert analyze(tmp_path, "good.py", "out").returncode == 0
    before = snapshot(tmp_path / "out")
    r = run(tmp_path, model, "--steps", 6, "--every", 2, "--out", "out", "--device", "cpu")
    assert r.returncode == code, r.stderr
    assert "earlier run in out is back in place" in r.stderr
    assert snapshot(tmp_path / "out") == before


def test_interrupted_before_any_measurement_puts_the_earlier_run_back(tmp_path):
    write_models(tmp_path)
    assert analyze(tmp_path, "good.py", "out", "--no-html").returncode == 0
    before = snapshot(tmp_path / "out")
    proc = _start(tmp_path, "out", 50, 40, STEP_SLEEP="0.05")
    _wait_for(lambda: (tmp_path / "out" / REPLACED).is_dir(), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert snapshot(tmp_path / "out") == before


# -- killed runs and stale locks -------------------------------------------------------------------


def _wait_for(condition, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def _rows(path: Path) -> int:
    try:
        return path.read_text().count("\n") - 1
    except FileNotFoundError:
        return 0


def _steps(path: Path) -> int:
    """How many distinct steps the trajectory file holds whole rows of (its first column)."""
    try:
        lines = path.read_text().split("\n")[1:-1]   # the header, and a last line that may be cut
    except FileNotFoundError:
        return 0
    return len({line.split(",", 1)[0] for line in lines})


def _start(tmp_path: Path, out: str, steps: int, every: int, **env) -> subprocess.Popen:
    """The analysis of good.py in the background, `env` (STEP_SLEEP, GATE) added to its environment."""
    return subprocess.Popen(command("good.py", "--steps", steps, "--every", every, "--out", out, "--device", "cpu",
                                    "--no-html"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "PYTHONWARNINGS": "ignore"})


def test_rerun_after_sigkill_keeps_the_killed_runs_samples_and_takes_over_the_stale_lock(tmp_path):
    write_models(tmp_path)
    assert analyze(tmp_path, "good.py", "out", "--no-html").returncode == 0
    complete = snapshot(tmp_path / "out")
    proc = _start(tmp_path, "out", 400, 1, STEP_SLEEP="0.02")
    part = tmp_path / "out" / "snr.csv.part"
    _wait_for(lambda: _rows(part) >= 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "out" / LOCK).exists()                      # left by the killed process
    assert json.loads((tmp_path / "out" / LOCK).read_text())["pid"] == proc.pid
    killed = snapshot(tmp_path / "out")
    assert snapshot(tmp_path / "out" / REPLACED) == {k.removeprefix(REPLACED + "/"): v for k, v in killed.items()
                                                      if k.startswith(REPLACED + "/")}
    # the complete run waits aside, byte for byte, while the killed one is in place
    assert {k: v for k, v in snapshot(tmp_path / "out" / REPLACED).items() if k != MANIFEST} == \
        {k: v for k, v in complete.items() if k != MANIFEST}
    killed_part = part.read_bytes()
    assert len(read_trajectory(part)) > 0

    r = run(tmp_path, "good.py", "--steps", 6, "--every", 2, "--out", "out", "--device", "cpu", "--no-html")
    assert r.returncode == 0, r.stderr
    assert "took over" in r.stderr
    # the killed run had samples: it is the run before this one, whole; the complete run, which an
    # unfinished one never pushes out, is kept behind it, byte for byte
    assert (tmp_path / "out" / PREVIOUS / "snr.csv.part").read_bytes() == killed_part
    assert {k: v for k, v in snapshot(tmp_path / "out" / PREVIOUS / FINISHED).items() if k != MANIFEST} == \
        {k: v for k, v in complete.items() if k != MANIFEST}
    assert "previous/finished" in r.stderr
    assert not (tmp_path / "out" / REPLACED).exists() and not (tmp_path / "out" / LOCK).exists()


def test_a_second_process_on_the_same_folder_is_refused_at_once(tmp_path):
    write_models(tmp_path)
    gate = tmp_path / "gate"
    gate.write_text("")   # the first run waits at step 5 until the gate is removed
    proc = _start(tmp_path, "out", 40, 1, GATE=str(gate))
    _wait_for(lambda: _rows(tmp_path / "out" / "snr.csv.part") >= 3, proc)
    second = analyze(tmp_path, "good.py", "out")
    assert second.returncode == 2, second.stderr
    assert f"pid {proc.pid}" in second.stderr and "in use" in second.stderr
    r = run(tmp_path, "compare", "good.py", "--out", "out", "--steps", 2, "--optimizers", "adamw", "--lrs", "1e-3")
    assert r.returncode == 2 and "in use" in r.stderr, r.stderr
    r = run(tmp_path, "hessian", "good.py", "--out", "out", "--block", "0.weight")
    assert r.returncode == 2 and "in use" in r.stderr, r.stderr
    # report reads the live run and prints it, but leaves the folder to its writer
    r = run(tmp_path, "report", "out")
    assert r.returncode == 0 and "report.html not written" in r.stderr and "in use" in r.stderr, r.stderr
    assert "0.weight" in r.stdout and not (tmp_path / "out" / "report.html").exists()
    assert proc.poll() is None   # the refusals came while the first run held the folder
    gate.unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # the first run lost nothing: every one of its 40 steps was measured and moved into place
    steps = sorted({s.step for s in read_trajectory(tmp_path / "out" / "snr.csv")})
    assert steps == list(range(1, 41))
    assert not (tmp_path / "out" / LOCK).exists()


# -- compare ---------------------------------------------------------------------------------------


def _compare(cwd, out, *extra):
    return run(cwd, "compare", "good.py", "--out", out, "--steps", 3, "--optimizers", "adamw,eve", "--lrs", "1e-3",
               "--device", "cpu", "-q", *extra)


def test_compare_fresh_never_deletes_the_users_files(tmp_path):
    write_models(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "experiment-1.log").write_bytes(b"mine\n")
    (tmp_path / "runs" / "adamw@0.001.json").write_bytes(b"{}\n")
    before = snapshot(tmp_path)
    for extra in ((), ("--fresh",)):
        r = _compare(tmp_path, ".", *extra)
        assert r.returncode == 2, r.stderr
        assert "runs" in r.stderr and "lowmem did not write" in r.stderr
        assert snapshot(tmp_path) == before


def test_compare_fresh_keeps_the_earlier_sweep_in_previous(tmp_path):
    write_models(tmp_path)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "notes.txt").write_bytes(b"mine\n")
    assert _compare(tmp_path, "sweep").returncode == 0
    first = snapshot(tmp_path / "sweep")
    r = _compare(tmp_path, "sweep", "--fresh", "--weight-decay", "0.1")
    assert r.returncode == 0, r.stderr
    kept = snapshot(tmp_path / "sweep" / PREVIOUS)
    for name in ("compare.csv", "curves.csv", "settings.json", "runs/adamw@0.001.json", "runs/eve@0.001.json"):
        assert kept[name] == first[name]
    assert (tmp_path / "sweep" / "notes.txt").read_bytes() == b"mine\n"
    assert json.loads((tmp_path / "sweep" / "settings.json").read_text())["weight_decay"] == 0.1


# -- hessian ---------------------------------------------------------------------------------------


def test_hessian_rerun_keeps_the_earlier_blocks_and_leaves_the_analysis_alone(tmp_path):
    write_models(tmp_path)
    assert analyze(tmp_path, "good.py", "out", "--no-html").returncode == 0
    analysis = snapshot(tmp_path / "out")
    r = run(tmp_path, "hessian", "good.py", "--out", "out", "--block", "0.weight", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    first = {k: v for k, v in snapshot(tmp_path / "out").items() if k not in analysis and k != MANIFEST}
    assert "hessian.json" in first and any(k.endswith(".npy") for k in first)
    r = run(tmp_path, "hessian", "good.py", "--out", "out", "--block", "2.weight", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    now = snapshot(tmp_path / "out")
    for k, v in analysis.items():   # the analysis run in the same folder is not a Hessian run's to move
        if k != MANIFEST:
            assert now[k] == v
    kept = snapshot(tmp_path / "out" / PREVIOUS)
    assert {k: v for k, v in kept.items() if k != MANIFEST} == first


# -- the file system -------------------------------------------------------------------------------


def test_out_that_is_a_file_or_under_a_file_is_a_usage_error(tmp_path):
    write_models(tmp_path)
    (tmp_path / "afile").write_bytes(b"x")
    for out in ("afile", "afile/sub"):
        for args in (("good.py", "--steps", 2, "--every", 1), ("compare", "good.py", "--steps", 2),
                     ("hessian", "good.py", "--block", "0.weight"), ("good.py", "--preset", "eve")):
            r = run(tmp_path, *args, "--out", out, "--device", "cpu")
            assert r.returncode == 2, (args, out, r.stderr)
            assert "Traceback" not in r.stderr and "afile" in r.stderr
    r = run(tmp_path, "hessian", "good.py", "--block", "0.weight", "--out", "h", "--plan-out", "afile/plan.json")
    assert r.returncode == 2 and "--plan-out" in r.stderr, r.stderr
    assert (tmp_path / "afile").read_bytes() == b"x"


@contextlib.contextmanager
def mounted(*args):
    """A real mount (tmpfs, read-only bind) for the test's duration; skips where mounts are not allowed."""
    target = Path(tempfile.mkdtemp(prefix="lowmem-mnt-"))
    r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        target.rmdir()
        pytest.skip(f"this machine does not allow mounts here: {r.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
        target.rmdir()


def test_read_only_out_is_a_usage_error_naming_the_folder(tmp_path):
    write_models(tmp_path)
    src = tmp_path / "ro-src"
    src.mkdir()
    (src / "existing.txt").write_bytes(b"keep\n")
    with mounted("--bind", str(src)) as target:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        for args in (("good.py", "--steps", 2, "--every", 1), ("compare", "good.py", "--steps", 2),
                     ("hessian", "good.py", "--block", "0.weight"), ("good.py", "--preset", "eve")):
            for out in (target, target / "sub"):
                r = run(tmp_path, *args, "--out", out, "--device", "cpu")
                assert r.returncode == 2, (args, r.stderr)
                assert "read-only" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
        r = run(tmp_path, "hessian", "good.py", "--block", "0.weight", "--out", "h", "--plan-out", target / "p.json")
        assert r.returncode == 2 and "--plan-out" in r.stderr, r.stderr
    assert snapshot(src) == {"existing.txt": b"keep\n"}


def test_full_disk_while_the_trajectory_streams_keeps_whole_measurements(tmp_path):
    write_models(tmp_path)
    with mounted("-t", "tmpfs", "-o", "size=48k", "tmpfs") as target:
        r = run(tmp_path, "good.py", "--steps", 3000, "--every", 1, "--out", target / "o", "--device", "cpu",
                "--no-html")
        assert r.returncode == 2, r.stderr
        assert "No space left on device" in r.stderr and "snr.csv.part" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        part = target / "o" / "snr.csv.part"
        text = part.read_text()
        assert text.endswith("\n")
        samples = read_trajectory(part)
        steps = sorted({s.step for s in samples})
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
        per_step = {s: sum(1 for x in samples if x.step == s) for s in steps}
        assert len(set(per_step.values())) == 1            # every measurement whole
        assert f"keeps the {len(steps)} measurement(s)" in r.stderr
        assert not (target / "o" / LOCK).exists()


def test_full_disk_while_compare_saves_a_run_keeps_the_finished_runs(tmp_path):
    write_models(tmp_path)
    with mounted("-t", "tmpfs", "-o", "size=40k", "tmpfs") as target:
        r = run(tmp_path, "compare", "good.py", "--out", target / "c", "--steps", 200, "--optimizers",
                "adamw,eve,adam-mini,adalayer", "--lrs", "1e-3,3e-3,1e-2,3e-2,1e-1", "--device", "cpu", "-q")
        assert r.returncode == 2, r.stderr
        assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
        finished = sorted((target / "c" / "runs").glob("*@*.json"))
        for f in finished:   # every run file on disk is whole
            assert json.loads(f.read_text())["steps_done"] == 200
        assert not list((target / "c").rglob("*.tmp"))


# -- what the tester found: names and folders that only look like lowmem's -------------------------


def test_a_users_folder_named_like_lowmems_aside_is_never_touched(tmp_path):
    write_models(tmp_path)
    for out in ("a", "c"):
        (tmp_path / out / REPLACED).mkdir(parents=True)
        (tmp_path / out / REPLACED / "x").write_bytes(b"mine\n")
    r = analyze(tmp_path, "good.py", "a")
    assert r.returncode == 2 and REPLACED in r.stderr, r.stderr
    assert snapshot(tmp_path / "a") == {f"{REPLACED}/x": b"mine\n"}
    assert _compare(tmp_path, "c").returncode == 0           # a sweep without --fresh sets nothing aside
    assert (tmp_path / "c" / REPLACED / "x").read_bytes() == b"mine\n"
    r = _compare(tmp_path, "c", "--fresh")
    assert r.returncode == 0, r.stderr                        # the sweep's own aside folder has another name
    assert (tmp_path / "c" / REPLACED / "x").read_bytes() == b"mine\n"


def test_names_a_failed_run_meant_to_write_do_not_become_lowmems(tmp_path):
    write_models(tmp_path)
    (tmp_path / "nobuild.py").write_text("from good import *\n\ndef build_model():\n    raise RuntimeError('no')\n")
    assert analyze(tmp_path, "nobuild.py", ".").returncode == 3
    (tmp_path / "report.html").write_bytes(b"mine\n")       # the user's, made after the failed run
    r = analyze(tmp_path, "good.py", ".")
    assert r.returncode == 2 and "report.html" in r.stderr, r.stderr
    assert (tmp_path / "report.html").read_bytes() == b"mine\n"


def test_a_symlink_in_place_of_the_lock_is_never_written_through(tmp_path):
    write_models(tmp_path)
    (tmp_path / "important.txt").write_bytes(b"keep\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK).symlink_to(tmp_path / "important.txt")
    r = analyze(tmp_path, "good.py", "out")
    assert r.returncode == 2 and "symlink" in r.stderr, r.stderr
    assert (tmp_path / "important.txt").read_bytes() == b"keep\n"


def test_a_failed_rerun_after_a_killed_one_removes_the_killed_runs_leftovers_too(tmp_path):
    write_models(tmp_path)
    assert analyze(tmp_path, "good.py", "out", "--no-html").returncode == 0
    complete = snapshot(tmp_path / "out")
    gate = tmp_path / "gate"
    gate.write_text("")
    proc = _start(tmp_path, "out", 50, 40, GATE=str(gate))
    _wait_for(lambda: (tmp_path / "out" / "snr.csv.part").exists(), proc)
    proc.kill()
    proc.wait(timeout=30)
    r = run(tmp_path, "raises.py", "--steps", 6, "--every", 2, "--out", "out", "--device", "cpu", "--no-html")
    assert r.returncode == 3, r.stderr
    assert snapshot(tmp_path / "out") == complete              # no header-only snr.csv.part hiding snr.csv


def test_sigterm_stops_like_ctrl_c_keeping_what_was_measured(tmp_path):
    write_models(tmp_path)
    gate = tmp_path / "gate"
    gate.write_text("")
    proc = _start(tmp_path, "out", 40, 1, GATE=str(gate))
    _wait_for(lambda: _steps(tmp_path / "out" / "snr.csv.part") >= 4, proc)   # 3 steps whole, a 4th begun
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["source"]["status"] == "interrupted"
    steps = sorted({s.step for s in read_trajectory(tmp_path / "out" / "snr.csv")})
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3
    assert not (tmp_path / "out" / LOCK).exists()


@pytest.mark.parametrize("plan, done", [
    ({"source": {"status": "complete"}}, True),
    ({"source": {"method": "preset"}}, True),                  # a preset's plan: nothing to run to its end
    ({"source": {"status": "interrupted"}}, False),
    ({"source": {"status": "nonfinite_loss"}}, False),
    (None, False),                                             # killed before its plan: samples only
    ("{not json", False),
])
def test_a_run_is_finished_when_its_plan_says_its_probe_completed(tmp_path, plan, done):
    from lowmem.cli.main import run_finished
    (tmp_path / "snr.csv.part").write_text("step,key\n1,a\n")
    if plan is not None:
        (tmp_path / "plan.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    assert run_finished(tmp_path) is done


def test_validations_never_touch_the_finished_analysis_kept_behind_an_unfinished_one(tmp_path):
    # A finished analysis A, then B interrupted (A goes to previous/), C interrupted (B to
    # previous/, A behind it in previous/finished/), then two --plan --validate runs, each setting
    # aside only validate/: A stays, byte for byte (the real predicates of lowmem-analyze).
    from lowmem.cli.main import RUN_FILES, VALIDATE_FILES, has_results, run_finished
    from lowmem.runfolder import RunFolder

    def analysis(tag, status):
        f = RunFolder(tmp_path)
        f.begin(RUN_FILES, has_results, finished=run_finished)
        f.claim(["plan.json", "snr.csv", "validate"])
        (tmp_path / "plan.json").write_text(json.dumps({"source": {"status": status}, "tag": tag}))
        (tmp_path / "snr.csv").write_text(f"step,key\n10,{tag}\n")
        (tmp_path / "validate" / "runs").mkdir(parents=True, exist_ok=True)
        (tmp_path / "validate" / "runs" / "adamw@0.001.json").write_text(f"{tag}\n")   # a finished run
        f.settle(has_results, finished=run_finished)

    def validation(tag):
        f = RunFolder(tmp_path)
        f.begin(VALIDATE_FILES, has_results, finished=run_finished)
        f.claim(["validate"])
        (tmp_path / "validate" / "runs").mkdir(parents=True, exist_ok=True)
        (tmp_path / "validate" / "runs" / "adamw@0.001.json").write_text(f"{tag}\n")
        f.settle(has_results, finished=run_finished)

    analysis("A", "complete")
    a_plan = (tmp_path / "plan.json").read_bytes()
    analysis("B", "interrupted")
    analysis("C", "interrupted")
    assert (tmp_path / PREVIOUS / FINISHED / "plan.json").read_bytes() == a_plan
    validation("V1")
    validation("V2")
    assert (tmp_path / PREVIOUS / FINISHED / "plan.json").read_bytes() == a_plan
    assert json.loads((tmp_path / "plan.json").read_text())["tag"] == "C"
    assert (tmp_path / "validate" / "runs" / "adamw@0.001.json").read_text() == "V2\n"
