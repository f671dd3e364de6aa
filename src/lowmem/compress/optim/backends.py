"""The step of the plan engine as functions over lists of tensors, and the one place that decides
which of them runs (DESIGN §5).

`ReducedAdamW` keeps the books (groups, lazy state, checks, checkpoints) and hands each group's
work to this module as `Bucket`s: tensors of one device and dtype, one kind of layout and one step
count, their gradients local (a row-sharded parameter's shard). `choose_backend` picks, per
bucket, the first backend of the group's preference that serves the bucket's `BucketKey`; the
backend updates parameters and states in place:

    m ← β1 m + (1−β1) g
    v ← β2 v + (1−β2) mean_r(g²)              (per block of the layout; full Adam: g²)
    θ ← θ (1 − lr·λ)
    θ ← θ − lr/(1−β1^t) · m / (sqrt(v) / sqrt(1−β2^t) + ε)

The host scalars (`StepScalars`: bias corrections, step size, decay factor, and ``maximize``, which
each backend applies to the gradient) are computed once per bucket, since a bucket has one step
count. Backends:

- ``reference``: the readable specification, one tensor and one block at a time; it serves every
  bucket (low-precision parameters step through a state-dtype copy; a block of a non-contiguous
  parameter that is not a view updates through a copy).
- ``foreach``: element-wise work batched with `torch._foreach_*`, reductions along the contiguous
  axis without full-size temporaries (`layout.mean_sq`).
- ``fused``: full-Adam tensors on CPU through `torch._fused_adamw_`, the kernel of
  ``AdamW(fused=True)`` (one vectorised pass; it reads step counts from CPU tensors, which is why
  it serves CPU only).
- ``compiled``: `torch.compile` of the update over a bucket's lists of tensors whose reduction is
  leading or trailing (`_canonical`), fp32/fp64 state only, scalars as 0-d tensors refilled each
  step, so a new step does not recompile; each new make-up of a bucket (list of shapes) compiles
  once, up to `MAX_COMPILED_SIGNATURES`, after which new make-ups run the foreach backend.
- ``native``: the CPU step as one C kernel call per bucket (`lowmem.compress.optim.native`),
  reading stored formats (bf16, 8-/4-bit codes) itself.
- ``triton``: the GPU step as a few Triton launches per bucket (`lowmem.compress.optim.gpu`),
  stored formats too; ``triton-interpreter`` runs the same kernels on CPU under Triton's
  interpreter, for tests, only when asked for by name.

Every backend serves sharded layouts through the two layout operations (`block_means`,
``land``), except the compiled, fused, native and triton ones, which take single-process tensors
only.

To add a backend: write ``fn(bucket, scalars)``, say which buckets it `serves`, add it to
`BACKENDS` and to the `PREFERENCE` orders it belongs in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lowmem.compress.optim.layout import Block, Layout, ShardedLayout, block_means


@dataclass(frozen=True)
class Stored:
    """How a parameter whose states or dtype differ from the compute dtype is kept
    (`BucketKey.stored`): its states' formats, its dtype, the compute dtype, how it rounds its
    update, and whether it and its gradient are contiguous (the gradient in its dtype)."""

    m: str
    v: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    rounding: str
    contiguous: bool


@dataclass(frozen=True)
class BucketKey:
    """What decides a backend for a group of tensors.

    Attributes:
        device: where the tensors live.
        dtype: the parameters' dtype.
        native: parameters are in the state dtype and (unless sharded) parameters and gradients
            are contiguous; else only the reference backend, which steps through a copy, takes
            them.
        kind: ``"full"`` (plain Adam, one block), ``"canonical"`` (one block whose reduction is
            leading or trailing, `_canonical`), ``"general"`` (other single-process layouts,
            parts, 0-d tensors) or ``"sharded"`` (row-sharded FSDP2 parameters).
        step: the step count t the tensors take now (1-based).
        stage: 0, or for parameters whose states are stored in another format (or that round
            their update in another way) the number of their staged bucket: the engine decodes
            them into compute-dtype temporaries before the backend runs (``dtype`` is then the
            compute dtype and ``native`` true) and encodes them after, unless the backend
            reads stored formats itself (`Backend.reads_stored`).
        stored: for staged parameters, and parameters below the compute dtype, how they are kept
            (`Stored`); None for parameters in the compute dtype with states in it.
    """

    device: torch.device
    dtype: torch.dtype
    native: bool
    kind: str
    step: int
    stage: int = 0
    stored: Stored | None = None


@dataclass
class Bucket:
    """Tensors that one backend call steps together (all local tensors, updated in place).

    Attributes:
        params: the parameters (this rank's shard of a sharded one).
        grads: their gradients, negated for ``maximize``.
        exp_avgs, exp_avg_sqs: their states (local tensors).
        layouts: each parameter's `Layout` or `ShardedLayout`.
        steps: the step-count tensors (already counted up), for kernels that read them.
        state_dtype: the dtype of the states.
        scratch: a per-optimizer cache a backend may keep small tensors in across steps.
    """

    key: BucketKey
    state_dtype: torch.dtype
    scratch: dict
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    layouts: list[Layout | ShardedLayout] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    stages: list = field(default_factory=list)   # the engine's staged parameters (`BucketKey.stage`)


@dataclass(frozen=True)
class StepScalars:
    """The host scalars of one group at step t, computed once for a bucket."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    step: int

    @property
    def decay(self) -> float:
        return 1 - self.lr * self.weight_decay

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1 ** self.step)

    @property
    def bc2_sqrt(self) -> float:
        return (1 - self.beta2 ** self.step) ** 0.5


