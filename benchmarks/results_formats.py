"""Storage formats of optimizer state, 8-/4-bit peers and pure-bf16 training against AdamW, over
seeds that change the initial weights and the batches (the tables of RESULTS.md, issue 16).

    python benchmarks/results_formats.py [--out results-formats] [--phases 1,2,3,4] [--tables-only]

Runs ``lowmem-analyze compare`` (in this Python, from this checkout) into ``OUT/TASK/sSEED/SWEEP``
and then prints the tables from the ``compare.csv`` files. A finished run is never trained again
(compare resumes), so the script can be stopped and rerun, and a phase added later.

Tasks: ``shakespeare`` (the built-in example, through ``examples/shakespeare_seeds.py:seedS``:
seed 0 is the built-in example itself) at lr 1e-3, AdamW's best at seed 0 in RESULTS.md's
first table; ``teacher`` (``examples/teacher_mlp.py:seedS``) at lr 3e-3, AdamW's best at seed 0
on the grid 1e-3, 3e-3, 1e-2. Seed S is ``--seed S`` (initial weights, stochastic rounding)
with the factory ``seedS`` (batches). Every other setting is compare's default (400 steps,
warm-up 20, cosine to 0.1·lr, betas 0.9/0.95, no weight decay, 4 held-out batches).

Phases (cut from the end when the machine is busy):
  1. teacher: fp32 parameters (adamw, eve, eve:int8, eve:int4, the peers) and bf16 parameters
     (adamw; eve:bf16:bf16 with each rounding), seeds 0-2;
  2. shakespeare, fp32: adamw, eve:int8, eve:int4, torchao-adamw8bit, torchao-adamw4bit, seeds 0-2;
  3. shakespeare, fp32: eve and bnb-adamw8bit, seeds 0-2;
  4. shakespeare, bf16 parameters as in phase 1, seed 0 only (bf16 matmuls are slow on CPU).

A peer whose package is missing is skipped by compare with a note (bitsandbytes is not a
dependency: put it on PYTHONPATH to include it).
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

TASKS = {
    "teacher": {"target": "examples/teacher_mlp.py", "lr": 3e-3},
    "shakespeare": {"target": "examples/shakespeare_seeds.py", "lr": 1e-3},
}

# (phase, task, seeds, sweep folder, optimizers, extra flags)
SWEEPS = [
    (1, "teacher", SEEDS, "fp32", ["adamw", "eve", "eve:int8", "eve:int4", *PEERS, "bnb-adamw8bit"], []),
    (1, "teacher", SEEDS, "bf16-nearest", ["adamw", BF16_PLAN], ["--param-dtype", "bf16"]),
    *[(1, "teacher", SEEDS, f"bf16-{r}", [BF16_PLAN], ["--param-dtype", "bf16", "--param-rounding", r])
      for r in ROUNDINGS[1:]],
    (2, "shakespeare", SEEDS, "fp32", ["adamw", "eve:int8", "eve:int4", *PEERS], []),
    (3, "shakespeare", SEEDS, "fp32", ["adamw", "eve", "bnb-adamw8bit"], []),
    (4, "shakespeare", (0,), "bf16-nearest", ["adamw", BF16_PLAN], ["--param-dtype", "bf16"]),
    *[(4, "shakespeare", (0,), f"bf16-{r}", [BF16_PLAN], ["--param-dtype", "bf16", "--param-rounding", r])
      for r in ROUNDINGS[1:]],
]


def run_sweeps(out: Path, phases: set[int]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    log = out / "wall.jsonl"
    for phase, task, seeds, sweep, optimizers, flags in SWEEPS:
        if phase not in phases:
            continue
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


def _gap_cells(gaps: list[float]) -> tuple[str, str, str]:
    """mean, spread and verdict of paired gaps (one per seed)."""
    if not gaps:
        return "", "", ""
    mean = statistics.fmean(gaps)
    if len(gaps) < 2:
        return f"{mean:+.4f}", "1 seed", "one seed: no noise estimate"
    sd = statistics.stdev(gaps)
    half = T_975[len(gaps) - 1] * sd / math.sqrt(len(gaps))
    lo, hi = mean - half, mean + half
    if lo <= 0 <= hi:
        verdict = "within seed noise"
    else:
        verdict = "worse than AdamW" if lo > 0 else "better than AdamW"
    spread = f"sd {sd:.4f}; {min(gaps):+.4f}…{max(gaps):+.4f}"
    return f"{mean:+.4f}", spread, f"{verdict} (95% CI {lo:+.4f}…{hi:+.4f})"


def tables(out: Path) -> str:
    lines = []
    for task in TASKS:
        n = _n_params(task)
        runs: dict[tuple[str, str], dict[int, dict]] = {}   # (sweep, optimizer) -> seed -> row
        for seed in SEEDS:
            for folder in sorted((out / task / f"s{seed}").glob("*")):
                for name, row in _rows(folder).items():
                    runs.setdefault((folder.name, name), {})[seed] = row
        if not runs:
            continue
        base = {s: float(r["final_val_loss"]) for s, r in runs.get(("fp32", "adamw"), {}).items()}
        base16 = {s: float(r["final_val_loss"]) for s, r in runs.get(("bf16-nearest", "adamw"), {}).items()}
        lines += [f"### {task} ({n:,} parameters, lr {TASKS[task]['lr']:g}, 400 steps)", "",
                  "| optimizer | params | state B/param | loss s0 / s1 / s2 | gap to AdamW: mean | spread | "
                  "verdict | gap to bf16 AdamW: mean | verdict | step ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        order = sorted(runs, key=lambda k: (k[0] != "fp32", k[0], k[1] != "adamw", k[1]))
        for sweep, name in order:
            by_seed = runs[(sweep, name)]
            losses = " / ".join(f"{float(by_seed[s]['final_val_loss']):.4f}" if s in by_seed else "–" for s in SEEDS)
            state = statistics.fmean(int(r["state_bytes"]) for r in by_seed.values()) / n
            step = statistics.median(float(r["step_seconds"]) for r in by_seed.values()) * 1e3
            params = "fp32" if sweep == "fp32" else f"bf16, {sweep.split('-', 1)[1]}"
            gaps = [float(by_seed[s]["final_val_loss"]) - base[s] for s in SEEDS if s in by_seed and s in base]
            mean, spread, verdict = _gap_cells(gaps) if (sweep, name) != ("fp32", "adamw") else ("", "", "reference")
            mean16, verdict16 = "", ""
            if sweep != "fp32" and (sweep, name) != ("bf16-nearest", "adamw"):
                g16 = [float(by_seed[s]["final_val_loss"]) - base16[s] for s in SEEDS if s in by_seed and s in base16]
                mean16, _, verdict16 = _gap_cells(g16)
            lines.append(f"| {name} | {params} | {state:.3f} | {losses} | {mean} | {spread} | {verdict} | {mean16} | "
                         f"{verdict16} | {step:.0f} |")
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
    p.add_argument("--phases", default="1,2,3,4", help="which phases to run (default all: 1,2,3,4)")
    p.add_argument("--tables-only", action="store_true", help="print the tables from what has finished")
    args = p.parse_args()
    out = Path(args.out).resolve()
    if not args.tables_only:
        run_sweeps(out, {int(x) for x in args.phases.split(",") if x})
    print(tables(out))


if __name__ == "__main__":
    main()
