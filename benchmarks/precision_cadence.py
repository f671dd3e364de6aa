"""What measuring the precision less often (`--precision-every K x --every`) changes in a plan.

Reads a finished analysis folder that measured the precision at every SNR measurement (the
default), keeps only the precision measurements a run with ``--precision-every K * every`` would
have taken (the first measurement and the steps that are multiples of K * every, in the plan's
window; also, for comparison, the multiples alone, as lowmem took them before 2026-12-05), and
chooses every layer's state format from them with lowmem's own rule
(`lowmem.compress.precision.choose_state`, the plan's threshold). Prints, per K: the layers
whose format differs from the one chosen from every measurement, and how the largest update error of each (layer, state, format) moved (the ratio of
the thinned largest to the full one: 1 where the full run's largest falls on a kept step). Also
says at which step the largest errors fall, since a thinned run skips the first measurement.

    lowmem-analyze --example shakespeare --out /tmp/ex
    python benchmarks/precision_cadence.py /tmp/ex
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

from lowmem.compress.plan import Plan
from lowmem.compress.precision import PRECISION_THRESHOLD, choose_state
from lowmem.snr.precision import PrecisionTrajectory


def formats(plan: Plan, trajectory: PrecisionTrajectory, window, threshold: float) -> dict[str, str]:
    worst = trajectory.by_layer(window)
    out = {}
    for name, lp in plan.layers.items():
        fmt, _ = choose_state(lp, worst.get(name, {}), threshold)
        out[name] = f"m {fmt.m}, v {fmt.v}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="an analysis folder (plan.json and precision.csv)")
    ap.add_argument("--ks", default="1,2,4,8", help="the K to try (default 1,2,4,8)")
    args = ap.parse_args(argv)
    plan = Plan.load(args.folder / "plan.json")
    full = PrecisionTrajectory.read(args.folder / "precision.csv")
    every = int(plan.source["every"])
    window = tuple(plan.source["window"]) if plan.source.get("window") else None
    threshold = float(plan.source.get("precision_threshold", PRECISION_THRESHOLD))
    if full.steps != list(range(full.steps[0], full.steps[-1] + 1, every)) or full.steps[0] != every:
        print(f"{args.folder}: the precision was not measured at every SNR measurement "
              f"(steps {full.steps[:4]}...); rerun without --precision-every", file=sys.stderr)
        return 2
    reference = formats(plan, full, window, threshold)
    worst_full = full.worst(window)
    print(f"{args.folder}: {len(plan.layers)} layers, precision measured at steps {full.steps[0]}.."
          f"{full.steps[-1]} every {every} ({len(full.steps)} measurements), window {window}, "
          f"threshold {threshold:g}")
    first_at = {}   # (layer, state, format) -> the first step of its largest update error
    for s in sorted(full.samples, key=lambda s: s.step):
        key = (s.name, s.state, s.format)
        if key in worst_full and key not in first_at and s.update_error == worst_full[key].update_error:
            first_at[key] = s.step
    at = Counter(first_at.values())
    first = full.steps[0]
    print(f"the largest update error of a (layer, state, format) falls at step {first} (the first "
          f"measurement) for {at[first]} of {len(worst_full)}; the most common others: "
          + ", ".join(f"step {s}: {c}" for s, c in at.most_common(4) if s != first))
    print(f"{'K':>3} {'steps kept':>18} {'measurements':>12} {'formats that differ':>20}   largest update error, "
          "thinned / full: min, median")
    for k in (int(x) for x in args.ks.split(",")):
        for rule in ("first+multiples", "multiples"):
            kept = [s for s in full.samples if s.step % (k * every) == 0 or (rule != "multiples" and s.step == first)]
            thinned = PrecisionTrajectory(kept)
            ours = formats(plan, thinned, window, threshold)
            differ = {n: (reference[n], ours[n]) for n in reference if ours[n] != reference[n]}
            worst = thinned.worst(window)
            ratios = [worst[key].update_error / w.update_error for key, w in worst_full.items()
                      if key in worst and w.update_error > 0]
            print(f"{k:>3} {rule:>18} {len(thinned.steps):>12} {len(differ):>20}   "
                  f"{min(ratios):.3f}, {statistics.median(ratios):.3f}")
            for name, (a, b) in differ.items():
                print(f"      {name}: {a} -> {b}")
            if k == 1:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