def kind_of(layout: Layout | ShardedLayout, param: torch.Tensor) -> str:
    """The `BucketKey.kind` of a parameter kept as `layout`."""
    if isinstance(layout, ShardedLayout):
        return "sharded"
    if param.dim() == 0 or param.numel() == 0 or layout.flat:   # (0-element tensors never step)
        return "general"
    if not layout.compressed:
        return "full"
    return "canonical" if _canonical(layout.blocks[0]) is not None else "general"


# -- reference ----------------------------------------------------------------------------------
def reference_step(b: Bucket, s: StepScalars) -> None:
    """The readable update, one tensor and one block at a time, in torch AdamW's order. A
    gradient is brought to the state dtype one tensor at a time (a bf16 model's step holds one
    fp32 copy at once), except on sharded parameters, whose means across ranks take one
    collective for the whole bucket."""
    dtype = b.state_dtype
    sharded = b.key.kind == "sharded"
    if sharded:
        grads = [_signed(g.to(dtype), s) for g in b.grads]
        means = block_means(list(zip(b.layouts, grads)))
    for k, (p, m, v_all, lay) in enumerate(zip(b.params, b.exp_avgs, b.exp_avg_sqs, b.layouts)):
        grad = grads[k] if sharded else _signed(b.grads[k].to(dtype), s)
        param = p if p.dtype == dtype else p.detach().to(dtype)   # low-precision params: via a state-dtype copy
        param.mul_(s.decay)
        m.lerp_(grad, 1 - s.beta1)
        for i, block in enumerate(lay.blocks):
            v = lay.v_of(v_all, i)
            if block.reduce is None:
                g = lay.entries_of(grad, i)
                v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
            elif sharded:
                v.mul_(s.beta2).add_(means[k][i], alpha=1 - s.beta2)
            else:
                g = lay.entries_of(grad, i)
                v.mul_(s.beta2).add_((g * g).mean(dim=block.reduce, keepdim=True), alpha=1 - s.beta2)
            denom = (v.sqrt() / s.bc2_sqrt).add_(s.eps)
            lay.land(param, i, m, denom, -s.step_size)
        if param is not p:
            p.copy_(param)


def _signed(grad: torch.Tensor, s: StepScalars) -> torch.Tensor:
    return -grad if s.maximize else grad


# -- foreach ------------------------------------------------------------------------------------
def foreach_step(b: Bucket, s: StepScalars) -> None:
    """The reference update with the element-wise work batched over the bucket's tensors and
    blocks, and every reduction along the contiguous axis (`layout.mean_sq`)."""
    if s.maximize:
        b.grads = torch._foreach_neg(b.grads)
    if s.weight_decay != 0:
        torch._foreach_mul_(b.params, s.decay)
    torch._foreach_lerp_(b.exp_avgs, b.grads, 1 - s.beta1)
    means = block_means(list(zip(b.layouts, b.grads)))
    full_v, full_g, red_v, red_mean, lands = [], [], [], [], []
    for p, g, m, v_all, lay, block_mean in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.layouts, means):
        for i, block in enumerate(lay.blocks):
            v = lay.v_of(v_all, i)
            if block.reduce is None:
                full_v.append(v)
                full_g.append(lay.entries_of(g, i))
            else:
                red_v.append(v)
                red_mean.append(block_mean[i])
            lands.append((lay, p, i, m, v))
    if full_v:
        torch._foreach_mul_(full_v, s.beta2)
        torch._foreach_addcmul_(full_v, full_g, full_g, value=1 - s.beta2)
    if red_v:
        torch._foreach_mul_(red_v, s.beta2)
        torch._foreach_add_(red_v, red_mean, alpha=1 - s.beta2)
    denoms = torch._foreach_sqrt([v for *_, v in lands])
    torch._foreach_div_(denoms, s.bc2_sqrt)
    torch._foreach_add_(denoms, s.eps)
    targets, ms, viewed = [], [], []
    for (lay, p, i, m, _), denom in zip(lands, denoms):
        target = lay.target(p, i)
        if target is None:
            lay.land(p, i, m, denom, -s.step_size)
        else:
            targets.append(target)
            ms.append(lay.entries_of(m, i))
            viewed.append(denom)
    if targets:   # one batched call; denominators broadcast over each block's reduced dims
        torch._foreach_addcdiv_(targets, ms, viewed, value=-s.step_size)


