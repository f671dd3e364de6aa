/* The plan engine's step as one C kernel over many tensors (lowmem.compress.optim.native).
 *
 * Each task is one parameter in canonical form (backends._canonical): n entries, contiguous, and
 * v kept per entry (FULL), per row of `cols` entries (ROW), per column of `cols` (COL) or once
 * (ALL). States are stored as fp32, bf16 (round to nearest even), or block-wise quantized codes:
 * 8-bit (one byte per entry) or 4-bit (two per byte, the even entry of a row in the low nibble),
 * blocks of `block` entries along each quantization row of `qlen` entries (dim 0 of the
 * parameter), one fp32 scale (absmax) per block; quantized v only where v is kept per entry.
 * Parameters (and gradients) are fp32 or bf16; bf16 ones are updated in fp32 and rounded to
 * nearest, or with a bf16 Kahan buffer `comp` (what rounding lost, added back next step).
 *
 * The update, in torch.optim.AdamW's order (fp32 arithmetic):
 *     p ← p·decay;  m ← lerp(m, g, 1−β1) (as torch.lerp: from m below a weight of 0.5, from g
 *     above);  v ← β2 v + (1−β2) mean_r(g²)
 *     p ← p − step_size · m / (sqrt(v)/bc2 + eps)
 * Reductions of g² accumulate in double, in an order fixed by the shapes alone (never by the
 * number of threads), so results are reproducible. Codes: an entry divided by its block's scale
 * takes the nearest map value, ties upward (torchao's rule), found by table lookup: the upper 17
 * bits of the float name a cell, `base[cell]` is the code of the cell's lowest value and
 * `cut[cell]` the one switch point inside it (quant._Encoder, which proves that one suffices);
 * with AVX-512, a 16-value map's codes come from a search over its 15 switch points in one
 * register instead (the same codes). Codes are read back by permutes of the map in registers.
 *
 * Memory: a core that reads one stream alone (a pass that only sums g²) gets about half the
 * bandwidth of one reading two or more side by side (measured on a 2-core Xeon: 28 against
 * 51-57 GB/s; the row sums of the 25M-entry benchmark took a third of its step). So v per row
 * is taken in groups of rows, a group's sums reading a gradient that was prefetched while the
 * group before it was updated; sums per column or over a whole tensor read STREAMS chunks of
 * rows side by side.
 */
#include <math.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { FULL = 0, ROW = 1, COL = 2, ALL = 3 };
enum { F32 = 0, BF16 = 1, Q8 = 2, Q4 = 3 };
#define GROUP 4096        /* entries per group of rows whose sums are taken together (ROW) */
#define PREFETCH 16       /* entries per prefetched cache line (fp32; bf16 lines are fetched twice) */
#define TILE 256          /* entries per tile of an unquantized state (>= every block size) */
#define ITEM 131072       /* entries per work item, about (whole units: see plan_items); fewer,
                             longer streams: 32K-entry items ran the Eve step on the 25M
                             Linear stack, caches cold, 6% slower */
#define COL_CHUNKS 32     /* row chunks whose sums are added in order (COL, ALL), at most */
#define CHUNK_MIN 16384   /* entries per chunk, at least (but one) */
#define STREAMS 4         /* chunks one thread reads side by side */
#define STRIDE 64         /* entries of one chunk read before the next one's (ALL) */
#define PARALLEL_MIN 65536   /* entries below which a loop runs on one thread: a parallel region
                                costs a barrier, and on a busy machine a barrier can cost milliseconds */

typedef struct {
    void *p;              /* parameter: float or bf16 (uint16) */
    const void *g;        /* gradient, the parameter's dtype */
    void *m;              /* m: float, bf16, or codes */
    float *m_scale;
    void *v;              /* v: float, bf16 (kept entries), or codes (FULL only) */
    float *v_scale;
    uint16_t *comp;       /* bf16 Kahan buffer, or NULL */
    int64_t n;            /* entries */
    int64_t cols;         /* row length of ROW / COL */
    int64_t qlen;         /* entries per quantization row */
    int32_t mode, p_bf16, m_fmt, v_fmt;
} Task;

typedef struct {
    float decay, beta1, beta2, omb1, omb2, eps, step_size, bc2;
    int32_t maximize;
} Scalars;

typedef struct {          /* one quantization map */
    const float *qmap;    /* 2^bits values */
    const int32_t *cells; /* 2^17 cells: lowest code << 16 | switch point (see encode_all) */
    const float *cuts;    /* a 16-value map: its 15 switch points in order, then +inf; else NULL */
    int32_t block;
    int32_t shift;        /* log2(block): blocks are powers of two */
} Codec;

typedef struct { int64_t task, start, stop; } Item;

static inline float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t bf16_round(float f) {   /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Codes of x[0..k) / sc (the division exact, as torch's). A cell's entry is its lowest code
 * << 16 | T: y takes one code more where its low 15 bits, reversed in order for negative y,
 * reach T (the switch point's, likewise; 0x8000, never reached, where the cell has none): y and
 * the switch point share sign, exponent and leading mantissa bits, so this is y >= cut. */
static inline uint8_t encode_one(const int32_t *cells, float y) {
    uint32_t u;
    memcpy(&u, &y, 4);
    int32_t e = cells[u >> 15];
    uint32_t low = (u & 0x7fffu) ^ ((uint32_t)((int32_t)u >> 31) & 0x7fffu);
    return (uint8_t)((e >> 16) + (low >= (uint32_t)(e & 0xffff)));
}

static void encode_all(const Codec *c, const float *x, float sc, int64_t k, uint8_t *out) {
    const int32_t *cells = c->cells;
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 vs = _mm512_set1_ps(sc);
    const __m512i mask = _mm512_set1_epi32(0x7fff), half = _mm512_set1_epi32(0xffff), one = _mm512_set1_epi32(1);
    if (c->cuts) {
        /* A 16-value map: the code is the number of switch points at or below y, found by a
         * binary search in one register (four permutes and compares; a third of the gather's
         * time). A NaN compares below every switch point: such lanes take the table's code. */
        const __m512 cuts = _mm512_loadu_ps(c->cuts);
        for (; j + 16 <= k; j += 16) {
            __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + j), vs);
            if (_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q)) break;
            __m512i code = _mm512_setzero_si512();
            for (int step = 8; step >= 1; step >>= 1) {   /* is y at or above switch point code + step − 1? */
                __m512 cut = _mm512_permutexvar_ps(_mm512_add_epi32(code, _mm512_set1_epi32(step - 1)), cuts);
                code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(y, cut, _CMP_GE_OQ), code, _mm512_set1_epi32(step));
            }
            _mm_storeu_si128((__m128i *)(out + j), _mm512_cvtepi32_epi8(code));
        }
    }
    for (; j + 16 <= k; j += 16) {
        __m512i u = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(x + j), vs));
        __m512i e = _mm512_i32gather_epi32(_mm512_srli_epi32(u, 15), cells, 4);
        __m512i low = _mm512_xor_si512(_mm512_and_si512(u, mask), _mm512_and_si512(_mm512_srai_epi32(u, 31), mask));
        __mmask16 up = _mm512_cmpge_epu32_mask(low, _mm512_and_si512(e, half));
        __m512i code = _mm512_mask_add_epi32(_mm512_srli_epi32(e, 16), up, _mm512_srli_epi32(e, 16), one);
        _mm_storeu_si128((__m128i *)(out + j), _mm512_cvtepi32_epi8(code));
    }
