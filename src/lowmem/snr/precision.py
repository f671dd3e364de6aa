"""How much precision Adam's state needs: the error each storage format of `m` and `v` causes,
measured on a live Adam state, and the file that keeps the measurements.

For a parameter's `m` (``exp_avg``), `v` (``exp_avg_sq``), its step t, betas (β1, β2) and ε, the
update direction is AdamW's

    u(m, v) = (m / (1 − β1^t)) / (sqrt(v) / sqrt(1 − β2^t) + ε)

and for a format F with Q = `lowmem.compress.optim.state.roundtrip` (the state stored in F and
read back, as the next step would see it):

    state error   ‖Q(x) − x‖ / ‖x‖                      (x = m or v)
    update error  ‖u(Q(m), v) − u(m, v)‖ / ‖u(m, v)‖     for a format of m
                  ‖u(m, Q(v)) − u(m, v)‖ / ‖u(m, v)‖     for a format of v

Frobenius norms over the whole parameter; 0 when the numerator is 0 (an all-zero state, which
every format stores exactly). The bias corrections use the parameter's own ``step`` (the step that
produced this state); for m formats they cancel, for v formats ε makes them matter. AMSGrad's
``max_exp_avg_sq`` is not modelled: the update is measured with ``exp_avg_sq``. The measurement
uses the probe's whole `v`; a plan that averages `v` weighs the same `m` error a little
differently.

Candidates (`candidates`): m in bf16, int8, int4; v in bf16, int8. The quantized formats apply
only to `quantizable` shapes (`lowmem.compress.formats`: at least 2 dims and `MIN_QUANTIZED_NUMEL`
entries); for other parameters they fall back to fp32 anyway (`effective_format`), so only bf16 is
measured there.

Computed on CPU by one native kernel call for all parameters (`error_sums_all`: each state read
once, every format's round trip made 256 entries at a time, in fp32 as below, sums in double,
squares in double where fp32 ones would underflow); on CUDA, where Triton is installed, by two
Triton kernel launches for all parameters (`lowmem.compress.optim.gpu.precision_sums`: the same
round trips a tile of 256 entries at a time in registers, sums in fp64, no host sync; the torch
ops took about 110,000 launches on gpt2-124m); elsewhere (bf16 CPU state, no C compiler, no
Triton, or a Triton kernel that did not compile: one warning) by torch ops a chunk of rows at a
time (`error_sums`), same-shaped small states stacked and measured together.
A `v` format's update error is computed as −u·(sqrt(q) − sqrt(v))/(sqrt(q)/√bc2 + ε)/√bc2 with
sqrt(q) − sqrt(v) = (q − v)/(sqrt(q) + sqrt(v)), not as the difference of two nearby updates,
which in fp32 lost about 1e-4 of it to cancellation.

Sharded (FSDP2) parameters: blocks run along rows (dim 0) and a rank holds whole rows, so each
rank's rows quantize exactly as in one process; each rank sums the squared errors and squared
norms of its rows, and one all-reduce of those partial sums per process group gives every rank the
whole parameter's errors (`error_sums` is the per-rank part).

File: ``precision.csv`` beside the SNR trajectory, header `HEADER`, one row per (step,
parameter, state, format), streamed and moved into place like the trajectory
(`PrecisionWriter`, `lowmem.snr.trajectory.TrajectoryWriter`'s protocol: ``<path>.part`` while
running, renamed at the end).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem.compress.formats import QUANTIZED, quantizable, rows_of
from lowmem.snr.keys import format_shape, parse_shape
from lowmem.snr.trajectory import TrajectoryError, TrajectoryWriter, _fmt, _Parsed, read_rows

HEADER = ("step", "name", "shape", "state", "format", "state_error", "update_error")
M_CANDIDATES = ("bf16", "int8", "int4")
V_CANDIDATES = ("bf16", "int8")


def candidates(which: str, shape) -> tuple[str, ...]:
    """The formats of state `which` ("m" or "v") measured for a parameter of `shape`."""
    formats = M_CANDIDATES if which == "m" else V_CANDIDATES
    return formats if quantizable(tuple(shape)) else tuple(f for f in formats if f not in QUANTIZED)


@dataclass(frozen=True)
class PrecisionSample:
    """The error one format of one state of one parameter causes at one step (one file row)."""

    step: int
    name: str
    shape: tuple[int, ...]
    state: str           # "m" or "v"
    format: str
    state_error: float   # ‖Q(x) − x‖ / ‖x‖
    update_error: float  # ‖Δu‖ / ‖u‖


def error_sums(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step, betas: tuple[float, float], eps: float,
               shape) -> torch.Tensor:
    """Squared norms and squared errors of one parameter's (local rows of) `m` and `v`, float64,
    on their device: ``[‖m‖², ‖v‖², ‖u‖²]`` then ``[‖ΔF‖², ‖ΔuF‖²]`` for each of
    ``candidates("m", shape)`` and then of ``candidates("v", shape)`` (see the module docstring).

    Args:
        exp_avg, exp_avg_sq: the state (a rank's local rows of a sharded one: rows are dim 0).
        step: the parameter's step t (a number or a tensor, possibly on the device).
        betas, eps: the parameter group's.
        shape: the whole parameter's shape (which formats apply).
    """
    n = _sum_count(shape)
    if exp_avg.numel() == 0:   # a rank holding no rows of this parameter
        return torch.zeros(n, dtype=torch.float64, device=exp_avg.device)
    bc1, sqrt_bc2 = _corrections(step, betas, exp_avg.device)
    # Whole rows at a time (blocks run along rows, so a chunk of rows quantizes as in the whole):
    # the temporaries are a few chunks, not a few copies of the state.
    rows, length = rows_of(tuple(exp_avg.shape))
    m_rows, v_rows = exp_avg.detach().reshape(rows, length), exp_avg_sq.detach().reshape(rows, length)
    per_chunk = max(1, CHUNK // max(length, 1))
    total = torch.zeros(n, dtype=torch.float64, device=exp_avg.device)
    for first in range(0, rows, per_chunk):
        total += _chunk_sums(m_rows[first:first + per_chunk].float(), v_rows[first:first + per_chunk].float(),
                             bc1, sqrt_bc2, eps, shape, 1)[0]
    return total


def _sum_count(shape) -> int:
    """How many numbers `error_sums` gives for a parameter of `shape`."""
    return 3 + 2 * (len(candidates("m", shape)) + len(candidates("v", shape)))


def _corrections(step, betas: tuple[float, float], device: torch.device):
    """(1 − β1^t, sqrt(1 − β2^t)): numbers for a step on the host (a copy to the device would
    synchronise), float32 tensors on `device` for a step there."""
    on_device = isinstance(step, torch.Tensor) and step.device.type != "cpu"
    t = step.to(device=device, dtype=torch.float32) if on_device else float(step)
    return 1 - betas[0] ** t, (1 - betas[1] ** t) ** 0.5


def _chunk_sums(m: torch.Tensor, v: torch.Tensor, bc1, sqrt_bc2, eps: float, shape, members: int) -> torch.Tensor:
    """`error_sums`' numbers of float32 (rows, length) `m` and `v` whose rows are `members` equal
    runs, one per tensor (stacked same-shaped tensors; 1: one tensor): (members, n) float64."""
    # Imported here: lowmem.compress.optim imports the plan, which imports lowmem.snr (this package).
    from lowmem.compress.optim.state import roundtrip

    sq = (lambda x: _square_sum(x).reshape(1)) if members == 1 else (lambda x: _square_sums(x, members))
    sqrt_v = v.sqrt()
    inv_denom = 1 / (sqrt_v / sqrt_bc2 + eps)
    m_hat = m / bc1
    u = m_hat * inv_denom
    sums = [sq(m), sq(v), sq(u)]
    for fmt in candidates("m", shape):
        d = roundtrip("m", fmt, m).sub_(m)
        sums += [sq(d), sq(d.div_(bc1).mul_(inv_denom))]
    for fmt in candidates("v", shape):
        q = roundtrip("v", fmt, v)
        dv = q - v
        # u(m, q) − u(m, v) = −u (sqrt(q) − sqrt(v)) / (sqrt(q)/√bc2 + ε) / √bc2, with
        # sqrt(q) − sqrt(v) = (q − v) / (sqrt(q) + sqrt(v)): no cancellation of nearby updates
        sqrt_q = q.sqrt_()
        du = torch.where(dv == 0, 0.0, dv / (sqrt_q + sqrt_v) * u / (sqrt_q / sqrt_bc2 + eps) / -sqrt_bc2)
        sums += [sq(dv), sq(du)]
    return torch.stack(sums, dim=1).double()


def _square_sums(x: torch.Tensor, members: int) -> torch.Tensor:
    """Σ x² over each of `members` equal runs of x's rows (no matrix product, which TF32 or a
    reduced matmul precision would round); on a GPU squared in double, as `_square_sum`."""
    rows = x.reshape(members, -1)
    if rows.is_cuda:
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).square()
    return rows.square().sum(dim=1)


def _stacked_sums(states: list[tuple]) -> list[torch.Tensor]:
    """`error_sums` of same-shaped states (same dtypes, device, betas, eps and step) from one
    set of ops on their stack (at most `CHUNK` entries of each of `m` and `v`)."""
    m0, _, step, betas, eps, shape = states[0]
    rows, length = rows_of(tuple(m0.shape))
    m = torch.stack([s[0].detach().reshape(rows, length) for s in states]).float().reshape(-1, length)
    v = torch.stack([s[1].detach().reshape(rows, length) for s in states]).float().reshape(-1, length)
    bc1, sqrt_bc2 = _corrections(step, betas, m.device)
    return list(_chunk_sums(m, v, bc1, sqrt_bc2, eps, shape, len(states)))


CHUNK = 1 << 18   # entries of `m` (and `v`) `error_sums` works on at once (whole rows; at least one row)


def error_sums_all(states: list[tuple]) -> list[torch.Tensor]:
    """`error_sums` of each of `states` (tuples of its arguments), in order: those whose `m` and
    `v` are contiguous fp32 CPU tensors in one call of the native kernel
    (`lowmem.compress.optim.native.precision_sums`: each state read once, every format's round
    trip made 256 entries at a time, on ``torch.get_num_threads()`` threads), where it is
    available (a C compiler; not ``LOWMEM_NATIVE=0``); CUDA states (fp32 or bf16) in two Triton
    launches per device (`lowmem.compress.optim.gpu.precision_sums`) where Triton is installed;
    the others (bf16 CPU state, no compiler, no Triton) through torch ops, same-shaped small ones stacked (at most `CHUNK` entries at a
    time), the rest one by one (`error_sums`). The same numbers up to float rounding."""
    from lowmem.compress.optim import native

    out: list[torch.Tensor | None] = [None] * len(states)
    batch = []
    if any(_native_reads(s) for s in states) and native.available():
        for i, (m, v, step, betas, eps, shape) in enumerate(states):
            if not _native_reads(states[i]):
                continue
            t = int(step)   # (a CPU tensor or a number: no device sync)
            out[i] = torch.empty(_sum_count(shape), dtype=torch.float64)   # (an empty state: zeros)
            batch.append((m.detach(), v.detach(), out[i], 1 - betas[0] ** t, (1 - betas[1] ** t) ** 0.5, eps,
                          quantizable(tuple(shape))))
        native.precision_sums(batch)
    # CUDA states: two Triton launches per device (and pair of state dtypes), no host sync
    cuda: dict[torch.device, list[int]] = {}
    for i, state in enumerate(states):
        if out[i] is None and state[0].is_cuda and _triton_reads(state):
            cuda.setdefault(state[0].device, []).append(i)
    for members in cuda.values():
        sums = _triton_sums([states[i] for i in members])
        for i, t in zip(members, sums or []):
            out[i] = t
    # The rest: same-shaped small states (every layer's q, k, v, ... on a GPU) stacked, so that
    # they cost the ops of one; the others one by one.
    groups: dict[tuple, list[int]] = {}
    for i, (m, v, step, betas, eps, shape) in enumerate(states):
        if out[i] is not None:
            continue
        host_step = not isinstance(step, torch.Tensor) or step.device.type == "cpu"
        if host_step and 0 < m.numel() <= CHUNK // 2 and m.shape == v.shape:
            key = (tuple(m.shape), tuple(shape), m.dtype, v.dtype, m.device, tuple(betas), eps, float(step))
            groups.setdefault(key, []).append(i)
        else:
            out[i] = error_sums(*states[i])
    for members in groups.values():
        per = max(1, CHUNK // states[members[0]][0].numel())
        for first in range(0, len(members), per):
            batch = members[first:first + per]
            sums = [error_sums(*states[batch[0]])] if len(batch) == 1 else _stacked_sums([states[i] for i in batch])
            for i, t in zip(batch, sums):
                out[i] = t
    return out


def _triton_reads(state: tuple) -> bool:
    from lowmem.compress.optim import gpu

    return gpu.measurement_runs("precision") and gpu.precision_reads(state)


def _triton_sums(states: list[tuple]) -> list[torch.Tensor] | None:
    """`gpu.precision_sums` of `states`, or None (after one warning, and for every later call)
    where its kernels do not compile here: the torch ops measure them instead."""
    from lowmem.compress.optim import gpu

    return gpu.measured("precision", lambda: gpu.precision_sums(states))


def _native_reads(state: tuple) -> bool:
    m, v, step = state[:3]
    cpu = torch.device("cpu")
    return (m.device == cpu and v.device == cpu and m.dtype == v.dtype == torch.float32 and m.is_contiguous()
            and v.is_contiguous() and m.numel() == v.numel()
            and (not isinstance(step, torch.Tensor) or step.device == cpu))


def _square_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ x², with no temporary of x's size: on a GPU squared and added in double (a float square
    of a state below about 1e-19 would be 0, as it still is on the CPU fallback here, where a
    float64 reduction ran 15x slower; the CPU's native kernel squares in double)."""
    flat = x.reshape(-1)
    if flat.is_cuda:
        return torch.linalg.vector_norm(flat, dtype=torch.float64).square()
    return torch.dot(flat, flat)


