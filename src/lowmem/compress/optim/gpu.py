"""The ``triton`` backend: the plan engine's GPU step as four Triton kernel launches per bucket,
whatever the number of its tensors (multi-tensor, as torch's fused AdamW), with no host
synchronisation.

Every parameter of a bucket is one *task* in canonical form (`backends._canonical`): a row-major
(R, C) problem whose `v` is kept per entry (full Adam), per row (``row``: reduce over C; one
row of n entries for ``all``) or per column (``col``: reduce over R). The step:

1. *partial sums* of ``g²``: for row tasks one program per chunk of `ROW_CHUNK` entries of a row,
   for column tasks one per tile of `COL_ROWS` rows × `COL_WIDTH` columns; each writes its sums
   to a scratch buffer;
2. *finalize*: one program per `KEPT` kept entries adds its chunks' sums (`CHUNK_BLOCK` at a
   time), updates `v`
   (fp32 or bf16) and writes the denominator ``sqrt(v)/sqrt(1−β2^t) + ε`` to a scratch buffer
   (from the fp32 `v`, before a bf16 `v` is rounded, as the staged path does);
3. *update*: one program per tile of the parameter (a quantization block where a state is
   quantized, else `TILE` entries) decodes `m` (and a full-Adam `v`), updates them, the
   parameter (fp32, or bf16 rounded to nearest), and encodes them back in registers: absmax of
   the block, the code of each entry by binary search over the map's switch points
   (`quant._switch_points`, so the codes are `quant.quantize`'s: nearest value, ties up; a
   block holding a NaN or an infinity gets a NaN scale, as there).

Full-Adam tasks skip 1 and 2. Reductions sum in an order fixed by the shapes (reproducible), in
fp32. A reduced task reads ``g`` twice (steps 1 and 3): 6 passes over the parameter's size
instead of the 5 of a single pass; a row is often far larger than what one program keeps in
registers, and two passes keep every program's work the same size on every shape.

The kernels read each task's sizes from a table built on the host once per make-up of a bucket
(its tensors' shapes, dtypes, formats and layouts; kept for the last `CACHED` make-ups), and its
addresses from a table of 8 integers per tensor made at each step (gradients are new tensors
at every step); both go to the device asynchronously from pinned memory, and a program finds its
tensor by binary search over its launch's first programs, so the tables grow with the number of
tensors, not of programs. Scalars are kernel arguments. Arithmetic in fp32 with IEEE division
and square root (``div_rn``, ``sqrt_rn``). A kernel is compiled (for its constants) before any
kernel of the step runs: where one fails to compile, the step and every later one run the
foreach backend, after one warning, and no tensor was touched by half a step.

It serves CUDA tensors where Triton is installed (CUDA builds of torch ship it): backend
``"triton"``, and in the default preference after the native CPU kernel. On CPU tensors the same
kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) as backend ``"triton-interpreter"``,
only when a group asks for ``backend="triton"`` and ``TRITON_INTERPRET=1`` was set before Triton
was imported (else the next backend of the preference steps them): that is how the tests check
them on a machine without a GPU (it is far too slow for training). bf16 stores round to nearest
even by their bits (as torch does; the interpreter's casts truncate). Not served (the next backend of the
preference takes them): sharded parameters, layouts of several parts or with reduce dims that
are neither leading nor trailing, 0-d tensors, fp16 and fp64 parameters, Kahan or stochastic
rounding, 4-bit `m` beside 8-bit `v`, and tensors not contiguous.

It also takes the capture's two measurements on CUDA, as the native kernel does on the CPU: the
precision of Adam's state (`precision_sums`, for `lowmem.snr.precision.error_sums_all`: one
program per `PREC_PER` tiles of a quantization row, each tile's five round trips (m in bf16, int8,
int4; v in bf16, int8) made in registers as the update kernel codes them, and a second launch
adding each parameter's programs' fp64 sums in order) and the SNR of `v`'s views (`snr_sums`, for
the capture: per view and axis subset, each slice's deviations from its first entry summed in
fp64, then the terms of the slices, then each task's in order). Where one of them does not
compile, torch ops take that measurement instead, after one warning (`measured`).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import warnings

import torch

from lowmem.compress.formats import QUANTIZED, block_of
from lowmem.compress.optim._common import local
from lowmem.compress.optim.backends import Bucket, StepScalars
from lowmem.compress.optim.native import FORMATS, MODES, kernel_plan, serves_stored

ROW_CHUNK = 4096   # entries of a row one program sums (longer rows: in chunks, added in order after)
COL_ROWS, COL_WIDTH = 256, 64    # a column task's tile of rows × columns per program
KEPT = 128         # kept entries per finalize program (adding CHUNK_BLOCK chunks' sums at a time)
CHUNK_BLOCK = 32
TILE = 1024        # entries per update program where no state is quantized
# fields of a task's row in the size table (int64; as triton_kernels reads them)
N, R, C, QLEN, K, PBASE, DBASE, CHUNKS, IS_COL, TILES = range(10)
NF = 16
CACHED = 256       # bucket make-ups whose tables an optimizer keeps (least recently used dropped)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: ``TRITON_INTERPRET=1``, set before Triton
    was imported (it decides at each kernel's definition, its own library's included)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True
    from triton.language import standard
    return type(standard.zeros).__name__ == "InterpretedFunction"


@functools.cache
def available() -> bool:
    """Whether Triton imports (and, outside the interpreter, a CUDA device exists)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return interpreting() or torch.cuda.is_available()