#endif
    for (; j < k; j++) out[j] = encode_one(cells, x[j] / sc);
}

#ifdef __AVX512F__
/* The values of 16 codes (0-255) of a 256-value map held in 16 registers: 8 two-register
 * permutes, then 7 blends by index bits 5-7 (faster than a gather here). */
static inline __m512 map256(const __m512 *tab, __m512i idx) {
    __m512 r[8];
    for (int l = 0; l < 8; l++) r[l] = _mm512_permutex2var_ps(tab[2 * l], idx, tab[2 * l + 1]);
    __mmask16 m5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), m6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64)),
              m7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512 s0 = _mm512_mask_blend_ps(m5, r[0], r[1]), s1 = _mm512_mask_blend_ps(m5, r[2], r[3]);
    __m512 s2 = _mm512_mask_blend_ps(m5, r[4], r[5]), s3 = _mm512_mask_blend_ps(m5, r[6], r[7]);
    __m512 u0 = _mm512_mask_blend_ps(m6, s0, s1), u1 = _mm512_mask_blend_ps(m6, s2, s3);
    return _mm512_mask_blend_ps(m7, u0, u1);
}
#endif

/* out[j] = qmap[codes[j]] · sc for j < k, codes one per byte of a map of 256 values (Q8) or 16 (Q4). */
static void decode_codes(const float *restrict qm, int fmt, const uint8_t *restrict q, float sc, int64_t k,
                         float *restrict o) {
    int64_t j = 0;
#ifdef __AVX512F__
    const __m512 vs = _mm512_set1_ps(sc);
    if (fmt == Q8) {
        __m512 tab[16];
        for (int l = 0; l < 16; l++) tab[l] = _mm512_loadu_ps(qm + 16 * l);
        for (; j + 16 <= k; j += 16)
            _mm512_storeu_ps(o + j, _mm512_mul_ps(map256(tab, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + j)))), vs));
    } else {
        const __m512 table = _mm512_loadu_ps(qm);
        for (; j + 16 <= k; j += 16)
            _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + j))), table), vs));
    }
#else
    (void)fmt;
#endif
    for (; j < k; j++) o[j] = qm[q[j]] * sc;
}

/* State entries [i, i+k) into floats; a quantized state's blocks lie whole in [i, i+k) (tiles
 * start at block starts of one quantization row and end at one's end or the row's). */
static void load_state(const void *s, const float *scale, int fmt, const Codec *c, int64_t qlen,
                       int64_t row, int64_t at, int64_t i, int64_t k, float *out) {
    if (fmt == F32) { memcpy(out, (const float *)s + i, k * sizeof(float)); return; }
    if (fmt == BF16) { const uint16_t *h = (const uint16_t *)s + i; for (int64_t j = 0; j < k; j++) out[j] = bf16_load(h[j]); return; }
    int64_t nb = (qlen + c->block - 1) >> c->shift;
    for (int64_t j0 = 0; j0 < k; j0 += c->block) {
        int64_t k1 = k - j0 < c->block ? k - j0 : c->block, a = at + j0;
        float sc = scale[row * nb + (a >> c->shift)], *restrict o = out + j0;
        const float *restrict qm = c->qmap;
        int64_t j = 0;
        if (fmt == Q8) {
            decode_codes(qm, Q8, (const uint8_t *)s + row * qlen + a, sc, k1, o);
        } else {                              /* a is even: blocks have an even size */
            const uint8_t *restrict q = (const uint8_t *)s + row * ((qlen + 1) / 2) + a / 2;
#ifdef __AVX512F__
            __m512 table = _mm512_loadu_ps(qm);
            for (; j + 16 <= k1; j += 16) {   /* 8 bytes: 16 codes, low nibble first */
                __m128i b = _mm_loadl_epi64((const __m128i *)(q + j / 2));
                __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
                __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
                _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(sc)));
            }
#endif
            for (; j + 1 < k1; j += 2) { o[j] = qm[q[j >> 1] & 15] * sc; o[j + 1] = qm[q[j >> 1] >> 4] * sc; }
            if (k1 & 1) o[k1 - 1] = qm[q[k1 >> 1] & 15] * sc;
        }
    }
}

/* The scale of a block y[0..k): its absmax, at least 1e-12; NaN where it holds a NaN (as torch's
 * aminmax makes it). */
static float block_scale(const float *y, int64_t k) {
    float hi = -INFINITY, lo = INFINITY;
    int nan = 0;
    int64_t j = 0;
#ifdef __AVX512F__
    __m512 vh = _mm512_set1_ps(-INFINITY), vl = _mm512_set1_ps(INFINITY);
    __mmask16 vn = 0;
    for (; j + 16 <= k; j += 16) {
        __m512 z = _mm512_loadu_ps(y + j);
        vh = _mm512_max_ps(vh, z);
        vl = _mm512_min_ps(vl, z);
        vn |= _mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q);
    }
    hi = _mm512_reduce_max_ps(vh);
    lo = _mm512_reduce_min_ps(vl);
    nan = vn != 0;
#endif
    for (; j < k; j++) {
        hi = y[j] > hi ? y[j] : hi;
        lo = y[j] < lo ? y[j] : lo;
        nan |= y[j] != y[j];
    }
    float sc = hi > -lo ? hi : -lo;
    if (sc < 1e-12f) sc = 1e-12f;
    return nan ? NAN : sc;
}

static void store_state(void *s, float *scale, int fmt, const Codec *c, int64_t qlen, int64_t row, int64_t at,
                        int64_t i, int64_t k, const float *x) {
    if (fmt == F32) { memcpy((float *)s + i, x, k * sizeof(float)); return; }
    if (fmt == BF16) { uint16_t *h = (uint16_t *)s + i; for (int64_t j = 0; j < k; j++) h[j] = bf16_round(x[j]); return; }
    int64_t nb = (qlen + c->block - 1) >> c->shift;
    for (int64_t j0 = 0; j0 < k; j0 += c->block) {
        int64_t k1 = k - j0 < c->block ? k - j0 : c->block, a = at + j0;
        const float *y = x + j0;
        float sc = block_scale(y, k1);
        scale[row * nb + (a >> c->shift)] = sc;
        if (fmt == Q8) {
            encode_all(c, y, sc, k1, (uint8_t *)s + row * qlen + a);
        } else {
            uint8_t *q = (uint8_t *)s + row * ((qlen + 1) / 2) + a / 2, codes[TILE];
            encode_all(c, y, sc, k1, codes);
            int64_t j = 0;
#ifdef __AVX512BW__
            /* 64 codes at a time: as 16-bit lanes lo | hi << 8, so lane | lane >> 4 holds
             * lo | hi << 4 in its low byte (the scalar loop cost a 4-bit step a fifth of its time) */
            for (; j + 64 <= k1; j += 64) {
                __m512i x = _mm512_loadu_si512((const void *)(codes + j));
                _mm256_storeu_si256((__m256i *)(q + j / 2), _mm512_cvtepi16_epi8(_mm512_or_si512(x, _mm512_srli_epi16(x, 4))));
            }
#endif
            for (; j + 1 < k1; j += 2) q[j >> 1] = (uint8_t)(codes[j] | (codes[j + 1] << 4));
            if (k1 & 1) q[k1 >> 1] = codes[k1 - 1];
        }
    }
}