def errors_from_sums(sums, shape) -> list[tuple[str, str, float, float]]:
    """(state, format, state error, update error) of each candidate from `error_sums`' numbers
    (summed over ranks for a sharded parameter), in its order."""
    s = [float(x) for x in sums]
    norm = {"m": s[0], "v": s[1]}
    out, i = [], 3
    for which in ("m", "v"):
        for fmt in candidates(which, shape):
            out.append((which, fmt, _ratio(s[i], norm[which]), _ratio(s[i + 1], s[2])))
            i += 2
    return out


def _ratio(err_sq: float, norm_sq: float) -> float:
    if err_sq == 0:
        return 0.0
    return math.sqrt(err_sq / norm_sq) if norm_sq > 0 else math.inf


class PrecisionWriter(TrajectoryWriter):
    """Streams `PrecisionSample`s to ``precision.csv`` with the trajectory's file protocol."""

    header = HEADER

    @staticmethod
    def _row(s: PrecisionSample) -> tuple:
        return (s.step, s.name, format_shape(s.shape), s.state, s.format, _fmt(s.state_error), _fmt(s.update_error))


def read_precision(path: str | os.PathLike) -> list[PrecisionSample]:
    """Read a precision CSV (also a ``.part`` file a killed run left; its torn last line is dropped).

    Raises:
        TrajectoryError: naming the file and line of the first malformed row.
    """
    path = Path(path)
    shapes = _Parsed(parse_shape)
    samples = []
    for lineno, row in read_rows(path, HEADER):
        try:
            if row[3] not in ("m", "v"):
                raise ValueError(f"state must be m or v, found {row[3]!r}")
            if row[4] not in (M_CANDIDATES if row[3] == "m" else V_CANDIDATES):
                raise ValueError(f"{row[4]!r} is not a measured format of {row[3]}")
            samples.append(PrecisionSample(int(row[0]), row[1], shapes[row[2]], row[3], row[4],
                                           float(row[5]), float(row[6])))
        except ValueError as e:
            raise TrajectoryError(f"{path}: line {lineno}: {e}") from None
    return samples


