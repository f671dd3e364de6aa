"""Structure of a dense block Hessian: partitions, their Frobenius mass, a class, spectra (DESIGN §6).

Input everywhere: a symmetric Hessian block ``H`` of shape (d, d) over a parameter (or a sub-view
of it) flattened row-major, and the parameter's shape. Rows are dim 0 (the output units of an
``nn.Linear`` weight), columns are the other dims flattened; for a transposed layout (HF
``Conv1D``, (in, out)) the rows are input units, so transpose first where heads matter.

A partition splits the d flat indices into disjoint groups; its diagonal blocks ``H[g, g]`` are
the blocks an Adam-mini-style optimizer gives one learning rate each. Adam-mini's principle is one
learning rate per smallest dense sub-block of the Hessian, and at initialisation a transformer's
Query and Key blocks are block-diagonal with one dense block per head (Class 1) while Value,
attention output and MLP blocks are dense (Class 2): Zhang, Chen, Li, Ding, Chen, Kingma, Ye,
Sun, Luo, "Adam-mini: Use Fewer Learning Rates To Gain More" (2024), §2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# -- partitions ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Partition:
    """Disjoint groups of flat indices covering 0..d-1.

    Attributes:
        name: what the partition is (``"per head"``, ``"per row"``, ``"found"``, …).
        groups: 1-D int64 tensors of flat indices, one per group.

    Raises:
        ValueError: a group is empty or not 1-D integer, or the groups overlap or leave a gap.
    """

    name: str
    groups: list[Tensor]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError(f"partition {self.name!r} has no groups")
        groups = []
        for i, g in enumerate(self.groups):
            g = torch.as_tensor(g)
            if g.dim() != 1 or g.numel() == 0 or g.dtype.is_floating_point or g.dtype == torch.bool:
                raise ValueError(f"partition {self.name!r}: group {i} must be a non-empty 1-D integer tensor, "
                                 f"found {g.dtype} of shape {tuple(g.shape)}")
            groups.append(g.to(torch.int64).contiguous())
        flat = torch.cat(groups).sort().values
        if not torch.equal(flat, torch.arange(flat.numel())):
            raise ValueError(f"partition {self.name!r}: groups must be disjoint and cover 0..{flat.numel() - 1} "
                             f"(they hold {flat.numel()} indices, {flat.unique().numel()} distinct, "
                             f"largest {int(flat[-1])})")
        object.__setattr__(self, "groups", groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def size(self) -> int:
        """d, the number of flat indices covered."""
        return sum(g.numel() for g in self.groups)

    @property
    def sizes(self) -> list[int]:
        return [g.numel() for g in self.groups]

    def labels(self) -> Tensor:
        """The group of every flat index, a (d,) int64 tensor."""
        labels = torch.empty(self.size, dtype=torch.int64)
        for j, g in enumerate(self.groups):
            labels[g] = j
        return labels

    @classmethod
    def from_labels(cls, name: str, labels: Tensor) -> "Partition":
        """The partition whose groups are the equal-label sets, ordered by their smallest index."""
        labels = torch.as_tensor(labels).reshape(-1)
        _, inverse = torch.unique(labels, return_inverse=True)
        k, d = int(inverse.max()) + 1, labels.numel()
        first = torch.full((k,), d, dtype=torch.int64).scatter_reduce(0, inverse, torch.arange(d), "amin")
        rank = torch.empty(k, dtype=torch.int64)
        rank[first.argsort()] = torch.arange(k)
        ordered = rank[inverse]
        idx = ordered.argsort(stable=True)   # indices ascending within each group
        return cls(name, list(idx.split(torch.bincount(ordered, minlength=k).tolist())))


def candidate_partitions(shape: tuple[int, ...] | list[int] | torch.Size,
                         heads: int | None = None) -> dict[str, Partition]:
    """The partitions a plan can express directly, for a parameter of this shape.

    Rows are dim 0 and columns the remaining dims flattened (one column for a 1-D tensor):

    - ``"per head"`` (only when ``heads > 1`` divides the rows): head h is rows
      ``h·hd … (h+1)·hd − 1`` with all their columns, hd = rows / heads;
    - ``"per row"``: each row's entries; ``"per column"``: each column's entries;
    - ``"whole"``: one group.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must have at least one dim, all positive, got {shape}")
    rows, cols = shape[0], math.prod(shape[1:])
    row_of = torch.arange(rows).repeat_interleave(cols)         # (rows·cols,)
    out = {}
    if heads is not None and heads > 1 and rows % heads == 0:
        out["per head"] = Partition.from_labels("per head", row_of // (rows // heads))
    out["per row"] = Partition.from_labels("per row", row_of)
    out["per column"] = Partition.from_labels("per column", torch.arange(cols).repeat(rows))
    out["whole"] = Partition("whole", [torch.arange(rows * cols)])
    return out


# -- mass ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionMass:
    """How much of ‖H‖_F² a partition's diagonal blocks hold, against a dense matrix.

    Attributes:
        name: the partition's name.
        groups: its number of groups.
        inside: Σ_g ‖H[g, g]‖_F² / ‖H‖_F².
        cross: Σ_{g≠g'} ‖H[g, g']‖_F² / ‖H‖_F² (= 1 − inside).
        baseline: Σ_g |g|² / d², the share a matrix with uniformly spread mass gives.
        ratio: inside / baseline.
        excess: (inside − baseline) / (1 − baseline): 0 for mass spread like a dense matrix,
            1 when no mass lies outside the blocks (NaN for the one-group partition).
    """

    name: str
    groups: int
    inside: float
    cross: float
    baseline: float
    ratio: float
    excess: float


def _check_block(H: Tensor) -> Tensor:
    if not isinstance(H, Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"expected a square (d, d) Hessian block, got {getattr(H, 'shape', type(H).__name__)}")
    if not H.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point Hessian block, got {H.dtype}")
    return H


def _check_fits(H: Tensor, partition: Partition) -> None:
    if partition.size != H.shape[0]:
        raise ValueError(f"partition {partition.name!r} covers {partition.size} indices, the block is "
                         f"{H.shape[0]} x {H.shape[0]}")


def _group_mass(H: Tensor, labels: Tensor, k: int) -> Tensor:
    """(k, k) float64 G with G[a, b] = ‖H[g_a, g_b]‖_F² for the groups labelled 0..k−1."""
    h2 = H.detach().to(torch.float64).square()
    labels = labels.to(h2.device)
    by_col = h2.new_zeros(h2.shape[0], k).index_add_(1, labels, h2)
    return h2.new_zeros(k, k).index_add_(0, labels, by_col)


def partition_mass(H: Tensor, partition: Partition) -> PartitionMass:
    """Share of ‖H‖_F² inside the partition's diagonal blocks, and the dense baseline.

    Args:
        H: (d, d) Hessian block.
        partition: a partition of 0..d−1.

    Returns:
        `PartitionMass`; inside, cross, ratio and excess are NaN when H is zero.
    """
    _check_fits(_check_block(H), partition)
    g = _group_mass(H, partition.labels(), len(partition))
    total, diag = float(g.sum()), float(g.diagonal().sum())
    d = H.shape[0]
    baseline = sum(s * s for s in partition.sizes) / (d * d)
    inside = diag / total if total > 0 else math.nan
    cross = (total - diag) / total if total > 0 else math.nan
    excess = (inside - baseline) / (1 - baseline) if baseline < 1 else math.nan
    return PartitionMass(partition.name, len(partition), inside, cross, baseline, inside / baseline, excess)


# -- a partition found from |H| ----------------------------------------------------------------


def find_partition(H: Tensor, atoms: Partition | None = None, max_groups: int | None = None, *,
                   seed: int = 0, restarts: int = 10) -> Partition:
    """Dense sub-blocks of H found without being told the heads: spectral clustering.

    The affinity between atoms a and b is their mass ``M_ab = ‖H[a, b]‖_F²`` (H_ab² for single
    entries), the quantity `partition_mass` scores; squaring keeps weak dense noise from bridging
    blocks. The diagonal is left out, and affinities at round-off level (≤ (d·ε)²·max M, ε the
    machine epsilon of H's dtype) count as zero.
    With the normalised Laplacian ``L = I − D^{-1/2} A D^{-1/2}`` (an atom with no affinity is its
    own component: L_aa = 0), the number of groups k is the position of the largest eigengap
    λ_k − λ_{k−1} among the smallest eigenvalues (k ≤ max_groups; past the last eigenvalue the
    gap is taken to 1, the bulk of a structureless graph's spectrum). The groups are k-means
    clusters of the rows of the first k eigenvectors, each scaled to unit length (Ng, Jordan,
    Weiss, "On Spectral Clustering: Analysis and an algorithm", 2001), with k-means++ seeds from
    a fixed generator, `restarts` runs, the lowest inertia kept: the result is deterministic.

    Args:
        H: (d, d) symmetric Hessian block.
        atoms: groups of indices that always stay together. For a weight pass its rows,
            ``candidate_partitions(shape)["per row"]`` (what `classify` does): more robust than
            single entries, and the eigenproblem is rows × rows instead of d × d.
        max_groups: most groups to consider (default: the number of atoms).
        seed: seed of the k-means++ generator.
        restarts: k-means runs.

    Returns:
        A `Partition` named ``"found"``, groups ordered by their smallest index; one group when
        H shows no block structure (a dense matrix).
    """
    _check_block(H)
    d = H.shape[0]
    if atoms is None:
        atom_of, n = torch.arange(d), d
        affinity = H.detach().to(torch.float64).square()
    else:
        _check_fits(H, atoms)
        atom_of, n = atoms.labels(), len(atoms)
        affinity = _group_mass(H, atom_of, n)
    affinity = affinity.cpu()   # the spectral step is n x n with n atoms, and its generator lives on the CPU
    if max_groups is not None and max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    most = n if max_groups is None else min(max_groups, n)
    whole = Partition("found", [torch.arange(d)])
    if most == 1:
        return whole
    affinity.fill_diagonal_(0.0)
    affinity[affinity <= (d * torch.finfo(H.dtype).eps) ** 2 * affinity.max()] = 0.0
    eigenvalues, eigenvectors = torch.linalg.eigh(_normalized_laplacian(affinity))
    k = _eigengap(eigenvalues, most)
    if k == 1:
        return whole
    embedding = eigenvectors[:, :k]
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cluster = _kmeans(embedding, k, seed, restarts)
    return Partition.from_labels("found", cluster[atom_of])


def _normalized_laplacian(a: Tensor) -> Tensor:
    """I − D^{-1/2} A D^{-1/2}, with L_ii = 0 for an isolated node (Chung, Spectral Graph Theory)."""
    degree = a.sum(dim=1)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), torch.zeros_like(degree))
    lap = -inv_sqrt[:, None] * a * inv_sqrt[None, :]
    lap.diagonal().add_((degree > 0).to(lap.dtype))
    return lap


