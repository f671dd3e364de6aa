"""AdaMeM and Adafactor with momentum: the optimizers that drop Adam's `v` for Adafactor's
factored statistics and keep momentum only where it pays.

**AdaMeM** — Vyas, Morwani, Kakade, "AdaMeM: Memory Efficient Momentum for Adafactor" (2024),
Algorithms 1–4. For a weight viewed as a matrix G (m×n, m ≤ n, else transposed):

    P      = top-r left singular vectors of G, at the first step and every T steps   (m×r)
    R      = Pᵀ G,  S = G − P R                                  (low-rank part, residual)
    M      = β1 M + (1 − β1) R                                   (momentum, r×n, kept in P's basis)
    M̂      = M / bc1
    row    = β2 row + (1 − β2) mean_cols(M̂²),  col = β2 col + (1 − β2) mean_rows(M̂²)
    N1     = M̂ / (sqrt(row ⊗ col / mean(row) / bc2) + ε)                  (Adafactor, Alg. 3)
    res    = β2 res + (1 − β2) mean_rows(S²)                     (one statistic per column, n)
    N2     = S / (sqrt(res / bc2) + ε)                                    (one-sided, Alg. 4)
    W     ← W (1 − η λ) − η (P N1 + δ N2)

with bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ (the paper leaves bias correction and ε out "for simplicity";
here the statistics are of the bias-corrected momentum M̂, so |N1| ≈ 1 from the first step, as
Adam's update is). A residual column at round-off level (the gradient inside P's span there)
counts as 0 (`RESIDUAL_ROUNDOFF`). Algorithm 4 is typeset garbled in the paper; the proof of its Claim 3.1
needs the residual scaled from the right, B = (I − PPᵀ) G D₃ with D₃ an n×n diagonal, and its
memory count r + n + n needs one statistic per column, so that is what `res` is: P N1 = P D₁ M D₂
and N2 stay orthogonal (Pᵀ N2 = 0). Momentum and statistics carry over a projector refresh, as
in GaLore. Embeddings, the LM head and every vector get Adafactor without momentum (Alg. 3 on G
itself, factored for matrices, a full statistic for vectors): the paper trains the first and
last layers with Adafactor, and AdamW there would cost the full 2× state AdaMeM exists to avoid.

The optimizer computes P N1 + δ N2 as P (N1 − δ R D₃) + δ G D₃ (`adamem_update`: two m×n×r
matmuls, the floor of any projection method, and no m×n residual); `adamem_directions` is the
readable form, term by term, that the tests hold it to.

State per projected m×n matrix: P (m·r) + M (r·n) + row (r) + col (n) + res (n) entries, i.e.
(m + n)·r + r + 2n — the paper's count — in fp32 (fp64 for fp64 parameters). A stack of E expert
matrices (`lowmem.layers`' ``expert`` axis, a mixture-of-experts layer) is E matrices, each with
its own projector and statistics (states stacked along a leading E), stepped together
(`adamem_update_stacked`); a stack of experts' biases is one vector per expert.

On a row-sharded (FSDP2) parameter each rank runs the same code on its own rows, and the
collectives are these. Sums over the split axis are completed by all-reducing partial sums
(`lowmem.sharding.all_reduce_sum`, passed in as `sum_over_rows` / `sum_over_cols` of
`adamem_update` and `_factored_precondition`; None in one process), at most one collective per
parameter and step: a projected M×N matrix with M ≤ N (rows split) sums R = Pᵀ G and G's column
sums of squares, after which its r×n momentum and statistics are the same on every rank; with
M > N, g = Gᵀ has its columns split, so the momentum, ``col_var``, ``res_col_var`` and D₃ are
this rank's columns (states kept as DTensors) and only M̂²'s row sums are summed; an Adafactor matrix
sums its column sums of squares and its row statistic's sum (the row statistic is this rank's
rows); a vector's statistic stays on the rank. At a projector refresh the whole gradient is
gathered, P computed on the group's first rank and broadcast, so every rank holds the same P.

**AdafactorMomentum** — `torch.optim.Adafactor`'s rule (Shazeer & Stern 2018 as torch implements
it: β2ₜ = 1 − t^beta2_decay, relative step size, update clipping by d, decoupled weight decay by
lr) with momentum β1 on the clipped update, the baseline the AdaMeM paper compares with. With
``beta1=0`` it is `torch.optim.Adafactor`; its state keeps torch's keys and shapes plus
``exp_avg``, so a `torch.optim.Adafactor` checkpoint loads into it.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from lowmem.compress.optim._common import (StateSpec, as_float, check_grad, check_hparams, check_state_dict,
                                           gathered, load_state_in_state_dtypes, local, named_trainable,
                                           param_groups_for, row_sharding, rows_state, state_dtype_for)
from lowmem.sharding import RowShards, all_reduce_sum
from lowmem.compress.optim.engine import mean_sq
from lowmem.layers import ModelLayers, is_generic_axis, resolve_layers

# Roles that get Adafactor without momentum instead of a projected momentum (the paper's "first
# and last layers").
PLAIN_ROLES = ("embedding", "lm_head")
PROJECTORS = ("svd", "randomized")

# Adds every rank's partial sums in place (`lowmem.sharding.all_reduce_sum` over a parameter's
# shard group): the sums over the axis of a matrix that is split across ranks.
ReduceSum = Callable[[list[torch.Tensor]], None]


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """A tensor of 2+ dims as the matrix AdaMeM treats: (first dim, product of the rest)."""
    if len(shape) < 2:
        return None
    return int(shape[0]), math.prod(shape[1:])


def adamem_rank(m: int, n: int, rank: int | None = None, rank_fraction: float = 0.25) -> int:
    """The projection rank for an m×n matrix: `rank`, or ⌊rank_fraction · min(m, n)⌋, within [1, min(m, n)]."""
    k = min(m, n)
    r = rank if rank is not None else int(rank_fraction * k)
    return max(1, min(int(r), k))


def _projected(model: nn.Module) -> dict[torch.Tensor, bool]:
    """``param -> whether AdaMeM projects it`` (matrices outside `PLAIN_ROLES`; a bias of any
    shape is a vector, as a stack of experts' biases is, and so is a tensor of 3+ dims with an
    unnamed axis, see `_vectors`)."""
    layers = resolve_layers(model, warn=False)
    vectors = _vectors(model, layers)
    return {p: layers[name].role not in PLAIN_ROLES + ("bias",) and p.dim() >= 2 and p.numel() > 0
            and p not in vectors for name, p in _trainable(model)}


def _vectors(model: nn.Module, layers: ModelLayers | None = None) -> set[torch.Tensor]:
    """Parameters AdaMeM keeps a full statistic for: vectors, biases of any shape (a stack of
    experts' biases, (expert, out), is one vector per expert: never factored across experts), and
    tensors of 3+ dims with an axis `lowmem.layers` could not name: which dims form the matrix is
    unknown there, so none is projected or factored across (a matrix of 2 dims stays a matrix).
    `layers`: the model's, where the caller has them already."""
    layers = layers if layers is not None else resolve_layers(model, warn=False)
    return {p for name, p in _trainable(model) if p.dim() < 2 or layers[name].role == "bias"
            or (p.dim() > 2 and any(is_generic_axis(a) for a in layers[name].axes))}


def _expert_stacks(model: nn.Module) -> dict[torch.Tensor, tuple[int, int, int]]:
    """``param -> (experts, rows, cols)`` of every stack of expert matrices (axes ``(expert, ·, ·)``
    on `ParamInfo.view_shape`, see `lowmem.layers`: a 3-D stack, or a 2-D one such as DBRX's
    (experts·rows, cols) read as (experts, rows, cols)): AdaMeM projects each expert's matrix on its
    own."""
    layers = resolve_layers(model, warn=False)
    return {p: layers[name].view_shape for name, p in _trainable(model)
            if len(layers[name].view_shape) == 3 and layers[name].axes[:1] == ("expert",)
            and layers[name].role != "bias"}


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _names_by_param(model: nn.Module) -> dict[torch.Tensor, str]:
    """``param -> canonical name`` for every trainable parameter (tied weights once)."""
    names = named_trainable(model)
    return {p: names[id(p)] for _, p in _trainable(model)}


def adamem_state_numel(model: nn.Module, rank: int | None = None, rank_fraction: float = 0.25) -> int:
    """State entries AdaMeM keeps for `model` (its ``step`` scalars left out); shapes only, so a
    model on the meta device works. Projected m×n matrix: (m + n)·r + r + 2n (a stack of E expert
    matrices: E times that); other matrices (Adafactor): m + n; vectors and biases: their size; a
    0-element parameter: none."""
    total = 0
    projected, vectors, stacks = _projected(model), _vectors(model), _expert_stacks(model)
    for _, p in _trainable(model):
        mn = matrix_shape(p.shape)
        if p.numel() == 0:
            continue
        if mn is None or p in vectors:
            total += p.numel()
            continue
        experts = stacks[p][0] if p in stacks else 1
        if p in stacks:
            mn = tuple(stacks[p][1:])
        m, n = sorted(mn)
        if projected[p]:
            r = adamem_rank(m, n, rank, rank_fraction)
            total += experts * ((m + n) * r + r + 2 * n)
        else:
            total += m + n
    return total


def adafactor_state_numel(model: nn.Module, momentum: bool = True) -> int:
    """State entries `torch.optim.Adafactor` keeps for `model` (``step`` scalars left out), plus
    one momentum entry per parameter entry with `momentum`: a tensor of 2+ dims factors its last
    two, (…, m, n) → (…, m) + (…, n); others keep a full statistic."""
    total = 0
    for _, p in _trainable(model):
        s = tuple(p.shape)
        total += math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1] if len(s) >= 2 else p.numel()
        total += p.numel() if momentum else 0
    return total