def torch_ops_step(b: Bucket, s: StepScalars) -> None:
    """A bucket on the torch-ops backends, whatever a kernel left of it: its parameters on the
    foreach backend (the reference one where the key is not native), its staged parameters
    (`Bucket.stages`) through compute-dtype temporaries."""
    if b.params:
        (foreach_step if b.key.native else reference_step)(b, s)
    if b.stages:
        from lowmem.compress.optim.engine import _load, _store
        _load(b)
        foreach_step(b, s)
        _store(b)


# -- fused (torch's AdamW kernel) -----------------------------------------------------------------
def fused_adamw_step(b: Bucket, s: StepScalars) -> None:
    """Full-Adam tensors through `torch._fused_adamw_` (the kernel of ``AdamW(fused=True)``)."""
    torch._fused_adamw_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, [], b.steps, amsgrad=False, lr=s.lr,
                        beta1=s.beta1, beta2=s.beta2, weight_decay=s.weight_decay, eps=s.eps, maximize=s.maximize,
                        grad_scale=None, found_inf=None)


# -- compiled -----------------------------------------------------------------------------------
def _canonical(block: Block) -> tuple[tuple[int, ...], tuple[int, ...], int | None] | None:
    """(shape, v shape, dim) of the block as a 1-D or 2-D problem, or None when its reduce dims
    are neither leading nor trailing. Few canonical forms keep `torch.compile` to few graphs."""
    view, reduce = block.view, block.reduce
    n = math.prod(view)
    if reduce is None:
        return (n,), (n,), None
    if len(reduce) == len(view):
        return (n,), (1,), 0
    k = len(view) - len(reduce)
    if reduce == tuple(range(k, len(view))):
        rows = math.prod(view[:k])
        return (rows, n // rows), (rows, 1), 1
    if reduce == tuple(range(len(reduce))):
        rows = math.prod(view[:len(reduce)])
        return (rows, n // rows), (1, n // rows), 0
    return None


def _compiled_update(params, grads, exp_avgs, exp_avg_sqs, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                     eps, step_size, bc2_sqrt, dims: tuple[int | None, ...], maximize: bool) -> None:
    """The whole update of a list of tensors in canonical form (`_canonical`), for
    `torch.compile` to fuse; the scalars are 0-d tensors, so a new step does not recompile."""
    for param, grad, exp_avg, exp_avg_sq, dim in zip(params, grads, exp_avgs, exp_avg_sqs, dims):
        grad = -grad if maximize else grad
        param.mul_(decay)
        exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
        if dim is None:
            exp_avg_sq.mul_(beta2).add_(grad * grad * one_minus_beta2)
        else:
            exp_avg_sq.mul_(beta2).add_((grad * grad).mean(dim=dim, keepdim=True) * one_minus_beta2)
        param.sub_(exp_avg / (exp_avg_sq.sqrt() / bc2_sqrt + eps) * step_size)


# `torch.compile` makes one graph per list of shapes (and dims) it meets, and dynamo refuses a
# function past its recompile limit. A bucket changes make-up when gradients are missing on some
# steps, so after this many distinct make-ups (in the process, over all optimizers) new ones
# run the foreach backend instead of compiling again.
MAX_COMPILED_SIGNATURES = 32
_compiled_fn: Callable | None = None
_compiled_signatures: set = set()


def compiled_step(b: Bucket, s: StepScalars) -> None:
    """`_compiled_update` over the bucket's lists, viewed in canonical form; a bucket of a new
    make-up once `MAX_COMPILED_SIGNATURES` are compiled runs `foreach_step`."""
    global _compiled_fn
    forms = [_canonical(lay.blocks[0]) for lay in b.layouts]
    signature = (b.key.device, b.state_dtype, s.maximize, tuple((tuple(p.shape), f[2]) for p, f in zip(b.params, forms)))
    if signature not in _compiled_signatures:
        if len(_compiled_signatures) >= MAX_COMPILED_SIGNATURES:
            foreach_step(b, s)
            return
        _compiled_signatures.add(signature)
    if _compiled_fn is None:
        _compiled_fn = torch.compile(_compiled_update, dynamic=True)
    scalars = b.scratch.get(("compiled", b.key.device, b.state_dtype))
    if scalars is None:   # made once per device and dtype, refilled each step
        scalars = [torch.zeros((), dtype=b.state_dtype, device=b.key.device) for _ in range(8)]
        b.scratch[("compiled", b.key.device, b.state_dtype)] = scalars
    values = (s.decay, s.beta1, 1 - s.beta1, s.beta2, 1 - s.beta2, s.eps, s.step_size, s.bc2_sqrt)
    for t, x in zip(scalars, values):
        t.fill_(x)
    with torch._dynamo.config.patch(recompile_limit=max(2 * MAX_COMPILED_SIGNATURES,
                                                        torch._dynamo.config.recompile_limit)):
        _compiled_fn([p.view(f[0]) for p, f in zip(b.params, forms)],
                     [g.view(f[0]) for g, f in zip(b.grads, forms)],
                     [m.view(f[0]) for m, f in zip(b.exp_avgs, forms)],
                     [v.view(f[1]) for v, f in zip(b.exp_avg_sqs, forms)],
                     *scalars, tuple(f[2] for f in forms), s.maximize)


# -- native (a C kernel, `native`) ----------------------------------------------------------------
def native_step(b: Bucket, s: StepScalars) -> None:
    """The bucket in one call of the C kernel of `lowmem.compress.optim.native`."""
    from lowmem.compress.optim import native
    native.native_step(b, s)


def _native_serves(key: BucketKey) -> bool:
    from lowmem.compress.optim import native
    return native.serves(key)


# -- triton (GPU kernels, `gpu`) ---------------------------------------------------------------------
def triton_step(b: Bucket, s: StepScalars) -> None:
    """The bucket in a few Triton launches (`lowmem.compress.optim.gpu`)."""
    from lowmem.compress.optim import gpu
    gpu.triton_step(b, s)


def _triton_serves(key: BucketKey) -> bool:
    from lowmem.compress.optim import gpu
    return key.device.type == "cuda" and gpu.serves(key)


def _interpreted_serves(key: BucketKey) -> bool:
    from lowmem.compress.optim import gpu
    return key.device.type == "cpu" and gpu.interpreting() and gpu.serves(key)


# -- the choice ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """One way to run a bucket: ``fn(bucket, scalars)`` and which buckets it can take.
    ``reads_stored``: it reads and writes staged parameters' stored formats itself (from
    `Bucket.stages`), so the engine does not decode them into temporaries first."""

    name: str
    fn: Callable[[Bucket, StepScalars], None]
    serves: Callable[[BucketKey], bool]
    reads_stored: bool = False


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", reference_step, lambda k: True),
    Backend("foreach", foreach_step, lambda k: k.native),
    Backend("fused", fused_adamw_step, lambda k: k.native and k.kind == "full" and k.device.type == "cpu"),
    # Its 0-d scalars are in the state dtype: in bf16 β2 = 0.999 would be 1.0, so fp32/fp64 only.
    Backend("compiled", compiled_step, lambda k: k.native and k.kind in ("full", "canonical")
            and k.dtype in (torch.float32, torch.float64)),
    Backend("native", native_step, _native_serves, reads_stored=True),
    Backend("triton", triton_step, _triton_serves, reads_stored=True),
    # the same kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1): for tests, and
    # only when asked for by name (``backend="triton"``), never as a fallback
    Backend("triton-interpreter", triton_step, _interpreted_serves, reads_stored=True),
)}

# The backends each group option tries, in order: the first that serves a bucket runs it.
# On CPU torch's fused AdamW kernel is faster than any per-op path for full-Adam tensors.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "reference": ("reference",),
    "foreach": ("fused", "foreach", "reference"),
    "compiled": ("compiled", "fused", "foreach", "reference"),
    "native": ("native", "triton", "fused", "foreach", "reference"),
    "triton": ("triton", "triton-interpreter", "fused", "foreach", "reference"),
}


def choose_backend(key: BucketKey, preference: str) -> Backend:
    """The backend that runs a bucket: the first of ``PREFERENCE[preference]`` that serves it."""
    for name in PREFERENCE[preference]:
        if BACKENDS[name].serves(key):
            return BACKENDS[name]
    raise AssertionError(f"no backend serves {key}")   # the reference serves every bucket


__all__ = ["BACKENDS", "PREFERENCE", "Backend", "Bucket", "BucketKey", "StepScalars", "Stored", "choose_backend",
           "compiled_step", "foreach_step", "fused_adamw_step", "kind_of", "native_step", "reference_step", "torch_ops_step", "triton_step"]
