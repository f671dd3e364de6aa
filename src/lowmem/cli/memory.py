"""`lowmem-analyze memory`: optimizer-state memory of AdamW, every preset and a plan, from shapes.

    lowmem-analyze memory --config llama2-7b [--plan plan.json] [--format json]
    lowmem-analyze memory --config llama2-70b --state m=int8 --state m=int4,v=int8 --param-dtype bf16
    lowmem-analyze memory model.py[:factory] [--meta]
    lowmem-analyze memory --example shakespeare
    lowmem-analyze memory --config llama2-7b --param-dtype bf16 --seq 4096 --fit 80GiB
    lowmem-analyze memory model.py --batch 64 --activation-checkpointing --fit 24GiB

The first table has a row per optimizer, and per state format (``--state``) for the plan
optimizers; the second gives bytes per parameter of every plan optimizer in all twelve formats
beside torch AdamW with fp32 and with bf16 parameters (``"by_format"`` in the JSON document).

With ``--peak`` (or any of ``--batch``, ``--seq``, ``--autocast``, ``--activation-checkpointing``,
``--fit``, ``--world``, ``--compare``, ``--measure``) a third table gives the peak memory of one training step per optimizer: weights,
gradients, optimizer state, activations and temporaries live at the peak, traced on fake tensors
by `lowmem.compress.peak` (one real forward, backward and ``optimizer.step()`` of the model, with no
memory used: a 70B config traces on a laptop); with ``--fit SIZE`` also the largest micro-batch
whose peak fits in SIZE (``"peak"`` in the JSON document); ``--world N``: one rank's figures under
FSDP2 on N ranks; ``--compare DIR``: each optimizer's best held-out loss minus AdamW's from a
``compare`` sweep, in the same table; ``--measure``: beside each traced peak, two real steps'
measured peak on ``--device`` (`lowmem.cli.measure`). The batch is ``get_batch(0)``'s with
its first dimension set to ``--batch`` and, for tensors of two or more dimensions, its second to
``--seq``; a config's is token ids of ``--batch`` × ``--seq`` (default 1 × 2048, at most the
model's positions) under next-token cross-entropy.

A named config (`lowmem.compress.configs`) is built on the meta device and costs no memory. A
``model.py``'s ``build_model()`` runs as it does for training, on the CPU; ``--meta`` runs it
under ``torch.device("meta")`` instead, for models too large to build here (a ``build_model``
that loads weights or moves tensors to a device cannot be built that way).

Exit codes as ``lowmem-analyze`` (DESIGN §8): 0 done; 2 usage error (unknown config, missing
file, unreadable or mismatched plan, a bad size); 3 the user's code failed or broke the contract
(also: its training step cannot be traced on fake tensors); 4 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rich.console import Console

from lowmem.cli.common import PROG, ArgumentParser, load_plan_file, parse_device, positive_int, run_guarded, user_code
from lowmem.cli.measure import measure_rows
from lowmem.cli.contract import UsageError, load_example, load_task
from lowmem.cli.peak import peak_optimizers, size_argument, trace_guarded, trace_task
from lowmem.compress import PlanError
from lowmem.compress.configs import CONFIGS, build_config_model
from lowmem.compress.formats import M_FORMATS, V_FORMATS, StateFormat
from lowmem.compress.memory import (ALL_FORMATS, PARAM_BYTES, STATE_BYTES, FormatGrid, MemoryEstimate,
                                    estimate_state_memory, format_grid)
from lowmem.compress.peak import PeakReport, lm_loss, peak_report
from lowmem.examples import EXAMPLES
from lowmem.layers import resolve_layers
from lowmem.probe import DEFAULTS, TaskError, build, call_user
from lowmem.reports.run import RunFolderError, best_loss_gaps, measured_states, read_compare_csv
from lowmem.reports.terminal import MemoryTable, PeakTable

NAME = f"{PROG} memory"


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=NAME,
        description="Optimizer-state memory (m and v) of AdamW, every lowmem preset and a plan, estimated "
                    "from parameter shapes alone; then bytes per parameter of every preset in every state "
                    "format, beside AdamW with fp32 and with bf16 parameters.",
        epilog="Exit codes: 0 done; 2 usage error; 3 your code failed or broke the model.py contract; "
               "4 internal error.",
    )
    p.add_argument("target", nargs="?", help="model.py or model.py:factory (the contract of lowmem-analyze)")
    p.add_argument("--config", metavar="NAME", help=f"a built-in model shape: {', '.join(CONFIGS)}")
    p.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example's model")
    p.add_argument("--plan", metavar="FILE", help="add a row for this plan.json (checked against the model)")
    p.add_argument("--format", choices=("text", "table", "json"), default="text",
                   help="stdout: a table (text or table) or one JSON document with raw bytes")
    p.add_argument("--state", type=state_formats, action="append", metavar="FMT",
                   help="a state format for the plan optimizers' rows, one row each: m=int8, m=int4,v=int8, "
                        f"bf16 (m alone); m: {', '.join(M_FORMATS)}; v: {', '.join(V_FORMATS)}; repeat it or list "
                        "several (m=int8,m=int4: a key seen again starts the next); 'all': every one (default fp32)")
    p.add_argument("--param-dtype", choices=tuple(PARAM_BYTES), default="fp32",
                   help="dtype of the parameters, which torch AdamW's states follow (bf16: 4 bytes per "
                        "parameter); lowmem's optimizers compute in fp32 for both (default fp32)")
    p.add_argument("--bytes-per-state", type=positive_int, default=None, metavar="N",
                   help=f"bytes of an entry in the compute dtype, i.e. of every 'fp32' state, AdamW's too (default "
                        f"{STATE_BYTES}; 8 for fp64; 2 is the old way to ask for bf16 states, now --state m=bf16,v=bf16 "
                        "and --param-dtype bf16); fp32 parameters only")
    p.add_argument("--meta", action="store_true", help="build model.py's model on the meta device (no memory used)")
    peak = p.add_argument_group("peak training memory (traced on fake tensors, no memory used)")
    peak.add_argument("--peak", action="store_true", help="add the peak of one training step per optimizer")
    peak.add_argument("--batch", type=positive_int, metavar="N", help="micro-batch size (default: get_batch's; configs 1)")
    peak.add_argument("--seq", type=positive_int, metavar="N",
                      help="sequence length: dimension 1 of the batch's tensors (default: get_batch's; configs 2048 "
                           "or the model's positions)")
    peak.add_argument("--autocast", choices=("bf16", "fp16"),
                      help="mixed precision: forward and loss under torch.autocast in this dtype (parameters stay "
                           "--param-dtype)")
    peak.add_argument("--activation-checkpointing", action="store_true",
                      help="recompute each block of the model's longest nn.ModuleList in the backward")
    peak.add_argument("--fit", type=size_argument, metavar="SIZE",
                      help="also the largest micro-batch whose peak fits in SIZE (e.g. 24GiB, 80GB) per optimizer")
    peak.add_argument("--world", type=positive_int, default=1, metavar="N",
                      help="FSDP2 on N ranks: one rank's figures (--batch is one rank's micro-batch)")
    peak.add_argument("--measure", action="store_true",
                      help="also train each optimizer for two real steps at these settings on --device and show "
                           "the measured peak beside the trace (CUDA: max_memory_allocated and _reserved; CPU, "
                           "Linux: peak resident set of a fresh process per optimizer); rows whose traced peak "
                           "does not fit in the free memory are not run")
    peak.add_argument("--device", default="auto", help="where --measure runs: auto (cuda when available), cpu, cuda:N")
    peak.add_argument("--compare", metavar="DIR",
                      help="a compare sweep's folder (or its compare.csv): add each optimizer's best held-out loss "
                           "minus AdamW's")
    p.add_argument("-q", "--quiet", action="store_true", help="no notes or warnings on stderr")
    p.add_argument("--debug", action="store_true", help="show full tracebacks of failures in your code")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_guarded(lambda err: _run(args), prog=NAME, quiet=args.quiet, debug=args.debug)


def _run(args) -> int:
    given = [x for x in (args.target, args.config and "--config", args.example and "--example") if x]
    if len(given) != 1:
        what = "nothing to measure" if not given else f"give one model, not {' and '.join(given)}"
        raise UsageError(f"{what}: a model.py, --config NAME ({', '.join(CONFIGS)}) or --example NAME")
    if args.meta and not args.target:
        raise UsageError("--meta applies to a model.py (configs are always built on the meta device)")
    if args.param_dtype != "fp32" and args.bytes_per_state not in (None, STATE_BYTES):
        raise UsageError(f"--bytes-per-state {args.bytes_per_state} applies to fp32 parameters; {args.param_dtype} "
                         f"parameters compute in fp32 ({STATE_BYTES} bytes): ask for {args.param_dtype} states "
                         f"with --state m={args.param_dtype},v={args.param_dtype}")
    formats = None if not args.state else tuple(f for given in args.state for f in given)
    name, model = _model(args)
    plan = None
    if args.plan:
        plan = load_plan_file(args.plan)
        try:
            plan.validate(model)
        except PlanError as e:   # name the file and the model, like every other message
            raise PlanError(f"{args.plan} does not fit {name}: {e}") from None
    layers = resolve_layers(model, warn=False)
    estimate = estimate_state_memory(model, plan, args.bytes_per_state or STATE_BYTES, layers=layers, formats=formats,
                                     param_dtype=args.param_dtype)
    grid = format_grid(model, plan, layers=layers)
    gaps = states = None
    if args.compare:
        try:
            swept = read_compare_csv(args.compare)
        except RunFolderError as e:
            raise UsageError(str(e)) from None
        gaps, states = best_loss_gaps(swept), measured_states(swept)
    device = _measure_device(args) if args.measure else None
    peak = _peak(args, plan, formats) if _wants_peak(args) else None
    if device is not None:
        spec = {"config": args.config, "target": args.target, "example": args.example, "plan": args.plan,
                "state": [str(f) for f in formats] if formats else None, "batch": peak.batch, "seq": peak.seq,
                "param_dtype": args.param_dtype, "autocast": args.autocast,
                "checkpointing": args.activation_checkpointing}
        traced = {r.name: r.memory.peak if r.memory else None for r in peak.rows}
        with user_code():
            peak = peak.with_measurements(measure_rows(spec, traced, device), str(device))
    if gaps is not None:   # after the measurement: a sweep's own candidates are not measured here
        peak = peak.with_loss_gaps(gaps, states)
    if args.format == "json":
        doc = memory_document(estimate, name, args.config, args.plan, grid)
        doc["peak"] = None if peak is None else peak.to_json()
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
        console.print(MemoryTable(estimate, name, args.plan, grid))
        if peak is not None:
            console.print()
            console.print(PeakTable(peak, name))
    return 0


def _wants_peak(args) -> bool:
    return bool(args.peak or args.batch or args.seq or args.autocast or args.activation_checkpointing or args.fit
                or args.compare or args.measure or args.world > 1)


def _measure_device(args) -> torch.device:
    """``--device`` for ``--measure``, refused where real steps cannot be measured."""
    if args.world > 1:
        raise UsageError(f"--measure runs one process on one device; FSDP2 on {args.world} ranks needs {args.world} "
                         "devices (measure a run of your own with torch.cuda.max_memory_allocated)")
    device = parse_device(args.device)
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--measure reads the peak of CUDA or of a CPU process, not of {device.type}")
    if device.type == "cpu" and not sys.platform.startswith("linux"):
        raise UsageError("--measure on the CPU reads the peak resident set from /proc (Linux); use a CUDA device")
    return device


def _peak(args, plan, formats) -> PeakReport:
    settings = dict(param_dtype=args.param_dtype, autocast=args.autocast, checkpointing=args.activation_checkpointing,
                    budget=args.fit, world=args.world)
    optimizers = peak_optimizers(plan, formats)
    if args.config:
        config = CONFIGS[args.config]
        positions = getattr(config, "n_positions", None)
        seq = args.seq or min(2048, positions or 2048)
        if positions is not None and seq > positions:
            raise UsageError(f"--seq {seq} is longer than {args.config}'s {positions} positions")
        example = torch.zeros(args.batch or 1, seq, dtype=torch.long)
        return trace_guarded(args.config, lambda: peak_report(lambda: build_config_model(args.config, "meta"), example,
                                                               lm_loss, optimizers, batch=args.batch or 1, seq=seq,
                                                               **settings))
    with user_code():
        task = load_example(args.example) if args.example else load_task(args.target)
        example = call_user(task, "get_batch(0)", task.get_batch, 0)
    return trace_task(task, example, optimizers, batch=args.batch, seq=args.seq, **settings)


def state_formats(text: str) -> tuple[StateFormat, ...]:
    """An argparse type: ``--state`` text as formats (`StateFormat.parse` each; in a list, a key
    seen again starts the next format: ``m=int8,m=int4,v=int8`` is two; ``all``: every one)."""
    if text.strip() == "all":
        return ALL_FORMATS
    groups: list[dict[str, str]] = [{}]
    try:
        for item in (x.strip() for x in text.split(",")):
            key, value = item.split("=", 1) if "=" in item else ("m", item)
            if key not in ("m", "v"):
                raise ValueError(f"{key!r} is neither m nor v")
            if key in groups[-1]:
                groups.append({})
            groups[-1][key] = value
        return tuple(StateFormat.parse(",".join(f"{k}={v}" for k, v in g.items())) for g in groups)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"invalid state format {text!r}: {e}; formats are m=M, v=V or m=M,v=V with M one of "
            f"{', '.join(M_FORMATS)} and V one of {', '.join(V_FORMATS)} (e.g. m=int8 or m=int4,v=int8), or all") from None


def _model(args) -> tuple[str, torch.nn.Module]:
    if args.config:
        try:
            return args.config, build_config_model(args.config)
        except ValueError as e:
            raise UsageError(str(e)) from None
    with user_code():
        task = load_example(args.example) if args.example else load_task(args.target)
        if not args.meta:
            return task.source, build(task, torch.device("cpu"), DEFAULTS["lr"], 0, with_optimizer=False)[0]
        try:
            with torch.device("meta"):
                return task.source, build(task, torch.device("meta"), DEFAULTS["lr"], 0, with_optimizer=False)[0]
        except TaskError as e:
            raise TaskError(f"{e}\n(build_model() ran on the meta device because of --meta; "
                            "without --meta it is built on the CPU)") from e


def memory_document(estimate: MemoryEstimate, name: str, config: str | None, plan: str | None,
                    grid: FormatGrid | None = None) -> dict:
    """The JSON document of ``--format json``: raw bytes, bytes per parameter, savings as shares
    (0–1); ``by_format``: `FormatGrid.to_json` (or null)."""
    doc = estimate.to_json()
    return {"model": {"name": name, **doc["model"]}, "config": config, "plan": plan,
            "param_dtype": doc["param_dtype"], "bytes_per_state": doc["bytes_per_state"],
            "optimizers": doc["optimizers"], "by_format": None if grid is None else grid.to_json()}


if __name__ == "__main__":
    sys.exit(main())