static inline float grad_at(const Task *t, int64_t i) {
    return t->p_bf16 ? bf16_load(((const uint16_t *)t->g)[i]) : ((const float *)t->g)[i];
}

/* Sum of g² over entries [o, o+k): eight double lanes (vectorisable), added in a fixed order. */
static double sum_sq(const Task *t, int64_t o, int64_t k) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    if (t->p_bf16) {
        const uint16_t *g = (const uint16_t *)t->g + o;
        for (; j + 8 <= k; j += 8)
            for (int l = 0; l < 8; l++) { double x = bf16_load(g[j + l]); acc[l] += x * x; }
        for (; j < k; j++) { double x = bf16_load(g[j]); acc[j & 7] += x * x; }
    } else {
        const float *g = (const float *)t->g + o;
        for (; j + 8 <= k; j += 8)
            for (int l = 0; l < 8; l++) { double x = g[j + l]; acc[l] += x * x; }
        for (; j < k; j++) { double x = g[j]; acc[j & 7] += x * x; }
    }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Sums of g² over up to STREAMS ranges [o[c], o[c]+k[c]) read side by side (one core reading
 * one stream alone gets half the bandwidth of two): each as sum_sq adds it. */
static void sum_sq_streams(const Task *t, int n, const int64_t *o, const int64_t *k, double *out) {
    double acc[STREAMS][8] = {{0}};
    int64_t most = 0;
    for (int c = 0; c < n; c++) most = k[c] > most ? k[c] : most;
    for (int64_t j0 = 0; j0 < most; j0 += STRIDE)
        for (int c = 0; c < n; c++) {
            int64_t e = j0 + STRIDE < k[c] ? j0 + STRIDE : k[c];
            double *a = acc[c];
            int64_t j = j0;
            if (t->p_bf16) {
                const uint16_t *g = (const uint16_t *)t->g + o[c];
                for (; j + 8 <= e; j += 8)
                    for (int l = 0; l < 8; l++) { double x = bf16_load(g[j + l]); a[l] += x * x; }
                for (; j < e; j++) { double x = bf16_load(g[j]); a[j & 7] += x * x; }
            } else {
                const float *g = (const float *)t->g + o[c];
                for (; j + 8 <= e; j += 8)
                    for (int l = 0; l < 8; l++) { double x = g[j + l]; a[l] += x * x; }
                for (; j < e; j++) { double x = g[j]; a[j & 7] += x * x; }
            }
        }
    for (int c = 0; c < n; c++)
        out[c] = ((acc[c][0] + acc[c][1]) + (acc[c][2] + acc[c][3])) + ((acc[c][4] + acc[c][5]) + (acc[c][6] + acc[c][7]));
}

/* v of a reduced task: entry j as float, and its update (fp32 or bf16 only). */
static inline float v_get(const Task *t, int64_t j) {
    return t->v_fmt == BF16 ? bf16_load(((uint16_t *)t->v)[j]) : ((float *)t->v)[j];
}

static inline float v_update(const Task *t, const Scalars *s, int64_t j, double mean) {
    float v = v_get(t, j) * s->beta2 + s->omb2 * (float)mean;   /* the step uses it unrounded */
    if (t->v_fmt == BF16) ((uint16_t *)t->v)[j] = bf16_round(v);
    else ((float *)t->v)[j] = v;
    return sqrtf(v) / s->bc2 + s->eps;
}

/* The codec of a state format. */
static const Codec *codec_of(int fmt, const Codec *c8, const Codec *c4) {
    return fmt == Q8 ? c8 : fmt == Q4 ? c4 : NULL;
}

/* Entries [a, b) of a task; `dn` holds the denominators: per row of [a, b) (ROW), per column
 * (COL), one (ALL); unused for FULL. The gradient's entries [ahead, ahead_end) are prefetched
 * along the way (the next group's, or none). */
static void update_range(const Task *t, const Scalars *s, const Codec *mc, const Codec *vc, int64_t a, int64_t b,
                         const float *dn, int64_t ahead, int64_t ahead_end) {
    float mb[TILE], vb[TILE], db[TILE], pb[TILE], gb[TILE];
    /* Tiles: the blocks of the larger block size (the smaller divides it) along each
     * quantization row, tracked as (row, at) without a division per tile; TILE entries where no
     * state is quantized. */
    const Codec *tc = mc;
    if (vc && (!tc || vc->block > tc->block)) tc = vc;
    int64_t row = 0, at = 0;
    if (tc) { row = a / t->qlen; at = a - row * t->qlen; }
    const float sign = s->maximize ? -1.0f : 1.0f, omb1 = s->omb1, decay = s->decay, neg_ss = -s->step_size;
    const int lerp_low = omb1 < 0.5f;
    const float omw = 1.0f - omb1;
    for (int64_t i = a; i < b;) {
        int64_t k;
        if (tc) {
            int64_t end = ((at >> tc->shift) + 1) << tc->shift;
            k = (end < t->qlen ? end : t->qlen) - at;
        } else {
            k = TILE;
        }
        if (k > b - i) k = b - i;
        int64_t e = i + k;
        /* the gradient of the next group, on its way into cache while this one is worked on */
        for (int64_t f = ahead + (i - a), fe = f + k < ahead_end ? f + k : ahead_end; f < fe; f += PREFETCH)
            __builtin_prefetch(t->p_bf16 ? (const void *)((const uint16_t *)t->g + f) : (const void *)((const float *)t->g + f));
        /* fp32 tensors are worked on where they lie; other formats through tile buffers */
        float *restrict mp = t->m_fmt == F32 ? (float *)t->m + i : mb;
        float *restrict pp = t->p_bf16 ? pb : (float *)t->p + i;
        const float *restrict gp = t->p_bf16 ? gb : (const float *)t->g + i;
        if (t->p_bf16) {
            const uint16_t *p = (const uint16_t *)t->p + i, *g = (const uint16_t *)t->g + i;
            for (int64_t j = 0; j < k; j++) { gb[j] = bf16_load(g[j]); pb[j] = bf16_load(p[j]); }
            if (t->comp) for (int64_t j = 0; j < k; j++) pb[j] += bf16_load(t->comp[i + j]);
        }
        if (t->m_fmt != F32) load_state(t->m, t->m_scale, t->m_fmt, mc, t->qlen, row, at, i, k, mb);
        if (t->mode == FULL) {
            float *restrict vp = t->v_fmt == F32 ? (float *)t->v + i : vb;
            if (t->v_fmt != F32) load_state(t->v, t->v_scale, t->v_fmt, vc, t->qlen, row, at, i, k, vb);
            const float beta2 = s->beta2, omb2 = s->omb2, bc2 = s->bc2, eps = s->eps;
            for (int64_t j = 0; j < k; j++) {
                float g = gp[j] * sign;
                vp[j] = vp[j] * beta2 + omb2 * (g * g);
                db[j] = sqrtf(vp[j]) / bc2 + eps;
            }
            if (t->v_fmt != F32) store_state(t->v, t->v_scale, t->v_fmt, vc, t->qlen, row, at, i, k, vb);
        } else if (t->mode == ROW) {
            int64_t r = (i - a) / t->cols, left = t->cols - (i - a - r * t->cols);
            for (int64_t j = 0; j < k;) {   /* row by row: no division per entry */
                int64_t e2 = j + left < k ? j + left : k;
                float d = dn[r++];
                for (; j < e2; j++) db[j] = d;
                left = t->cols;
            }
        } else if (t->mode == COL) {
            int64_t c = i % t->cols;
            for (int64_t j = 0; j < k;) {
                int64_t e2 = j + (t->cols - c) < k ? j + (t->cols - c) : k;
                memcpy(db + j, dn + c, (size_t)(e2 - j) * sizeof(float));
                j = e2;
                c = 0;
            }
        } else {
            for (int64_t j = 0; j < k; j++) db[j] = dn[0];
        }
        for (int64_t j = 0; j < k; j++) {
            float g = gp[j] * sign;   /* torch's lerp: from the nearer end */
            float m = lerp_low ? mp[j] + omb1 * (g - mp[j]) : g - (g - mp[j]) * omw;
            mp[j] = m;
            pp[j] = pp[j] * decay + neg_ss * (m / db[j]);
        }
        if (t->m_fmt != F32) store_state(t->m, t->m_scale, t->m_fmt, mc, t->qlen, row, at, i, k, mb);
        if (t->p_bf16) {
            uint16_t *p = (uint16_t *)t->p + i;
            for (int64_t j = 0; j < k; j++) {
                uint16_t h = bf16_round(pb[j]);
                p[j] = h;
                if (t->comp) t->comp[i + j] = bf16_round(pb[j] - bf16_load(h));
            }
        }
        i = e;
        if (tc && (at += k) == t->qlen) { row++; at = 0; }
    }
}