def serves(key) -> bool:
    """Whether the kernels take a bucket: CUDA (CPU under the interpreter), one canonical
    block or full Adam, fp32 compute; parameters fp32 or bf16 rounded to nearest, contiguous;
    states fp32/bf16, `m` also 8- or 4-bit, a full-Adam `v` also 8-bit."""
    if key.device.type != "cuda" and not (key.device.type == "cpu" and interpreting()):
        return False
    if key.kind not in ("full", "canonical"):
        return False
    st = key.stored
    if st is None:
        ok = key.native and key.dtype == torch.float32
    else:
        ok = serves_stored(st, key.kind, ("nearest",)) and not (st.m == "int4" and st.v == "int8")
    return ok and _broken is None and available()


# -- kernels ------------------------------------------------------------------------------------
@functools.cache
def _kernels():
    from lowmem.compress.optim import triton_kernels as k
    return k.triton, k.tl, k.row_sums, k.col_sums, k.finalize, k.update


# -- maps ---------------------------------------------------------------------------------------
_maps: dict = {}


def _map(which: str, fmt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, switch points padded with +inf to 2^bits) of `which`'s map in `fmt` on `device`."""
    key = (which, fmt, str(device))
    if key not in _maps:
        from lowmem.compress.optim.quant import _switch_points
        from lowmem.compress.optim.state import _qmap

        q = _qmap(which, fmt, torch.device("cpu")).float()
        thr = torch.cat((_switch_points(q), torch.tensor([math.inf])))
        _maps[key] = tuple(_to_device([q, thr], device))
    return _maps[key]


# -- the backend --------------------------------------------------------------------------------
class _Tables:
    """What the kernels of one make-up of a bucket (its tensors' shapes, dtypes, formats and
    layouts, not their addresses) read besides this step's addresses: the size table, each
    launch's tasks and first programs, scratch for the partial sums and the denominators (on the
    device). Built once per make-up; O(tensors), not O(programs)."""

    def __init__(self, device: torch.device, tasks: list[list[int]], launches: dict, partial: int, dens: int):
        host = [torch.tensor(tasks, dtype=torch.int64).reshape(-1, NF)]
        kinds = []
        for what, (ids, counts) in launches.items():
            host += [torch.tensor(ids, dtype=torch.int64), torch.tensor(_firsts(counts), dtype=torch.int64)]
            kinds.append((what, len(ids), sum(counts)))
        moved = _to_device(host, device)
        self.sizes = moved[0]
        self.launches = [(what, moved[1 + 2 * i], moved[2 + 2 * i], n, programs)
                         for i, (what, n, programs) in enumerate(kinds)]
        self.partial = torch.empty(max(partial, 1), dtype=torch.float32, device=device)
        self.dens = torch.empty(max(dens, 1), dtype=torch.float32, device=device)


def _firsts(counts: list[int]) -> list[int]:
    """Where each of consecutive runs of `counts` items starts (0, then the running sums)."""
    return [0, *itertools.accumulate(counts)][:-1]