# -- projectors ---------------------------------------------------------------------------------
def top_left_singular_vectors(g: torch.Tensor, r: int) -> torch.Tensor:
    """The exact top-r left singular vectors of `g` (m×n), by a full thin SVD."""
    u, _, _ = torch.linalg.svd(g, full_matrices=False)
    return u[:, :r].contiguous()


def randomized_left_singular_vectors(g: torch.Tensor, r: int, start: torch.Tensor | None,
                                     generator: torch.Generator, oversample: int = 8,
                                     iters: int = 2) -> torch.Tensor:
    """Top-r left singular vectors of `g` (m×n) by subspace iteration (Halko, Martinsson, Tropp
    2011, Alg. 4.4) on G Gᵀ with `oversample` extra columns, warm-started from the previous
    projector `start` when there is one, then a Rayleigh–Ritz step on the small matrix Qᵀ G.
    Costs O(m·n·(r + oversample)·(2·iters + 1)) instead of a full SVD's O(m²·n)."""
    m = g.shape[0]
    k = min(m, r + oversample)
    q = torch.randn(m, k, dtype=g.dtype, device=g.device, generator=generator)
    if start is not None:
        q[:, :start.shape[1]] = start
    q = torch.linalg.qr(g @ (g.T @ q)).Q
    for _ in range(iters - 1):
        q = torch.linalg.qr(g @ (g.T @ q)).Q
    u_small, _, _ = torch.linalg.svd(q.T @ g, full_matrices=False)   # k×k
    return (q @ u_small[:, :r]).contiguous()


