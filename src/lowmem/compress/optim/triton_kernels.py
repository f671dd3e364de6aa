"""The Triton kernels of the ``triton`` backend (`lowmem.compress.optim.gpu`, which describes them
and alone imports this module: it needs Triton).

Every kernel reads three tables: ``ptrs`` (per task, this step's addresses: p, g, m, m's scales,
v, v's scales; 8 int64 each), ``tasks`` (per task, its sizes: 16 int64 each, fields as
`gpu.N` … `gpu.CBLOCKS`) and its launch's ``ids`` / ``starts`` (the tasks it covers and the first
program of each): a program finds its task by binary search over ``starts``, so the tables grow
with the number of tensors, not of programs."""

import triton
import triton.language as tl

# fields of a task's row in ``tasks`` (as gpu.py writes them)
N = tl.constexpr(0)
R = tl.constexpr(1)
C = tl.constexpr(2)
QLEN = tl.constexpr(3)
KEPT = tl.constexpr(4)
PBASE = tl.constexpr(5)
DBASE = tl.constexpr(6)
CHUNKS = tl.constexpr(7)
IS_COL = tl.constexpr(8)
TILES = tl.constexpr(9)


@triton.jit
def _bf16(x):
    """fp32 → bf16 rounded to nearest even, NaN kept quiet, by bits (as torch rounds; Triton's
    interpreter truncates in ``.to``)."""
    bits = x.to(tl.uint32, bitcast=True)
    h = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
    return tl.where(x != x, 0x7FC0, h).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _out(x, dtype: tl.constexpr):
    """`x` (fp32) in `dtype` (fp32 or bf16) for a store."""
    if dtype == tl.bfloat16:
        return _bf16(x)
    else:
        return x


@triton.jit
def _ptr(ptrs, t, field, dtype: tl.constexpr):
    return tl.load(ptrs + t * 8 + field).to(tl.pointer_type(dtype))


@triton.jit
def _field(tasks, t, field):
    return tl.load(tasks + t * 16 + field)


