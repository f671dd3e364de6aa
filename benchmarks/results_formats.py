"""Storage formats of optimizer state, 8-/4-bit peers and pure-bf16 training against AdamW, over
seeds that change the initial weights and the batches (the tables of RESULTS.md, issue 16).

    python benchmarks/results_formats.py [--out results-formats] [--phases 1,2] [--tables-only]

Runs ``lowmem-analyze compare`` (in this Python, from this checkout) into ``OUT/TASK/sSEED/SWEEP``
and then prints the tables from the ``compare.csv`` files. A finished run is never trained again
(compare resumes), so the script can be stopped and rerun, and a phase added later.

Tasks: ``shakespeare`` (the built-in example, through ``examples/shakespeare_seeds.py:seedS``:
seed 0 is the built-in example itself) at lr 1e-3, AdamW's best at seed 0 in RESULTS.md's
first table; ``teacher`` (``examples/teacher_mlp.py:seedS``) at lr 3e-3, AdamW's best at seed 0
on the grid 1e-3, 3e-3, 1e-2. Seed S is ``--seed S`` (initial weights, stochastic rounding)
with the factory ``seedS`` (batches). Every other setting is compare's default (400 steps,
warm-up 20, cosine to 0.1·lr, betas 0.9/0.95, no weight decay, 4 held-out batches).

Phases (RESULTS.md reports all six, run over three sessions; the default runs 1 and 2):
  1. teacher: fp32 parameters (adamw, eve, eve:int8, eve:int4, the peers) and bf16 parameters
     (adamw; eve:bf16:bf16 with each rounding), seeds 0-2;
  2. shakespeare, fp32: adamw, eve:int8, eve:int4, torchao-adamw8bit, torchao-adamw4bit, seed 0;
     then the measured plan (``lowmem-analyze --example shakespeare``: SNR plan for `v`, and per
     layer the state formats its precision probe chose) as ``plan``, seed 0;
  3. the same, seeds 1 and 2 (the plan is seed 0's analysis, applied to every seed);
  4. shakespeare, fp32: eve and bnb-adamw8bit, seeds 0-2;
  5. shakespeare, bf16 parameters as in phase 1, seeds 0-2;
  6. teacher: the measured plan (``lowmem-analyze examples/teacher_mlp.py``, seed 0) as ``plan``,
     seeds 0-2 (its gaps pair with phase 1's AdamW).

A peer whose package is missing is skipped by compare with a note (``pip install -e '.[peers]'``
installs torchao and bitsandbytes).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _machine import cpu_model, load_average   # beside this script

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
PEERS = ["torchao-adamw8bit", "torchao-adamw4bit"]
ROUNDINGS = ("nearest", "stochastic", "kahan")
BF16_PLAN = "eve:bf16:bf16"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}   # two-sided 95% Student t quantiles by degrees of freedom

TASKS = {   # target: compare's (a factory seedS is added); analyze: lowmem-analyze's, for seed 0's plan
    "teacher": {"target": "examples/teacher_mlp.py", "lr": 3e-3, "analyze": ["examples/teacher_mlp.py"]},
    "shakespeare": {"target": "examples/shakespeare_seeds.py", "lr": 1e-3, "analyze": ["--example", "shakespeare"]},
}

# (phase, task, seeds, sweep folder, optimizers, extra flags)
SWEEPS = [
    (1, "teacher", SEEDS, "fp32", ["adamw", "eve", "eve:int8", "eve:int4", *PEERS, "bnb-adamw8bit"], []),
    (1, "teacher", SEEDS, "bf16-nearest", ["adamw", BF16_PLAN], ["--param-dtype", "bf16"]),
    *[(1, "teacher", SEEDS, f"bf16-{r}", [BF16_PLAN], ["--param-dtype", "bf16", "--param-rounding", r])
      for r in ROUNDINGS[1:]],
    (2, "shakespeare", (0,), "fp32", ["adamw", "eve:int8", "eve:int4", *PEERS], []),
    (2, "shakespeare", (0,), "fp32-plan", ["plan"], ["--plan", "{out}/shakespeare/analysis/plan.json"]),
    (3, "shakespeare", (1, 2), "fp32", ["adamw", "eve:int8", "eve:int4", *PEERS], []),
    (3, "shakespeare", (1, 2), "fp32-plan", ["plan"], ["--plan", "{out}/shakespeare/analysis/plan.json"]),
    (4, "shakespeare", SEEDS, "fp32", ["adamw", "eve", "bnb-adamw8bit"], []),
    (5, "shakespeare", SEEDS, "bf16-nearest", ["adamw", BF16_PLAN], ["--param-dtype", "bf16"]),
    *[(5, "shakespeare", SEEDS, f"bf16-{r}", [BF16_PLAN], ["--param-dtype", "bf16", "--param-rounding", r])
      for r in ROUNDINGS[1:]],
    (6, "teacher", SEEDS, "fp32-plan", ["plan"], ["--plan", "{out}/teacher/analysis/plan.json"]),
]


def run_sweeps(out: Path, phases: set[int]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = out / "wall.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    for phase, task, seeds, sweep, optimizers, flags in SWEEPS:
        if phase not in phases:
            continue
        if "--plan" in flags and not (out / task / "analysis" / "plan.json").exists():
            cmd = [sys.executable, "-m", "lowmem.cli.main", *TASKS[task]["analyze"], "--out", str(out / task / "analysis"),
                   "-q", "--format", "json"]
            print(f"[{time.strftime('%H:%M:%S')}] phase {phase}: {task}: the measured plan", file=sys.stderr, flush=True)
            t0 = time.time()
            if subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                sys.exit(f"the analysis failed: {' '.join(cmd)}")
            with open(log, "a") as f:
                f.write(json.dumps({"task": task, "sweep": "analysis", "wall_s": round(time.time() - t0, 1),
                                    "skipped": {}, "load": load_average()}) + "\n")
        flags = [f.format(out=out) for f in flags]
        for seed in seeds:
            folder = out / task / f"s{seed}" / sweep
            cmd = [sys.executable, "-m", "lowmem.cli.main", "compare", f"{TASKS[task]['target']}:seed{seed}",
                   "--seed", str(seed), "--lrs", f"{TASKS[task]['lr']:g}", "--optimizers", ",".join(optimizers),
                   "--out", str(folder), "--format", "json", *flags]
            print(f"[{time.strftime('%H:%M:%S')}] phase {phase}: {task} seed {seed} {sweep}: {','.join(optimizers)}",
                  file=sys.stderr, flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            wall = time.time() - t0
            if proc.returncode != 0:
                sys.exit(f"compare exited {proc.returncode}: {' '.join(cmd)}")
            skipped = json.loads(proc.stdout).get("skipped", {})
            out.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(json.dumps({"task": task, "seed": seed, "sweep": sweep, "optimizers": optimizers,
                                    "wall_s": round(wall, 1), "skipped": skipped, "load": load_average(),
                                    "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


# -- tables ------------------------------------------------------------------------------------

def _rows(folder: Path) -> dict[str, dict]:
    path = folder / "compare.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {r["optimizer"]: r for r in csv.DictReader(f) if r["status"] == "complete"}


def _n_params(task: str) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from lowmem.cli.contract import load_task
    torch.manual_seed(0)
    model = load_task(str(ROOT / TASKS[task]["target"]) + ":seed0").build_model()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _gap(losses: dict[int, float], ref: dict[int, float]) -> tuple[str, str]:
    """Paired gaps (same seed) of `losses` to `ref`: "mean (min…max)" and "95% CI, verdict"."""
    gaps = [losses[s] - ref[s] for s in SEEDS if s in losses and s in ref]
    if not gaps:
        return "", ""
    mean = statistics.fmean(gaps)
    cell = f"{mean:+.4f} ({min(gaps):+.4f}…{max(gaps):+.4f})" if len(gaps) > 1 else f"{mean:+.4f}"
    if len(gaps) < 2:
        return cell, "1 seed: no interval"
    half = T_975[len(gaps) - 1] * statistics.stdev(gaps) / math.sqrt(len(gaps))
    lo, hi = mean - half, mean + half
    verdict = "no detectable gap" if lo <= 0 <= hi else ("worse" if lo > 0 else "better")
    return cell, f"{lo:+.4f}…{hi:+.4f}: {verdict}" + (f" ({len(gaps)} seeds)" if len(gaps) < len(SEEDS) else "")


def tables(out: Path) -> str:
    lines = []
    for task in TASKS:
        n = _n_params(task)
        runs: dict[tuple[str, str], dict[int, dict]] = {}   # (sweep, optimizer) -> seed -> row
        for seed in SEEDS:
            for folder in sorted((out / task / f"s{seed}").glob("*")):
                if not folder.is_dir():
                    continue
                for name, row in _rows(folder).items():
                    runs.setdefault((folder.name, name), {})[seed] = row
        if not runs:
            continue
        loss = {k: {s: float(r["final_val_loss"]) for s, r in v.items()} for k, v in runs.items()}
        adamw, adamw16 = loss.get(("fp32", "adamw"), {}), loss.get(("bf16-nearest", "adamw"), {})

        def cells(key):
            by_seed = runs[key]
            losses = " / ".join(f"{loss[key][s]:.4f}" if s in by_seed else "–" for s in SEEDS)
            state = statistics.fmean(int(r["state_bytes"]) for r in by_seed.values()) / n
            step = statistics.median(float(r["step_seconds"]) for r in by_seed.values()) * 1e3
            return losses, f"{state:.3f}", f"{step:.0f}"

        lines += [f"### {task} ({n:,} parameters, lr {TASKS[task]['lr']:g}, 400 steps)", "",
                  "fp32 parameters; gaps are paired (same seed), final held-out loss minus AdamW's:", "",
                  "| optimizer | state B/param | loss s0 / s1 / s2 | gap to AdamW: mean (min…max) | 95% CI | "
                  "gap to its fp32-state self | 95% CI | step ms |",
                  "|---|---|---|---|---|---|---|---|"]
        fp32 = sorted((k for k in runs if k[0].startswith("fp32")), key=lambda k: (k[1] != "adamw", k[1]))
        for key in fp32:
            losses, state, step = cells(key)
            gap, ci = _gap(loss[key], adamw) if key[1] != "adamw" else ("", "")
            own = ("fp32", key[1].split(":")[0])
            sgap, sci = _gap(loss[key], loss[own]) if ":" in key[1] and own in loss else ("", "")
            lines.append(f"| {key[1]} | {state} | {losses} | {gap} | {ci} | {sgap} | {sci} | {step} |")
        bf16 = sorted((k for k in runs if k[0].startswith("bf16")),
                      key=lambda k: (k[1] != "adamw", ROUNDINGS.index(k[0].split("-", 1)[1])))
        if bf16:
            lines += ["", "bf16 parameters (the same start cast to bf16); rounding: lowmem's `--param-rounding` "
                      "(torch's AdamW rounds to nearest):", "",
                      "| optimizer | rounding | state B/param | loss s0 / s1 / s2 | gap to fp32 AdamW | 95% CI | "
                      "gap to bf16 AdamW | 95% CI | gap to itself in fp32 | 95% CI | step ms |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for key in bf16:
                losses, state, step = cells(key)
                gap, ci = _gap(loss[key], adamw)
                gap16, ci16 = _gap(loss[key], adamw16) if key[1] != "adamw" else ("", "")
                own = ("fp32", key[1].split(":")[0])   # the same optimizer, fp32 parameters and state
                gap32, ci32 = _gap(loss[key], loss[own]) if key[1] != "adamw" and own in loss else ("", "")
                rounding = key[0].split("-", 1)[1] if key[1] != "adamw" else "nearest (torch)"
                lines.append(f"| {key[1]} | {rounding} | {state} | {losses} | {gap} | {ci} | {gap16} | {ci16} | "
                             f"{gap32} | {ci32} | {step} |")
        lines.append("")
    log = out / "wall.jsonl"
    if log.exists():
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        total = sum(e["wall_s"] for e in entries)
        skipped = sorted({f"{k}: {v}" for e in entries for k, v in e["skipped"].items()})
        lines.append(f"Wall time of the compare commands: {total / 60:.1f} min over {len(entries)} commands.")
        lines += [f"Skipped: {s}" for s in skipped]
    lines.append(f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                 f"torch {torch.__version__}, load average now {load_average()}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results-formats", help="where the sweeps go (default results-formats)")
    p.add_argument("--phases", default="1,2", help="which phases to run (default 1,2; RESULTS.md's tables ran 1-6)")
    p.add_argument("--tables-only", action="store_true", help="print the tables from what has finished")
    args = p.parse_args()
    out = Path(args.out).resolve()
    if not args.tables_only:
        run_sweeps(out, {int(x) for x in args.phases.split(",") if x})
    print(tables(out))


if __name__ == "__main__":
    main()