def adamem_directions(g: torch.Tensor, state: dict, t: int, betas: tuple[float, float],
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdaMeM step's two directions for a matrix gradient `g` (m×n, m ≤ n) whose projector
    ``state["proj"]`` (P, m×r) is current: N1 (r×n, Algorithm 3 on the momentum of Pᵀ G) and
    N2 (m×n, Algorithm 4 on G − P Pᵀ G). Updates ``exp_avg``, ``row_var``, ``col_var`` and
    ``res_col_var`` in `state` for step `t` (1-based). P N1 and N2 are orthogonal (Claim 3.1)."""
    beta1, beta2 = betas
    proj, exp_avg = state["proj"], state["exp_avg"]
    low = proj.T @ g                                        # R = Pᵀ G            (r×n)
    residual = g - proj @ low                               # S = G − P R         (m×n)
    exp_avg.lerp_(low, 1 - beta1)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    # Adafactor on M̂ = M / bc1 (Algorithm 3): factored second moment of M̂ itself.
    m_hat = exp_avg / bc1
    n1 = _factored_precondition(m_hat, m_hat.square(), state, beta2, bc2, eps)
    # One-sided Adafactor on S (Algorithm 4): one statistic per column, so N2 = S D₃.
    live, res = _residual_columns(g.square().sum(dim=0), residual.square().sum(dim=0), g.shape[0])
    state["res_col_var"].lerp_(res, 1 - beta2)
    n2 = residual.mul_(live / (state["res_col_var"] / bc2).sqrt_().add_(eps))
    return n1, n2


def adamem_update(g: torch.Tensor, state: dict, t: int, betas: tuple[float, float], eps: float,
                  scale: float, *, shape: tuple[int, int] | None = None, sum_over_rows: ReduceSum | None = None,
                  sum_over_cols: ReduceSum | None = None, into: torch.Tensor | None = None,
                  lr: float = 1.0, decay: float = 1.0) -> torch.Tensor:
    """P N1 + δ N2 of `adamem_directions` (same state updates) with two m×n×r matmuls instead of
    three, never forming the residual S: P's columns are orthonormal, so S's column sums of
    squares are G's minus R's (Pythagoras), and with N2 = S D₃ = (G − P R) D₃,

        P N1 + δ N2 = P (N1 − δ R D₃) + δ G D₃.

    Both forms take a residual column at round-off level as 0 (`_residual_columns`), so the
    subtraction's lost digits never reach the update.

    With `into` (a parameter as an m×n matrix, `g`'s dtype), the update is applied there instead
    of returned: ``into ← decay · into − lr · (P N1 + δ N2)``, in the matmul's own
    ``C ← β C + α A B`` and one fused multiply-add, so no m×n update tensor is made and the
    parameter is read and written twice (returns `into`; G's column norms, `_column_sq_sum`,
    may square a small G in a temporary).

    On one rank's part of a matrix split across ranks (FSDP2), `g` is that part and `shape` the
    whole matrix's (m, n). Rows split: ``state["proj"]`` is this rank's rows of P, and
    `sum_over_rows` completes R and G's column sums of squares. Columns split: ``exp_avg``,
    ``col_var`` and ``res_col_var`` are this rank's columns, and `sum_over_cols` completes the
    row sums of M̂². None (the default) where `g` is whole along that axis."""
    beta1, beta2 = betas
    m, n = g.shape if shape is None else shape
    proj, exp_avg = state["proj"], state["exp_avg"]
    low = proj.T @ g                                        # R = Pᵀ G            (r×n)
    col_g2 = _column_sq_sum(g)
    if sum_over_rows is not None:
        sum_over_rows([low, col_g2])
    exp_avg.lerp_(low, 1 - beta1)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    n1 = _momentum_precondition(exp_avg, bc1, state, beta2, bc2, eps, n, sum_over_cols)
    live, res = _residual_columns(col_g2, col_g2 - mean_sq(low, (0,)).view(-1).mul_(low.shape[0]), m)
    state["res_col_var"].lerp_(res, 1 - beta2)
    d3 = live / (state["res_col_var"] / bc2).sqrt_().add_(eps)            # D₃'s diagonal (n)
    x = n1.addcmul_(low, d3, value=-scale)                  # N1 − δ R D₃         (r×n)
    if into is None:
        return (g * d3.mul_(scale)).addmm_(proj, x)         # δ G D₃ + P (…)      (m×n)
    into.addmm_(proj, x, beta=decay, alpha=-lr)             # decay·W − lr·P (…)
    return into.addcmul_(g, d3, value=-lr * scale)          #        − lr·δ G D₃


# Single-process projected matrices of at most `BATCH_NUMEL` entries (contiguous, in the state
# dtype) are updated together with the others of their shape, dtype, device and step count in
# their group (`adamem_update_batched`), and vectors of at most that many entries together: below
# it a step is dominated by the cost of launching its ~30 small operations per matrix; above it by
# the passes over the matrix, to which stacking adds four. A batch runs once it holds
# `BATCH_ENTRIES` entries, so its stacked copies (gradients, parameters, momenta: a few of each
# entry) stay within a few times 16 MiB in fp32.
BATCH_NUMEL = 1 << 17
BATCH_ENTRIES = 1 << 22


_STACKED_KEYS = ("exp_avg", "row_var", "col_var", "res_col_var")


def adamem_update_batched(items: list[tuple[torch.Tensor, dict, torch.Tensor]], t: int, betas: tuple[float, float],
                          eps: float, scale: float, lr: float, decay: float) -> None:
    """`adamem_update` with ``into`` of B matrices of one shape at once: `items` holds each one's
    (g, state, parameter as g's matrix); gradients, states and parameters are stacked, updated
    with batched matmuls and reductions along the same axes (`adamem_update_stacked`), and written
    back, so a step costs ~30 operations per shape instead of per matrix (same arithmetic, up to
    the order of sums)."""
    states = [st for _, st, _ in items]
    stacked = {k: torch.stack([st[k] for st in states]) for k in ("proj", *_STACKED_KEYS)}
    params = [w for _, _, w in items]
    w = torch.stack(params)
    adamem_update_stacked(torch.stack([g for g, _, _ in items]), stacked, w, t, betas, eps, scale, lr, decay)
    for key in _STACKED_KEYS:
        torch._foreach_copy_([st[key] for st in states], list(stacked[key].unbind(0)))
    torch._foreach_copy_(params, list(w.unbind(0)))


def adamem_update_stacked(g: torch.Tensor, state: dict, w: torch.Tensor, t: int, betas: tuple[float, float],
                          eps: float, scale: float, lr: float, decay: float) -> None:
    """`adamem_update` with ``into`` on B matrices stacked along dim 0: gradients `g` (B, m, n),
    parameters `w` (B, m, n, updated in place), and `state`'s ``proj`` (B, m, r), ``exp_avg``
    (B, r, n), ``row_var`` (B, r), ``col_var`` and ``res_col_var`` (B, n), updated in place. A
    stack of experts' matrices steps here straight from its tensors (`g` and `w` may be
    transposed views)."""
    beta1, beta2 = betas
    proj, exp_avg, row_var, col_var, res_col_var = (state[k] for k in ("proj", *_STACKED_KEYS))
    m, n = g.shape[1:]
    low = torch.bmm(proj.mT, g)                                                 # R = Pᵀ G   (B, r, n)
    col_g2 = mean_sq(g, (1,)).view(g.shape[0], n).mul_(m)                      # (B, n)
    exp_avg.lerp_(low, 1 - beta1)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    inv = 1.0 / (bc1 * bc1)   # as `_momentum_precondition`, per matrix
    row_var.lerp_(mean_sq(exp_avg, (2,)).view(row_var.shape).mul_(inv), 1 - beta2)
    col_var.lerp_(mean_sq(exp_avg, (1,)).view(col_var.shape).mul_(inv), 1 - beta2)
    row_mean = row_var.mean(dim=1, keepdim=True).clamp_(min=torch.finfo(row_var.dtype).tiny)
    rows = (row_var / row_mean / bc2).sqrt_().mul_(bc1)
    den = torch.mul(rows.unsqueeze(2), col_var.sqrt().unsqueeze(1)).add_(bc1 * eps)
    n1 = torch.div(exp_avg, den, out=den)
    live, res = _residual_columns(col_g2, col_g2 - mean_sq(low, (1,)).view(col_g2.shape).mul_(low.shape[1]), m)
    res_col_var.lerp_(res, 1 - beta2)
    d3 = (live / (res_col_var / bc2).sqrt_().add_(eps)).unsqueeze(1)           # (B, 1, n)
    x = n1.addcmul_(low, d3, value=-scale)
    w.baddbmm_(proj, x, beta=decay, alpha=-lr).addcmul_(g, d3, value=-lr * scale)


def _vectors_update(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], t: int, beta2: float, eps: float,
                    lr: float, decay: float) -> None:
    """Adafactor on vectors (a full statistic each, no momentum) as `_adafactor_update` does it,
    for every (grad, variance, parameter) of `items` in one batch of foreach operations."""
    grads, variances, params = (list(x) for x in zip(*items))
    torch._foreach_lerp_(variances, torch._foreach_mul(grads, grads), 1 - beta2)
    den = torch._foreach_div(variances, 1 - beta2 ** t)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, eps)
    torch._foreach_mul_(params, decay)
    torch._foreach_add_(params, torch._foreach_div(grads, den), alpha=-lr)


# A residual column whose squared norm is at most this many machine epsilons of its gradient
# column's is round-off (the gradient lies in P's span there, e.g. a batch of fewer tokens than
# r): it is taken as exactly 0, as exact arithmetic would give, instead of being divided by its
# own round-off-sized statistic and turned into an O(1) random direction.
RESIDUAL_ROUNDOFF = 64


def _residual_columns(col_g2: torch.Tensor, col_s2: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(live, res): 1.0 where a residual column is more than round-off, else 0.0; and the
    residual's per-column mean of squares, 0 where not live."""
    live = (col_s2 > RESIDUAL_ROUNDOFF * torch.finfo(col_s2.dtype).eps * col_g2).to(col_s2.dtype)
    return live, col_s2.clamp(min=0).mul_(live).div_(m)


def _column_sq_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ_i g_ij² per column, reducing along the contiguous axis where there is one."""
    if g.T.is_contiguous():                                 # a transposed weight: its rows
        return torch.linalg.vector_norm(g.T, dim=1).square_()
    return mean_sq(g, (0,)).view(-1).mul_(g.shape[0])


def _factored_precondition(x: torch.Tensor, x2: torch.Tensor, state: dict, beta2: float, bc2: float,
                           eps: float, *, shape: tuple[int, int] | None = None,
                           sum_over_rows: ReduceSum | None = None,
                           sum_over_cols: ReduceSum | None = None) -> torch.Tensor:
    """x / (sqrt(V̂ / bc2) + ε) with V̂ = row ⊗ col / mean(row), after folding the squares `x2`
    (a matrix) into ``state["row_var"]`` (row means) and ``state["col_var"]`` (column means).

    On one rank's part of a matrix split across ranks, `shape` is the whole matrix's, and the
    sums over the split axis are completed as in `adamem_update`: `sum_over_rows` the column sums
    and the row statistic's sum (one call; ``row_var`` is this rank's rows), or `sum_over_cols`
    the row sums (``col_var`` is this rank's columns)."""
    rows, cols = x.shape if shape is None else shape
    row_var, col_var = state["row_var"], state["col_var"]
    if sum_over_cols is None:
        row_var.lerp_(x2.mean(dim=1), 1 - beta2)
    else:
        row_sums = x2.sum(dim=1)
        sum_over_cols([row_sums])
        row_var.lerp_(row_sums.div_(cols), 1 - beta2)
    if sum_over_rows is None:
        col_var.lerp_(x2.mean(dim=0), 1 - beta2)
        row_mean = row_var.mean()
    else:
        sums = [x2.sum(dim=0), row_var.sum().reshape(1)]
        sum_over_rows(sums)
        col_var.lerp_(sums[0].div_(rows), 1 - beta2)
        row_mean = sums[1].div_(rows)
    v_hat = torch.outer(row_var / row_mean.clamp(min=torch.finfo(row_var.dtype).tiny), col_var)
    return x / v_hat.div_(bc2).sqrt_().add_(eps)


def _momentum_precondition(exp_avg: torch.Tensor, bc1: float, state: dict, beta2: float, bc2: float, eps: float,
                           cols: int, sum_over_cols: ReduceSum | None) -> torch.Tensor:
    """N1 of `_factored_precondition` on M̂ = ``exp_avg`` / bc1, in about six passes over the
    r×n momentum instead of about a dozen: the row and column means of M̂² come from
    ``exp_avg``'s squares (`mean_sq`, which squares a small momentum in one temporary and a large
    one in bounded chunks) without forming M̂, and sqrt(V̂ / bc2) is the outer product of its
    factors' square roots, with bc1 folded into it:

        N1 = exp_avg / (bc1 · sqrt(row / mean(row) / bc2) ⊗ sqrt(col) + bc1 · ε).

    The same numbers up to rounding. `cols` is the whole matrix's n; with its columns split
    across ranks, `sum_over_cols` completes the row sums (``col_var`` is this rank's columns)."""
    row_var, col_var = state["row_var"], state["col_var"]
    inv = 1.0 / (bc1 * bc1)
    row_sums = mean_sq(exp_avg, (1,)).view(-1).mul_(exp_avg.shape[1] * inv)   # Σ_j M̂²
    if sum_over_cols is not None:
        sum_over_cols([row_sums])
    row_var.lerp_(row_sums.div_(cols), 1 - beta2)
    col_var.lerp_(mean_sq(exp_avg, (0,)).view(-1).mul_(inv), 1 - beta2)
    rows = (row_var / row_var.mean().clamp(min=torch.finfo(row_var.dtype).tiny) / bc2).sqrt_().mul_(bc1)
    den = torch.outer(rows, col_var.sqrt()).add_(bc1 * eps)
    return torch.div(exp_avg, den, out=den)


def _sum_over_ranks(shards: RowShards | None) -> ReduceSum | None:
    """The `ReduceSum` of a row-sharded parameter's shard group; None in one process."""
    return None if shards is None else functools.partial(all_reduce_sum, group=shards.group)


def _check_adamem_group(g: dict) -> None:
    """Refuse an out-of-range AdaMeM hyper-parameter (defaults or one param group), naming it."""
    check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
    rank, fraction, gap, scale = g["rank"], g["rank_fraction"], g["update_proj_gap"], g["scale"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"Invalid rank: {rank} (expected a positive integer or None)")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"Invalid rank_fraction: {fraction} (expected 0 < rank_fraction <= 1)")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"Invalid update_proj_gap: {gap} (expected a positive integer)")
    if not isinstance(scale, (int, float)) or not scale >= 0.0:
        raise ValueError(f"Invalid scale: {scale}")
    if g["projector"] not in PROJECTORS:
        raise ValueError(f"Invalid projector: {g['projector']!r} (expected one of {', '.join(PROJECTORS)})")


