"""Paired gaps to AdamW, with their spread, from final held-out losses per seed.

RESULTS.md's first section reports the built-in example's sweep over learning rates with three
seeds at 1e-3 and 3e-3. This script computes, from those final losses (or from `compare.csv`
files given with --csv, one per seed, the same runs), each optimizer's paired gap (its loss
minus AdamW's at the same seed and lr), the mean over seeds, the sample standard deviation and
the 95% interval mean ± t(0.975, n−1)·sd/√n, and prints the table RESULTS.md shows.

    python benchmarks/results_paired.py                       # the losses RESULTS.md records
    python benchmarks/results_paired.py --csv s0/compare.csv s1/compare.csv s2/compare.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics

# Final held-out losses of `lowmem-analyze compare --example shakespeare --optimizers
# adamw,slimadam,eve --lrs 1e-3,3e-3 --seed S` (S = 0, 1, 2; the seed changes the initial
# weights, not the batches), as RESULTS.md's seed table records them.
RECORDED = {
    1e-3: {"adamw": [2.452, 2.444, 2.471], "slimadam": [2.483, 2.463, 2.485], "eve": [2.476, 2.462, 2.467]},
    3e-3: {"adamw": [2.502, 2.366, 2.406], "slimadam": [2.394, 2.379, 2.379], "eve": [2.418, 2.403, 2.396]},
}
# t(0.975, n−1) for n = 2 … 10
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(losses: dict[float, dict[str, list[float]]], reference: str = "adamw") -> list[dict]:
    rows = []
    for lr, by_opt in sorted(losses.items()):
        ref = by_opt[reference]
        for name, xs in by_opt.items():
            if name == reference:
                continue
            gaps = [x - r for x, r in zip(xs, ref)]
            n = len(gaps)
            mean = sum(gaps) / n
            sd = statistics.stdev(gaps) if n > 1 else math.nan
            half = T975[n - 1] * sd / math.sqrt(n) if n > 1 else math.nan
            rows.append({"lr": lr, "optimizer": name, "gaps": gaps, "mean": mean, "sd": sd,
                         "low": mean - half, "high": mean + half, "worse": sum(g > 0 for g in gaps)})
    return rows


def read_csvs(paths: list[str]) -> dict[float, dict[str, list[float]]]:
    """compare.csv files, one per seed: the final held-out loss of each (optimizer, lr)."""
    out: dict[float, dict[str, list[float]]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                loss = row.get("final_val_loss") or row.get("final_train_loss")
                out.setdefault(float(row["lr"]), {}).setdefault(row["optimizer"], []).append(float(loss))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", nargs="+", help="compare.csv of each seed, in seed order")
    args = ap.parse_args()
    rows = paired(read_csvs(args.csv) if args.csv else RECORDED)
    print("| lr | optimizer | paired gaps (seeds 0 / 1 / 2) | mean | sd | 95% interval | seeds worse |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gaps = " / ".join(f"{g:+.3f}" for g in r["gaps"])
        print(f"| {r['lr']:g} | {r['optimizer']} | {gaps} | {r['mean']:+.3f} | {r['sd']:.3f} | "
              f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['worse']} of {len(r['gaps'])} |")


if __name__ == "__main__":
    main()
