"""`lowmem-analyze compare`: train a model with several optimizers over a learning-rate grid,
from the same initial weights on the same batches, and compare their losses.

    lowmem-analyze compare --example shakespeare --lrs 3e-4,1e-3,3e-3,1e-2 --steps 400
    lowmem-analyze compare model.py --optimizers adamw,slimadam,eve --plan lowmem-out/plan.json
    lowmem-analyze compare --example shakespeare --optimizers adamw,eve:int8,eve:int4,torchao-adamw8bit --lrs 1e-3
    lowmem-analyze compare --example shakespeare --optimizers adamw,eve:bf16:bf16 --param-dtype bf16 \
        --param-rounding stochastic --lrs 1e-3

Optimizers are specs (`lowmem.compare.parse_spec`): a name of lowmem's registry (the default is
all of them), of a peer (``torchao-adamw8bit``, ``torchao-adamw4bit``, ``bnb-adamw8bit``: other
packages' 8-/4-bit AdamW, never in the default, so a sweep does not depend on what is installed),
or ``plan`` (SlimAdam from ``--plan``), and for lowmem's plan optimizers the storage of `m` and
`v` after colons (``eve:int8``, ``slimadam:int8:int8``, ``plan:bf16:bf16``). A peer whose package
is missing is skipped with a note, and the others run; if nothing is left to run, that is a
usage error. ``--param-dtype bf16`` trains a bf16 copy of the model (the same start for every
optimizer); ``--param-rounding`` says how lowmem's plan optimizers round into it; torch's AdamW
keeps bf16 state and updates in bf16 (round to nearest), the peers round to nearest.

Writes to ``--out`` (default ``lowmem-out/compare``) as each run ends: ``runs/NAME@LR.json``,
``compare.csv`` and ``curves.csv`` (columns in `lowmem.compare`), then ``report.html`` (in the
run folder when ``--out`` is its ``compare/`` folder, as by default, else in ``--out``). Running the same command
again skips the finished runs; ``--fresh`` starts over (the earlier sweep moves to ``previous/``
once a new run has finished; lowmem never deletes a file it did not write, see `lowmem.runfolder`).

Exit codes as ``lowmem-analyze`` (DESIGN §8): 0 done (diverged runs are results, a skipped peer
is a note); 2 usage error (unknown optimizer or storage format, no optimizer left to run, bad grid, a plan for another model, ``--out`` holding another sweep);
3 the user's code failed or broke the contract; 4 internal error; 130 interrupted (finished
runs kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console

from lowmem.cli.common import (EXIT_INTERRUPTED, EXIT_OK, PROG, ArgumentParser, fraction, load_plan_file, nonneg_float,
                               nonneg_int, parse_device, positive_int, run_guarded, seed_int, training_progress, user_code,
                               write_folder_report)
from lowmem.cli.contract import UsageError, load_example, load_task
from lowmem.compare import (KNOWN, OPTIMIZERS, PARAM_DTYPES, RunResult, SpecError, SweepMismatch, SweepSettings,
                            check_class_spec, format_names, has_runs, parse_spec, plan_digest, run_sweep, split_specs,
                            unavailable)
from lowmem.compress.optim.engine import ROUNDINGS
from lowmem.compress.optim.registry import PEER_NAMES
from lowmem.compress import PlanError
from lowmem.examples import EXAMPLES
from lowmem.probe import DEFAULTS, build
from lowmem.reports.run import loss_column
from lowmem.reports.terminal import CompareTable, compare_rows
from lowmem.runfolder import PREVIOUS, FolderError, RunFolder

NAME = f"{PROG} compare"
LR_FACTORS = (0.3, 1.0, 3.0, 10.0)   # default grid around the task's lr: 4 rates spanning 33x


def _names(text: str) -> list[str]:
    """Optimizer specs separated by commas, each in its canonical spelling (`parse_spec`)."""
    items = split_specs(text)
    if not items:
        raise argparse.ArgumentTypeError(f"no optimizer given; known: {','.join(KNOWN)}")
    specs, errors = [], []
    for item in items:
        try:
            specs.append(str(parse_spec(item)))
        except SpecError as e:
            errors.append(str(e))
    if errors:
        raise argparse.ArgumentTypeError("; ".join(errors))
    return list(dict.fromkeys(specs))


def _lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected learning rates separated by commas, e.g. 1e-3,3e-3; got {text!r}") from None
    if not lrs or any(not (0 < x < float("inf")) for x in lrs):
        raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0; got {text!r}")
    return sorted(dict.fromkeys(lrs))


def _betas(text: str) -> tuple[float, float]:
    try:
        b = tuple(float(x) for x in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0 <= x < 1 for x in b):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1) like 0.9,0.95; got {text!r}")
    return b




def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=NAME,
        description="Train a model with several optimizers over a learning-rate grid from the same initial weights "
                    "on the same batches; record loss curves, final train and held-out loss, divergence, "
                    "optimizer-state bytes and step time.",
        epilog="Exit codes: 0 done (diverged runs are results); 2 usage error; 3 your code failed or broke the "
               "model.py contract; 4 internal error; 130 interrupted (finished runs kept: run the same command "
               "to resume).",
    )
    p.add_argument("target", nargs="?", help="model.py or model.py:factory (the contract of lowmem-analyze)")
    p.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example instead of a model.py")
    p.add_argument("--optimizers", type=_names, default=list(OPTIMIZERS), metavar="A,B,…",
                   help=f"optimizers to train (default all of lowmem's: {','.join(OPTIMIZERS)}); also the "
                        f"peers {','.join(PEER_NAMES)} (other packages, skipped when missing), plan (SlimAdam "
                        "from --plan) and module:Class[:{json}] for any optimizer class (e.g. "
                        "'torch.optim:SGD:{\"momentum\": 0.9}'; a .py file beside model.py is a module); a plan "
                        f"optimizer may carry the storage of m and v as NAME:M or NAME:M:V, e.g. eve:int8 ({format_names()})")
    p.add_argument("--lrs", type=_lrs, metavar="LR,LR,…",
                   help="peak learning rates (default the task's lr times " + ", ".join(f"{f:g}" for f in LR_FACTORS) + ")")
    p.add_argument("--steps", type=positive_int, help=f"steps per run (default the task's, else {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=nonneg_int, help="linear warm-up steps (default steps/20)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="after warm-up (default cosine)")
    p.add_argument("--min-lr-ratio", type=fraction, default=0.1, help="cosine floor as a share of the lr (default 0.1)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="decoupled weight decay (default 0)")
    p.add_argument("--betas", type=_betas, default=(0.9, 0.95), help="beta1,beta2 (default 0.9,0.95)")
    p.add_argument("--eval-every", type=positive_int, help="steps between held-out evaluations (default steps/10)")
    p.add_argument("--eval-batches", type=nonneg_int, default=4, help="held-out batches per evaluation (default 4)")
    p.add_argument("--plan", metavar="FILE", help="SlimAdam from this plan.json (default: the published rules)")
    p.add_argument("--param-dtype", choices=tuple(PARAM_DTYPES), default="fp32",
                   help="train the model in this dtype, cast after build_model (default fp32)")
    p.add_argument("--param-rounding", choices=ROUNDINGS, default="nearest",
                   help="how lowmem's plan optimizers round updates into bf16 parameters (default nearest; "
                        "torch's AdamW and the peers round to nearest)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, …")
    p.add_argument("--out", default="lowmem-out/compare", metavar="DIR", help="output folder (default lowmem-out/compare)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: the sweep already in --out moves to --out/previous once a new run has finished")
    p.add_argument("--format", choices=("table", "json"), default="table", help="stdout: a table or one JSON document")
    p.add_argument("--seed", type=seed_int, default=0, help="torch.manual_seed before build_model and each run (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or notes on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks of failures in your code")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return run_guarded(lambda err: _run(args, err), prog=NAME, quiet=args.quiet, debug=args.debug)




def _run(args, err: Console) -> int:
    if bool(args.target) == bool(args.example):
        raise UsageError("give a model.py or --example NAME (one of them)")
    with user_code():
        task = load_example(args.example) if args.example else load_task(args.target)
    device = parse_device(args.device)
    settings_lr = task.defaults.get("lr", DEFAULTS["lr"])
    steps = args.steps or task.defaults.get("steps", DEFAULTS["steps"])
    lrs = args.lrs or sorted(settings_lr * f for f in LR_FACTORS)
    plan = None
    if args.plan:
        plan = load_plan_file(args.plan)
        with user_code():
            model, _ = build(task, torch.device("cpu"), settings_lr, args.seed, with_optimizer=False)
        try:
            plan.validate(model)
        except PlanError as e:
            raise PlanError(f"{args.plan} does not fit the model of {task.source}: {e}") from None
    if args.warmup is not None and args.warmup >= steps:
        raise UsageError(f"--warmup {args.warmup} must be below --steps {steps}")
    if args.param_rounding != "nearest" and args.param_dtype == "fp32":
        raise UsageError(f"--param-rounding {args.param_rounding} rounds into bf16 parameters: add --param-dtype bf16")
    if plan is None and any(parse_spec(s).name == "plan" for s in args.optimizers):
        raise UsageError("optimizer 'plan' is SlimAdam from --plan FILE: give --plan, or use slimadam")
    skipped = unavailable(args.optimizers)
    named = {n: why for n, why in skipped.items() if ":" in n}    # a module:Class the user named: an error
    if named:
        raise UsageError("; ".join(named.values()))
    for s in args.optimizers:
        if parse_spec(s).custom:
            try:
                check_class_spec(s, settings_lr)
            except SpecError as e:
                raise UsageError(str(e)) from None
    for reason in skipped.values():
        if not args.quiet:
            err.print(f"{NAME}: note: skipped: {reason}", markup=False)
    args.optimizers = [s for s in args.optimizers if parse_spec(s).name not in skipped]
    if not args.optimizers:
        raise UsageError("no optimizer left to run: " + "; ".join(skipped.values()))
    args.skipped = skipped
    settings = SweepSettings(steps=steps, warmup=steps // 20 if args.warmup is None else args.warmup,
                             schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                             betas=tuple(args.betas), eval_every=args.eval_every or max(1, steps // 10),
                             eval_batches=args.eval_batches, seed=args.seed,
                             slimadam=plan_digest(plan) if plan else "slimadam-rules", task=task.source,
                             param_dtype=args.param_dtype, param_rounding=args.param_rounding)
    out = Path(args.out)
    with RunFolder(out, NAME) as folder:
        report_in = _report_folder(out)
        folder.check([*SWEEP_FILES, *(["report.html"] if report_in == out else [])],
                     f" (a sweep writes {', '.join(SWEEP_FILES)} and report.html)")
        if args.fresh:   # the earlier sweep is kept in OUT/previous once this one has finished a run
            folder.begin(SWEEP_FILES, has_runs, kind="sweep")
        folder.claim(SWEEP_FILES)
        try:
            return _sweep(args, err, task, device, plan, lrs, settings, out)
        finally:
            try:
                if folder.settle(has_runs, "sweep") == "kept" and not args.quiet:
                    err.print(f"the earlier sweep in {out} is now in {out / PREVIOUS}", markup=False)
            except FolderError as e:   # never in place of the sweep's own outcome
                err.print(f"{NAME}: warning: {e}", markup=False)


SWEEP_FILES = ("runs", "compare.csv", "curves.csv", "settings.json")   # what a sweep writes in --out


def _sweep(args, err: Console, task, device, plan, lrs, settings, out: Path) -> int:
    steps = settings.steps
    quiet = args.quiet or not err.is_terminal
    note = (lambda msg: None) if args.quiet else (lambda msg: err.print(msg, markup=False))
    if task.get_val_batch is None:
        note(f"{task.source} has no held-out split (get_val_batch(i), or get_batch(step, split='val')): "
             "final losses are training losses")
    elif args.eval_batches == 0:
        note("--eval-batches 0: final losses are training losses")
    progress = training_progress(err, disable=quiet)
    bar = progress.add_task("", total=steps, loss="—")

    def start(name, lr, i, total):
        progress.reset(bar, total=steps, description=f"{name} lr {lr:g} ({i + 1}/{total})", loss="—")

    def done(result: RunResult, resumed: bool):
        if resumed:
            note(f"{result.optimizer} lr {result.lr:g}: finished earlier in {out}, kept")
        elif result.status == "diverged":
            note(f"{result.optimizer} lr {result.lr:g}: diverged after {result.steps_done} step(s) (NaN/inf loss)")

    try:
        with progress:
            results = run_sweep(task, args.optimizers, lrs, settings, out, device, plan, on_run_start=start,
                                on_run_done=done, on_step=lambda s, loss: progress.update(bar, completed=s, loss=f"{loss:.4f}"))
    except SweepMismatch as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        note(f"interrupted: the finished runs are in {out}; run the same command to resume the rest")
        return EXIT_INTERRUPTED
    _report(out, note)
    rows = [r.row() for r in results]
    loss_name = "held-out loss" if loss_column(rows) == "final_val_loss" else "training loss"
    if args.format == "json":
        doc = {"settings": settings.to_json(), "lrs": lrs, "runs": [r.row() for r in results],
               "skipped": getattr(args, "skipped", {}),
               "files": {"compare": str(out / "compare.csv"), "curves": str(out / "curves.csv")}}
        sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    else:
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        console.print(CompareTable(compare_rows(rows), loss_name))
    return EXIT_OK


def _report_folder(out: Path) -> Path:
    """The folder whose report.html shows the sweep: the run folder when `out` is its ``compare/``
    (the default), else `out`."""
    return out.parent if out.name == "compare" and (out.parent / "plan.json").exists() else out


def _report(out: Path, note) -> None:
    folder = _report_folder(out)
    write_folder_report(folder, note, held=folder == out)   # this sweep holds --out's lock, not its parent's