static int64_t gcd64(int64_t a, int64_t b) { while (b) { int64_t r = a % b; a = b; b = r; } return a; }

/* Work items of a task: ranges of whole units (quantization rows when a state is quantized,
 * rows when v is kept per row; their least common multiple when both), about ITEM entries. */
static int64_t items_unit(const Task *t) {
    int64_t unit = 1;
    if (t->m_fmt >= Q8 || t->v_fmt >= Q8) unit = t->qlen;
    if (t->mode == ROW) unit = unit / gcd64(unit, t->cols) * t->cols;
    return unit > t->n ? t->n : unit;
}

static int64_t plan_items(const Task *t, int64_t k, Item *out) {
    int64_t unit = items_unit(t);
    int64_t per = unit >= ITEM ? unit : (ITEM / unit) * unit, count = 0;
    for (int64_t a = 0; a < t->n; a += per) {
        if (out) { out[count].task = k; out[count].start = a; out[count].stop = a + per < t->n ? a + per : t->n; }
        count++;
    }
    return count;
}

/* Row chunks (COL, ALL) and how many sums each keeps (columns, or 1). */
static void chunking(const Task *t, int64_t *chunks, int64_t *width) {
    int64_t rows = t->mode == COL ? t->n / t->cols : t->n, most = t->n / CHUNK_MIN;
    most = most < 1 ? 1 : most > COL_CHUNKS ? COL_CHUNKS : most;
    *chunks = rows < most ? rows : most;
    *width = t->mode == COL ? t->cols : 1;
}

/* Column (COL) or total (ALL) means of g² of a task: its v updated, its denominators into `dn`
 * (one per column, or one), with `part` as scratch (chunks × width doubles). */
static void reduce_task(const Task *t, const Scalars *s, int nthreads, double *part, float *dn) {
    int64_t chunks, width;
    chunking(t, &chunks, &width);
    /* chunks side by side where every thread still gets STREAMS of them (many threads: one each,
     * as many threads reading as there are chunks); a chunk's sum does not depend on this */
    int64_t rows = t->n / width, per = chunks >= STREAMS * nthreads ? STREAMS : 1, groups = (chunks + per - 1) / per;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(t->n >= PARALLEL_MIN)
    for (int64_t q = 0; q < groups; q++) {   /* `per` chunks side by side */
        int64_t c0 = q * per, n = chunks - c0 < per ? chunks - c0 : per, r0[STREAMS], k[STREAMS], most = 0;
        for (int c = 0; c < n; c++) {
            r0[c] = rows * (c0 + c) / chunks;
            k[c] = rows * (c0 + c + 1) / chunks - r0[c];
            most = k[c] > most ? k[c] : most;
        }
        if (width == 1) { sum_sq_streams(t, (int)n, r0, k, part + c0); continue; }
        for (int64_t j = 0; j < n * width; j++) part[c0 * width + j] = 0;
        for (int64_t i = 0; i < most; i++)
            for (int c = 0; c < n; c++) {
                if (i >= k[c]) continue;
                double *restrict acc = part + (c0 + c) * width;
                int64_t at = (r0[c] + i) * width;
                if (t->p_bf16) {
                    const uint16_t *g = (const uint16_t *)t->g + at;
                    for (int64_t j = 0; j < width; j++) { double x = bf16_load(g[j]); acc[j] += x * x; }
                } else {
                    const float *g = (const float *)t->g + at;
                    for (int64_t j = 0; j < width; j++) { double x = g[j]; acc[j] += x * x; }
                }
            }
    }
    for (int64_t j = 0; j < width; j++) {
        double sum = 0;
        for (int64_t c = 0; c < chunks; c++) sum += part[c * width + j];
        dn[j] = v_update(t, s, j, sum / (double)rows);
    }
}

/* Returns 0, or -1 when out of memory (then nothing was changed). */
int lowmem_step(int64_t ntasks, const Task *tasks, const Scalars *s, const Codec *m8, const Codec *m4,
                const Codec *v8, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    float **dns = calloc((size_t)ntasks + 1, sizeof(float *));
    if (!dns) return -1;
    int64_t count = 0, scratch = 1, total = 0;
    int failed = 0;
    for (int64_t k = 0; k < ntasks; k++) {   /* every allocation first */
        const Task *t = &tasks[k];
        int64_t chunks, width;
        count += plan_items(t, k, NULL);
        total += t->n;
        if (t->mode == ROW) width = t->n / t->cols;
        else if (t->mode == FULL) width = 0;
        else { chunking(t, &chunks, &width); if (chunks * width > scratch) scratch = chunks * width; }
        if (width && !(dns[k] = malloc((size_t)width * sizeof(float)))) failed = 1;
    }
    Item *items = failed ? NULL : malloc((size_t)count * sizeof(Item) + 1);
    double *part = items ? malloc((size_t)scratch * sizeof(double)) : NULL;
    if (!part) {
        for (int64_t k = 0; k < ntasks; k++) free(dns[k]);
        free(dns);
        free(items);
        return -1;
    }
    count = 0;
    for (int64_t k = 0; k < ntasks; k++) count += plan_items(&tasks[k], k, items + count);
    for (int64_t k = 0; k < ntasks; k++)
        if (tasks[k].mode == COL || tasks[k].mode == ALL) reduce_task(&tasks[k], s, nthreads, part, dns[k]);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if(count > 1 && total >= PARALLEL_MIN)
    for (int64_t w = 0; w < count; w++) {
        const Task *t = &tasks[items[w].task];
        int64_t a = items[w].start, b = items[w].stop;
        const Codec *mc = codec_of(t->m_fmt, m8, m4), *vc = codec_of(t->v_fmt, v8, NULL);
        float *dn = dns[items[w].task];
        if (t->mode != ROW) { update_range(t, s, mc, vc, a, b, dn, b, b); continue; }
        /* v per row: in groups of whole units of about GROUP entries, each group's row sums
         * first (its gradient prefetched while the group before it was updated), then its
         * entries */
        int64_t unit = items_unit(t), group = unit >= GROUP ? unit : (GROUP / unit) * unit;
        if (t->n < PARALLEL_MIN) group = b - a;   /* a small tensor is in cache: one group */
        dn += a / t->cols;
        for (int64_t g0 = a; g0 < b; g0 += group) {
            int64_t g1 = g0 + group < b ? g0 + group : b;
            for (int64_t o = g0; o < g1; o += t->cols)
                dn[(o - a) / t->cols] = v_update(t, s, o / t->cols, sum_sq(t, o, t->cols) / (double)t->cols);
            update_range(t, s, mc, vc, g0, g1, dn + (g0 - a) / t->cols, g1, g1 + group < b ? g1 + group : b);
        }
    }
    for (int64_t k = 0; k < ntasks; k++) free(dns[k]);
    free(dns);
    free(items);
    free(part);
    return 0;
}

