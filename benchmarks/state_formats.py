"""Step time and state bytes of lowmem's optimizers with state in bf16, int8 and int4, as ratios
to the same optimizer with fp32 state, in one run.

    python benchmarks/state_formats.py [--model linear|gpt|all] [--rounds 8] [--steps 3]
        [--layers 6] [--width 2048] [--threads N] [--json]

Models: the `optimizer_step.py` Linear stack (default 6 x 2048 x 2048, 25,178,112 parameters)
and the built-in GPT (814,208 parameters); and the GPT in pure bf16 (parameters bf16), where the
rows compare the rounding modes with round-to-nearest.

Rows, each against the same optimizer with fp32 state ("fp32" row of its group): lowmem's full
Adam (`ReducedAdamW` without a plan), `Eve` and `SlimAdam` (published rules), with ``m=bf16``,
``m=int8``, ``m=int4`` (and ``m=int8,v=int8`` for full Adam, whose `v` is whole); torch's fused
AdamW and, where installed, torchao's `AdamW8bit` / `AdamW4bit` for reference (ratios to fused
AdamW). Gradients are random, drawn once and copied into every copy of the model; only
``opt.step()`` is timed; rows run interleaved in rounds with the order rotated, ratios are
medians of per-round paired ratios. "B/param" is the state (all tensors in ``opt.state`` but
the step counters) per parameter; "temp MiB" the peak extra memory of one step (see
`optimizer_step._peak_temp_bytes`).

Goal (issue 16): a quantized-state step no slower than 1.2x the same optimizer in fp32 on the
current backends. Informative only: the script always exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lowmem.compress import optimizer_state_bytes
from lowmem.compress.optim import Eve, ReducedAdamW, SlimAdam
from lowmem.examples import shakespeare as ex

from _machine import allocator_env, cpu_model, load_average   # beside this script
from optimizer_step import ALLOC_ENV, _peak_temp_bytes, build_linear

LR = 1e-3
FORMATS = {"adam (lowmem)": ("fp32", "m=bf16", "m=int8", "m=int4", "m=int8,v=int8", "m=bf16,v=bf16"),
           "eve": ("fp32", "m=bf16", "m=int8", "m=int4"),
           "slimadam": ("fp32", "m=bf16", "m=int8", "m=int4")}
BUILD = {"adam (lowmem)": lambda m, **k: ReducedAdamW(m, None, **k), "eve": Eve, "slimadam": SlimAdam}


def _rows(bf16: bool) -> list[tuple[str, str, object]]:
    """(group, label, make(model)) of every row."""
    rows = []
    if bf16:
        for rounding in ("nearest", "stochastic", "kahan"):
            for fmt in ("fp32", "m=bf16,v=bf16"):
                rows.append(("eve bf16 params", f"{fmt} {rounding}",
                             lambda m, f=fmt, r=rounding: Eve(m, lr=LR, state_format=None if f == "fp32" else f,
                                                              param_rounding=r)))
        rows.append(("reference", "AdamW (bf16 state)", lambda m: torch.optim.AdamW(m.parameters(), lr=LR)))
        return rows
    for group, fmts in FORMATS.items():
        for fmt in fmts:
            rows.append((group, fmt, lambda m, g=group, f=fmt: BUILD[g](m, lr=LR, state_format=None if f == "fp32" else f)))
    rows.append(("reference", "AdamW fused", lambda m: torch.optim.AdamW(m.parameters(), lr=LR, fused=True)))
    try:
        from torchao.optim import AdamW4bit, AdamW8bit
        rows.append(("reference", "torchao AdamW8bit", lambda m: AdamW8bit(m.parameters(), lr=LR)))
        rows.append(("reference", "torchao AdamW4bit", lambda m: AdamW4bit(m.parameters(), lr=LR)))
    except ImportError:
        pass
    return rows


def bench(name: str, base: torch.nn.Module, args, bf16: bool = False) -> dict:
    if bf16:
        base = base.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in base.named_parameters()}
    n_params = sum(p.numel() for p in base.parameters())
    built = []
    for group, label, make in _rows(bf16):
        model = copy.deepcopy(base)
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt = make(model)
        for _ in range(2):
            opt.step()
        temp = _peak_temp_bytes(opt.step, torch.device("cpu"))
        state = optimizer_state_bytes(opt).without_step
        built.append(dict(group=group, label=label, opt=opt, times=[], temp=temp, state=state))
    for r in range(args.rounds):
        order = built[r % len(built):] + built[:r % len(built)]
        for row in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                row["opt"].step()
            row["times"].append((time.perf_counter() - t0) / args.steps)
    out = []
    for row in built:
        ref_label = "AdamW fused" if row["group"] == "reference" else \
            ("fp32 nearest" if bf16 else "fp32")
        ref_group = "reference" if row["group"] == "reference" else row["group"]
        ref = next(x for x in built if x["group"] == ref_group and x["label"] == ref_label) \
            if any(x["group"] == ref_group and x["label"] == ref_label for x in built) else built[0]
        ratios = [a / b for a, b in zip(row["times"], ref["times"])]
        out.append(dict(group=row["group"], format=row["label"], ms=1e3 * statistics.median(row["times"]),
                        ratio=statistics.median(ratios), against=f"{ref['group']} {ref['label']}",
                        bytes_per_param=row["state"] / n_params,
                        temp_mib=None if row["temp"] is None else row["temp"] / 2 ** 20))
    return {"model": name, "parameters": n_params, "rows": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("linear", "gpt", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "env": allocator_env(ALLOC_ENV), "load_average": load_average()}
    results = []
    if args.model in ("linear", "all"):
        results.append(bench(f"{args.layers} x Linear({args.width}, {args.width})", build_linear(args.layers, args.width), args))
    if args.model in ("gpt", "all"):
        results.append(bench("built-in GPT", ex.build_model(), args))
        results.append(bench("built-in GPT, bf16 parameters", ex.build_model(), args, bf16=True))
    machine["load_average_after"] = load_average()
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return 0
    print(f"machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
          f"env {machine['env'] or '{}'}, load {machine['load_average']} -> {machine['load_average_after']}")
    for res in results:
        print(f"\n{res['model']} ({res['parameters']:,} parameters)")
        print(f"{'group':<18} {'state':<22} {'ms/step':>9} {'ratio':>7}  {'vs':<26} {'B/param':>8} {'temp MiB':>9}")
        for r in res["rows"]:
            temp = "?" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
            print(f"{r['group']:<18} {r['format']:<22} {r['ms']:>9.2f} {r['ratio']:>6.2f}x  {r['against']:<26} "
                  f"{r['bytes_per_param']:>8.3f} {temp:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
