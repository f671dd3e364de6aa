"""The analysis ends with what to do next, and every command it prints runs as printed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import os
import runpy

import torch
from tiny_models import MLP_MODEL_PY

import lowmem
from lowmem import Plan

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def lowmem_analyze(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowmem.cli.main", *map(str, args), "--device", "cpu"],
                          cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)


def _next_block(stdout: str) -> list[tuple[str, str]]:
    """(what, text) pairs of the "What next" block at the end of the output."""
    lines = stdout.splitlines()
    start = lines.index("What next")
    rest = lines[start + 1:]
    assert len(rest) % 2 == 0, rest
    pairs = [(rest[i].strip().rstrip(":"), rest[i + 1].strip()) for i in range(0, len(rest), 2)]
    assert all(rest[i].startswith("  ") and rest[i + 1].startswith("    ") for i in range(0, len(rest), 2))
    return pairs


def _as_module(command: str) -> list[str]:
    """A printed ``lowmem-analyze …`` command, run as ``python -m lowmem.cli.main …``."""
    argv = shlex.split(command)
    assert argv[0] == "lowmem-analyze", command
    return [sys.executable, "-m", "lowmem.cli.main", *argv[1:], "--device", "cpu"]


def test_what_next_names_the_files_and_every_printed_command_runs(tmp_path):
    (tmp_path / "model.py").write_text(MLP_MODEL_PY)
    out = "my run"   # a space: the printed commands must quote it
    r = lowmem_analyze(tmp_path, "model.py", "--steps", "2", "--every", "1", "--lr", "0.002", "--out", out)
    assert r.returncode == 0, r.stderr
    block = dict(_next_block(r.stdout))
    texts = list(block.values())
    report, plan, train, validate, compare = texts
    assert (tmp_path / report).read_text().startswith("<!DOCTYPE html>")
    assert Path(plan) == Path(out) / "plan.json"

    # The Python line builds the plan's optimizer for the model, at the probe's lr, and steps it.
    mod = runpy.run_path(str(tmp_path / "model.py"))
    model = mod["build_model"]()
    namespace = {"lowmem": lowmem, "model": model}
    exec(train.replace(json.dumps(plan), json.dumps(str(tmp_path / plan))), namespace)
    optimizer = namespace["optimizer"]
    assert optimizer.param_groups[0]["lr"] == 0.002                # the probe's lr
    before = [p.detach().clone() for p in model.parameters()]
    mod["loss_fn"](model, mod["get_batch"](0)).backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    # The validation command as printed: the probe's 2 steps, at the probe's lr (not the default).
    assert shlex.split(validate)[-6:-2] == ["--validate", "2", "--lr", "0.002"]
    v = subprocess.run(_as_module(validate), cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert v.returncode == 0, v.stderr
    assert (tmp_path / out / "validate").is_dir()
    assert "check it" not in "".join(w for w, _ in _next_block(v.stdout))   # validated: not offered again
    # compare, as printed, with a shorter grid.
    c = subprocess.run(_as_module(compare) + ["--steps", "2", "--lrs", "1e-3", "--optimizers", "adamw,slimadam"],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert c.returncode == 0, c.stderr
    assert (tmp_path / out / "compare").is_dir()

    # The JSON document carries the same commands.
    j = lowmem_analyze(tmp_path, "model.py", "--plan", plan, "--format", "json", "--out", out)
    assert j.returncode == 0, j.stderr
    doc = json.loads(j.stdout)
    assert doc["next"]["train"] == train and doc["next"]["compare"] == compare
    assert "report" not in doc["next"]     # checking a plan writes no report
    Plan.load(tmp_path / plan)
