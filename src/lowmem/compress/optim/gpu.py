"""The ``triton`` backend: the plan engine's GPU step as four Triton kernel launches per bucket,
whatever the number of its tensors (multi-tensor, as torch's fused AdamW), with no host
synchronisation.

Every parameter of a bucket is one *task* in canonical form (`backends._canonical`): a row-major
(R, C) problem whose `v` is kept per entry (full Adam), per row (``row``: reduce over C; one
row of n entries for ``all``) or per column (``col``: reduce over R). The step:

1. *partial sums* of ``g²``: for row tasks one program per chunk of `ROW_CHUNK` entries of a row,
   for column tasks one per tile of `COL_ROWS` rows × `COL_WIDTH` columns; each writes its sums
   to a scratch buffer;
2. *finalize*: one program per `KEPT` kept entries adds its chunks' sums in order, updates `v`
   (fp32 or bf16) and writes the denominator ``sqrt(v)/sqrt(1−β2^t) + ε`` to a scratch buffer
   (from the fp32 `v`, before a bf16 `v` is rounded, as the staged path does);
3. *update*: one program per tile of the parameter (a quantization block where a state is
   quantized, else `TILE` entries) decodes `m` (and a full-Adam `v`), updates them, the
   parameter (fp32, or bf16 rounded to nearest), and encodes them back in registers: absmax of
   the block, the code of each entry by binary search over the map's switch points
   (`quant._switch_points`, so the codes are `quant.quantize`'s: nearest value, ties up).

Full-Adam tasks skip 1 and 2. Reductions sum in an order fixed by the shapes (reproducible), in
fp32. A reduced task reads ``g`` twice (steps 1 and 3): 6 passes over the parameter's size
instead of the 5 of a single pass; a row is often far larger than what one program keeps in
registers, and two passes keep every program's work the same size on every shape.

The tables the kernels read (each task's pointers and sizes, each program's task) are built on
the host once per make-up of a bucket (the tensors' addresses and shapes) and copied to the
device asynchronously from pinned memory; a step then only launches. Scalars are kernel
arguments. Arithmetic in fp32 with IEEE division and square root (``div_rn``, ``sqrt_rn``).

It serves CUDA tensors where Triton is installed (CUDA builds of torch ship it): backend
``"triton"``, and in the default preference after the native CPU kernel. On CPU tensors the same
kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) as backend ``"triton-interpreter"``,
only when a group asks for ``backend="triton"``: that is how the tests check them on a machine
without a GPU (it is far too slow for training). bf16 stores round to nearest even by their
bits (as torch does; the interpreter's casts truncate). Not served (the next backend of the
preference takes them): sharded parameters, Kahan or stochastic rounding, 4-bit `m` beside 8-bit
`v`, and tensors not contiguous.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from lowmem.compress.formats import QUANTIZED, block_of
from lowmem.compress.optim._common import local
from lowmem.compress.optim.backends import Bucket, StepScalars

FORMATS = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}
ROW_CHUNK = 4096   # entries of a row one program sums (longer rows: in chunks, added in order after)
COL_ROWS, COL_WIDTH = 256, 64    # a column task's tile of rows × columns per program
KEPT = 512         # kept entries per finalize program
TILE = 1024        # entries per update program where no state is quantized
# fields of a task's row in the task table (int64)
P, G, M, MS, V, VS, N, R, C, QLEN, K, PBASE, DBASE, CHUNKS, IS_COL = range(15)
NF = 16   # (one spare field: rows of 16 int64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
        ok = (st.compute_dtype == torch.float32 and st.contiguous and st.param_dtype in (torch.float32, torch.bfloat16)
              and (st.rounding == "nearest" or st.param_dtype == torch.float32)
              and st.m in FORMATS and st.v in FORMATS and (st.v not in QUANTIZED or key.kind == "full")
              and not (st.m == "int4" and st.v == "int8"))
    return ok and available()


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
        _maps[key] = (q.to(device), thr.to(device))
    return _maps[key]


# -- the backend --------------------------------------------------------------------------------
class _Tables:
    """What the kernels of one make-up of a bucket read: the task table, each launch's items,
    scratch for the partial sums and the denominators (on the device)."""

    def __init__(self, device: torch.device, tasks: list[list[int]], launches: dict, partial: int, dens: int):
        pin = device.type == "cuda"
        self.host = [torch.tensor(tasks, dtype=torch.int64).reshape(-1, NF)]
        self.launches = {}
        for what, items in launches.items():
            self.host.append(torch.tensor(items, dtype=torch.int64).reshape(-1, 3))
            self.launches[what] = self.host[-1]
        if pin:   # kept alive here until the copies are done (they are asynchronous)
            self.host = [t.pin_memory() for t in self.host]
            self.launches = dict(zip(self.launches, self.host[1:]))
        self.tasks = self.host[0].to(device, non_blocking=True)
        self.launches = {k: (v.to(device, non_blocking=True), v.shape[0]) for k, v in self.launches.items()}
        self.partial = torch.empty(max(partial, 1), dtype=torch.float32, device=device)
        self.dens = torch.empty(max(dens, 1), dtype=torch.float32, device=device)


def _tensors(b: Bucket) -> list[tuple]:
    """(param, grad, state dict of local tensors, layout, m format, v format) of every tensor
    of the bucket."""
    out = [(p, g, {"exp_avg": m, "exp_avg_sq": v}, lay, "fp32", "fp32")
           for p, g, m, v, lay in zip(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.layouts)]
    for st in b.stages:
        out.append((st.shard, st.grad, {k: local(t) for k, t in st.state.items() if isinstance(t, torch.Tensor)},
                    st.layout, st.fmt.m, st.fmt.v))
    return out


def _fits(t, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (t is not None and t.dtype == dtype and t.is_contiguous() and t.numel() == numel
            and t.device == device)


def _describe(entries, device) -> tuple[list, list, tuple]:
    """Split the bucket's tensors into those the kernels take (with their task rows) and the
    rest; the make-up key of the first kind."""
    from lowmem.compress.optim.native import _plan

    taken, rest, key = [], [], []
    for e in entries:
        p, g, state, lay, m_fmt, v_fmt = e
        mode, cols, qlen, want = _plan(lay, tuple(p.shape), m_fmt, v_fmt)
        n = p.numel()
        ok = (p.dtype in (torch.float32, torch.bfloat16) and _fits(p, n, p.dtype, device)
              and _fits(g, n, p.dtype, device)
              and all(_fits(state.get(k), numel, dt, device) for k, (numel, dt) in want.items()))
        if not ok:
            rest.append(e)
            continue
        taken.append((e, mode, cols, qlen))
        key.append((p.data_ptr(), g.data_ptr(), tuple(p.shape), p.dtype, m_fmt, v_fmt, mode, cols,
                    tuple(state[k].data_ptr() for k in sorted(want))))
    return taken, rest, tuple(key)


def _block(m_fmt: str, v_fmt: str) -> int:
    """Entries per update program: the quantization block where a state is quantized."""
    for fmt in (m_fmt, v_fmt):
        if fmt in QUANTIZED:
            return block_of(fmt)
    return TILE


def _tables(taken, device) -> _Tables:
    from lowmem.compress.optim.native import MODES

    tasks, launches, partial, dens = [], {}, 0, 0
    for t, ((p, g, state, lay, m_fmt, v_fmt), mode, cols, qlen) in enumerate(taken):
        n = p.numel()
        rows, cols = (n, 1) if mode == MODES["full"] else (1, n) if mode == MODES["all"] else (n // cols, cols)
        is_col = mode == MODES["col"]
        kept = cols if is_col else rows
        chunks = -(-rows // COL_ROWS) if is_col else -(-cols // ROW_CHUNK)
        ptr = lambda k: state[k].data_ptr() if k in state else 0
        tasks.append([p.data_ptr(), g.data_ptr(), ptr("exp_avg"), ptr("exp_avg_scale"), ptr("exp_avg_sq"),
                      ptr("exp_avg_sq_scale"), n, rows, cols, 0, kept, partial, dens, chunks, int(is_col), 0])
        full = mode == MODES["full"]
        block = _block(m_fmt, v_fmt)
        if block == TILE:   # nothing quantized: tiles over the whole tensor
            qrows, qlen = 1, n
        else:
            qrows = n // qlen
        tasks[-1][QLEN] = qlen
        what = ("update", p.dtype, m_fmt, v_fmt, full)
        launches.setdefault(what, []).extend(x for r in range(qrows) for tb in range(-(-qlen // block))
                                             for x in (t, r, tb))
        if full:
            continue
        if is_col:
            launches.setdefault(("cols", p.dtype), []).extend(
                x for cb in range(-(-cols // COL_WIDTH)) for ch in range(chunks) for x in (t, cb, ch))
        else:
            launches.setdefault(("rows", p.dtype), []).extend(
                x for r in range(rows) for ch in range(chunks) for x in (t, r, ch))
        v_dtype = state["exp_avg_sq"].dtype
        launches.setdefault(("finalize", v_dtype), []).extend(x for kb in range(-(-kept // KEPT)) for x in (t, kb, 0))
        partial += chunks * kept
        dens += kept
    return _Tables(device, tasks, launches, partial, dens)


def _tl_dtype(tl, dtype: torch.dtype):
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float32


def triton_step(b: Bucket, s: StepScalars) -> None:
    """The bucket's update in at most four kinds of launches (`update` once per combination of
    parameter dtype and formats); tensors the kernels cannot read as they are step on the
    foreach backend (through fp32 temporaries when staged)."""
    from lowmem.compress.optim.backends import foreach_step, reference_step

    device = b.key.device
    taken, rest, key = _describe(_tensors(b), device)
    if taken:
        cache = b.scratch.setdefault(("triton", str(device)), {})
        tables = cache.get(key)
        if tables is None:
            if len(cache) >= 8:   # make-ups that change every step (rare): forget the oldest
                cache.pop(next(iter(cache)))
            tables = cache[key] = _tables(taken, device)
        _launch(tables, taken, s, device)
        touched = [e[0] for e, *_ in taken] + [x for e, *_ in taken for x in e[2].values()]
        torch.autograd.graph.increment_version(touched)
    if rest:
        _rest(b, s, rest, foreach_step, reference_step)


def _launch(tables: _Tables, taken, s: StepScalars, device) -> None:
    triton, tl, row_sums, col_sums, finalize, update = _kernels()
    with torch.cuda.device(device) if device.type == "cuda" else _nothing():
        for (what, *rest), (items, count) in tables.launches.items():
            if what == "rows":
                row_sums[(count,)](tables.tasks, items, tables.partial, GT=_tl_dtype(tl, rest[0]), CH=ROW_CHUNK,
                                   BLOCK=1024)
            elif what == "cols":
                col_sums[(count,)](tables.tasks, items, tables.partial, GT=_tl_dtype(tl, rest[0]), RB=16,
                                   WIDTH=COL_WIDTH, ROWS=COL_ROWS)
        for (what, *rest), (items, count) in tables.launches.items():
            if what == "finalize":
                finalize[(count,)](tables.tasks, items, tables.partial, tables.dens, s.beta2, 1 - s.beta2, s.bc2_sqrt,
                                   s.eps, VT=_tl_dtype(tl, rest[0]), BLOCK=KEPT)
        for (what, *rest), (items, count) in tables.launches.items():
            if what != "update":
                continue
            p_dtype, m_fmt, v_fmt, full = rest
            m_map, m_thr = _map("m", m_fmt, device) if m_fmt in QUANTIZED else (tables.dens, tables.dens)
            v_map, v_thr = _map("v", v_fmt, device) if v_fmt in QUANTIZED else (tables.dens, tables.dens)
            update[(count,)](tables.tasks, items, tables.dens, m_map, m_thr, v_map, v_thr, s.decay, 1 - s.beta1,
                             s.beta2, 1 - s.beta2, s.bc2_sqrt, s.eps, -s.step_size, -1.0 if s.maximize else 1.0,
                             PT=_tl_dtype(tl, p_dtype), MF=FORMATS[m_fmt], VF=FORMATS[v_fmt], FULL=full,
                             BLOCK=_block(m_fmt, v_fmt))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rest(b: Bucket, s: StepScalars, rest, foreach_step, reference_step) -> None:
    """The tensors the kernels do not take, on the torch backends."""
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
    if other.params:
        (foreach_step if b.key.native else reference_step)(other, s)
    if other.stages:
        from lowmem.compress.optim.engine import _load, _store
        _load(other)
        foreach_step(other, s)
        _store(other)


__all__ = ["available", "interpreting", "serves", "triton_step"]