@dataclass(frozen=True)
class WorstError:
    """The largest errors one format caused over the measurements of a window (non-finite ones
    count as infinite), and how many measurements there were."""

    update_error: float
    state_error: float
    samples: int


# (parameter name, "m" or "v", format)
PrecisionKey = tuple[str, str, str]


class PrecisionTrajectory:
    """All precision samples of a run, indexed for the plan builder and the reports."""

    def __init__(self, samples: list[PrecisionSample]):
        self.samples = samples

    @classmethod
    def read(cls, path: str | os.PathLike) -> "PrecisionTrajectory":
        return cls(read_precision(path))

    @property
    def steps(self) -> list[int]:
        return sorted({s.step for s in self.samples})

    def worst(self, window: tuple[int | None, int | None] | None = None) -> dict[PrecisionKey, WorstError]:
        """The largest update and state errors of each (name, state, format) over the measured
        steps in ``[start, end]`` (inclusive; either may be None)."""
        start, end = window if window else (None, None)
        acc: dict[PrecisionKey, list] = {}
        for s in self.samples:
            if (start is not None and s.step < start) or (end is not None and s.step > end):
                continue
            a = acc.setdefault((s.name, s.state, s.format), [0.0, 0.0, 0])
            a[0] = max(a[0], s.update_error if math.isfinite(s.update_error) else math.inf)
            a[1] = max(a[1], s.state_error if math.isfinite(s.state_error) else math.inf)
            a[2] += 1
        return {k: WorstError(*a) for k, a in acc.items()}

    def by_layer(self, window: tuple[int | None, int | None] | None = None) -> dict[str, dict[tuple[str, str], WorstError]]:
        """`worst` per parameter: ``{name: {(state, format): WorstError}}``."""
        out: dict[str, dict[tuple[str, str], WorstError]] = {}
        for (name, which, fmt), w in self.worst(window).items():
            out.setdefault(name, {})[(which, fmt)] = w
        return out


__all__ = ["HEADER", "M_CANDIDATES", "PrecisionKey", "PrecisionSample", "PrecisionTrajectory", "PrecisionWriter",
           "V_CANDIDATES", "WorstError", "candidates", "error_sums", "error_sums_all", "errors_from_sums", "read_precision"]