/* The codes of x[0..n) (entries in [-1, 1]) under a codec: for tests of the encoder alone. */
void lowmem_encode(const Codec *c, const float *x, int64_t n, uint8_t *out) { encode_all(c, x, 1.0f, n, out); }

/* ---- The precision measurement (lowmem.snr.precision.error_sums, for many parameters at once).
 *
 * For each parameter: the squared norms of m, v and the update direction u = m̂ / (sqrt(v̂) + ε),
 * then, for each candidate format, the squared error it causes in the state and in u: m stored
 * as bf16, int8, int4, then v as bf16, int8 (bf16 only where the parameter is not quantizable).
 * Each state is read once: a tile of at most 256 entries of one quantization row (a whole 8-bit
 * block; two 4-bit blocks) is loaded, every format's round trip of it is made in registers and
 * tile buffers, and its sums are added (squares in double for v, whose entries are about g²,
 * and wherever else float's would underflow). The sums of a work item accumulate in double, tile by tile; a parameter's are
 * its items' added in order, so the result does not depend on the number of threads.
 * Arithmetic in fp32, as the torch reference, with the bias corrections applied as
 * multiplications by their reciprocals (the same up to rounding). */
typedef struct {
    const float *m, *v;   /* fp32, contiguous, n entries each */
    double *out;          /* PREC_SUMS (quantized) or PREC_SUMS_BF16 sums, in the order above */
    int64_t n, qlen;      /* entries; entries per quantization row */
    float bc1, sbc2, eps; /* 1 − β1^t, sqrt(1 − β2^t), ε */
    int32_t quantized;    /* whether the int8 / int4 formats are measured */
} PrecTask;

enum { PREC_SUMS = 13, PREC_SUMS_BF16 = 7 };

/* Σ a[j]² over j < k, squared and added in double, eight lanes added in a fixed order. */
static double tile_sq_wide(const float *a, int64_t k) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= k; j += 8)
        for (int l = 0; l < 8; l++) { double x = a[j + l]; acc[l] += x * x; }
    for (; j < k; j++) { double x = a[j]; acc[j & 7] += x * x; }
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* The sum of sixteen float lanes in double, added as a tree: one after another, the ten chains
 * of 16 dependent additions per tile cost the precision measurement about 10%. */