def _to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tables on `device` without synchronising: copied from pinned memory asynchronously
    (torch's pinned-memory cache keeps each host block until its copy is done)."""
    if device.type != "cuda":
        return tensors
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def _tensors(b: Bucket) -> list[tuple]:
    """(param, grad, state dict of local tensors, layout, m format, v format) of every tensor
    of the bucket."""
    out = [(p, g, {"exp_avg": m, "exp_avg_sq": v}, lay, "fp32", "fp32")
           for p, g, m, v, lay in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.layouts)]
    for st in b.stages:
        out.append((st.shard, st.grad, {k: local(t) for k, t in st.state.items() if isinstance(t, torch.Tensor)},
                    st.layout, st.fmt.m, st.fmt.v))
    return out


def _describe(entries, device) -> tuple[list, list, tuple, list]:
    """Split the bucket's tensors into those the kernels take (with their plans) and the rest;
    the make-up key of the first kind, and this step's address rows."""
    taken, rest, key, ptrs = [], [], [], []
    for e in entries:
        p, g, state, lay, m_fmt, v_fmt = e
        plan = kernel_plan(p, g, state, lay, m_fmt, v_fmt, device)
        if plan is None:
            rest.append(e)
            continue
        mode, cols, qlen, _ = plan
        taken.append((e, mode, cols, qlen))
        key.append((tuple(p.shape), p.dtype, m_fmt, v_fmt, mode, cols, state["exp_avg_sq"].dtype))
        addr = lambda k: state[k].data_ptr() if k in state else 0
        ptrs += [p.data_ptr(), g.data_ptr(), addr("exp_avg"), addr("exp_avg_scale"), addr("exp_avg_sq"),
                 addr("exp_avg_sq_scale"), 0, 0]
    return taken, rest, tuple(key), ptrs


def _block(m_fmt: str, v_fmt: str) -> int:
    """Entries per update program: the quantization block where a state is quantized."""
    for fmt in (m_fmt, v_fmt):
        if fmt in QUANTIZED:
            return block_of(fmt)
    return TILE


