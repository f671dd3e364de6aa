"""The Triton kernels of the ``triton`` backend (`lowmem.compress.optim.gpu`, which describes them
and alone imports this module: it needs Triton). A task's row in the task table holds 16 int64
fields, in `gpu`'s order: pointers p, g, m, m's scales, v, v's scales; n, R, C, quantization row
length, kept entries, partial-sum offset, denominator offset, chunks, is-column."""

import triton
import triton.language as tl


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
def _ptr(tasks, t, field, dtype: tl.constexpr):
    return tl.load(tasks + t * 16 + field).to(tl.pointer_type(dtype))

@triton.jit
def row_sums(tasks, items, partial, GT: tl.constexpr, CH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(items + pid * 3)
    seg = tl.load(items + pid * 3 + 1)
    chunk = tl.load(items + pid * 3 + 2)
    g = _ptr(tasks, t, 1, GT)
    cols = tl.load(tasks + t * 16 + 8)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, CH, BLOCK):
        offs = chunk * CH + i + tl.arange(0, BLOCK)
        x = tl.load(g + seg * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
        acc += x * x
    kept = tl.load(tasks + t * 16 + 10)
    tl.store(partial + tl.load(tasks + t * 16 + 11) + chunk * kept + seg, tl.sum(acc, 0))

@triton.jit
def col_sums(tasks, items, partial, GT: tl.constexpr, RB: tl.constexpr, WIDTH: tl.constexpr,
             ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(items + pid * 3)
    cb = tl.load(items + pid * 3 + 1)
    chunk = tl.load(items + pid * 3 + 2)
    g = _ptr(tasks, t, 1, GT)
    rows = tl.load(tasks + t * 16 + 7)
    cols = tl.load(tasks + t * 16 + 8)
    c = cb * WIDTH + tl.arange(0, WIDTH)
    acc = tl.zeros([RB, WIDTH], tl.float32)
    for i in range(0, ROWS, RB):
        r = chunk * ROWS + i + tl.arange(0, RB)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        x = tl.load(g + r[:, None] * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial + tl.load(tasks + t * 16 + 11) + chunk * cols + c, tl.sum(acc, 0), mask=c < cols)

@triton.jit
def finalize(tasks, items, partial, dens, beta2, omb2, bc2, eps, VT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(items + pid * 3)
    kb = tl.load(items + pid * 3 + 1)
    kept = tl.load(tasks + t * 16 + 10)
    base = tl.load(tasks + t * 16 + 11)
    chunks = tl.load(tasks + t * 16 + 13)
    is_col = tl.load(tasks + t * 16 + 14)
    count = tl.where(is_col != 0, tl.load(tasks + t * 16 + 7), tl.load(tasks + t * 16 + 8)).to(tl.float32)
    k = kb * BLOCK + tl.arange(0, BLOCK)
    mask = k < kept
    s = tl.zeros([BLOCK], tl.float32)
    for ch in range(0, chunks):
        s += tl.load(partial + base + ch * kept + k, mask=mask, other=0.0)
    vp = _ptr(tasks, t, 4, VT)
    v = tl.load(vp + k, mask=mask, other=0.0).to(tl.float32)
    v = v * beta2 + omb2 * tl.div_rn(s, count)
    tl.store(vp + k, _out(v, VT), mask=mask)
    tl.store(dens + tl.load(tasks + t * 16 + 12) + k, tl.div_rn(tl.sqrt_rn(v), bc2) + eps, mask=mask)

@triton.jit
def _decode(tasks, t, ptr_field, scale_field, flat, within, qrow, tb, mask, qmap, qlen,
            FMT: tl.constexpr, BLOCK: tl.constexpr):
    if FMT == 0:
        x = tl.load(_ptr(tasks, t, ptr_field, tl.float32) + flat, mask=mask, other=0.0)
    elif FMT == 1:
        x = tl.load(_ptr(tasks, t, ptr_field, tl.bfloat16) + flat, mask=mask, other=0.0).to(tl.float32)
    else:
        codes = _ptr(tasks, t, ptr_field, tl.uint8)
        if FMT == 2:
            code = tl.load(codes + flat, mask=mask, other=0).to(tl.int32)
        else:
            byte = tl.load(codes + qrow * ((qlen + 1) // 2) + within // 2, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((within % 2) * 4)) & 15
        nb = (qlen + BLOCK - 1) // BLOCK
        scale = tl.load(_ptr(tasks, t, scale_field, tl.float32) + qrow * nb + tb)
        x = tl.load(qmap + code, mask=mask, other=0.0) * scale
    return x

@triton.jit
def _encode(tasks, t, ptr_field, scale_field, x, flat, within, qrow, tb, mask, thr, qlen,
            FMT: tl.constexpr, BLOCK: tl.constexpr):
    if FMT == 0:
        tl.store(_ptr(tasks, t, ptr_field, tl.float32) + flat, x, mask=mask)
    elif FMT == 1:
        tl.store(_ptr(tasks, t, ptr_field, tl.bfloat16) + flat, _bf16(x), mask=mask)
    else:
        x = tl.where(mask, x, 0.0)
        scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12)
        scale = tl.where(tl.max((x != x).to(tl.int32), 0) > 0, float("nan"), scale)   # as torch's aminmax
        xn = tl.div_rn(x, scale)
        code = tl.zeros([BLOCK], tl.int32)   # how many switch points lie at or below xn
        BITS: tl.constexpr = 8 if FMT == 2 else 4
        for i in tl.static_range(BITS):
            cand = code + (1 << (BITS - 1 - i))
            code = tl.where(xn >= tl.load(thr + cand - 1), cand, code)
        code = tl.where(mask, code, 0)
        nb = (qlen + BLOCK - 1) // BLOCK
        tl.store(_ptr(tasks, t, scale_field, tl.float32) + qrow * nb + tb, scale)
        codes = _ptr(tasks, t, ptr_field, tl.uint8)
        if FMT == 2:
            tl.store(codes + flat, code.to(tl.uint8), mask=mask)
        else:
            even, odd = tl.split(tl.reshape(code, (BLOCK // 2, 2)))
            width = (qlen + 1) // 2
            j = tb * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            tl.store(codes + qrow * width + j, (even | (odd << 4)).to(tl.uint8), mask=j < width)

@triton.jit
def update(tasks, items, dens, m_map, m_thr, v_map, v_thr, decay, omb1, beta2, omb2, bc2, eps, neg_step_size,
           sign, PT: tl.constexpr, MF: tl.constexpr, VF: tl.constexpr, FULL: tl.constexpr,
           BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(items + pid * 3)
    qrow = tl.load(items + pid * 3 + 1)
    tb = tl.load(items + pid * 3 + 2)
    qlen = tl.load(tasks + t * 16 + 9)
    within = tb * BLOCK + tl.arange(0, BLOCK)
    mask = within < qlen
    flat = qrow * qlen + within
    g = tl.load(_ptr(tasks, t, 1, PT) + flat, mask=mask, other=0.0).to(tl.float32) * sign
    pp = _ptr(tasks, t, 0, PT)
    p = tl.load(pp + flat, mask=mask, other=0.0).to(tl.float32)
    m = _decode(tasks, t, 2, 3, flat, within, qrow, tb, mask, m_map, qlen, MF, BLOCK)
    if FULL:
        v = _decode(tasks, t, 4, 5, flat, within, qrow, tb, mask, v_map, qlen, VF, BLOCK)
        v = v * beta2 + omb2 * (g * g)
        _encode(tasks, t, 4, 5, v, flat, within, qrow, tb, mask, v_thr, qlen, VF, BLOCK)
        den = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
    else:
        cols = tl.load(tasks + t * 16 + 8)
        kept = tl.where(tl.load(tasks + t * 16 + 14) != 0, flat % cols, flat // cols)
        den = tl.load(dens + tl.load(tasks + t * 16 + 12) + kept, mask=mask, other=1.0)
    # torch's lerp: from the nearer end
    m = tl.where(omb1 < 0.5, m + omb1 * (g - m), g - (g - m) * (1.0 - omb1))
    _encode(tasks, t, 2, 3, m, flat, within, qrow, tb, mask, m_thr, qlen, MF, BLOCK)
    p = p * decay + neg_step_size * tl.div_rn(m, den)
    tl.store(pp + flat, _out(p, PT), mask=mask)