static inline double lanes_sum(const float *l) {
    double s[8];
    for (int i = 0; i < 8; i++) s[i] = (double)l[i] + (double)l[i + 8];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* Σ a[j]² over j < k ≤ TILE: sixteen float lanes (vectorisable), added in double in a fixed
 * order; where that sum is tiny (below 2^-100, where float squares of 1e-19 and less would have
 * been lost) or huge (near float's range), again by `tile_sq_wide`. */
static double tile_sq(const float *a, int64_t k) {
    float acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= k; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[j + l] * a[j + l];
    for (; j < k; j++) acc[j & 15] += a[j] * a[j];
    double sum = lanes_sum(acc);
    return sum >= 0x1p-100 && sum <= 0x1p100 ? sum : tile_sq_wide(a, k);
}

/* x[0..k) stored under codec `c` of format `fmt` (Q8, Q4; blocks of c->block from x[0]) and
 * read back into `out`. */
static void roundtrip_blocks(const Codec *c, int fmt, const float *x, int64_t k, float *out) {
    uint8_t codes[TILE];
    for (int64_t j0 = 0; j0 < k; j0 += c->block) {
        int64_t k1 = k - j0 < c->block ? k - j0 : c->block;
        const float *y = x + j0;
        float sc = block_scale(y, k1);
        encode_all(c, y, sc, k1, codes);
        decode_codes(c->qmap, fmt, codes, sc, k1, out + j0);
    }
}

static inline float bf16_trip(float x) { return bf16_load(bf16_round(x)); }

/* The sums of one tile (k ≤ TILE entries of m and v) added to acc. */
static void precision_tile(const PrecTask *t, const Codec *m8, const Codec *m4, const Codec *v8, const float *m,
                           const float *v, int64_t k, double *acc) {
    /* A tile of zeros in m and v (embedding rows never seen) adds nothing: every format stores
     * 0 exactly, and u = 0 there (for ε > 0; with ε = 0 the update is undefined there and such
     * tiles are left out, where torch ops would give NaN). */
    uint32_t bits = 0;
    for (int64_t j = 0; j < k; j++) {
        uint32_t a, b;
        memcpy(&a, m + j, 4);
        memcpy(&b, v + j, 4);
        bits |= (a | b) & 0x7fffffffu;
    }
    if (!bits) return;
    float sv[TILE], inv[TILE], mh[TILE], u[TILE], q[TILE], e[TILE], eu[TILE];
    const float rbc1 = 1.0f / t->bc1, rsbc2 = 1.0f / t->sbc2, eps = t->eps;
    for (int64_t j = 0; j < k; j++) {
        sv[j] = sqrtf(v[j]);
        inv[j] = 1.0f / (sv[j] * rsbc2 + eps);
        mh[j] = m[j] * rbc1;
        u[j] = mh[j] * inv[j];
    }
    int a = 0;
    /* v ~ g²: its squares (and its formats' errors') are the ones a float would lose, so
     * they are taken in double outright */
    acc[a++] += tile_sq(m, k);
    acc[a++] += tile_sq_wide(v, k);
    acc[a++] += tile_sq(u, k);
    const Codec *mformats[3] = {NULL, m8, m4}, *vformats[2] = {NULL, v8};
    const int mfmt[3] = {BF16, Q8, Q4};
    int formats = t->quantized ? 3 : 1;
    for (int f = 0; f < formats; f++) {          /* m: bf16, int8, int4 */
        if (f == 0) for (int64_t j = 0; j < k; j++) q[j] = bf16_trip(m[j]);
        else roundtrip_blocks(mformats[f], mfmt[f], m, k, q);
        for (int64_t j = 0; j < k; j++) {
            e[j] = q[j] - m[j];
            eu[j] = e[j] * rbc1 * inv[j];
        }
        acc[a++] += tile_sq(e, k);
        acc[a++] += tile_sq(eu, k);
    }
    formats = t->quantized ? 2 : 1;
    for (int f = 0; f < formats; f++) {          /* v: bf16, int8 */
        if (f == 0) for (int64_t j = 0; j < k; j++) q[j] = bf16_trip(v[j]);
        else roundtrip_blocks(vformats[f], Q8, v, k, q);
        /* u(m, q) − u(m, v) without the cancellation of subtracting two nearby updates: with
         * s = sqrt(v), r = sqrt(q), it is m̂ (s − r) / ((s/√bc2 + ε)(r/√bc2 + ε) √bc2), and
         * s − r = (v − q) / (s + r), where v − q has no cancellation (exact where q is within a
         * factor 2 of v, as bf16's is); one division (a second cost this measurement a fifth
         * of its time) */
        for (int64_t j = 0; j < k; j++) {
            float sq = sqrtf(q[j]);
            e[j] = q[j] - v[j];
            eu[j] = e[j] == 0.0f ? 0.0f : -(u[j] * rsbc2 * e[j]) / ((sv[j] + sq) * (sq * rsbc2 + eps));
        }
        acc[a++] += tile_sq_wide(e, k);
        acc[a++] += tile_sq(eu, k);
    }
}

/* Work items of a precision task: whole quantization rows of about ITEM entries, or pieces of
 * ITEM entries (a multiple of every block) of a longer row. */
static int64_t precision_items(const PrecTask *t, int64_t k, Item *out) {
    int64_t qlen = t->qlen > 0 ? t->qlen : t->n, count = 0;
    if (t->n <= 0 || qlen <= 0) return 0;   /* nothing to measure: its sums stay 0 */
    if (qlen <= ITEM) {
        int64_t per = (ITEM / qlen) * qlen;
        for (int64_t a = 0; a < t->n; a += per, count++)
            if (out) { out[count].task = k; out[count].start = a; out[count].stop = a + per < t->n ? a + per : t->n; }
        return count;
    }
    for (int64_t r = 0; r < t->n; r += qlen)
        for (int64_t a = r; a < r + qlen; a += ITEM, count++)
            if (out) { out[count].task = k; out[count].start = a; out[count].stop = a + ITEM < r + qlen ? a + ITEM : r + qlen; }
    return count;
}

/* Returns 0, or -1 when out of memory (then no sums were written). */
int lowmem_precision(int64_t ntasks, const PrecTask *tasks, const Codec *m8, const Codec *m4, const Codec *v8,
                     int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int64_t count = 0, total = 0;
    for (int64_t k = 0; k < ntasks; k++) { count += precision_items(&tasks[k], k, NULL); total += tasks[k].n; }
    Item *items = malloc((size_t)count * sizeof(Item) + 1);
    double *part = items ? calloc((size_t)count * PREC_SUMS + 1, sizeof(double)) : NULL;
    if (!part) { free(items); return -1; }
    count = 0;
    for (int64_t k = 0; k < ntasks; k++) count += precision_items(&tasks[k], k, items + count);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if(count > 1 && total >= PARALLEL_MIN)
    for (int64_t w = 0; w < count; w++) {
        const PrecTask *t = &tasks[items[w].task];
        int64_t qlen = t->qlen > 0 ? t->qlen : t->n, a = items[w].start, b = items[w].stop;
        double *acc = part + w * PREC_SUMS;
        /* tiles from the item's start (a row's start, or ITEM entries into one) to the end of
         * its row, or of the item */
        for (int64_t i = a; i < b;) {
            int64_t row_end = (i / qlen + 1) * qlen, end = row_end < b ? row_end : b;
            int64_t k = end - i < TILE ? end - i : TILE;
            precision_tile(t, m8, m4, v8, t->m + i, t->v + i, k, acc);
            i += k;
        }
    }
    for (int64_t w = 0, k = -1; w < count; w++) {
        const PrecTask *t = &tasks[items[w].task];
        int sums = t->quantized ? PREC_SUMS : PREC_SUMS_BF16;
        if (items[w].task != k) { k = items[w].task; for (int j = 0; j < sums; j++) t->out[j] = 0; }
        for (int j = 0; j < sums; j++) t->out[j] += part[w * PREC_SUMS + j];
    }
    free(items);
    free(part);
    return 0;
}

/* ---- the SNR measurement (lowmem.snr.capture; lowmem.snr.estimator is its reference) ----------
 *
 * For each view of a second moment (any strides) and each of its axis subsets S, the statistics
 * of every slice along S (the entries that share their indices on the other axes), and from them
 * Σ mean²/var, Σ mean², Σ var and the count over the slices whose ratio is finite. One read of
 * the view serves all its subsets: each entry x adds d = x − x0 and d² to its slice's sums in
 * double, x0 being a fixed entry of the slice (its first along S), so a constant slice has d = 0
 * and a variance of exactly 0; var = Σd²/n − (Σd/n)² then loses to cancellation a factor of about
 * 1 + (x0 − mean)²/var (how far x0 lies from the slice's mean, in variances) of the sums' own
 * relative rounding, about 1e-16 times the square root of the slice's size, or its size at
 * worst: 1e-12 or better on the tests' and gpt2's views, 1e-8 for a slice of 4M entries whose
 * first entry is an outlier (float32 sums lose 1e-7 and more). Work items are ranges of dim 0;
 * a subset that reduces dim 0 sums each item apart and adds the items in order at the end, so
 * the result depends on the shapes alone, never on the number of threads. A view's sums are
 * allocated when its first item starts and freed when its last ends. */
#define SNR_MAXDIM 8
#define SNR_ITEM 262144   /* entries per work item, about (whole indices of dim 0) */

typedef struct {
    const float *x;
    int64_t ndim;
    int64_t shape[SNR_MAXDIM];
    int64_t stride[SNR_MAXDIM];   /* in entries */
    int64_t nsub;
    const int32_t *subs;          /* a bit per reduced axis */
    double *out;                  /* 4 per subset: Σ ratio, Σ mean², Σ var, count of slices kept */
} SnrTask;

typedef struct {
    int64_t slices;
    int64_t kst[SNR_MAXDIM];      /* an axis's step in the slice index (0 where reduced) */
    int spans;                    /* reduces dim 0: sums per item */
    double *s1;                   /* 2 x slices doubles (Σd, Σd²), per item where spans */
    float *shift;                 /* x0 of each slice */
} SnrSub;

typedef struct {
    int64_t nd, n, items, rows, remaining;
    int64_t shape[SNR_MAXDIM], stride[SNR_MAXDIM];
    int ready;                    /* 0 not yet, 1 allocated, -1 out of memory */
    SnrSub *subs;
    void *mem;
    int64_t bytes;                /* what subs and mem take */
} SnrState;

/* The task's shape with a unit dim 0 before a 1-D view (so that items are ranges of dim 0 and a
 * row is the last dim), and its items: whole indices of dim 0, about SNR_ITEM entries, fewer
 * where the per-item sums of the subsets that reduce dim 0 would pass a quarter of the view's
 * bytes (or 1 MiB). */
static void snr_layout(const SnrTask *t, SnrState *st) {
    int64_t nd = t->ndim, off = nd == 1 ? 1 : 0;
    st->nd = nd + off;
    st->shape[0] = 1; st->stride[0] = 0;
    st->n = 1;
    for (int64_t d = 0; d < nd; d++) {
        st->shape[d + off] = t->shape[d];
        st->stride[d + off] = t->stride[d];
        st->n *= t->shape[d];
    }
    st->items = 0;
    if (st->n == 0 || nd == 0 || t->nsub == 0) return;
    int64_t d0 = st->shape[0], row = st->n / d0, per = row >= SNR_ITEM ? 1 : SNR_ITEM / row;
    int64_t spanning = 0;   /* per-item sums of the subsets that reduce dim 0, bytes */
    for (int64_t s = 0; s < t->nsub; s++) {
        int32_t mask = off ? t->subs[s] << 1 : t->subs[s];
        if (mask & 1) {
            int64_t slices = 1;
            for (int64_t d = 0; d < st->nd; d++) if (!(mask >> d & 1)) slices *= st->shape[d];
            if (__builtin_mul_overflow(slices, 16, &slices) || __builtin_add_overflow(spanning, slices, &spanning))
                spanning = INT64_MAX;   /* (an expanded view too large to allocate anyway) */
        }
    }
    int64_t items = (d0 + per - 1) / per, budget = st->n > (1 << 20) ? st->n : (1 << 20);
    if (spanning > 0 && items > budget / spanning) items = budget / spanning > 1 ? budget / spanning : 1;
    st->rows = (d0 + items - 1) / items;
    st->items = (d0 + st->rows - 1) / st->rows;
}

/* Allocates the task's sums and takes each slice's x0. Returns -1 when out of memory. */
static int snr_prepare(const SnrTask *t, SnrState *st) {
    int64_t nd = st->nd, off = nd - t->ndim, doubles = 0, floats = 0;
    SnrSub *subs = calloc((size_t)t->nsub, sizeof(SnrSub));
    if (!subs) return -1;
    for (int64_t s = 0; s < t->nsub; s++) {
        int32_t mask = off ? t->subs[s] << 1 : t->subs[s];
        SnrSub *u = &subs[s];
        u->spans = mask & 1;
        u->slices = 1;
        for (int64_t d = nd - 1; d >= 0; d--) {
            u->kst[d] = (mask >> d & 1) ? 0 : u->slices;
            if (!(mask >> d & 1)) u->slices *= st->shape[d];   /* at most n: no overflow */
        }
        /* sizes that do not fit (an expanded view of 2^60 entries) are out of memory, not a
         * wrapped count */
        int64_t need;
        if (__builtin_mul_overflow(2 * u->slices, u->spans ? st->items : 1, &need)
            || __builtin_add_overflow(doubles, need, &doubles) || __builtin_add_overflow(floats, u->slices, &floats)
            || doubles > (int64_t)(SIZE_MAX / 16) || floats > (int64_t)(SIZE_MAX / 16)) {
            free(subs);
            return -1;
        }
    }
    double *mem = calloc((size_t)(doubles + (floats + 1) / 2 + 1), sizeof(double));
    if (!mem) { free(subs); return -1; }
    double *at = mem;
    float *fat = (float *)(mem + doubles);
    for (int64_t s = 0; s < t->nsub; s++) {
        SnrSub *u = &subs[s];
        u->s1 = at;
        at += 2 * u->slices * (u->spans ? st->items : 1);
        u->shift = fat;
        fat += u->slices;
        if (!u->spans) continue;   /* the others' x0 are taken as their first rows are read */
        /* x0: the slice's entry at index 0 of every reduced axis, slices in index order */
        int64_t idx[SNR_MAXDIM] = {0}, o = 0;
        for (int64_t i = 0; i < u->slices; i++) {
            u->shift[i] = t->x[o];
            for (int64_t d = nd - 1; d >= 0; d--) {
                if (!u->kst[d]) continue;
                o += st->stride[d];
                if (++idx[d] < st->shape[d]) break;
                idx[d] = 0;
                o -= st->shape[d] * st->stride[d];
            }
        }
    }
    st->subs = subs;
    st->mem = mem;
    st->bytes = (int64_t)(t->nsub * sizeof(SnrSub) + (doubles + (floats + 1) / 2 + 1) * sizeof(double));
    return 0;
}

/* Σd and Σd² of one row, d = x − x0, in double. */
static inline void snr_row_sums(const float *restrict p, int64_t len, int64_t s, double x0, double *o1, double *o2) {
    int64_t j = 0;
    double r1 = 0, r2 = 0;
#ifdef __AVX512F__
    if (s == 1 && len >= 16) {
        const __m512d c = _mm512_set1_pd(x0);
        __m512d a1 = _mm512_setzero_pd(), a2 = _mm512_setzero_pd(), b1 = a1, b2 = a1;
        for (; j + 16 <= len; j += 16) {
            __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + j)), c);
            __m512d e = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + j + 8)), c);
            a1 = _mm512_add_pd(a1, d);
            a2 = _mm512_add_pd(a2, _mm512_mul_pd(d, d));
            b1 = _mm512_add_pd(b1, e);
            b2 = _mm512_add_pd(b2, _mm512_mul_pd(e, e));
        }
        double l1[8], l2[8];
        _mm512_storeu_pd(l1, _mm512_add_pd(a1, b1));
        _mm512_storeu_pd(l2, _mm512_add_pd(a2, b2));
        r1 = ((l1[0] + l1[1]) + (l1[2] + l1[3])) + ((l1[4] + l1[5]) + (l1[6] + l1[7]));
        r2 = ((l2[0] + l2[1]) + (l2[2] + l2[3])) + ((l2[4] + l2[5]) + (l2[6] + l2[7]));
    }
