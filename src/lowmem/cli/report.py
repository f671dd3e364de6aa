"""`lowmem-analyze report RUN_DIR`: the terminal views and ``report.html`` again, from the files a
run left, without the model and without retraining; works on an interrupted run.

    lowmem-analyze report lowmem-out                 # tables on stdout, lowmem-out/report.html
    lowmem-analyze report lowmem-out --html r.html   # the report elsewhere
    lowmem-analyze report lowmem-out --no-html --format json

See `lowmem.reports.run` for the files read. Exit codes as ``lowmem-analyze`` (DESIGN §8):
0 done; 2 usage error (no such folder, nothing to report, an unreadable file); 4 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from lowmem.cli.common import PROG, ArgumentParser, run_guarded, write_report_html
from lowmem.cli.contract import UsageError
from lowmem.reports.run import RunFolderError, gap_words, loss_column, read_run
from lowmem.reports.terminal import (CompareTable, DecisionTable, HessianRow, HessianTable, MemoryTable, PlanSummary,
                                    PlanTable, RoleSnrTable, StateTable, compare_rows)
from lowmem.runfolder import PREVIOUS, REPLACED, FolderBusy
from lowmem.snr.summary import median_by_role

NAME = f"{PROG} report"


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=NAME,
        description="Rebuild the terminal views and the self-contained report.html of a lowmem-analyze run "
                    "from the files in its output folder (plan.json, snr.csv, precision.csv, layers.json, "
                    "memory.json, peak.json, hessian.json, compare.csv).",
        epilog="Exit codes: 0 done; 2 usage error (missing folder, nothing to report, unreadable file); "
               "4 internal error.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a run (default of lowmem-analyze: lowmem-out)")
    p.add_argument("--html", metavar="FILE", help="where to write the HTML report (default RUN_DIR/report.html)")
    p.add_argument("--no-html", action="store_true", help="only print the terminal views")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="stdout: rich tables, or one JSON document (what the folder holds)")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_guarded(lambda err: _run(args, err), prog=NAME, quiet=args.quiet, debug=args.debug)


def _run(args, err: Console) -> int:
    note = (lambda msg: None) if args.quiet else (lambda msg: err.print(msg, markup=False))
    try:
        run = read_run(args.run_dir)
    except RunFolderError as e:
        raise UsageError(str(e)) from None
    for n in run.notes:
        note(f"note: {n}")
    if (run.folder / REPLACED).is_dir():
        note(f"note: this run did not finish; the run before it waits in {run.folder / REPLACED} and moves to "
             f"{PREVIOUS}/ (or back, if this run has no results) when the next run in {run.folder} starts")
    html = None
    if args.html and Path(args.html).is_dir():
        raise UsageError(f"--html {args.html} is a folder; give the file to write, e.g. {Path(args.html) / 'report.html'}")
    if not args.no_html:
        html = _write_html(run, args.html, note)
    if args.format == "json":
        doc = {"folder": str(run.folder), "status": run.status,
               "plan": run.plan.to_json() if run.plan else None,
               "memory": [r.to_json() for r in run.memory_rows()],
               "measurements": len(run.trajectory.steps) if run.trajectory else 0,
               "precision_measurements": len(run.precision.steps) if run.precision else 0,
               "hessian_blocks": len(run.hessian_blocks), "compare_runs": len(run.compare),
               "peak": run.peak.to_json() if run.peak else None, "decision": [r.to_json() for r in run.decisions()],
               "notes": run.notes, "report": str(html) if html else None}
        sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        return 0
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    if run.plan is not None:
        console.print(PlanTable(run.plan, run.layers))
        console.print()
        if run.precision is not None or any(lp.state is not None for lp in run.plan.layers.values()):
            console.print(StateTable(run.plan, run.precision_by_layer()))
            console.print()
    if run.trajectory is not None and run.layers is not None:
        threshold = (run.plan.source if run.plan else {}).get("threshold", 1.0)
        window = (run.plan.source if run.plan else {}).get("window")
        console.print(RoleSnrTable(median_by_role(run.trajectory, run.layers, tuple(window) if window else None),
                                   threshold))
        console.print()
    if run.memory is not None:
        task = (run.plan.source if run.plan else {}).get("task") or str(run.folder)
        console.print(MemoryTable(run.memory, task, "plan.json" if run.plan else None))
        console.print()
    if run.hessian_blocks:
        console.print(HessianTable([_hessian_row(b.record) for b in run.hessian_blocks]))
        console.print()
    if run.compare:
        held_out = loss_column(run.compare) == "final_val_loss"
        console.print(CompareTable(compare_rows(run.compare), "held-out loss" if held_out else "training loss"))
        console.print()
    if run.plan is not None:
        console.print(PlanSummary(run.plan))
    decisions = run.decisions()
    if decisions:
        console.print()
        console.print(DecisionTable(decisions, run.peak, *gap_words(run.compare)))
    return 0


def _write_html(run, path: str | None, note) -> Path | None:
    """report.html, or a note while another lowmem process writes the run folder (the tables are
    printed all the same)."""
    try:
        html = write_report_html(run, path)
    except FolderBusy as e:
        note(f"report.html not written: {e}; or write it elsewhere with --html FILE")
        return None
    except OSError as e:
        raise UsageError(f"cannot write {path or run.folder / 'report.html'}: {e.strerror or e}") from None
    note(f"wrote {html}")
    return html


def _hessian_row(r: dict) -> HessianRow:
    if r.get("status") != "done":
        return HessianRow(r.get("block", "?"), r.get("size") or 0, failure=r.get("reason") or r.get("status", "?"),
                          status=r.get("status", "failed"))
    head = (r.get("mass") or {}).get("per head")
    spec = r.get("spectrum") or {}
    return HessianRow(r["block"], r["size"], (r.get("class") or {}).get("label"),
                      (head["inside"], head["baseline"]) if head else None, (r.get("found") or {}).get("groups"),
                      spec.get("lambda_max"), spec.get("condition"))


if __name__ == "__main__":
    sys.exit(main())