def _eigengap(eigenvalues: Tensor, most: int) -> int:
    """k in 1..most at the largest gap λ_k − λ_{k−1} (λ_n := 1 past the last); ties to the smaller k."""
    lam = eigenvalues.clamp(min=0.0)
    if most == lam.numel():
        lam = torch.cat([lam, lam.new_ones(1)])
    gaps = lam[1:most + 1] - lam[:most]
    return int(gaps.argmax()) + 1


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    return (x.square().sum(1, keepdim=True) - 2 * x @ c.T + c.square().sum(1)[None, :]).clamp_min(0.0)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeds (Arthur, Vassilvitskii, 2007): each next seed drawn ∝ squared distance."""
    centers = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    d2 = _sq_dist(x, centers[0][None]).squeeze(1)
    for _ in range(k - 1):
        total = float(d2.sum())
        i = int(torch.multinomial(d2 / total, 1, generator=gen)) if total > 0 \
            else int(torch.randint(x.shape[0], (1,), generator=gen))
        centers.append(x[i])
        d2 = torch.minimum(d2, _sq_dist(x, x[i][None]).squeeze(1))
    return torch.stack(centers)


def _kmeans(x: Tensor, k: int, seed: int, restarts: int, iters: int = 100) -> Tensor:
    """Cluster labels of the rows of x: Lloyd's k-means, best of `restarts` k-means++ starts."""
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(max(1, restarts)):
        centers = _kmeans_pp(x, k, gen)
        labels = None
        for _ in range(iters):
            dist = _sq_dist(x, centers)
            new = dist.argmin(dim=1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            counts = torch.bincount(labels, minlength=k)
            centers = x.new_zeros(k, x.shape[1]).index_add_(0, labels, x) / counts.clamp_min(1)[:, None]
            far = dist.gather(1, labels[:, None]).squeeze(1).clone()
            for j in torch.nonzero(counts == 0).flatten().tolist():   # an emptied cluster takes the worst-fit point
                i = int(far.argmax())
                centers[j], far[i] = x[i], -1.0
        dist = _sq_dist(x, centers)
        inertia = float(dist.min(dim=1).values.sum())
        if inertia < best_inertia:
            best, best_inertia = dist.argmin(dim=1), inertia
    return best


# -- classification --------------------------------------------------------------------------

BLOCK_DIAGONAL_BY_HEADS = "block-diagonal by heads"
BLOCK_DIAGONAL_FOUND = "block-diagonal (found partition)"
BLOCK_DIAGONAL_BY_ROWS = "block-diagonal by rows"
DENSE = "dense"
ZERO = "zero"

# The off-block region may hold at most a quarter of the mass a dense matrix would put there:
# with 4 heads (dense baseline 1/4) that is an in-partition share of at least 0.8125.
DEFAULT_THRESHOLD = 0.75


@dataclass(frozen=True, eq=False)
class Classification:
    """Adam-mini's class of a Hessian block (Class 1: block-diagonal; Class 2: dense).

    Attributes:
        label: ``"block-diagonal by heads"``, ``"block-diagonal (found partition)"``, ``"dense"``,
            or ``"zero"`` (H = 0: no curvature to classify).
        hessian_class: 1 (block-diagonal), 2 (dense) or None (zero).
        partition: the partition the label rests on: per head or found when block-diagonal; for a
            dense block the one that was tested (per head when heads are known, else the found
            partition, else per row).
        mass: that partition's `PartitionMass` (in-partition share, dense baseline, excess).
        found: the partition `find_partition` returns with rows as atoms, whatever the label.
        threshold: the excess a partition needs to count as block-diagonal.
        why: one line a person can read.
    """

    label: str
    hessian_class: int | None
    partition: Partition
    mass: PartitionMass
    found: Partition
    threshold: float
    why: str

    @property
    def inside(self) -> float:
        return self.mass.inside

    @property
    def baseline(self) -> float:
        return self.mass.baseline


def classify(H: Tensor, shape: tuple[int, ...] | list[int] | torch.Size, heads: int | None = None, *,
             threshold: float = DEFAULT_THRESHOLD, max_groups: int | None = None) -> Classification:
    """Call a Hessian block block-diagonal (Adam-mini's Class 1) or dense (Class 2).

    The rule scores a partition P by its excess over a dense matrix,
    ``excess(P) = (inside(P) − baseline(P)) / (1 − baseline(P))`` (see `PartitionMass`), so that
    ``cross(P) = (1 − excess) · (1 − baseline)``: the off-block region holds a fraction
    (1 − excess) of the mass a uniformly dense matrix would put there. In order:

    1. heads > 1 divide the rows and excess(per head) ≥ threshold: ``"block-diagonal by heads"``;
    2. the partition found with rows as atoms (`find_partition`) has more than one group and
       excess ≥ threshold: ``"block-diagonal (found partition)"``;
    3. excess(per row) ≥ threshold: ``"block-diagonal by rows"`` (one block per output neuron;
       rows are `find_partition`'s atoms, so this is tested on its own);
    4. otherwise ``"dense"``.

    The default threshold 0.75 means an in-partition share ≥ 0.8125 with 4 heads (baseline 0.25),
    ≥ 0.875 with 2 and ≥ 0.766 with 16; a dense random matrix scores an excess near 0.

    Args:
        H: (d, d) symmetric Hessian block over a parameter of `shape`, flattened row-major.
        shape: the parameter's shape (rows = dim 0).
        heads: attention heads along the rows, when known.
        threshold: the excess a partition needs, in (0, 1].
        max_groups: passed to `find_partition`.
    """
    _check_block(H)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    candidates = candidate_partitions(shape)
    if candidates["whole"].size != H.shape[0]:
        raise ValueError(f"shape {tuple(shape)} has {candidates['whole'].size} entries, the block is "
                         f"{H.shape[0]} x {H.shape[0]}")
    per_head = candidate_partitions(shape, heads).get("per head")
    if not bool((H != 0).any()):
        whole = candidates["whole"]
        return Classification(ZERO, None, whole, partition_mass(H, whole), whole, threshold,
                              "the block is zero: no curvature to classify")
    found = find_partition(H, candidates["per row"], max_groups)
    if per_head is not None:
        m = partition_mass(H, per_head)
        if m.excess >= threshold:
            return Classification(BLOCK_DIAGONAL_BY_HEADS, 1, per_head, m, found, threshold,
                                  f"{heads} heads hold {m.inside:.3f} of the mass (dense: {m.baseline:.3f}), "
                                  f"excess {m.excess:.3f} >= {threshold:g}")
    if len(found) > 1:
        m = partition_mass(H, found)
        if m.excess >= threshold:
            return Classification(BLOCK_DIAGONAL_FOUND, 1, found, m, found, threshold,
                                  f"{len(found)} found blocks hold {m.inside:.3f} of the mass (dense: "
                                  f"{m.baseline:.3f}), excess {m.excess:.3f} >= {threshold:g}")
    # Rows are the atoms `find_partition` keeps whole, so a block concentrated within output rows
    # (one dense sub-block per neuron, the adam-mini package's choice for V, output and MLP) is
    # tested on its own.
    rows = candidates["per row"]
    m_rows = partition_mass(H, rows)
    if len(rows) > 1 and m_rows.excess >= threshold:
        return Classification(BLOCK_DIAGONAL_BY_ROWS, 1, rows, m_rows, found, threshold,
                              f"{len(rows)} rows hold {m_rows.inside:.3f} of the mass (dense: {m_rows.baseline:.3f}), "
                              f"excess {m_rows.excess:.3f} >= {threshold:g}")
    tested = per_head if per_head is not None else found if len(found) > 1 else rows
    m = partition_mass(H, tested)
    return Classification(DENSE, 2, tested, m, found, threshold,
                          f"{tested.name} holds {m.inside:.3f} of the mass (dense: {m.baseline:.3f}), excess "
                          f"{m.excess:.3f} < {threshold:g}; per row {m_rows.inside:.3f} (excess "
                          f"{m_rows.excess:.3f}); {len(found)} group(s) found")


# -- spectra ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockSpectrum:
    """Eigenvalues of a symmetric block, and of each group's diagonal sub-block.

    Attributes:
        eigenvalues: float64, ascending.
        tol: relative tolerance: |λ| ≤ tol · max|λ| counts as zero.
        groups: the spectrum of ``H[g, g]`` for every group g of the partition (empty without one).
    """

    eigenvalues: Tensor
    tol: float
    groups: list["BlockSpectrum"] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.eigenvalues.numel()

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def lambda_min(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def null_count(self) -> int:
        """How many |λ| ≤ tol · max|λ| (all of them for a zero block)."""
        a = self.eigenvalues.abs()
        return int((a <= self.tol * a.max()).sum())

    @property
    def condition(self) -> float:
        """max|λ| / min|λ| over the |λ| above tol · max|λ|; NaN for a zero block."""
        a = self.eigenvalues.abs()
        top = float(a.max())
        kept = a[a > self.tol * top]
        return top / float(kept.min()) if kept.numel() else math.nan


def block_spectrum(H: Tensor, partition: Partition | None = None, tol: float | None = None) -> BlockSpectrum:
    """Eigenvalues (float64) of H and of each group's diagonal sub-block H[g, g].

    H is taken as symmetric: only its lower triangle is read (`torch.linalg.eigvalsh`).

    Args:
        H: (d, d) Hessian block.
        partition: groups whose diagonal sub-blocks get their own spectrum.
        tol: relative zero tolerance; default n · ε of H's dtype for an n × n block (the rank
            tolerance of `numpy.linalg.matrix_rank`).
    """
    _check_block(H)
    h = H.detach().to(torch.float64)

    def one(block: Tensor) -> BlockSpectrum:
        t = tol if tol is not None else block.shape[0] * torch.finfo(H.dtype).eps
        return BlockSpectrum(torch.linalg.eigvalsh(block), t)

    whole = one(h)
    if partition is None:
        return whole
    _check_fits(H, partition)
    return BlockSpectrum(whole.eigenvalues, whole.tol, [one(h[g][:, g]) for g in partition.groups])
