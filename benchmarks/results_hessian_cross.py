"""RESULTS.md's cross-block table: where the exact Hessian of one attention layer of the
Adam-mini paper's setup keeps its mass, between and inside Q, K, V and the output projection.

    python benchmarks/results_hessian_cross.py [--layer 1] [--threads 1]   # ~2.5 min on one core

Model and data: `lowmem.examples.binary` (``build_model()`` after ``torch.manual_seed(0)``, the
whole ``dataset()`` as the one batch, mean cross-entropy), at initialisation, float64. The
Hessian of ``transformer.h.L.attn.c_attn.weight`` (Q, K, V stacked along its rows, 3·32 × 32)
and ``c_proj.weight`` (32 × 32) together, 4,096 × 4,096, from three `lowmem.block_hessian`
calls (c_attn's diagonal block, the c_attn × c_proj cross block, c_proj's diagonal block). The
table: each pair of pieces' share of the whole matrix's squared Frobenius norm; an off-diagonal
pair appears twice in the matrix (H_AB and H_BA), and its cell gives one copy's share, "(x2)".
"""

from __future__ import annotations

import argparse
import time

import torch

import lowmem
from lowmem.examples import binary

PIECES = ("Q", "K", "V", "O")


def layer_hessian(layer: int) -> torch.Tensor:
    """The (4096, 4096) float64 Hessian of layer `layer`'s c_attn and c_proj weights, rows in the
    order Q, K, V (c_attn's row-major entries) then O (c_proj's)."""
    torch.manual_seed(0)
    model = binary.build_model()
    batch = [binary.dataset()]
    attn = f"transformer.h.{layer}.attn.c_attn.weight"
    proj = f"transformer.h.{layer}.attn.c_proj.weight"
    h_aa = lowmem.block_hessian(model, binary.loss_fn, batch, attn, dtype=torch.float64)
    h_ab = lowmem.block_hessian(model, binary.loss_fn, batch, attn, proj, dtype=torch.float64)
    h_bb = lowmem.block_hessian(model, binary.loss_fn, batch, proj, dtype=torch.float64)
    return torch.cat([torch.cat([h_aa, h_ab], 1), torch.cat([h_ab.T, h_bb], 1)], 0)


def shares(H: torch.Tensor) -> list[list[float]]:
    """Share of ||H||_F^2 in each (row piece, column piece) block, pieces of equal size."""
    n = H.shape[0] // len(PIECES)
    total = H.square().sum()
    return [[float(H[i * n:(i + 1) * n, j * n:(j + 1) * n].square().sum() / total) for j in range(len(PIECES))]
            for i in range(len(PIECES))]


def table(s: list[list[float]]) -> str:
    def cell(i, j):
        x = s[i][j]
        text = f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"
        return text + (" (x2)" if i != j else "")

    lines = ["| | " + " | ".join(PIECES) + " |", "|---" + "|---:" * len(PIECES) + "|"]
    for i, a in enumerate(PIECES):
        lines.append(f"| **{a}** | " + " | ".join(cell(i, j) if j >= i else "" for j in range(len(PIECES))) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    H = layer_hessian(args.layer)
    s = shares(H)
    diagonal = sum(s[i][i] for i in range(len(PIECES)))
    print(f"layer {args.layer}: Hessian of c_attn.weight and c_proj.weight, {H.shape[0]} x {H.shape[1]}, float64, "
          f"max |H - H^T| = {float((H - H.T).abs().max()):.1e}, {time.perf_counter() - t0:.0f} s on "
          f"{args.threads} thread(s)\n")
    print(table(s))
    print(f"\ndiagonal blocks: {diagonal:.3f} of the mass; V-O cross blocks: {2 * s[2][3]:.3f} "
          f"(each copy {s[2][3]:.3f}, {s[2][3] / s[2][2]:.0f}x V's own block)")


if __name__ == "__main__":
    main()
