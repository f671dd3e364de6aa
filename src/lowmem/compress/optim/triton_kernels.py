"""The Triton kernels of the ``triton`` backend (`lowmem.compress.optim.gpu`, which describes them
and alone imports this module: it needs Triton).

Every kernel reads three tables: ``ptrs`` (per task, this step's addresses: p, g, m, m's scales,
v, v's scales; 8 int64 each), ``tasks`` (per task, its sizes: 16 int64 each, fields as
`gpu.N` … `gpu.CBLOCKS`) and its launch's ``ids`` / ``starts`` (the tasks it covers and the first
program of each): a program finds its task by binary search over ``starts``, so the tables grow
with the number of tensors, not of programs. The kernels that take ``count`` (the tasks of a
launch) are not specialised on it, so that a new number of tensors does not compile a new
version at launch, outside `gpu._run`'s compile-first step."""

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


@triton.jit(do_not_specialize=["count"])
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


@triton.jit(do_not_specialize=["count"])
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


@triton.jit(do_not_specialize=["count"])
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


@triton.jit(do_not_specialize=["count"])
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


# -- the precision measurement (lowmem.snr.precision.error_sums; gpu.precision_sums drives it) ----
# fields of a task's row in its size table (8 int64 each, as gpu.precision_sums writes them)
P_QLEN = tl.constexpr(0)
P_PER_ROW = tl.constexpr(1)
P_TILES = tl.constexpr(2)
P_QUANT = tl.constexpr(3)
P_OUT = tl.constexpr(4)
P_FIRST = tl.constexpr(5)
P_PROGRAMS = tl.constexpr(6)
P_SCALARS = tl.constexpr(7)   # its row of the scalars table (bc1, sqrt(bc2), eps, 0: fp32)


@triton.jit
def _sq(x):
    """Σ x² in fp64 (v's squares and their errors' are below fp32's range)."""
    x = x.to(tl.float64)
    return tl.sum(x * x, 0)


@triton.jit
def _at(col, j, s):
    """s in lane j of a 16-lane fp64 row."""
    return tl.where(col == j, s, 0.0)


@triton.jit
def _roundtrip(x, mask, half, qmap, thr, BITS: tl.constexpr):
    """x (a tile of one quantization row, zero where masked) stored in a block-wise quantized
    format and read back: one block per tile (8 bits) or per half tile (4 bits); the scale is the
    block's absmax, at least 1e-12, NaN where it holds a NaN (as `quant.quantize`); the code the
    nearest map value, ties up (a binary search over the switch points, as the step's)."""
    a = tl.where(mask, tl.abs(x), 0.0)
    bad = tl.where(mask & (x != x), 1, 0)
    if BITS == 8:
        scale = tl.maximum(tl.max(a, 0), 1e-12)
        scale = tl.where(tl.max(bad, 0) > 0, float("nan"), scale)
    else:
        lo = tl.maximum(tl.max(tl.where(half, 0.0, a), 0), 1e-12)
        hi = tl.maximum(tl.max(tl.where(half, a, 0.0), 0), 1e-12)
        lo = tl.where(tl.max(tl.where(half, 0, bad), 0) > 0, float("nan"), lo)
        hi = tl.where(tl.max(tl.where(half, bad, 0), 0) > 0, float("nan"), hi)
        scale = tl.where(half, hi, lo)
    y = tl.div_rn(x, scale)
    code = tl.zeros(x.shape, tl.int32)
    for i in tl.static_range(BITS):
        cand = code + (1 << (BITS - 1 - i))
        code = tl.where(y >= tl.load(thr + cand - 1), cand, code)
    return tl.load(qmap + code) * scale