#endif
    for (; j < len; j++) {
        double d = (double)p[j * s] - x0;
        r1 += d;
        r2 += d * d;
    }
    *o1 = r1;
    *o2 = r2;
}

/* Each entry of one row to its own slice (consecutive slices). */
static inline void snr_row_spread(const float *restrict p, int64_t len, int64_t s, const float *restrict x0,
                                  double *restrict s1, double *restrict s2) {
    if (s == 1)
        for (int64_t j = 0; j < len; j++) {
            double d = (double)p[j] - (double)x0[j];
            s1[j] += d;
            s2[j] += d * d;
        }
    else
        for (int64_t j = 0; j < len; j++) {
            double d = (double)p[j * s] - (double)x0[j];
            s1[j] += d;
            s2[j] += d * d;
        }
}

/* The sums of item k: indices [k·rows, (k+1)·rows) of dim 0, a row (the last dim) at a time. A
 * subset that reduces the last dim takes the row's own sums, shifted by its first entry, moved to
 * the slice's shift x0: Σ(x − x0) = r1 + len·δ and Σ(x − x0)² = r2 + 2δ·r1 + len·δ², δ = x_r − x0
 * (0 in a constant slice, whose sums stay exactly 0); the others add each entry to its slice.
 * A slice's x0 is its first entry in index order: where the slice lies in one item (the subset
 * keeps dim 0), taken when the row that holds it is read (the first row whose indices on the
 * subset's reduced dims are all 0), else beforehand (snr_prepare). */
