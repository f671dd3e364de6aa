"""Training steps/s of the built-in example with and without SNR capture.

    python benchmarks/capture_overhead.py [--steps 20] [--rounds 21] [--device auto] [--json]

Trains `lowmem.examples.shakespeare` with torch AdamW in three configurations — no capture,
capture at every=1, capture at every=10 — from the same initial weights on the same
pre-built batches. On a shared, noisy machine a single long run per configuration measures
the neighbours as much as the code, so the configurations are interleaved in rounds of
`--steps` steps and the median time per step of each is reported, with the slowdown as a
ratio against no capture. Goal (issue 2): at most 3% slower at every=10. This prints PASS or
FAIL against it and always exits 0: it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowmem
from lowmem.examples import shakespeare as ex

GOAL = 0.03


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = ex.build_model().to(device)
    n_batches = args.steps + args.warmup
    batches = [tuple(t.to(device) for t in ex.get_batch(s)) for s in range(n_batches)]
    tmp = Path(tempfile.mkdtemp(prefix="lowmem-bench-"))

    configs = {"no capture": None, "capture every=1": 1, "capture every=10": 10}
    runs = {}
    for name, every in configs.items():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # torch's default kernel choice
        cap = lowmem.capture(opt, model, every=every, out=tmp / f"snr-{every}.csv") if every else None
        runs[name] = (model, opt, cap)

    def train(model, opt, steps, offset=0):
        for s in range(steps):
            loss = ex.loss_fn(model, batches[(offset + s) % n_batches])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for model, opt, _ in runs.values():
        train(model, opt, args.warmup)
    times = {name: [] for name in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))   # no fixed position bias
        for name in order:
            model, opt, _ = runs[name]
            _sync(device)
            t0 = time.perf_counter()
            train(model, opt, args.steps, offset=args.warmup)
            _sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    measurements = {name: (len(cap.measured_steps) if cap else 0) for name, (_, _, cap) in runs.items()}
    # The cost of one measurement timed directly (median of 20), a steadier estimate of the
    # every=N overhead than the difference of two noisy medians: cost / (N × step time).
    cap = runs["capture every=10"][2]
    costs = []
    for _ in range(20):
        _sync(device)
        t0 = time.perf_counter()
        cap.measure(-1)
        _sync(device)
        costs.append(time.perf_counter() - t0)
    measure_s = statistics.median(costs)
    for _, _, cap in runs.values():
        if cap:
            cap.close()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    base_t = med["no capture"]
    # Ratios are paired per round (blocks run back to back), then the median is taken: slow
    # drifts of a shared machine cancel within a round.
    slow = {name: statistics.median(t / b for t, b in zip(times[name], times["no capture"])) - 1 for name in configs}
    per_measurement_ms = slow["capture every=1"] * base_t * 1e3
    estimate10 = measure_s / (10 * base_t)
    result = {
        "machine": {"cpu": _cpu_model(), "device": str(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "settings": {"steps_per_round": args.steps, "rounds": args.rounds, "ratio": "median over rounds of paired per-round ratios", "warmup": args.warmup,
                     "optimizer": "torch.optim.AdamW(lr=1e-3), default kernel",
                     "parameters": sum(p.numel() for p in base.parameters())},
        "ms_per_step": {k: round(v * 1e3, 3) for k, v in med.items()},
        "steps_per_s": {k: round(1 / v, 2) for k, v in med.items()},
        "slowdown": {k: round(v, 4) for k, v in slow.items()},
        "ms_per_measurement_from_every1": round(per_measurement_ms, 3),
        "ms_per_measurement_direct": round(measure_s * 1e3, 3),
        "estimated_slowdown_every10": round(estimate10, 4),
        "measurements": measurements,
        "goal_every10": GOAL,
        "pass": slow["capture every=10"] <= GOAL and estimate10 <= GOAL,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["machine"]
    print(f"machine: {m['cpu']} | device {m['device']} | torch {m['torch']} | {m['threads']} threads")
    print(f"model: built-in shakespeare GPT, {result['settings']['parameters']:,} parameters; "
          f"{args.rounds} interleaved rounds of {args.steps} steps; ms/step: median per configuration; "
          "ratio: median of per-round paired ratios")
    print(f"{'configuration':<18} {'ms/step':>9} {'steps/s':>9} {'vs no capture':>14}")
    for name in configs:
        print(f"{name:<18} {med[name] * 1e3:>9.2f} {1 / med[name]:>9.2f} {slow[name]:>+13.1%}")
    print(f"one measurement: {measure_s * 1e3:.1f} ms timed directly ({per_measurement_ms:.1f} ms from the every=1 "
          f"difference); at every=10 that is {estimate10:+.1%} of a step")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"goal: at most {GOAL:.0%} slower at every=10 -> {verdict} "
          f"(end to end {slow['capture every=10']:+.1%}, from the measurement cost {estimate10:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
