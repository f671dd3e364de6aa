"""`lowmem-analyze`: probe-train a model, measure the SNR of Adam's `v`, write a compression plan.

``lowmem-analyze model.py`` (or ``--example NAME``) runs the probe; ``lowmem-analyze COMMAND …``
runs one of `SUBCOMMANDS` (``memory``: optimizer-state memory, see `lowmem.cli.memory`).

After the plan (and ``--validate``), the peak memory of one training step per candidate optimizer
is traced on fake tensors (`lowmem.cli.peak`, ``peak.json``; ``--no-peak`` skips it, ``--fit
SIZE`` adds the largest micro-batch within SIZE) and the output ends with the decision table
(`lowmem.reports.terminal.DecisionTable`). A step that cannot be traced is a note, not a failure.

Exit codes (DESIGN §8): 0 done; 1 analysis finished but a requested bar (``--require-saved``)
was not met; 2 usage error (bad flags, missing file, unreadable or mismatched plan); 3 the
user's code failed or broke the `model.py` contract (including a NaN/inf loss); 4 internal
error; 130 interrupted by Ctrl-C (the trajectory and a plan from what was captured are kept).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from lowmem.cli.common import (EXIT_BAR, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_USER, PROG,
                               ArgumentParser, fraction, load_plan_file, nonneg_float, parse_device, positive_float,
                               positive_int, run_guarded, seed_int, training_progress, user_code, write_folder_report)
from lowmem.cli.contract import UsageError, load_example, load_task
from lowmem.compress import Plan, PlanError, build_plan, build_preset, plan_state_memory
from lowmem.compare import SweepSettings, has_runs, plan_digest, run_sweep
from lowmem.compress.memory import MemoryEstimate, estimate_state_memory, format_bytes
from lowmem.compress.peak import PeakReport
from lowmem.compress.optim.registry import PLAN_PRESETS
from lowmem.compress.plan import model_record, write_atomic
from lowmem.compress.precision import ADAMW_BYTES_PER_PARAMETER, PRECISION_THRESHOLD, plan_bytes_per_parameter
from lowmem.examples import EXAMPLES
from lowmem.layers import resolve_layers
from lowmem.cli.peak import batch_size, dtype_words, peak_optimizers, size_argument, trace_task
from lowmem.probe import DEFAULTS, TaskError, build, call_user, run_probe
from lowmem.runfolder import FINISHED, LOCK, PREVIOUS, FolderError, RunFolder
from lowmem.reports.run import Decision, decision_rows, gap_words
from lowmem.reports.terminal import (CompareTable, DecisionTable, PlanSummary, PlanTable, RoleSnrTable, StateTable,
                                     compare_rows, print_next_steps)
from lowmem.snr.capture import NoAdamStateError
from lowmem.snr.precision import PrecisionTrajectory
from lowmem.snr.summary import median_by_role
from lowmem.snr.trajectory import SnrTrajectory

__all__ = ["EXIT_BAR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "EXIT_USER", "PROG",
           "SUBCOMMANDS", "main", "make_parser"]

# `lowmem-analyze NAME …` runs the `main(argv)` of these modules; anything else is a model.py
# (a file literally named like a command is reached as ./NAME).
SUBCOMMANDS = {"memory": "lowmem.cli.memory", "hessian": "lowmem.cli.hessian", "report": "lowmem.cli.report",
               "compare": "lowmem.cli.compare"}


def _window(text: str) -> tuple[int | None, int | None]:
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected START:END (either may be empty), got {text!r}")
    try:
        w = (int(start) if start else None, int(end) if end else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integer steps in START:END, got {text!r}") from None
    if w[0] is not None and w[1] is not None and w[0] > w[1]:
        raise argparse.ArgumentTypeError(f"window start {w[0]} is after its end {w[1]}")
    return w




def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        usage=f"%(prog)s [model.py | --example NAME] [options]\n       %(prog)s {{{','.join(SUBCOMMANDS)}}} …",
        description="Train a model briefly with AdamW, measure per layer and axis how well Adam's v is "
                    "replaced by its mean (SNR), and write a compression plan.",
        epilog="Other commands: memory (optimizer-state memory of AdamW, the presets and a plan, from shapes; "
               f"'{PROG} memory --help'); hessian (exact Hessian blocks, their structure and spectra; "
               f"'{PROG} hessian --help'); report (rebuild the terminal views and report.html from a run folder; "
               f"'{PROG} report --help'); compare (train with several optimizers over a learning-rate grid; "
               f"'{PROG} compare --help'). "
               "Exit codes: 0 done; 1 a --require-saved bar was not met; 2 usage error; 3 your code failed "
               "or broke the model.py contract; 4 internal error; 130 interrupted (results so far kept).",
    )
    p.add_argument("target", nargs="?", help="model.py or model.py:factory defining build_model, get_batch, loss_fn")
    p.add_argument("--example", choices=sorted(EXAMPLES), help="run a built-in example instead of a model.py")
    p.add_argument("--steps", type=positive_int, help=f"probe training steps (default {DEFAULTS['steps']}, or LOWMEM['steps'])")
    p.add_argument("--every", type=positive_int, help=f"measure SNR every N optimizer steps (default {DEFAULTS['every']})")
    p.add_argument("--lr", type=positive_float, help=f"probe learning rate of the default AdamW (default {DEFAULTS['lr']:g})")
    p.add_argument("--threshold", type=nonneg_float, default=1.0, help="compress along a subset when its SNR is > this (default 1.0)")
    p.add_argument("--window", type=_window, help="steps START:END (inclusive) averaged for the plan; default all measured steps")
    p.add_argument("--prefer", choices=("snr", "compression"), default="snr",
                   help="among passing subsets take the highest SNR (default) or the most compression")
    p.add_argument("--precision-threshold", type=nonneg_float, default=PRECISION_THRESHOLD, metavar="X",
                   help="store each layer's m (and its v when kept whole) in the smallest format (int4, int8, bf16) "
                        "whose measured update-direction error stays below X at every measurement "
                        f"(default {PRECISION_THRESHOLD:g}: 8-bit passes, 4-bit rarely); 0 keeps all state in fp32")
    p.add_argument("--precision-every", type=positive_int, metavar="N",
                   help="measure the state formats' precision only at the first SNR measurement and every N "
                        "steps, a multiple of --every (default: at every SNR measurement); on a large model on CPU "
                        "it costs 4-6 "
                        "times the SNR, so e.g. 2x --every cuts the probe's measuring time by about 40%%, "
                        "4x by 60%%")
    p.add_argument("--depth-average", action="store_true", help="average SNR over depth for layers of one role and shape")
    p.add_argument("--rule", choices=("lowmem", "paper"), default="lowmem",
                   help="lowmem (default): per-head subsets are candidates too, an embedding's token axis is not; "
                        "paper: SlimAdam as published (every subset of each tensor's own axes, token included, no "
                        "head view, highest SNR)")
    p.add_argument("--shadow-v", action="store_true", help="estimate v from gradients when the optimizer keeps no exp_avg_sq")
    p.add_argument("--side-stream", action="store_true",
                   help="CUDA: run each measurement on a side stream beside training (its temporaries then "
                        "coexist with the next step's activations)")
    p.add_argument("--preset", choices=PLAN_PRESETS, help="write a preset plan for the model without training")
    p.add_argument("--plan", metavar="FILE", help="check an existing plan against the model and show it, without training")
    p.add_argument("--require-saved", type=fraction, metavar="FRACTION",
                   help="exit 1 if the plan saves less than this share of v (e.g. 0.5)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, …")
    p.add_argument("--out", default="lowmem-out", metavar="DIR",
                   help="output folder for plan.json, snr.csv, layers.json, memory.json, peak.json and report.html (default lowmem-out)")
    p.add_argument("--no-html", action="store_true", help="do not write report.html")
    p.add_argument("--validate", type=positive_int, metavar="N",
                   help="after writing the plan, train AdamW and the plan's optimizer for N steps from the same start "
                        "and report the loss gap and memory saved (runs in OUT/validate)")
    p.add_argument("--fit", type=size_argument, metavar="SIZE",
                   help="the memory budget of the decision table (e.g. 24GiB, 80GB): per optimizer the largest "
                        "micro-batch whose training step fits in it")
    p.add_argument("--no-peak", action="store_true",
                   help="do not trace the peak memory of a training step per optimizer (peak.json; on fake "
                        "tensors, no memory used: seconds for small models, minutes for billions of parameters "
                        "with --fit)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="stdout: rich tables or one JSON document")
    p.add_argument("--seed", type=seed_int, default=0, help="torch.manual_seed before build_model (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    if argv and not argv[0].startswith("-") and not Path(argv[0].partition(":")[0]).exists():
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1, cutoff=0.6)
        if close:   # `reprot run`: argparse would only complain about the extra word
            Console(stderr=True, soft_wrap=True).print(
                f"{PROG}: error: {argv[0]!r} is neither a file nor a command. Did you mean the command {close[0]!r}?",
                markup=False)
            return EXIT_USAGE
    args = make_parser().parse_args(argv)
    return run_guarded(lambda err: _run(args, err), quiet=args.quiet, debug=args.debug,
                       user_errors=(TaskError, NoAdamStateError))


def _run(args, err: Console) -> int:
    if args.target and args.example:
        raise UsageError("give either a model.py or --example, not both")
    if not args.target and not args.example:
        raise UsageError(f"nothing to analyze: give a model.py (e.g. {PROG} model.py) or a built-in example "
                         f"({PROG} --example shakespeare)")
    if args.plan and args.preset:
        raise UsageError("--plan and --preset are alternatives; give one")
    if args.fit is not None and args.no_peak:
        raise UsageError("--fit needs the peak trace that --no-peak turns off; give one of them")
    if args.fit is not None and args.plan:
        target = shlex.quote(args.target) if args.target else f"--example {args.example}"
        raise UsageError(f"--fit sizes the decision table of a probe or --preset run; for a plan file ask "
                         f"'{PROG} memory {target} --plan {shlex.quote(args.plan)} --peak --fit SIZE'")
    if args.rule == "paper" and (args.prefer != "snr" or args.depth_average):
        raise UsageError("--rule paper takes each layer's own highest SNR: leave out --prefer compression and "
                         "--depth-average")
    with user_code():
        task = load_example(args.example) if args.example else load_task(args.target)
    device = parse_device(args.device)
    settings = {**DEFAULTS, **task.defaults}
    steps = args.steps or settings["steps"]
    every = args.every or settings["every"]
    lr = args.lr or settings["lr"]
    out = Path(args.out)
    quiet = args.quiet or not err.is_terminal
    note = (lambda msg: None) if args.quiet else (lambda msg: err.print(msg, markup=False))

    if args.side_stream and (args.plan or args.preset):
        raise UsageError("--side-stream places the probe's measurements; --plan and --preset run no probe")
    if args.side_stream and device.type != "cuda":
        raise UsageError(f"--side-stream measures on a CUDA side stream; this run trains on {device} "
                         "(give --device cuda, or leave --side-stream out)")
    if every > steps and not (args.plan or args.preset):
        raise UsageError(f"measuring every {every} steps (--every or LOWMEM['every']) needs at least that many "
                         f"steps; the probe runs {steps} (--steps or LOWMEM['steps'])")
    if args.window and args.window[0] is not None and args.window[0] > steps and not (args.plan or args.preset):
        raise UsageError(f"--window {args.window[0]}:{'' if args.window[1] is None else args.window[1]} starts after "
                         f"the last step the probe runs ({steps}); every measured step lies in 1:{steps}")
    if args.precision_every is not None:
        pe = args.precision_every
        if args.plan or args.preset or args.shadow_v:
            raise UsageError("--precision-every places the probe's precision measurements; "
                             + ("--shadow-v reads no m and measures none" if args.shadow_v
                                else "--plan and --preset run no probe"))
        if pe % every:
            raise UsageError(f"--precision-every {pe} must be a multiple of the SNR's every {every} steps "
                             "(--every or LOWMEM['every']): the precision is measured at some of its measurements")
        if pe > steps:
            raise UsageError(f"--precision-every {pe} needs at least that many steps; the probe runs {steps} "
                             "(--steps or LOWMEM['steps'])")
        start, end = args.window or (None, None)
        last = min(steps, end if end is not None else steps)
        first = -(-max(start or 1, 1) // pe) * pe   # the first multiple of pe in the window
        if first > last and not (start or 1) <= every <= last and args.precision_threshold > 0:
            raise UsageError(f"--window {'' if start is None else start}:{'' if end is None else end} holds no step "
                             f"that measures the precision (step {every}, then every {pe} steps up to step {steps}): "
                             "widen the window or give a smaller --precision-every")
    if args.plan and not args.validate:   # only checks the plan: writes nothing, so needs no folder
        return _check_plan(args, task, device, lr, note, steps)
    # The folder is locked and checked before any training: a busy folder, or one holding the
    # user's own files, costs nothing.
    names = VALIDATE_FILES if args.plan else RUN_FILES
    writes = [n for n in names if not (n == "report.html" and args.no_html)
              and not (n == "validate" and not args.validate) and not (n == "peak.json" and args.no_peak)
              and not (n.startswith(("snr.", "precision.")) and args.preset)]
    with RunFolder(out, f"{PROG} {args.target or '--example ' + args.example}") as folder:
        folder.check(writes, " (a run of lowmem-analyze writes " + ", ".join(writes) + ")")
        if folder.stale_holder:
            note(f"took over {out / LOCK}, left by a process that no longer runs")
        try:
            return _run_in(args, task, device, steps, every, lr, out, quiet, note, err,
                           lambda: (folder.begin(names, has_results, writes, finished=run_finished),
                                    folder.claim(writes)))
        finally:
            _settle(folder, out, note)


def _settle(folder: RunFolder, out: Path, note) -> None:
    """Keep or put back the earlier run; a failure here is a note, never in place of the run's own
    outcome (what was set aside stays recorded and is settled by the next run)."""
    try:
        outcome = folder.settle(has_results, finished=run_finished)
    except FolderError as e:
        note(f"{PROG}: warning: {e}")
        return
    if outcome == "restored":
        note(f"this run left no results; the earlier run in {out} is back in place")
    elif outcome == "kept":
        behind = out / PREVIOUS / FINISHED
        note(f"the earlier run in {out} is now in {out / PREVIOUS}"
             + (f"; the last finished run before it is in {behind}" if FINISHED in folder.owned(behind.parent)
                else ""))


def _check_plan(args, task, device, lr, note, steps: int) -> int:
    """``--plan FILE`` without ``--validate``: the plan against the model, shown; nothing written."""
    with user_code():
        model, _ = build(task, device, lr, args.seed, with_optimizer=False)   # no training: no optimizer
    layers = resolve_layers(model, warn=False)
    plan = _checked_plan(args.plan, model, task)
    return _emit(args, plan, layers, None, {"mode": "plan"}, Path(args.out), lr=lr, steps=steps)


def _checked_plan(path: str, model, task) -> Plan:
    plan = load_plan_file(path)
    try:
        plan.validate(model)
    except PlanError as e:   # name the file and the model, like every other message
        raise PlanError(f"{path} does not fit the model of {task.source}: {e}") from None
    return plan


def _run_in(args, task, device, steps, every, lr, out: Path, quiet, note, err, begin) -> int:
    """The run proper, in the locked `out`; `begin()` sets the earlier run aside once the model is
    built (a model.py that fails to build leaves the folder as it was)."""
    if args.plan or args.preset:
        with user_code():
            model, _ = build(task, device, lr, args.seed, with_optimizer=False)   # no training: no optimizer
        layers = resolve_layers(model, warn=False)
        if args.plan:
            plan = _checked_plan(args.plan, model, task)
            begin()
        else:
            plan = build_preset(args.preset, model, layers)
            begin()
            _write_layers(out, model, layers)
            plan.save(out / "plan.json")
            estimate = _write_memory(out, model, layers, plan)
            note(f"wrote {out / 'plan.json'}")
        validation = _maybe_validate(args, task, plan, lr, device, out, err, quiet, note, "")
        if validation is _INTERRUPTED:
            return EXIT_INTERRUPTED
        peak = None
        if args.preset:
            peak = _maybe_peak(args, task, plan, model, out, note, "")
            _write_report(args, out, note)
            if peak is _INTERRUPTED:
                return EXIT_INTERRUPTED
        return _emit(args, plan, layers, None, {"mode": "plan" if args.plan else "preset"}, out, validation, lr=lr,
                     steps=steps, decision=_decision(peak, estimate.rows if args.preset else [], validation))

    def start(model, layers):
        begin()
        _write_layers(out, model, layers)

    csv_path = out / "snr.csv"
    precision_path = out / "precision.csv"
    progress = training_progress(err, disable=quiet)
    bar = progress.add_task("probe", total=steps, loss="—")
    with progress, user_code():
        result = run_probe(task, steps, every, lr, device, csv_path, args.seed, args.shadow_v,
                           on_step=lambda s, loss: progress.update(bar, completed=s, loss=f"{loss:.4f}"),
                           on_start=start, precision_out=precision_path, stream=args.side_stream,
                           precision_every=args.precision_every)
    traj = SnrTrajectory(result.capture.samples)
    precision = PrecisionTrajectory(result.capture.precision_samples) if result.capture.precision else None
    if precision is None and args.precision_threshold > 0:
        note("shadow v: the optimizer's m is not read, so no state format is measured; the plan keeps fp32 state")
    failure = result.nonfinite
    status = "interrupted" if result.interrupted else "nonfinite_loss" if failure else "complete"
    if not traj.samples:
        if failure:
            note(f"no SNR measurement was taken before the loss became non-finite; {csv_path} holds the header only")
            raise failure
        if result.interrupted:
            note(f"interrupted after {result.steps_done} step(s), before the first measurement (every {every}); "
                 f"{csv_path} holds the header only; no plan written")
            return EXIT_INTERRUPTED
        raise TaskError(f"no SNR measurement in {result.steps_done} steps (every {every}): the optimizer of "
                        f"{task.source} updated no parameter of the model with Adam state")
    try:
        plan = build_plan(result.model, traj, args.threshold, args.window, args.prefer, args.depth_average, rule=args.rule,
                          layers=result.layers,
                          source=_source(task, lr, steps, every, result.steps_done, status, args.precision_every),
                          precision=precision, precision_threshold=args.precision_threshold)
    except PlanError as e:   # e.g. a --window past the steps an interrupted probe reached
        if not (result.interrupted or failure):
            raise
        note(f"no plan written: {e}; the {len(traj.steps)} measurement(s) are kept in {csv_path.with_name('snr.csv')}"
             f" ('{PROG} report {out}' rebuilds one with the whole trajectory)")
        if failure:
            raise failure from None
        return EXIT_INTERRUPTED
    if precision is not None and args.precision_threshold > 0 and not precision.worst(args.window):
        # (possible with --precision-every and a --window: a run that stopped before the window's
        # first precision step)
        where = "the run took no precision measurement" if not precision.samples else \
            "the window {}:{} holds no precision measurement".format(*("" if x is None else x for x in args.window))
        note(f"{where} (every {args.precision_every or every} steps): the plan keeps every layer's state in fp32")
    plan.save(out / "plan.json")
    estimate = _write_memory(out, result.model, result.layers, plan)
    skipped = "the probe was interrupted" if result.interrupted else "the loss became non-finite" if failure else ""
    validation = _maybe_validate(args, task, plan, lr, device, out, err, quiet, note, skipped)
    if validation is _INTERRUPTED:
        return EXIT_INTERRUPTED
    peak = _maybe_peak(args, task, plan, result.model, out, note, skipped)
    _write_report(args, out, note)
    if peak is _INTERRUPTED:
        return EXIT_INTERRUPTED
    if failure:
        note(f"kept {len(traj.steps)} measurement(s) in {csv_path} and wrote {out / 'plan.json'} from them")
        raise failure
    if result.interrupted:
        note(f"interrupted at step {result.steps_done} of {steps}: kept {len(traj.steps)} measurement(s) in "
             f"{csv_path} and wrote {out / 'plan.json'} from what was captured")
    code = _emit(args, plan, result.layers, traj, {"mode": "probe", "status": status, "steps_done": result.steps_done,
                                                    "final_loss": result.losses[-1] if result.losses else None}, out,
                 validation, precision, lr=lr, steps=steps, decision=_decision(peak, estimate.rows, validation))
    return EXIT_INTERRUPTED if result.interrupted else code


# Every entry an analysis run may leave in --out (a preset run: all but the trajectory). A new run
# sets the earlier run's aside (lowmem.runfolder), so none of them is ever shown with another run.
RUN_FILES = ("layers.json", "plan.json", "snr.csv", "snr.csv.part", "precision.csv", "precision.csv.part",
             "memory.json", "peak.json", "report.html", "validate")
VALIDATE_FILES = ("validate",)   # --plan FILE --validate N adds a validation to a folder


def has_results(folder: Path, names=RUN_FILES) -> bool:
    """Whether a run folder holds something worth keeping among `names`: a plan, an SNR
    measurement or a finished validation run (layers.json and memory.json are remade in seconds)."""
    if "plan.json" in names and (folder / "plan.json").is_file():
        return True
    for name in ("snr.csv", "snr.csv.part"):
        if name not in names:
            continue
        try:
            with open(folder / name, "rb") as f:
                if f.readline() and f.readline().endswith(b"\n"):   # the header, then one whole row
                    return True
        except OSError:
            pass
    return "validate" in names and has_runs(folder / "validate")


def run_finished(folder: Path, names=RUN_FILES) -> bool:
    """Whether the analysis in `folder` ran to its end: its plan comes from a probe that completed
    (not one killed, interrupted or stopped by a non-finite loss) or from a preset. A validation
    added to a folder (`VALIDATE_FILES`: no plan among `names`) is no analysis: it never counts,
    so it neither pushes a finished analysis out of ``previous/`` nor is kept behind one."""
    if "plan.json" not in names:
        return False
    try:
        source = json.loads((folder / "plan.json").read_text()).get("source") or {}
        return source.get("status", "complete") == "complete"
    except (OSError, ValueError, AttributeError):
        return False


def _write_layers(out: Path, model, layers) -> None:
    """layers.json, what each parameter is, so `lowmem-analyze report` needs no model, even for a
    killed run."""
    write_atomic(out / "layers.json", json.dumps({**layers.to_json(), "model": model_record(model)}, indent=1) + "\n")


_INTERRUPTED = object()   # what _maybe_validate returns after Ctrl-C


def _maybe_validate(args, task, plan: Plan, lr: float, device, out: Path, err: Console, quiet: bool, note,
                    skipped: str):
    """`--validate`'s runs, None without it, or `_INTERRUPTED` after Ctrl-C. The report is
    written before a failure of the user's code propagates, so the plan's report is never lost."""
    if not args.validate:
        return None
    if skipped:
        note(f"--validate skipped: {skipped}")
        return None
    try:
        return _validate(args, task, plan, lr, device, out, err, quiet, note)
    except KeyboardInterrupt:
        note(f"validation interrupted; the plan is in {out / 'plan.json'}")
        _write_report(args, out, note)
        return _INTERRUPTED
    except TaskError:
        _write_report(args, out, note)
        raise


def _validate(args, task, plan: Plan, lr: float, device, out: Path, err: Console, quiet: bool, note) -> list:
    """AdamW and the plan's optimizer, `--validate` steps each from the same start at the probe's lr."""
    steps = args.validate    # an earlier validation was set aside with its run (RunFolder.begin)
    settings = SweepSettings(steps=steps, warmup=steps // 20, eval_every=max(1, steps // 10), seed=args.seed,
                             slimadam=plan_digest(plan), task=task.source)
    progress = training_progress(err, disable=quiet)
    bar = progress.add_task("validate", total=steps, loss="—")
    with progress, user_code():
        results = run_sweep(task, ["adamw", "plan"], [lr], settings, out / "validate", device, plan,
                            on_run_start=lambda name, *_: progress.reset(bar, total=steps, description=f"validate {name}",
                                                                         loss="—"),
                            on_step=lambda s, loss: progress.update(bar, completed=s, loss=f"{loss:.4f}"))
    note(f"validation runs in {out / 'validate'}")
    return results


def _write_memory(out: Path, model, layers, plan: Plan) -> MemoryEstimate:
    estimate = estimate_state_memory(model, plan, layers=layers)
    write_atomic(out / "memory.json", json.dumps(estimate.to_json(), indent=2) + "\n")
    return estimate


def _maybe_peak(args, task, plan: Plan, model, out: Path, note, skipped: str):
    """The peak of a training step per candidate optimizer (`lowmem.cli.peak`), traced on fake
    tensors at ``get_batch(0)``'s size with the parameters in the dtypes the model was built with,
    written to ``peak.json``; None when skipped or when the step cannot be traced (a note says
    why: the plan and everything else stand), `_INTERRUPTED` after Ctrl-C."""
    if args.no_peak:
        return None
    if skipped:
        note(f"peak memory not traced: {skipped}")
        return None
    try:
        with user_code():
            example = call_user(task, "get_batch(0)", task.get_batch, 0)
        how = "build_model() ran on the meta device, the batch at get_batch(0)'s size" + (
            ", then with dimension 0 resized for --fit" if args.fit is not None else "")
        peak = trace_task(task, example, peak_optimizers(plan, None), how, param_dtype=None, budget=args.fit)
    except KeyboardInterrupt:
        note(f"peak-memory trace interrupted; the plan is in {out / 'plan.json'}")
        return _INTERRUPTED
    except (Exception, SystemExit) as e:   # the analysis stands: a trace is an extra
        note(f"peak memory not traced (the decision table shows state only; --no-peak skips the trace): {e}")
        return None
    # traced at the batch's own size: say which (dimension 0 of its first tensor), and the dtypes
    peak = replace(peak, param_dtype=dtype_words(model), batch=batch_size(example))
    write_atomic(out / "peak.json", json.dumps(peak.to_json(), indent=1) + "\n")
    return peak


def _decision(peak, memory_rows, validation) -> tuple[list[Decision], PeakReport | None, list[dict]]:
    rows = [r.row() for r in validation] if validation else []
    return decision_rows(peak, list(memory_rows), rows), peak, rows


def _write_report(args, out: Path, note) -> None:
    """report.html from the files just written; a failure here loses none of them."""
    if not args.no_html:
        write_folder_report(out, note, held=True)


def _validation_summary(results) -> dict:
    adamw, mine = (next(r for r in results if r.optimizer == n) for n in ("adamw", "plan"))
    held_out = adamw.final_val_loss is not None
    key = "final_val_loss" if held_out else "final_train_loss"
    a, b = getattr(adamw, key), getattr(mine, key)
    gap = b - a if a is not None and b is not None else None
    relative = gap / abs(a) if gap is not None and a != 0 else None
    return {"steps": adamw.steps_done, "lr": adamw.lr, "loss_name": "held-out loss" if held_out else "training loss",
            "adamw": adamw.row(), "plan": mine.row(), "loss_gap": gap, "relative_gap": relative,
            "adamw_state_bytes": adamw.state_bytes, "plan_state_bytes": mine.state_bytes,
            "state_saved": 1 - mine.state_bytes / adamw.state_bytes if adamw.state_bytes else 0.0}


def _source(task, lr, steps, every, steps_done, status, precision_every=None) -> dict:
    source = {"probe_lr": lr, "probe_steps": steps, "every": every, "steps_done": steps_done, "status": status,
              "task": task.source}
    if precision_every is not None:
        source["precision_every"] = precision_every
    return source


def next_steps(args, run: dict, out: Path, lr: float, steps: int, validated: bool) -> list[tuple[str, str, str]]:
    """What a user does with the plan just shown, as (key, what, text): where the report and plan
    are, the line that trains with the plan, and the commands that check it by training (leaving
    out a validation this run did)."""
    target = shlex.quote(args.target) if args.target else f"--example {args.example}"
    plan = Path(args.plan) if run.get("mode") == "plan" else out / "plan.json"
    steps = args.validate or steps
    out_q, plan_q = shlex.quote(str(out)), shlex.quote(str(plan))
    lines = []
    if run.get("mode") != "plan":
        if not args.no_html:
            lines.append(("report", f"the report ({PROG} report {out_q} shows these tables again)",
                          str(out / "report.html")))
        lines.append(("plan", "the plan", str(plan)))
    lines.append(("train", "train with the plan (Python; lr: the probe's)",
                  f"optimizer = lowmem.optimizer_from_plan(model, {json.dumps(str(plan))}, lr={lr:g})"))
    if not validated:
        lines.append(("validate", "check it: AdamW and the plan's optimizer from the same start, loss gap and memory",
                      f"{PROG} {target} --plan {plan_q} --validate {steps} --lr {lr:g}"
                      f"{f' --seed {args.seed}' if args.seed else ''} --out {out_q}"))
    lines.append(("compare", "compare every optimizer over a learning-rate grid",
                  f"{PROG} compare {target} --plan {plan_q} --out {shlex.quote(str(out / 'compare'))}"))
    return lines


def _emit(args, plan: Plan, layers, traj: SnrTrajectory | None, run: dict, out: Path, validation=None,
          precision: PrecisionTrajectory | None = None, lr: float = DEFAULTS["lr"], steps: int = DEFAULTS["steps"],
          decision: tuple[list[Decision], PeakReport | None, list[dict]] | None = None) -> int:
    mem = plan_state_memory(plan)
    saved = plan.summary["v_saved"]
    bar_failed = args.require_saved is not None and saved < args.require_saved
    after = next_steps(args, run, out, args.lr or plan.source.get("probe_lr") or lr, steps, bool(validation))
    if args.format == "json":
        doc = {"plan": plan.to_json(),
               "memory": {"adamw_bytes": mem.adamw_bytes, "plan_bytes": mem.plan_bytes, "saved": round(mem.saved, 6),
                          "bytes_per_parameter": round(plan_bytes_per_parameter(plan), 6),
                          "adamw_bytes_per_parameter": ADAMW_BYTES_PER_PARAMETER},
               "run": run,
               "files": {"plan": str(out / "plan.json")} | ({"snr": str(out / "snr.csv")} if traj else {})
               | ({"precision": str(out / "precision.csv")} if precision is not None else {})}
        if traj is not None:
            doc["snr_by_role"] = [r.__dict__ for r in median_by_role(traj, layers, args.window)]
        if validation:
            doc["validation"] = _validation_summary(validation)
        if decision is not None:
            rows, peak, _ = decision
            doc["decision"] = [r.to_json() for r in rows]
            doc["peak"] = peak.to_json() if peak is not None else None
            if peak is not None:
                doc["files"]["peak"] = str(out / "peak.json")
        doc["next"] = {key: text for key, _, text in after}
        sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    else:
        # A pipe has no width; give the tables room rather than folding layer names.
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
        console.print(PlanTable(plan, layers))
        console.print()
        if precision is not None or any(lp.state is not None for lp in plan.layers.values()):
            window = tuple(plan.source["window"]) if plan.source.get("window") else None
            console.print(StateTable(plan, precision.by_layer(window) if precision is not None else None))
            console.print()
        if traj is not None:
            console.print(RoleSnrTable(median_by_role(traj, layers, args.window), args.threshold))
            console.print()
        console.print(PlanSummary(plan))
        if validation:
            console.print()
            console.print(CompareTable(compare_rows([r.row() for r in validation]), title=f"Validation: {validation[0].steps_done:,} steps "
                                       f"from the same start at lr {validation[0].lr:g} (gap to AdamW in brackets)"))
            v = _validation_summary(validation)
            if v["loss_gap"] is not None:
                relative = "" if v["relative_gap"] is None else f" ({v['relative_gap']:+.2%})"
                console.print(f"plan vs AdamW: {v['loss_name']} gap {v['loss_gap']:+.4f}{relative}; optimizer state {format_bytes(v['plan_state_bytes'])} vs "
                              f"{format_bytes(v['adamw_state_bytes'])} ({v['state_saved']:.1%} saved, measured)")
        if decision is not None and decision[0]:
            rows, peak, trained = decision
            console.print()
            console.print(DecisionTable(rows, peak, *gap_words(trained)))
        console.print()
        print_next_steps(console, after)
    if bar_failed:
        Console(stderr=True, soft_wrap=True).print(f"{PROG}: the plan saves {saved:.2%} of v, below --require-saved {args.require_saved:.2%}",
                                   markup=False)
        return EXIT_BAR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