# The hyper-parameters every AdaMeM param group holds (a checkpoint's must too).
_ADAMEM_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "rank", "rank_fraction", "update_proj_gap", "scale",
                      "projector")


def _cast_states(state: dict, dtype: torch.dtype) -> None:
    """Bring floating states (not ``step``) to the state dtype, e.g. a torch checkpoint's bf16
    statistics of bf16 parameters, which lowmem keeps in fp32."""
    for k, v in state.items():
        if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
            state[k] = v.to(dtype)


# -- AdaMeM -------------------------------------------------------------------------------------
class AdaMeM(torch.optim.Optimizer):
    """AdaMeM: Adafactor with momentum kept on the top-r singular subspace of the gradient.

    Args:
        model: the model to train (which tensors are embeddings / LM head comes from
            `lowmem.layers`).
        lr: η. betas: (β1, β2) of the momentum and of the Adafactor statistics.
        eps: added to the square root of the statistics. weight_decay: decoupled, as AdamW.
        rank: the projection rank r for every projected matrix (capped at min(m, n)); None uses
            ``rank_fraction`` · min(m, n).
        update_proj_gap: T, steps between projector refreshes (the first step computes one).
        scale: δ, the weight of the residual's update.
        projector: ``"svd"`` (exact) or ``"randomized"`` (`randomized_left_singular_vectors`,
            warm-started from the previous projector).
        param_groups: torch-style groups of `model`'s parameters; any of the above per group.
        maximize: ascend instead. state_dtype: of the states (default fp32; fp64 for fp64 params).
        seed: of the randomized projector's draws (each refresh draws from (seed, parameter, step),
            so a resumed run draws the same).

    Raises:
        ValueError: an out-of-range hyper-parameter, named with its value.
    """

    kind = "adamem"

    def __init__(self, model: nn.Module, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, rank: int | None = None,
                 rank_fraction: float = 0.25, update_proj_gap: int = 200, scale: float = 1.0,
                 projector: str = "svd", param_groups=None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None, seed: int = 0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        rank_fraction=rank_fraction, update_proj_gap=update_proj_gap, scale=scale,
                        projector=projector)
        _check_adamem_group(defaults)
        defaults = dict(defaults, betas=tuple(betas), maximize=maximize)
        super().__init__(param_groups_for(model, param_groups), defaults)
        # Keyed by the parameter itself, so a deepcopy of model and optimizer together maps them.
        self._names = _names_by_param(model)
        self._projected = _projected(model)
        self._vectors = _vectors(model)
        self._experts = _expert_stacks(model)
        self._shards = row_sharding(model)
        for p in self._experts:
            if p in self._shards:
                raise ValueError(f"AdaMeM: parameter {self._names.get(p, '?')!r} is a stack of experts split across "
                                 "ranks (FSDP2); AdaMeM steps stacks of experts in one process only")
        self._state_dtype = state_dtype
        self.seed = seed

    def __getstate__(self):
        return {**super().__getstate__(), "_names": self._names, "_projected": self._projected,
                "_vectors": self._vectors, "_experts": self._experts, "_shards": self._shards,
                "_state_dtype": self._state_dtype, "seed": self.seed}

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, with every group's hyper-parameters checked (not only the defaults)."""
        super().add_param_group(param_group)
        _check_adamem_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that states take this optimizer's state dtype (fp32 states of bf16
        parameters survive), and that the checkpoint is checked first (`check_state_dict`): a
        refused one leaves the optimizer as it was.

        Raises:
            TypeError: `state_dict` is not a dict. ValueError: an entry is missing or malformed
                (another optimizer's checkpoint, a state of the wrong shape), named in the message.
        """
        check_state_dict(self, state_dict, group_keys=_ADAMEM_GROUP_KEYS, check_group=_check_adamem_group,
                         spec=self._state_spec, names=self._names, accepts="its own (AdaMeM's)")
        load_state_in_state_dtypes(self, state_dict, lambda p: state_dtype_for(p, self._state_dtype))

    def _state_spec(self, p: torch.Tensor, group: dict) -> StateSpec:
        """What a loaded state of `p` must hold (global shapes; nothing but ``step`` for a
        0-element parameter, which is never updated)."""
        mn = matrix_shape(p.shape)
        if p.numel() == 0:
            return {}, {}
        if self._projected.get(p):
            stack = self._experts.get(p)
            m, n = sorted(stack[1:] if stack else mn)
            r = adamem_rank(m, n, group["rank"], group["rank_fraction"])
            lead = (stack[0],) if stack else ()
            return {"proj": ((*lead, m, r),), "exp_avg": ((*lead, r, n),), "row_var": ((*lead, r),),
                    "col_var": ((*lead, n),), "res_col_var": ((*lead, n),)}, {}
        if mn is None or p in self._vectors:
            return {"variance": (tuple(p.shape),)}, {}
        return {"row_var": ((mn[0],),), "col_var": ((mn[1],),)}, {}

    def __repr__(self) -> str:
        g = self.param_groups[0]
        n = sum(len(gr["params"]) for gr in self.param_groups)
        return (f"AdaMeM(params={n}, projected={sum(self._projected.values())}, lr={g['lr']}, "
                f"betas={g['betas']}, eps={g['eps']}, weight_decay={g['weight_decay']}, rank={g['rank']}, "
                f"rank_fraction={g['rank_fraction']}, update_proj_gap={g['update_proj_gap']}, "
                f"scale={g['scale']}, projector={g['projector']!r})")

    @torch.no_grad()
    def step(self, closure=None):
        """One AdaMeM step for every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:   # every gradient is checked before anything is updated
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p.grad, self._names.get(p, "?"), type(self).__name__)
        for group in self.param_groups:
            lr = as_float(group["lr"])
            decay = 1 - lr * group["weight_decay"]
            batches: dict = {}   # same-shaped small matrices, and small vectors, updated together
            copies: dict = {}    # batch key -> the (parameter, fp32 copy) pairs to write back after it
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.numel() == 0:   # nothing to update (no projector, no statistic): count the step
                    self._init_step(p)
                    continue
                dtype = state_dtype_for(p, self._state_dtype)
                grad = local(p.grad).to(dtype)     # FSDP2: this rank's rows
                if group["maximize"]:
                    grad = -grad
                shard = local(p)
                param = shard if shard.dtype == dtype else shard.detach().to(dtype)   # low precision: via a copy
                if p in self._experts:       # each expert's matrix on its own, all in one batch
                    key = self._experts_update(p, grad, group, into=param, lr=lr, decay=decay)
                elif self._projected.get(p):   # applied inside the update
                    key = self._projected_update(p, grad, group, self._shards.get(p), into=param, lr=lr, decay=decay,
                                                 batches=batches)
                else:
                    key = self._adafactor_update(p, grad, group, self._shards.get(p), into=param, lr=lr,
                                                 decay=decay, batches=batches)
                if key is None:
                    if param is not shard:
                        shard.copy_(param)
                    continue
                if param is not shard:
                    copies.setdefault(key, []).append((shard, param))
                if sum(item[0].numel() for item in batches[key]) >= BATCH_ENTRIES:
                    self._run_batch(key, batches.pop(key), copies.pop(key, []), group, lr, decay)
            for key in list(batches):
                self._run_batch(key, batches.pop(key), copies.pop(key, []), group, lr, decay)
        return loss

    @staticmethod
    def _run_batch(key: tuple, items: list, copies: list, group: dict, lr: float, decay: float) -> None:
        """One batch of `step`: its update, then its low-precision parameters written back."""
        kind, t = key[0], key[-1]
        if kind == "vectors":
            _vectors_update(items, t, group["betas"][1], group["eps"], lr, decay)
        elif len(items) == 1:
            g, here, target = items[0]
            adamem_update(g, here, t, group["betas"], group["eps"], group["scale"], into=target, lr=lr, decay=decay)
        else:
            adamem_update_batched(items, t, group["betas"], group["eps"], group["scale"], lr, decay)
        for shard, param in copies:
            shard.copy_(param)

    def _init_step(self, p: torch.Tensor) -> tuple[dict, int]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["step"] += 1
        return state, int(state["step"].item())

    def _projected_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, shards: RowShards | None, *,
                          into: torch.Tensor, lr: float, decay: float, batches: dict) -> tuple | None:
        """``into ← decay · into − lr · (P N1 + δ N2)`` for a projected matrix G (M×N) whose
        (local) parameter, in the state dtype, is `into`: `adamem_update` on g = G, or on g = Gᵀ
        when M > N (so that m ≤ n). A single-process contiguous matrix of at most `BATCH_NUMEL`
        entries is left in `batches` (after its projector refresh) for `adamem_update_batched`
        with the others of its shape: its batch's key is returned (None when it was updated).
        Row-sharded (`shards`): `grad` is this rank's rows, and the collectives are those the
        module docstring lists."""
        state, t = self._init_step(p)
        big_m, big_n = matrix_shape(p.shape)
        transposed = big_m > big_n
        g = grad.reshape(grad.shape[0], big_n)             # (not -1: a rank may hold no rows)
        if transposed:
            g = g.T                                         # m ≤ n; sharded: its columns split
        m, n = (big_n, big_m) if transposed else (big_m, big_n)
        r = adamem_rank(m, n, group["rank"], group["rank_fraction"])
        if "proj" not in state:
            cols = g.shape[1]                               # n, or this rank's columns
            exp_avg, col_var, res_col_var = g.new_zeros(r, cols), g.new_zeros(cols), g.new_zeros(cols)
            if shards is not None and transposed:           # this rank's columns, as DTensors
                exp_avg, col_var, res_col_var = (rows_state(exp_avg, p, 1, (r, n)), rows_state(col_var, p, 0, (n,)),
                                                 rows_state(res_col_var, p, 0, (n,)))
            state.update(proj=g.new_zeros(m, r), exp_avg=exp_avg, row_var=g.new_zeros(r), col_var=col_var,
                         res_col_var=res_col_var)
        elif state["proj"].shape != (m, r):
            raise ValueError(f"parameter {self._names.get(p, '?')!r}: its projector is {tuple(state['proj'].shape)} "
                             f"but the group's rank asks for {(m, r)}; the rank cannot change once "
                             "training has started")
        _cast_states(state, g.dtype)
        if (t - 1) % group["update_proj_gap"] == 0:
            state["proj"].copy_(self._refreshed_projector(p, g, state["proj"] if t > 1 else None, r, group, t,
                                                          shards, transposed))
        here = {k: local(v) for k, v in state.items()}     # the DTensors' local parts, updated in place
        reduce = _sum_over_ranks(shards)
        if shards is not None and not transposed:
            here["proj"] = here["proj"][slice(*shards.rows)]   # this rank's rows of P
        kw = dict(shape=(m, n), sum_over_rows=None if transposed else reduce,
                  sum_over_cols=reduce if transposed else None)
        if into.is_contiguous():   # the parameter as g's matrix, a view
            target = into.view(g.shape[1], g.shape[0]).T if transposed else into.view(g.shape)
            if shards is None and g.numel() <= BATCH_NUMEL:
                key = ("matrices", tuple(g.shape), g.dtype, g.device, t)
                batches.setdefault(key, []).append((g, here, target))
                return key
            adamem_update(g, here, t, group["betas"], group["eps"], group["scale"], **kw, into=target, lr=lr,
                          decay=decay)
        else:                      # (e.g. a channels-last convolution's weight): through the update
            update = adamem_update(g, here, t, group["betas"], group["eps"], group["scale"], **kw)
            into.mul_(decay).add_((update.T if transposed else update).reshape(grad.shape), alpha=-lr)
        return None

    def _experts_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, *, into: torch.Tensor, lr: float,
                        decay: float) -> None:
        """`_projected_update` for a stack of E expert matrices (E, M, N) (`lowmem.layers`'
        ``expert`` axis): every expert is its own matrix, with its own projector, momentum and
        statistics (states stacked: ``proj`` (E, m, r), ``exp_avg`` (E, r, n), …), updated
        together by `adamem_update_stacked`; as each expert alone would be, up to the order of
        sums."""
        state, t = self._init_step(p)
        experts, big_m, big_n = stack = self._experts[p]
        grad, into = grad.reshape(stack), into.view(stack)   # a 2-D stack (DBRX's) as its experts' matrices
        transposed = big_m > big_n
        g = grad.mT if transposed else grad                 # (E, m, n), m ≤ n
        m, n = g.shape[1:]
        r = adamem_rank(m, n, group["rank"], group["rank_fraction"])
        if "proj" not in state:
            state.update(proj=g.new_zeros(experts, m, r), exp_avg=g.new_zeros(experts, r, n),
                         row_var=g.new_zeros(experts, r), col_var=g.new_zeros(experts, n),
                         res_col_var=g.new_zeros(experts, n))
        elif state["proj"].shape != (experts, m, r):
            raise ValueError(f"parameter {self._names.get(p, '?')!r}: its projectors are {tuple(state['proj'].shape)} "
                             f"but the group's rank asks for {(experts, m, r)}; the rank cannot change once "
                             "training has started")
        _cast_states(state, g.dtype)
        if (t - 1) % group["update_proj_gap"] == 0:
            for e in range(experts):
                state["proj"][e].copy_(self._project(g[e], r, state["proj"][e] if t > 1 else None, group, p, t, e))
        adamem_update_stacked(g, state, into.mT if transposed else into, t, group["betas"], group["eps"],
                              group["scale"], lr, decay)
        return None

    def _refreshed_projector(self, p: torch.Tensor, g: torch.Tensor, previous: torch.Tensor | None, r: int,
                             group: dict, t: int, shards: RowShards | None, transposed: bool) -> torch.Tensor:
        """P (m×r) of the gradient g. Row-sharded: of the whole gradient, gathered (every rank
        joins), computed on the group's first rank and broadcast, so every rank holds the same P."""
        if shards is None:
            return self._project(g, r, previous, group, p, t)
        whole = gathered(p.grad).to(g.dtype).reshape(matrix_shape(p.shape))
        whole = whole.T if transposed else whole            # m×n
        if shards.rank == 0:
            proj = self._project(-whole if group["maximize"] else whole, r, previous, group, p, t)
        else:
            proj = whole.new_empty(whole.shape[0], r)
        del whole
        dist.broadcast(proj, group=shards.group, group_src=0)
        return proj

    def _project(self, g, r, previous, group, p, t, expert: int | None = None) -> torch.Tensor:
        if group["projector"] == "svd":
            return top_left_singular_vectors(g, r)
        gen = torch.Generator(device=g.device)
        name = zlib.crc32(self._names.get(p, "").encode() + (b"" if expert is None else b"#%d" % expert))
        gen.manual_seed(((self.seed * 1_000_003 + name) * 1_000_003 + t) % (1 << 63))
        return randomized_left_singular_vectors(g, r, previous, gen)

    def _adafactor_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, shards: RowShards | None, *,
                          into: torch.Tensor, lr: float, decay: float, batches: dict) -> tuple | None:
        """``into ← decay · into − lr · U`` with U Algorithm 3 on the gradient itself, without
        momentum (embeddings, LM head, vectors). A single-process vector of at most
        `BATCH_NUMEL` entries is left in `batches` (with its parameter `into`) for
        `_vectors_update`: its batch's key is returned (None when it was updated). Row-sharded
        (`shards`): `grad` is this rank's rows, and the collectives are those the module
        docstring lists."""
        state, t = self._init_step(p)
        beta2, eps = group["betas"][1], group["eps"]
        bc2 = 1 - beta2 ** t
        _cast_states(state, grad.dtype)
        mn = matrix_shape(p.shape)
        if mn is None or p in self._vectors:   # (a bias of any shape: a stack of experts' biases)
            if "variance" not in state:
                state["variance"] = torch.zeros_like(p, dtype=grad.dtype)       # sharded: a DTensor like p
            if shards is None and grad.numel() <= BATCH_NUMEL:
                key = ("vectors", grad.dtype, grad.device, t)
                batches.setdefault(key, []).append((grad, state["variance"], into))
                return key
            variance = local(state["variance"]).lerp_(grad.square(), 1 - beta2)
            into.mul_(decay).add_(grad / (variance / bc2).sqrt_().add_(eps), alpha=-lr)
            return None
        g = grad.reshape(grad.shape[0], mn[1])             # (not -1: a rank may hold no rows)
        if "row_var" not in state:
            row_var = g.new_zeros(g.shape[0])              # sharded: this rank's rows, as a DTensor
            state.update(row_var=row_var if shards is None else rows_state(row_var, p, 0, (mn[0],)),
                         col_var=g.new_zeros(mn[1]))
        here = {k: local(v) for k, v in state.items()}
        update = _factored_precondition(g, g.square(), here, beta2, bc2, eps, shape=mn,
                                        sum_over_rows=_sum_over_ranks(shards)).reshape(grad.shape)
        into.mul_(decay).add_(update, alpha=-lr)
        return None


