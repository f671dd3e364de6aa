"""The first RESULTS.md comparison over seeds that change the initial weights *and* the batches,
at every learning rate of its claim, and the paired-gap table from it.

For S in the seeds: ``lowmem-analyze compare examples/shakespeare_seeds.py:seedS --seed S
--optimizers adamw,slimadam,eve --lrs 3e-4,1e-3,3e-3,1e-2,3e-2 --out OUT/seedS`` (resumes:
a finished run is not run again), then `results_paired.py` over the seeds' ``compare.csv``.

    python benchmarks/results_lr_seeds.py --out results-lr-seeds
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results-lr-seeds")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--optimizers", default="adamw,slimadam,eve")
    ap.add_argument("--tables-only", action="store_true", help="only print the table from finished runs")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if not args.tables_only:
        for s in seeds:
            cmd = [sys.executable, "-m", "lowmem.cli.main", "compare",
                   f"{HERE.parent / 'examples' / 'shakespeare_seeds.py'}:seed{s}", "--seed", str(s),
                   "--optimizers", args.optimizers, "--lrs", args.lrs, "--out", str(out / f"seed{s}"),
                   "--device", "cpu", "--format", "json"]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    subprocess.run([sys.executable, str(HERE / "results_paired.py"), "--csv",
                    *(str(out / f"seed{s}" / "compare.csv") for s in seeds)], check=True)


if __name__ == "__main__":
    main()
