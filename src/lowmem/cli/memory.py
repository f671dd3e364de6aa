"""`lowmem-analyze memory`: optimizer-state memory of AdamW, every preset and a plan, from shapes.

    lowmem-analyze memory --config llama2-7b [--plan plan.json] [--format json]
    lowmem-analyze memory model.py[:factory] [--meta]
    lowmem-analyze memory --example shakespeare

A named config (`lowmem.compress.configs`) is built on the meta device and costs no memory. A
``model.py``'s ``build_model()`` runs as it does for training, on the CPU; ``--meta`` runs it
under ``torch.device("meta")`` instead, for models too large to build here (a ``build_model``
that loads weights or moves tensors to a device cannot be built that way).

Exit codes as ``lowmem-analyze`` (DESIGN §8): 0 done; 2 usage error (unknown config, missing
file, unreadable or mismatched plan); 3 the user's code failed or broke the contract; 4 internal
error.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rich.console import Console

from lowmem.cli.common import PROG, ArgumentParser, load_plan_file, positive_int, run_guarded, user_code
from lowmem.cli.contract import UsageError, load_example, load_task
from lowmem.compress import PlanError
from lowmem.compress.configs import CONFIGS, build_config_model
from lowmem.compress.memory import STATE_BYTES, MemoryEstimate, estimate_state_memory
from lowmem.examples import EXAMPLES
from lowmem.probe import DEFAULTS, TaskError, build
from lowmem.reports.terminal import MemoryTable

NAME = f"{PROG} memory"


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=NAME,
        description="Optimizer-state memory (m and v) of AdamW, every lowmem preset and a plan, estimated "
                    "from parameter shapes alone.",
        epilog="Exit codes: 0 done; 2 usage error; 3 your code failed or broke the model.py contract; "
               "4 internal error.",
    )
    p.add_argument("target", nargs="?", help="model.py or model.py:factory (the contract of lowmem-analyze)")
    p.add_argument("--config", metavar="NAME", help=f"a built-in model shape: {', '.join(CONFIGS)}")
    p.add_argument("--example", choices=sorted(EXAMPLES), help="a built-in example's model")
    p.add_argument("--plan", metavar="FILE", help="add a row for this plan.json (checked against the model)")
    p.add_argument("--format", choices=("text", "table", "json"), default="text",
                   help="stdout: a table (text or table) or one JSON document with raw bytes")
    p.add_argument("--bytes-per-state", type=positive_int, default=STATE_BYTES, metavar="N",
                   help=f"bytes of one state entry (default {STATE_BYTES}: fp32; 2 for bf16 states)")
    p.add_argument("--meta", action="store_true", help="build model.py's model on the meta device (no memory used)")
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
    name, model = _model(args)
    plan = None
    if args.plan:
        plan = load_plan_file(args.plan)
        try:
            plan.validate(model)
        except PlanError as e:   # name the file and the model, like every other message
            raise PlanError(f"{args.plan} does not fit {name}: {e}") from None
    estimate = estimate_state_memory(model, plan, args.bytes_per_state)
    if args.format == "json":
        sys.stdout.write(json.dumps(memory_document(estimate, name, args.config, args.plan), indent=2) + "\n")
    else:
        console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
        console.print(MemoryTable(estimate, name, args.plan))
    return 0


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


def memory_document(estimate: MemoryEstimate, name: str, config: str | None, plan: str | None) -> dict:
    """The JSON document of ``--format json``: raw bytes, savings as shares (0–1)."""
    doc = estimate.to_json()
    return {"model": {"name": name, **doc["model"]}, "config": config, "plan": plan,
            "bytes_per_state": doc["bytes_per_state"], "optimizers": doc["optimizers"]}


if __name__ == "__main__":
    sys.exit(main())
