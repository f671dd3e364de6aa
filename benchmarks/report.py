"""Time to build the HTML report against the analysis it reports on, for the built-in example.

    python benchmarks/report.py [--steps 400] [--rounds 5] [--threads N] [--hessian DIR] [--json]

Runs ``lowmem-analyze --example shakespeare --no-html`` once in this process (timed: that is the
analysis a user waits for), then rebuilds the report from the folder `--rounds` times, timing
each phase: reading the folder (`lowmem.reports.read_run`), drawing the figures and rendering the
HTML (`render_report`), and writing it. With ``--hessian DIR`` (a ``lowmem-analyze hessian
--out`` folder) the report is also timed with those blocks linked in as ``RUN/hessian``.

Goal (issue 5): the report takes a small fraction of the analysis time. Prints the median
report time, its share of the analysis time, and the file size; exits 0 (a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import cpu_model, load_average
from lowmem.cli.main import main as analyze
from lowmem.reports.html import render_report
from lowmem.reports.run import read_run
from lowmem.compress.plan import write_atomic


def _time_report(folder: Path, rounds: int) -> dict:
    phases = {"read": [], "render": [], "write": [], "total": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        run = read_run(folder)
        t1 = time.perf_counter()
        html = render_report(run)
        t2 = time.perf_counter()
        write_atomic(folder / "report.html", html)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            phases[k].append(v)
    return {k: statistics.median(v) for k, v in phases.items()} | {"bytes": (folder / "report.html").stat().st_size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hessian", type=Path, help="a lowmem-analyze hessian --out folder to include")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = analyze(["--example", "shakespeare", "--steps", str(args.steps), "--out", str(out),
                            "--no-html", "-q", "--device", "cpu"])
        analysis = time.perf_counter() - t0
        if code != 0:
            print(f"analysis failed with exit code {code}", file=sys.stderr)
            return 1
        report = _time_report(out, args.rounds)
        result = {"machine": cpu_model(), "threads": torch.get_num_threads(), "load": load_average(),
                  "torch": torch.__version__, "steps": args.steps, "analysis_s": analysis, "report": report,
                  "share": report["total"] / analysis}
        if args.hessian:
            os.symlink(args.hessian.resolve(), out / "hessian")
            blocks = len(json.loads((args.hessian / "hessian.json").read_text())["blocks"])
            result["with_hessian"] = _time_report(out, args.rounds) | {"blocks": blocks}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads, load {result['load']}")
    print(f"analysis (shakespeare, {args.steps} steps, CPU): {analysis:.1f} s")
    r = report
    print(f"report, median of {args.rounds}: {r['total']:.2f} s (read {r['read']:.2f}, figures + HTML "
          f"{r['render']:.2f}, write {r['write']:.3f}), {r['bytes'] / 2**20:.2f} MiB")
    print(f"report / analysis: {result['share']:.1%}  (goal: a small fraction)")
    if "with_hessian" in result:
        h = result["with_hessian"]
        print(f"with {h['blocks']} Hessian blocks: {h['total']:.2f} s (read {h['read']:.2f}, figures + HTML "
              f"{h['render']:.2f}), {h['bytes'] / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