def _tables(taken, device) -> _Tables:
    tasks, launches, partial, dens = [], {}, 0, 0

    def launch(what, t, programs):
        ids, counts = launches.setdefault(what, ([], []))
        ids.append(t)
        counts.append(programs)

    for t, ((p, g, state, lay, m_fmt, v_fmt), mode, cols, qlen) in enumerate(taken):
        n = p.numel()
        rows, cols = (n, 1) if mode == MODES["full"] else (1, n) if mode == MODES["all"] else (n // cols, cols)
        is_col = mode == MODES["col"]
        kept = cols if is_col else rows
        chunks = -(-rows // COL_ROWS) if is_col else -(-cols // ROW_CHUNK)
        block = _block(m_fmt, v_fmt)
        if block == TILE:   # nothing quantized: tiles over the whole tensor
            qlen = n
        tiles = -(-qlen // block)
        row = [0] * NF
        row[N], row[R], row[C], row[QLEN], row[K], row[PBASE], row[DBASE], row[CHUNKS], row[IS_COL], row[TILES] = (
            n, rows, cols, qlen, kept, partial, dens, chunks, int(is_col), tiles)
        tasks.append(row)
        full = mode == MODES["full"]
        launch(("update", p.dtype, m_fmt, v_fmt, full), t, (n // qlen) * tiles)
        if full:
            continue
        if is_col:
            launch(("cols", p.dtype), t, -(-cols // COL_WIDTH) * chunks)
        else:
            launch(("rows", p.dtype), t, rows * chunks)
        launch(("finalize", state["exp_avg_sq"].dtype), t, -(-kept // KEPT))
        partial += chunks * kept
        dens += kept
    return _Tables(device, tasks, launches, partial, dens)


def _tl_dtype(tl, dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


def triton_step(b: Bucket, s: StepScalars) -> None:
    """The bucket's update in at most four kinds of launches (`update` once per combination of
    parameter dtype and formats); tensors the kernels cannot read as they are step on the
    foreach backend (through fp32 temporaries when staged)."""
    global _broken

    device = b.key.device
    taken, rest, key, ptrs = _describe(_tensors(b), device)
    if taken:
        cache = b.scratch.setdefault(("triton", str(device)), {})
        tables = cache.pop(key, None)
        if tables is None:
            if len(cache) >= CACHED:
                cache.pop(next(iter(cache)))
            tables = _tables(taken, device)
        cache[key] = tables   # (most recently used last)
        addresses = _to_device([torch.tensor(ptrs, dtype=torch.int64)], device)[0]
        try:
            _launch(tables, addresses, s, device)
        except KernelUnavailable as e:
            _broken = str(e)
            warnings.warn(f"lowmem: a Triton kernel of the optimizer step could not be compiled ({e}); the "
                          "optimizer steps with the foreach backend instead (slower, same results up to rounding).",
                          RuntimeWarning, stacklevel=4)
            rest = rest + [e for e, *_ in taken]
        else:
            touched = [e[0] for e, *_ in taken] + [x for e, *_ in taken for x in e[2].values()]
            torch.autograd.graph.increment_version(touched)
    if rest:
        _rest(b, s, rest)


def _launch(tables: _Tables, ptrs: torch.Tensor, s: StepScalars, device) -> None:
    """Every launch of the bucket, in order (sums, then `v`, then the update). Kernels not yet
    compiled for their arguments' types are compiled first, all of them before any runs, so a
    kernel that fails to compile (`KernelUnavailable`) leaves every tensor as it was."""
    triton, tl, row_sums, col_sums, finalize, update = _kernels()
    order = {"rows": 0, "cols": 0, "finalize": 1, "update": 2}
    calls = []
    for (what, *rest), ids, starts, n, programs in sorted(tables.launches, key=lambda x: order[x[0][0]]):
        common = (ptrs, tables.sizes, ids, starts, n)
        log = max(1, n.bit_length())
        if what == "rows":
            calls.append((row_sums, programs, (*common, tables.partial),
                          dict(LOG=log, GT=_tl_dtype(tl, rest[0]), CH=ROW_CHUNK, BLOCK=1024)))
        elif what == "cols":
            calls.append((col_sums, programs, (*common, tables.partial),
                          dict(LOG=log, GT=_tl_dtype(tl, rest[0]), RB=16, WIDTH=COL_WIDTH, ROWS=COL_ROWS)))
        elif what == "finalize":
            calls.append((finalize, programs, (*common, tables.partial, tables.dens, s.beta2, 1 - s.beta2, s.bc2_sqrt,
                                               s.eps),
                          dict(LOG=log, VT=_tl_dtype(tl, rest[0]), BLOCK=KEPT, CB=CHUNK_BLOCK)))
        else:
            p_dtype, m_fmt, v_fmt, full = rest
            m_map, m_thr = _map("m", m_fmt, device) if m_fmt in QUANTIZED else (tables.dens, tables.dens)
            v_map, v_thr = _map("v", v_fmt, device) if v_fmt in QUANTIZED else (tables.dens, tables.dens)
            calls.append((update, programs, (*common, tables.dens, m_map, m_thr, v_map, v_thr, s.decay, 1 - s.beta1,
                                             s.beta2, 1 - s.beta2, s.bc2_sqrt, s.eps, -s.step_size,
                                             -1.0 if s.maximize else 1.0),
                          dict(LOG=log, PT=_tl_dtype(tl, p_dtype), MF=FORMATS[m_fmt], VF=FORMATS[v_fmt], FULL=full,
                               BLOCK=_block(m_fmt, v_fmt))))
    _run(calls, device)


_compiled: set = set()   # kernels compiled for their constants (or interpreted)


class KernelUnavailable(RuntimeError):
    """A Triton kernel of the step could not be compiled here."""


_broken: str | None = None   # why the kernels cannot run here, after one failed compile


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rest(b: Bucket, s: StepScalars, rest) -> None:
    """The tensors the kernels do not take, on the torch backends (`backends.torch_ops_step`)."""
    from lowmem.compress.optim.backends import torch_ops_step

    staged_ids = {id(st.shard): st for st in b.stages}
    other = Bucket(b.key, b.state_dtype, b.scratch)
    for p, g, state, lay, *_ in rest:
        st = staged_ids.get(id(p))
        if st is not None:
            other.stages.append(st)
            continue
        i = next(i for i, q in enumerate(b.params) if q is p)
        other.params.append(p)
        other.grads.append(g)
        other.exp_avgs.append(b.exp_avgs[i])
        other.exp_avg_sqs.append(b.exp_avg_sqs[i])
        other.layouts.append(lay)
        other.steps.append(b.steps[i])
    torch_ops_step(other, s)


# -- the precision measurement ---------------------------------------------------------------------
# The measurements' kernels round every product and sum as the CPU kernels and the torch ops do:
# no fused multiply-adds (Triton's default changes between versions).
EXACT = {"enable_fp_fusion": False}
PREC_TILE = 256    # entries of a quantization row per tile: one 8-bit block, two 4-bit ones
PREC_PER = 8       # tiles per program (the partial sums: 128 B per program, 0.2% of fp32 state)
PREC_CB = 64       # partial rows a total program adds at a time


def precision_reads(state: tuple) -> bool:
    """Whether `precision_sums` takes a state (`error_sums`' arguments): `m` and `v` contiguous
    fp32 or bf16 tensors of one size on one CUDA device (or the CPU under the interpreter), the
    step a number, a CPU tensor or a tensor on that device."""
    m, v, step = state[:3]
    return (m.device == v.device and (m.is_cuda or (m.device.type == "cpu" and interpreting()))
            and m.dtype in (torch.float32, torch.bfloat16) and v.dtype in (torch.float32, torch.bfloat16)
            and m.is_contiguous() and v.is_contiguous() and m.numel() == v.numel()
            and (not isinstance(step, torch.Tensor) or step.device.type == "cpu" or step.device == m.device))


def precision_sums(states: list[tuple]) -> list[torch.Tensor]:
    """`lowmem.snr.precision.error_sums` of each of `states` (tuples of its arguments, all
    `precision_reads` and on one device), in two launches per pair of state dtypes, with no
    host synchronisation: one program per `PREC_PER` tiles of `PREC_TILE` entries of a
    quantization row (every format's round trip in registers, fp32 as the torch ops, sums in
    fp64), then one per parameter adding its programs' sums in order (so the numbers do not
    depend on scheduling). Returns float64 tensors on the device (views of one buffer). Raises
    `KernelUnavailable` before anything runs where a kernel does not compile."""
    from lowmem.compress.formats import block_of, quantizable, rows_of
    from lowmem.snr.precision import _sum_count

    if block_of("int8") != PREC_TILE or block_of("int4") * 2 != PREC_TILE:
        raise KernelUnavailable(f"the kernel's tiles ({PREC_TILE}) do not hold the formats' blocks")
    tl = _kernels()[1]
    from lowmem.compress.optim.triton_kernels import precision_tiles, precision_total

    device = states[0][0].device
    counts = [_sum_count(s[5]) for s in states]
    out = torch.zeros(max(sum(counts), 1), dtype=torch.float64, device=device)
    scalars, on_device = [], []
    groups: dict[tuple, list[int]] = {}
    for i, (m, v, step, betas, eps, shape) in enumerate(states):
        if isinstance(step, torch.Tensor) and step.device.type != "cpu":
            on_device.append(i)
            scalars.append([1.0, 1.0, eps, 0.0])
        else:
            t = float(step)
            scalars.append([1 - betas[0] ** t, (1 - betas[1] ** t) ** 0.5, eps, 0.0])
        if m.numel():
            groups.setdefault((m.dtype, v.dtype), []).append(i)
    scal = _to_device([torch.tensor(scalars, dtype=torch.float32)], device)[0]
    if on_device:   # bias corrections of steps kept on the device, computed there (no sync)
        t = torch.stack([states[i][2].reshape(()) for i in on_device]).to(torch.float32)
        betas, rows = _to_device([torch.tensor([states[i][3] for i in on_device], dtype=torch.float32),
                                  torch.tensor(on_device, dtype=torch.int64)], device)
        scal[rows, 0] = 1 - betas[:, 0] ** t
        scal[rows, 1] = (1 - betas[:, 1] ** t).sqrt()
    offsets = _firsts(counts)
    maps = [x for which, fmt in (("m", "int8"), ("m", "int4"), ("v", "int8")) for x in _map(which, fmt, device)]
    calls = []
    for (m_dtype, v_dtype), members in groups.items():
        sizes, ptrs, starts, first = [], [], [], 0
        for i in members:
            m, v, _, _, _, shape = states[i]
            quant = quantizable(tuple(shape))
            rows, qlen = rows_of(tuple(m.shape)) if quant else (1, m.numel())
            per_row = -(-qlen // PREC_TILE)
            programs = -(-rows * per_row // PREC_PER)
            sizes.append([qlen, per_row, rows * per_row, int(quant), offsets[i], first, programs, i])
            ptrs += [m.data_ptr(), v.data_ptr()]
            starts.append(first)
            first += programs
        sizes_d, ptrs_d, ids_d, starts_d = _to_device(
            [torch.tensor(sizes, dtype=torch.int64), torch.tensor(ptrs, dtype=torch.int64),
             torch.arange(len(members), dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)], device)
        partial = torch.empty(first * 16, dtype=torch.float64, device=device)
        n = len(members)
        calls.append((precision_tiles, first, (ptrs_d, sizes_d, scal, ids_d, starts_d, n, partial, *maps),
                      dict(LOG=max(1, n.bit_length()), MT=_tl_dtype(tl, m_dtype), VT=_tl_dtype(tl, v_dtype),
                           TILE=PREC_TILE, PER=PREC_PER, **EXACT)))
        calls.append((precision_total, n, (partial, sizes_d, out), dict(CB=PREC_CB, **EXACT)))
    _run(calls, device)
    return list(torch.split(out[: sum(counts)], counts))


# -- the SNR measurement -----------------------------------------------------------------------------
SNR_BLOCK = 2048    # entries a program reads at a time: SB slices x NB of their entries
SNR_SEG = 1 << 16   # entries of a slice one program adds at most (longer ones: pieces, added in order)
SNR_CB = 64         # partial rows a total program adds at a time


def snr_reads(x: torch.Tensor) -> bool:
    """Whether `snr_sums` takes `x`: an fp32, bf16 or fp16 view (any strides) of 1 to 8 dims on
    a CUDA device (or the CPU under the interpreter)."""
    return ((x.is_cuda or (x.device.type == "cpu" and interpreting()))
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and 1 <= x.dim() <= 8)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def snr_sums(entries: list[tuple[torch.Tensor, list[tuple[int, ...]]]]) -> list[torch.Tensor]:
    """`lowmem.snr.estimator.snr_sums` of each view along each of its subsets, as
    `native.snr_sums` gives them on the CPU: for each entry ``(x, subsets)`` (views that
    `snr_reads` takes, on one device) a float64 ``(len(subsets), 4)`` tensor on the device, row i
    ``[Σ mean²/var, Σ mean², Σ var, count]`` over the slices along ``subsets[i]`` whose ratio is
    finite. Each (view, subset) is a task: programs of `SNR_BLOCK` entries at a time add each
    slice's deviations from its first entry, and their squares, in fp64 (slices longer than
    `SNR_SEG` in pieces, added in order by a second launch), turn them into the four terms, and a
    last launch adds each task's programs' terms in order; so a handful of launches in all, no
    host synchronisation, and numbers that do not depend on scheduling. Temporaries: 32 bytes per
    program and 16 per slice and piece of a long slice. Raises `KernelUnavailable` before
    anything runs where a kernel does not compile."""
    tl = _kernels()[1]
    from lowmem.compress.optim import triton_kernels as k

    device = entries[0][0].device
    rows = sum(len(subsets) for _, subsets in entries)
    out = torch.zeros(max(rows, 1), 4, dtype=torch.float64, device=device)
    table, xs, launches = [], [], {}
    first = scratch = at = 0
    pad = lambda values, fill: values + [fill] * (8 - len(values))   # (the kernels read 8 axes of each)
    for x, subsets in entries:
        for subset in subsets:
            if x.numel() and subset:
                kept = [a for a in range(x.dim()) if a not in subset]
                red = sorted(subset)
                slices, n = math.prod(x.shape[a] for a in kept), math.prod(x.shape[a] for a in red)
                segments = -(-n // SNR_SEG)
                if segments == 1:
                    nb = min(256, max(16, _pow2(n)))
                    sb = SNR_BLOCK // nb
                else:
                    sb = min(8, max(2, _pow2(slices)))
                    nb = SNR_BLOCK // sb
                blocks = -(-slices // sb)
                row = [slices, n, segments, first, scratch, at, blocks, 0,
                       *pad([x.shape[a] for a in reversed(kept)], 1), *pad([x.stride(a) for a in reversed(kept)], 0),
                       *pad([x.shape[a] for a in reversed(red)], 1), *pad([x.stride(a) for a in reversed(red)], 0)]
                t = len(table)
                table.append(row)
                xs.append(x.data_ptr())
                dims = (len(kept), len(red))
                if segments == 1:
                    ids, counts = launches.setdefault(("whole", x.dtype, sb, nb, dims), ([], []))
                    ids.append(t)
                    counts.append(blocks)
                else:
                    for what, programs in (("split", blocks * segments), ("split_terms", blocks)):
                        ids, counts = launches.setdefault((what, x.dtype, sb, nb, dims), ([], []))
                        ids.append(t)
                        counts.append(programs)
                    scratch += 2 * slices * segments
                first += blocks
            at += 1
    per_entry = [len(subsets) for _, subsets in entries]
    if not table:
        return list(torch.split(out[:rows], per_entry))
    host = [torch.tensor(table, dtype=torch.int64), torch.tensor(xs, dtype=torch.int64)]
    order = {"whole": 0, "split": 0, "split_terms": 1}
    kinds = sorted(launches.items(), key=lambda kv: order[kv[0][0]])
    for _, (ids, counts) in kinds:
        host += [torch.tensor(ids, dtype=torch.int64), torch.tensor(_firsts(counts), dtype=torch.int64)]
    moved = _to_device(host, device)
    table_d, xs_d = moved[0], moved[1]
    partial = torch.empty(first * 4, dtype=torch.float64, device=device)
    scratch_d = torch.empty(max(scratch, 1), dtype=torch.float64, device=device)
    calls = []
    for i, ((what, dtype, sb, nb, (kd, rd)), (ids, counts)) in enumerate(kinds):
        ids_d, starts_d = moved[2 + 2 * i], moved[3 + 2 * i]
        common = (xs_d, table_d, ids_d, starts_d, len(ids))
        kw = dict(LOG=max(1, len(ids).bit_length()), XT=_tl_dtype(tl, dtype), SB=sb, KD=kd, **EXACT)
        if what == "whole":
            calls.append((k.snr_whole, sum(counts), (*common, partial), dict(kw, NB=nb, RD=rd)))
        elif what == "split":
            calls.append((k.snr_split, sum(counts), (*common, scratch_d), dict(kw, NB=nb, RD=rd, SEG=SNR_SEG)))
        else:
            calls.append((k.snr_split_terms, sum(counts), (*common, scratch_d, partial), kw))
    calls.append((k.snr_total, len(table), (partial, table_d, out), dict(CB=SNR_CB, **EXACT)))
    _run(calls, device)
    return list(torch.split(out[:rows], per_entry))


def _run(calls: list, device: torch.device) -> None:
    """Launch `calls` ((kernel, programs, args, constants)) in order, each kernel compiled for its
    constants first, all of them before any runs: one that does not compile raises
    `KernelUnavailable` with nothing run."""
    with torch.cuda.device(device) if device.type == "cuda" else _nothing():
        for kernel, programs, args, kw in calls:
            signature = (kernel, str(device), tuple(sorted((k, str(v)) for k, v in kw.items())))
            if signature in _compiled:
                continue
            try:
                compiled = kernel.run(*args, grid=(programs,), warmup=True, **kw)
                load = getattr(compiled, "_init_handles", None)   # (loaded on the device: resources checked)
                if load is not None:
                    load()
            except Exception as e:   # (a compiler error of any kind): nothing has run yet
                raise KernelUnavailable(f"{getattr(kernel, '__name__', kernel)}: {type(e).__name__}: {e}") from e
            _compiled.add(signature)
        for kernel, programs, args, kw in calls:
            kernel[(programs,)](*args, **kw)


_measure_broken: dict[str, str] = {}   # measurements whose kernels did not compile here, and why


def measurement_runs(what: str) -> bool:
    """Whether the Triton kernels of measurement `what` ("snr", "precision") may run here."""
    return what not in _measure_broken and available()


def measured(what: str, run):
    """``run()`` (a measurement's kernels), or None where they do not compile here: then, after
    one warning, `measurement_runs` says no for the rest of the process (torch ops measure)."""
    if what in _measure_broken:
        return None
    try:
        return run()
    except KernelUnavailable as e:
        _measure_broken[what] = str(e)
        warnings.warn(f"lowmem: a Triton kernel of the {what} measurement could not be compiled ({e}); torch "
                      "ops measure it instead (slower, same numbers up to rounding).", RuntimeWarning, stacklevel=3)
        return None


__all__ = ["available", "interpreting", "measured", "measurement_runs", "precision_reads", "precision_sums", "serves",
           "snr_reads", "snr_sums", "triton_step"]