static void snr_item(const SnrTask *t, const SnrState *st, int64_t k) {
    int64_t nd = st->nd, last = nd - 1, len = st->shape[last], sl = st->stride[last], nsub = t->nsub;
    int64_t a = k * st->rows, b = a + st->rows < st->shape[0] ? a + st->rows : st->shape[0];
    int64_t idx[SNR_MAXDIM] = {0}, outer = b - a, off = a * st->stride[0], reduce = 0;
    int64_t base[nsub > 0 ? nsub : 1];
    uint32_t rmask[nsub > 0 ? nsub : 1], zero = (1u << last) - 1;   /* dims (but the last) at index 0 */
    idx[0] = a;
    if (a) zero &= ~1u;
    for (int64_t d = 1; d < last; d++) outer *= st->shape[d];
    for (int64_t s = 0; s < nsub; s++) {
        const SnrSub *u = &st->subs[s];
        base[s] = a * u->kst[0];
        reduce |= u->kst[last] == 0;
        rmask[s] = 0;
        for (int64_t d = 0; d < last; d++) if (!u->kst[d]) rmask[s] |= 1u << d;
    }
    for (int64_t o = 0; o < outer; o++) {
        const float *p = t->x + off;
        double r1 = 0, r2 = 0, xr = p[0];
        if (reduce) snr_row_sums(p, len, sl, xr, &r1, &r2);
        for (int64_t s = 0; s < nsub; s++) {
            const SnrSub *u = &st->subs[s];
            double *s1 = u->s1 + (u->spans ? 2 * u->slices * k : 0) + base[s], *s2 = s1 + u->slices;
            int first = !u->spans && (zero & rmask[s]) == rmask[s];
            if (u->kst[last] == 0) {
                if (first) u->shift[base[s]] = p[0];
                double delta = xr - (double)u->shift[base[s]];
                s1[0] += r1 + (double)len * delta;
                s2[0] += r2 + 2 * delta * r1 + (double)len * delta * delta;
            } else if (first) {   /* the slices' x0 are this row: d = 0 */
                for (int64_t j = 0; j < len; j++) u->shift[base[s] + j] = p[j * sl];
            } else {
                snr_row_spread(p, len, sl, u->shift + base[s], s1, s2);
            }
        }
        for (int64_t d = last - 1; d >= 0; d--) {   /* the next row: indices, offset and bases */
            off += st->stride[d];
            for (int64_t s = 0; s < nsub; s++) base[s] += st->subs[s].kst[d];
            zero &= ~(1u << d);
            if (++idx[d] < st->shape[d] || d == 0) break;
            idx[d] = 0;
            zero |= 1u << d;
            off -= st->shape[d] * st->stride[d];
            for (int64_t s = 0; s < nsub; s++) base[s] -= st->shape[d] * st->subs[s].kst[d];
        }
    }
}

/* The task's per-item sums added in order, each slice's mean and variance, the kept slices'
 * sums into out; then its memory freed. */
static void snr_finish(const SnrTask *t, SnrState *st) {
    for (int64_t s = 0; s < t->nsub; s++) {
        const SnrSub *u = &st->subs[s];
        double *s1 = u->s1, *s2 = s1 + u->slices, count = (double)(st->n / u->slices);
        if (u->spans)
            for (int64_t k = 1; k < st->items; k++) {
                const double *p1 = u->s1 + 2 * u->slices * k, *p2 = p1 + u->slices;
                for (int64_t i = 0; i < u->slices; i++) { s1[i] += p1[i]; s2[i] += p2[i]; }
            }
        /* eight lanes of sums (a fixed order), each slice's ratio kept where finite; a variance
         * that rounding made negative, or NaN, is 0 (its ratio is then not finite either) */
        double lane[4][8] = {{0}}, inv = 1.0 / count, sum[4];
        int64_t i = 0;
        for (; i + 8 <= u->slices; i += 8)
            for (int l = 0; l < 8; l++) {
                double c = s1[i + l] * inv, var = s2[i + l] * inv - c * c;
                var = var > 0 ? var : 0;
                double mean = (double)u->shift[i + l] + c, mean_sq = mean * mean, ratio = mean_sq / var;
                int keep = fabs(ratio) < INFINITY;
                lane[0][l] += keep ? ratio : 0;
                lane[1][l] += keep ? mean_sq : 0;
                lane[2][l] += keep ? var : 0;
                lane[3][l] += keep ? 1 : 0;
            }
        for (; i < u->slices; i++) {
            double c = s1[i] * inv, var = s2[i] * inv - c * c;
            var = var > 0 ? var : 0;
            double mean = (double)u->shift[i] + c, mean_sq = mean * mean, ratio = mean_sq / var;
            if (fabs(ratio) < INFINITY) { lane[0][0] += ratio; lane[1][0] += mean_sq; lane[2][0] += var; lane[3][0] += 1; }
        }
        for (int j = 0; j < 4; j++) {
            const double *l = lane[j];
            sum[j] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        }
        for (int j = 0; j < 4; j++) t->out[4 * s + j] = sum[j];
    }
    free(st->mem);
    free(st->subs);
    st->mem = NULL;
    st->subs = NULL;
}

/* Returns 0, or -1 when out of memory (then the sums are not all written); *peak: the most bytes
 * of views' sums held at once. */
int lowmem_snr(int64_t ntasks, const SnrTask *tasks, int nthreads, int64_t *peak) {
    if (nthreads < 1) nthreads = 1;
    SnrState *states = calloc((size_t)ntasks + 1, sizeof(SnrState));
    if (!states) return -1;
    int64_t count = 0, total = 0;
    for (int64_t k = 0; k < ntasks; k++) {
        for (int64_t j = 0; j < 4 * tasks[k].nsub; j++) tasks[k].out[j] = 0;
        if (tasks[k].ndim > SNR_MAXDIM || tasks[k].ndim < 0) { free(states); return -2; }
        snr_layout(&tasks[k], &states[k]);
        states[k].remaining = states[k].items;
        count += states[k].items;
        total += states[k].n;
    }
    Item *items = malloc((size_t)count * sizeof(Item) + 1);
    if (!items) { free(states); return -1; }
    count = 0;
    for (int64_t k = 0; k < ntasks; k++)
        for (int64_t i = 0; i < states[k].items; i++, count++) { items[count].task = k; items[count].start = i; }
    int failed = 0;
    int64_t live = 0, most = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if(count > 1 && total >= PARALLEL_MIN)
    for (int64_t w = 0; w < count; w++) {
        const SnrTask *t = &tasks[items[w].task];
        SnrState *st = &states[items[w].task];
        int ready;
        #pragma omp critical(lowmem_snr)
        {
            if (!st->ready) {
                st->ready = snr_prepare(t, st) == 0 ? 1 : -1;
                if (st->ready > 0) { live += st->bytes; most = live > most ? live : most; }
            }
            ready = st->ready;
        }
        if (ready > 0) snr_item(t, st, items[w].start);
        int64_t left;
        #pragma omp critical(lowmem_snr)
        {
            left = --st->remaining;
            if (ready < 0) failed = 1;
        }
        if (left == 0 && ready > 0) {
            int64_t bytes = st->bytes;
            snr_finish(t, st);
            #pragma omp critical(lowmem_snr)
            live -= bytes;
        }
    }
    free(items);
    free(states);
    if (peak) *peak = most;
    return failed ? -1 : 0;
}