@triton.jit
def _find(ids, starts, count, LOG: tl.constexpr):
    """(task, program number within it) of this program: the last of the launch's tasks whose
    first program is at or before it (``starts`` ascending, ``starts[0] == 0``)."""
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + count
    for _ in tl.static_range(LOG):
        mid = (lo + hi) // 2
        ok = tl.load(starts + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return tl.load(ids + lo), pid - tl.load(starts + lo)


@triton.jit
def _chunk_of(ids, starts, count, tasks, LOG: tl.constexpr):
    """(task, outer unit, chunk) of a partial-sum program: its task's program number split into
    the row (or column block) and the chunk of it."""
    t, local = _find(ids, starts, count, LOG)
    chunks = _field(tasks, t, CHUNKS)
    return t, local // chunks, local % chunks


@triton.jit
def row_sums(ptrs, tasks, ids, starts, count, partial, LOG: tl.constexpr, GT: tl.constexpr, CH: tl.constexpr,
             BLOCK: tl.constexpr):
    """Σ g² over one chunk of `CH` entries of one row (its partial sum)."""
    t, seg, chunk = _chunk_of(ids, starts, count, tasks, LOG)
    g = _ptr(ptrs, t, 1, GT)
    cols = _field(tasks, t, C)
    acc = tl.zeros([BLOCK], tl.float32)
    start = chunk * CH
    for i in range(0, tl.minimum(CH, cols - start), BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        x = tl.load(g + seg * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial + _field(tasks, t, PBASE) + chunk * _field(tasks, t, KEPT) + seg, tl.sum(acc, 0))


@triton.jit
def col_sums(ptrs, tasks, ids, starts, count, partial, LOG: tl.constexpr, GT: tl.constexpr, RB: tl.constexpr,
             WIDTH: tl.constexpr, ROWS: tl.constexpr):
    """Σ g² down `ROWS` rows of `WIDTH` columns (their partial sums)."""
    t, cb, chunk = _chunk_of(ids, starts, count, tasks, LOG)
    g = _ptr(ptrs, t, 1, GT)
    rows = _field(tasks, t, R)
    cols = _field(tasks, t, C)
    c = cb * WIDTH + tl.arange(0, WIDTH)
    acc = tl.zeros([RB, WIDTH], tl.float32)
    start = chunk * ROWS
    for i in range(0, tl.minimum(ROWS, rows - start), RB):
        r = start + i + tl.arange(0, RB)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        x = tl.load(g + r[:, None] * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial + _field(tasks, t, PBASE) + chunk * cols + c, tl.sum(acc, 0), mask=c < cols)


@triton.jit
def finalize(ptrs, tasks, ids, starts, count, partial, dens, beta2, omb2, bc2, eps, LOG: tl.constexpr,
             VT: tl.constexpr, BLOCK: tl.constexpr, CB: tl.constexpr):
    """For `BLOCK` kept entries: their chunks' partial sums added in order (`CB` chunks at a
    time), the mean, `v` updated, and the denominator written."""
    t, kb = _find(ids, starts, count, LOG)
    kept = _field(tasks, t, KEPT)
    base = _field(tasks, t, PBASE)
    chunks = _field(tasks, t, CHUNKS)
    count_r = tl.where(_field(tasks, t, IS_COL) != 0, _field(tasks, t, R), _field(tasks, t, C)).to(tl.float32)
    k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = k < kept
    acc = tl.zeros([CB, BLOCK], tl.float32)
    for ch in range(0, chunks, CB):
        c = ch + tl.arange(0, CB)
        acc += tl.load(partial + base + c[:, None] * kept + k[None, :], mask=(c < chunks)[:, None] & mask[None, :],
                       other=0.0)
    s = tl.sum(acc, 0)
    vp = _ptr(ptrs, t, 4, VT)
    v = tl.load(vp + k, mask=mask, other=0.0).to(tl.float32)
    v = v * beta2 + omb2 * tl.div_rn(s, count_r)
    tl.store(vp + k, _out(v, VT), mask=mask)
    tl.store(dens + _field(tasks, t, DBASE) + k, tl.div_rn(tl.sqrt_rn(v), bc2) + eps, mask=mask)


@triton.jit
def _decode(ptrs, t, ptr_field, scale_field, flat, within, qrow, tb, mask, qmap, qlen,
            FMT: tl.constexpr, BLOCK: tl.constexpr):
    if FMT == 0:
        x = tl.load(_ptr(ptrs, t, ptr_field, tl.float32) + flat, mask=mask, other=0.0)
    elif FMT == 1:
        x = tl.load(_ptr(ptrs, t, ptr_field, tl.bfloat16) + flat, mask=mask, other=0.0).to(tl.float32)
    else:
        codes = _ptr(ptrs, t, ptr_field, tl.uint8)
        if FMT == 2:
            code = tl.load(codes + flat, mask=mask, other=0).to(tl.int32)
        else:
            byte = tl.load(codes + qrow * ((qlen + 1) // 2) + within // 2, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((within % 2) * 4)) & 15
        nb = (qlen + BLOCK - 1) // BLOCK
        scale = tl.load(_ptr(ptrs, t, scale_field, tl.float32) + qrow * nb + tb)
        x = tl.load(qmap + code, mask=mask, other=0.0) * scale
    return x


@triton.jit
def _encode(ptrs, t, ptr_field, scale_field, x, flat, within, qrow, tb, mask, thr, qlen,
            FMT: tl.constexpr, BLOCK: tl.constexpr):
    if FMT == 0:
        tl.store(_ptr(ptrs, t, ptr_field, tl.float32) + flat, x, mask=mask)
    elif FMT == 1:
        tl.store(_ptr(ptrs, t, ptr_field, tl.bfloat16) + flat, _bf16(x), mask=mask)
    else:
        x = tl.where(mask, x, 0.0)
        scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12)
        scale = tl.where(tl.max((x != x).to(tl.int32), 0) > 0, float("nan"), scale)   # as torch's aminmax
        xn = tl.div_rn(x, scale)
        xn = tl.where(xn != xn, 0.0, xn)   # NaN (a NaN or infinite block): the code of 0, as quant's encoder
        code = tl.zeros([BLOCK], tl.int32)   # how many switch points lie at or below xn
        BITS: tl.constexpr = 8 if FMT == 2 else 4
        for i in tl.static_range(BITS):
            cand = code + (1 << (BITS - 1 - i))
            code = tl.where(xn >= tl.load(thr + cand - 1), cand, code)
        code = tl.where(mask, code, 0)
        nb = (qlen + BLOCK - 1) // BLOCK
        tl.store(_ptr(ptrs, t, scale_field, tl.float32) + qrow * nb + tb, scale)
        codes = _ptr(ptrs, t, ptr_field, tl.uint8)
        if FMT == 2:
            tl.store(codes + flat, code.to(tl.uint8), mask=mask)
        else:
            even, odd = tl.split(tl.reshape(code, (BLOCK // 2, 2)))
            width = (qlen + 1) // 2
            j = tb * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            tl.store(codes + qrow * width + j, (even | (odd << 4)).to(tl.uint8), mask=j < width)


@triton.jit
def update(ptrs, tasks, ids, starts, count, dens, m_map, m_thr, v_map, v_thr, decay, omb1, beta2, omb2, bc2, eps,
           neg_step_size, sign, LOG: tl.constexpr, PT: tl.constexpr, MF: tl.constexpr, VF: tl.constexpr,
           FULL: tl.constexpr, BLOCK: tl.constexpr):
    """One tile (a quantization block, or `BLOCK` entries) of one parameter: m (and a full-Adam
    v) decoded, updated, encoded; the parameter updated."""
    t, local = _find(ids, starts, count, LOG)
    tiles = _field(tasks, t, TILES)
    qrow = local // tiles
    tb = local % tiles
    qlen = _field(tasks, t, QLEN)
    within = tb * BLOCK + tl.arange(0, BLOCK)
    mask = within < qlen
    flat = qrow * qlen + within
    g = tl.load(_ptr(ptrs, t, 1, PT) + flat, mask=mask, other=0.0).to(tl.float32) * sign
    pp = _ptr(ptrs, t, 0, PT)
    p = tl.load(pp + flat, mask=mask, other=0.0).to(tl.float32)
    m = _decode(ptrs, t, 2, 3, flat, within, qrow, tb, mask, m_map, qlen, MF, BLOCK)
    if FULL:
        v = _decode(ptrs, t, 4, 5, flat, within, qrow, tb, mask, v_map, qlen, VF, BLOCK)
        v = v * beta2 + omb2 * (g * g)
        _encode(ptrs, t, 4, 5, v, flat, within, qrow, tb, mask, v_thr, qlen, VF, BLOCK)
        den = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
    else:
        cols = _field(tasks, t, C)
        kept = tl.where(_field(tasks, t, IS_COL) != 0, flat % cols, flat // cols)
        den = tl.load(dens + _field(tasks, t, DBASE) + kept, mask=mask, other=1.0)
    # torch's lerp: from the nearer end
    m = tl.where(omb1 < 0.5, m + omb1 * (g - m), g - (g - m) * (1.0 - omb1))
    _encode(ptrs, t, 2, 3, m, flat, within, qrow, tb, mask, m_thr, qlen, MF, BLOCK)
    p = p * decay + neg_step_size * tl.div_rn(m, den)
    tl.store(pp + flat, _out(p, PT), mask=mask)