# -- Adafactor with momentum --------------------------------------------------------------------
def _check_adafactor_group(g: dict) -> None:
    """Refuse an out-of-range hyper-parameter of an Adafactor(-momentum) param group, naming it."""
    check_hparams(g["lr"], weight_decay=g["weight_decay"])
    beta1 = g.get("beta1", 0.0)
    if isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta1 value: {beta1}")
    eps = g["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2) as torch.optim.Adafactor takes, got {eps!r}")
    for e in eps:
        if e is not None:
            check_hparams(0.0, eps=e)

class AdafactorMomentum(torch.optim.Adafactor):
    """`torch.optim.Adafactor` with momentum β1 on its clipped update (``beta1=0``: Adafactor).

    Per step t, for a parameter with gradient G (torch's rule): β̂2 = 1 − t^beta2_decay;
    factored statistics over the last two dims (full for vectors); U = G / sqrt(V̂) clipped to
    RMS ≤ d; α = max(eps2, RMS(θ)) · min(lr, 1/√t); then m ← β1 m + (1 − β1) U and
    θ ← θ (1 − lr λ) − α m.

    Args:
        model: the model to train. lr, beta2_decay, eps (eps1, eps2), d, weight_decay, maximize:
            as `torch.optim.Adafactor`. beta1: the momentum (0.9 as in the AdaMeM paper's baseline).
        param_groups: torch-style groups of `model`'s parameters. state_dtype: of the states
            (default fp32; fp64 for fp64 parameters).
    """

    kind = "adafactor-momentum"

    def __init__(self, model: nn.Module, lr: float | torch.Tensor = 1e-2, beta1: float = 0.9,
                 beta2_decay: float = -0.8, eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, param_groups=None, maximize: bool = False,
                 state_dtype: torch.dtype | None = None):
        _check_adafactor_group(dict(lr=lr, weight_decay=weight_decay, beta1=beta1, eps=eps))
        super().__init__(param_groups_for(model, param_groups), lr=lr, beta2_decay=beta2_decay,
                         eps=tuple(eps), d=d, weight_decay=weight_decay, maximize=maximize)
        for group in self.param_groups:
            group.setdefault("beta1", beta1)
        self.defaults["beta1"] = beta1
        self._names = _names_by_param(model)
        self._shards = row_sharding(model)
        self._state_dtype = state_dtype

    def __getstate__(self):
        return {**super().__getstate__(), "_names": self._names, "_shards": self._shards,
                "_state_dtype": self._state_dtype}

    def __setstate__(self, state):
        super().__setstate__(state)   # also what load_state_dict calls: a torch Adafactor checkpoint
        for group in self.param_groups:   # has no beta1, and takes this optimizer's
            group.setdefault("beta1", self.defaults.get("beta1", 0.0))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's (a `torch.optim.Adafactor` checkpoint loads too, taking this optimizer's
        beta1), except that states take this optimizer's state dtype (fp32 states of bf16
        parameters survive; a bf16 torch checkpoint's become fp32), and that the checkpoint is
        checked first (`check_state_dict`): a refused one leaves the optimizer as it was.

        Raises:
            TypeError: `state_dict` is not a dict. ValueError: an entry is missing or malformed
                (another optimizer's checkpoint, a state of the wrong shape), named in the message.
        """
        check_state_dict(self, state_dict, group_keys=("lr", "beta2_decay", "eps", "d", "weight_decay"),
                         check_group=_check_adafactor_group, spec=self._state_spec, names=self._names,
                         accepts="its own or torch.optim.Adafactor's")
        load_state_in_state_dtypes(self, state_dict, lambda p: state_dtype_for(p, self._state_dtype))

    def _state_spec(self, p: torch.Tensor, group: dict) -> StateSpec:
        """What a loaded state of `p` must hold: torch's Adafactor statistics (global shapes),
        and ``exp_avg`` like `p` if it has one (a torch checkpoint has none)."""
        s = tuple(p.shape)
        stats = {"row_var": ((*s[:-1], 1),), "col_var": ((*s[:-2], 1, s[-1]),)} if len(s) > 1 else \
            {"variance": (s,)}
        return stats, {"exp_avg": (s,)}

    def __repr__(self) -> str:
        g = self.param_groups[0]
        n = sum(len(gr["params"]) for gr in self.param_groups)
        return (f"AdafactorMomentum(params={n}, lr={g['lr']}, beta1={g['beta1']}, "
                f"beta2_decay={g['beta2_decay']}, eps={g['eps']}, d={g['d']}, weight_decay={g['weight_decay']})")

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every parameter with a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p.grad, self._names.get(p, "?"), type(self).__name__)
                    self._step_one(p, group)
        return loss

    def _step_one(self, p: torch.Tensor, group: dict) -> None:
        """One step of `p`. On a row-sharded (FSDP2) parameter it works on this rank's rows, and
        only sums over dim 0 cross ranks: a matrix's column statistic and the mean of its row
        statistic, and the RMS of the parameter and of the update, each an all-reduced partial
        sum (two collectives per parameter). The statistics of a tensor of 3+ dims factor its
        last two dims, so they stay on the rank; a 2-D ``col_var`` is the same on every rank; the
        other states hold this rank's rows, as DTensors."""
        shards = self._shards.get(p)
        dtype = state_dtype_for(p, self._state_dtype)
        grad = local(p.grad).to(dtype)
        if group["maximize"]:
            grad = -grad
        shard = local(p)
        param = shard if shard.dtype == dtype else shard.detach().to(dtype)
        state = self.state[p]
        shape = tuple(p.shape)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if grad.dim() > 1:   # torch's shapes: (…, m, 1) and (…, 1, n)
                row_var = grad.new_zeros(*grad.shape[:-1], 1)
                col_var = grad.new_zeros(*grad.shape[:-2], 1, grad.shape[-1])
                if shards is not None:
                    row_var = rows_state(row_var, p, 0, (*shape[:-1], 1))
                    if grad.dim() > 2:
                        col_var = rows_state(col_var, p, 0, (*shape[:-2], 1, shape[-1]))
                state.update(row_var=row_var, col_var=col_var)
            else:
                state["variance"] = torch.zeros_like(p, dtype=dtype)
        if group["beta1"] > 0 and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype)
        _cast_states(state, dtype)
        if p.numel() == 0:   # nothing to update (its RMS would divide by 0 entries): count the step
            state["step"] += 1
            return
        step_count, state = state["step"], {k: local(v) for k, v in state.items()}
        lr, d, wd = as_float(group["lr"]), group["d"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1   # torch's default: the parameter's eps

        step_count += 1
        # No .item(): the step count, the RMS of the parameter and of the update stay tensors
        # (no host sync on a GPU; traceable on fake tensors, lowmem.compress.peak). torch's
        # Adafactor reads them as Python floats; the step count is an exact integer in `dtype`.
        t = step_count.to(device=grad.device, dtype=dtype)
        one_minus_beta2_t = t.pow(group["beta2_decay"])
        split_columns = shards is not None and grad.dim() == 2     # column sums cross ranks
        param_norm = torch.linalg.vector_norm(param)
        sums = [param_norm.square().reshape(1)]
        if grad.dim() > 1:
            row_var, col_var = state["row_var"], state["col_var"]
            row_var.lerp_(torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_().div_(grad.shape[-1]),
                          one_minus_beta2_t)
            col_sq = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_()
            if split_columns:
                sums += [row_var.sum().reshape(1), col_sq.reshape(-1)]
        if shards is not None:
            all_reduce_sum(sums, shards.group)
            param_norm = sums[0].sqrt()
        alpha = (param_norm / p.numel() ** 0.5).clamp(min=eps2) * t.rsqrt().clamp(max=lr)
        if wd != 0:
            param.mul_(1 - lr * wd)
        if grad.dim() > 1:
            col_var.lerp_(col_sq.div_(shape[-2]), one_minus_beta2_t)
            row_mean = sums[1].div(shape[0]) if split_columns else row_var.mean(dim=-2, keepdim=True)
            var_estimate = (row_var @ col_var).div_(row_mean.clamp(min=eps1))
        else:
            state["variance"].lerp_(grad * grad, one_minus_beta2_t)
            var_estimate = state["variance"].clone()
        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        update_norm = torch.linalg.vector_norm(update)
        if shards is not None:
            update_sq = update_norm.square().reshape(1)
            all_reduce_sum([update_sq], shards.group)
            update_norm = update_sq.sqrt()
        update.div_((update_norm / (p.numel() ** 0.5 * d)).clamp(min=1.0))
        if group["beta1"] > 0:
            update = state["exp_avg"].lerp_(update, 1 - group["beta1"])
        param.sub_(update * alpha)
        if param is not shard:
            shard.copy_(param)