@triton.jit(do_not_specialize=["count"])
def precision_tiles(mv, sizes, scalars, ids, starts, count, partial, m8_map, m8_thr, m4_map, m4_thr, v8_map, v8_thr,
                    LOG: tl.constexpr, MT: tl.constexpr, VT: tl.constexpr, TILE: tl.constexpr, PER: tl.constexpr):
    """`PER` tiles of `TILE` entries of one quantization row each, of one parameter: the squared
    norms of m, v and the update u, and the squared errors of each format in the state and in u
    (fp32 round trips, fp64 sums), added over the tiles into this program's row of `partial`
    (16 fp64: m², v², u², then (state, update) for m bf16, int8, int4, v bf16, int8)."""
    t, local = _find(ids, starts, count, LOG)
    qlen = tl.load(sizes + t * 8 + P_QLEN)
    per_row = tl.load(sizes + t * 8 + P_PER_ROW)
    tiles = tl.load(sizes + t * 8 + P_TILES)
    mp = tl.load(mv + t * 2).to(tl.pointer_type(MT))
    vp = tl.load(mv + t * 2 + 1).to(tl.pointer_type(VT))
    at = scalars + tl.load(sizes + t * 8 + P_SCALARS) * 4
    rbc1 = tl.div_rn(1.0, tl.load(at))
    rsbc2 = tl.div_rn(1.0, tl.load(at + 1))
    eps = tl.load(at + 2)
    lane = tl.arange(0, TILE)
    half = lane >= TILE // 2
    col = tl.arange(0, 16)
    acc = tl.zeros([16], tl.float64)
    for k in range(PER):
        tile = local * PER + k
        within = (tile % per_row) * TILE + lane
        mask = within < tl.where(tile < tiles, qlen, 0)   # (past the task's last tile: nothing)
        flat = (tile // per_row) * qlen + within
        m = tl.load(mp + flat, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(vp + flat, mask=mask, other=0.0).to(tl.float32)
        # a tile of zeros adds nothing (every format stores 0 exactly; u = 0 there for ε > 0)
        live = tl.max(tl.where(mask & ((m != 0) | (v != 0)), 1, 0), 0) > 0
        sv = tl.sqrt_rn(v)
        inv = tl.div_rn(1.0, sv * rsbc2 + eps)
        w = tl.where(mask, rbc1 * inv, 0.0)   # Δu of a change e of m is e·w (0 past the row: ε may be 0)
        u = tl.where(mask, m * w, 0.0)
        row = _at(col, 0, _sq(m)) + _at(col, 1, _sq(v)) + _at(col, 2, _sq(u))
        for f in tl.static_range(3):   # m: bf16, int8, int4
            if f == 0:
                q = _bf16(m).to(tl.float32)
            elif f == 1:
                q = _roundtrip(m, mask, half, m8_map, m8_thr, 8)
            else:
                q = _roundtrip(m, mask, half, m4_map, m4_thr, 4)
            e = tl.where(mask, q - m, 0.0)
            row += _at(col, 3 + 2 * f, _sq(e)) + _at(col, 4 + 2 * f, _sq(e * w))
        for f in tl.static_range(2):   # v: bf16, int8
            if f == 0:
                q = _bf16(v).to(tl.float32)
            else:
                q = _roundtrip(v, mask, half, v8_map, v8_thr, 8)
            e = tl.where(mask, q - v, 0.0)
            sq = tl.sqrt_rn(q)
            # u(m, q) − u(m, v) without the cancellation of two nearby updates (as the CPU kernel)
            eu = tl.where(e == 0.0, 0.0, tl.div_rn(-(u * rsbc2 * e), (sv + sq) * (sq * rsbc2 + eps)))
            row += _at(col, 9 + 2 * f, _sq(e)) + _at(col, 10 + 2 * f, _sq(eu))
        acc += tl.where(live, row, 0.0)
    tl.store(partial + tl.program_id(0).to(tl.int64) * 16 + col, acc)


@triton.jit
def _add_rows(partial, first, rows, WIDTH: tl.constexpr, CB: tl.constexpr):
    """Rows first, first + 1, … (`rows` of them, `WIDTH` fp64 each) of `partial` added in order,
    `CB` at a time: a task's programs' sums, the same whatever ran them when."""
    col = tl.arange(0, WIDTH)
    acc = tl.zeros([CB, WIDTH], tl.float64)
    for i in range(0, rows, CB):
        r = i + tl.arange(0, CB)
        acc += tl.load(partial + (first + r)[:, None] * WIDTH + col[None, :], mask=(r < rows)[:, None], other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def precision_total(partial, sizes, out, CB: tl.constexpr):
    """One parameter's sums: its programs' rows of `partial` added in order (`CB` at a time),
    written at its offset of `out`: all 13, or the 7 of a parameter measured in bf16 only."""
    t = tl.program_id(0)
    s = _add_rows(partial, tl.load(sizes + t * 8 + P_FIRST), tl.load(sizes + t * 8 + P_PROGRAMS), 16, CB)
    col = tl.arange(0, 16)
    quant = tl.load(sizes + t * 8 + P_QUANT) != 0
    short = tl.where(col < 5, col, tl.where(col == 9, 5, tl.where(col == 10, 6, -1)))   # bf16 sums only
    dest = tl.where(quant, col, short)
    tl.store(out + tl.load(sizes + t * 8 + P_OUT) + dest, s, mask=tl.where(quant, col < 13, short >= 0))


# -- the SNR measurement (lowmem.snr.estimator.snr_sums of many views; gpu.snr_sums drives it) --
# a task is one view along one axis subset; fields of its row in the table (40 int64, as
# gpu.snr_sums writes them), then the kept axes' sizes and strides (8 each, innermost first,
# padded with 1 and 0) and the reduced axes' likewise
S_SLICES = tl.constexpr(0)
S_N = tl.constexpr(1)          # entries per slice
S_SEGMENTS = tl.constexpr(2)   # pieces of `SEG` entries a slice is split into (1: whole)
S_FIRST = tl.constexpr(3)      # its first row of `partial`
S_SCRATCH = tl.constexpr(4)    # its first double of `scratch` (split tasks)
S_OUT = tl.constexpr(5)        # its row of `out`
S_BLOCKS = tl.constexpr(6)     # blocks of slices (and rows of `partial`)
S_KEPT = tl.constexpr(8)
S_REDUCED = tl.constexpr(24)


@triton.jit
def _offsets(row, index, FIELD: tl.constexpr, DIMS: tl.constexpr):
    """Offsets (in entries) of flat row-major indices over the `DIMS` axes whose sizes are at
    ``row[FIELD:FIELD + 8]`` and strides at ``row[FIELD + 8:FIELD + 16]`` (innermost first)."""
    off = index * 0
    rem = index
    for k in tl.static_range(DIMS):
        size = tl.load(row + FIELD + k)
        off += (rem % size) * tl.load(row + FIELD + 8 + k)
        rem = rem // size
    return off


@triton.jit
def _slices(row, xp, block, SB: tl.constexpr, KD: tl.constexpr):
    """(indices, mask, offsets, first entry in fp64) of the block's `SB` slices (`KD` kept axes)."""
    s = block * SB + tl.arange(0, SB).to(tl.int64)
    smask = s < tl.load(row + S_SLICES)
    base = _offsets(row, s, S_KEPT, KD)
    x0 = tl.load(xp + base, mask=smask, other=0.0).to(tl.float32).to(tl.float64)
    return s, smask, base, x0


@triton.jit
def _deviation_sums(row, xp, base, smask, x0, start, stop, SB: tl.constexpr, NB: tl.constexpr, RD: tl.constexpr):
    """Σ d and Σ d² (fp64) of each slice over its entries [start, stop), d = x − x0: `NB` of
    them at a time."""
    s1 = tl.zeros([SB], tl.float64)
    s2 = tl.zeros([SB], tl.float64)
    for r0 in range(start, stop, NB):
        r = r0 + tl.arange(0, NB).to(tl.int64)
        mask = smask[:, None] & (r < stop)[None, :]
        x = tl.load(xp + base[:, None] + _offsets(row, r, S_REDUCED, RD)[None, :], mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32).to(tl.float64) - x0[:, None], 0.0)
        s1 += tl.sum(d, 1)
        s2 += tl.sum(d * d, 1)
    return s1, s2


@triton.jit
def _store_terms(at, s1, s2, x0, n, smask):
    """[Σ mean²/var, Σ mean², Σ var, count] over the block's slices whose ratio is finite (a
    variance that rounding made negative, or NaN, is 0, as the CPU kernel's), into at[0:4]."""
    inv = 1.0 / n.to(tl.float64)
    c = s1 * inv
    var = s2 * inv - c * c
    var = tl.where(var > 0, var, 0.0)
    mean = x0 + c
    mean_sq = mean * mean
    ratio = mean_sq / var
    keep = smask & (tl.abs(ratio) < float("inf"))
    col = tl.arange(0, 4)
    terms = (tl.where(col == 0, tl.sum(tl.where(keep, ratio, 0.0), 0), 0.0)
             + tl.where(col == 1, tl.sum(tl.where(keep, mean_sq, 0.0), 0), 0.0)
             + tl.where(col == 2, tl.sum(tl.where(keep, var, 0.0), 0), 0.0)
             + tl.where(col == 3, tl.sum(tl.where(keep, 1.0, 0.0), 0), 0.0))
    tl.store(at + col, terms)


@triton.jit(do_not_specialize=["count"])
def snr_whole(xs, table, ids, starts, count, partial, LOG: tl.constexpr, XT: tl.constexpr, SB: tl.constexpr,
              KD: tl.constexpr, NB: tl.constexpr, RD: tl.constexpr):
    """`SB` whole slices of one task: their deviation sums, then their terms into its row of
    `partial`."""
    t, block = _find(ids, starts, count, LOG)
    row = table + t * 40
    xp = tl.load(xs + t).to(tl.pointer_type(XT))
    _, smask, base, x0 = _slices(row, xp, block, SB, KD)
    n = tl.load(row + S_N)
    s1, s2 = _deviation_sums(row, xp, base, smask, x0, 0, n, SB, NB, RD)
    _store_terms(partial + (tl.load(row + S_FIRST) + block) * 4, s1, s2, x0, n, smask)


@triton.jit(do_not_specialize=["count"])
def snr_split(xs, table, ids, starts, count, scratch, LOG: tl.constexpr, XT: tl.constexpr, SB: tl.constexpr,
              KD: tl.constexpr, NB: tl.constexpr, RD: tl.constexpr, SEG: tl.constexpr):
    """One piece of `SEG` entries of `SB` long slices: their deviation sums into `scratch`."""
    t, local = _find(ids, starts, count, LOG)
    row = table + t * 40
    xp = tl.load(xs + t).to(tl.pointer_type(XT))
    blocks = tl.load(row + S_BLOCKS)
    block, seg = local % blocks, local // blocks
    s, smask, base, x0 = _slices(row, xp, block, SB, KD)
    n = tl.load(row + S_N)
    s1, s2 = _deviation_sums(row, xp, base, smask, x0, seg * SEG, tl.minimum(seg * SEG + SEG, n), SB, NB, RD)
    at = scratch + tl.load(row + S_SCRATCH) + (seg * tl.load(row + S_SLICES) + s) * 2
    tl.store(at, s1, mask=smask)
    tl.store(at + 1, s2, mask=smask)


@triton.jit(do_not_specialize=["count"])
def snr_split_terms(xs, table, ids, starts, count, scratch, partial, LOG: tl.constexpr, XT: tl.constexpr,
                    SB: tl.constexpr, KD: tl.constexpr):
    """`SB` long slices: their pieces' sums added in order, then their terms into `partial`."""
    t, block = _find(ids, starts, count, LOG)
    row = table + t * 40
    xp = tl.load(xs + t).to(tl.pointer_type(XT))
    s, smask, _, x0 = _slices(row, xp, block, SB, KD)
    slices = tl.load(row + S_SLICES)
    s1 = tl.zeros([SB], tl.float64)
    s2 = tl.zeros([SB], tl.float64)
    for seg in range(0, tl.load(row + S_SEGMENTS)):
        at = scratch + tl.load(row + S_SCRATCH) + (seg * slices + s) * 2
        s1 += tl.load(at, mask=smask, other=0.0)
        s2 += tl.load(at + 1, mask=smask, other=0.0)
    _store_terms(partial + (tl.load(row + S_FIRST) + block) * 4, s1, s2, x0, tl.load(row + S_N), smask)


@triton.jit
def snr_total(partial, table, out, CB: tl.constexpr):
    """One task's terms: its blocks' rows of `partial` added in order (`CB` at a time)."""
    row = table + tl.program_id(0).to(tl.int64) * 40
    s = _add_rows(partial, tl.load(row + S_FIRST), tl.load(row + S_BLOCKS), 4, CB)
    tl.store(out + tl.load(row + S_OUT) * 4 + tl.arange(0, 4), s)
