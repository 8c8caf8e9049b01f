/*
 * avx512.c - AVX-512 kernels (F/BW/VL/VBMI; this file alone is compiled with
 * those flags, dispatch calls it only on CPUs that have all of them).
 *
 *  - linear, batch <= 32 (GEMV, in chunks of 4 batch rows over each block of
 *    rows): the packed words are turned into bfloat16
 *    weights two codes per 32-bit lane:
 *      vpmultishiftqb  moves 4 codes of each qword into the low bits of four
 *                      16-bit lanes (one instruction for 32 codes, any bits),
 *      vpermw          looks the 32 bf16 weights up in a 32-entry table
 *                      (bits <= 5; vpermt2w with 64 entries for 6 bits; a few
 *                      16-bit ops for 7..9 bits), zero code included,
 *      shift / and     widen the even and odd halves to float32 (exact: every
 *                      weight is a power of two),
 *    i.e. ~6 instructions per 32 weights instead of ~36 with the AVX2 bit
 *    decode.  x is
 *    permuted once per call to the matching order.  Rows split over threads.
 *  - conv2d: the direct-convolution driver of gemm_common.h with two tile
 *    shapes, 14x32 and 8x48 (28 / 24 zmm accumulators), picked per conv by
 *    padding waste; weight panels are gathered (vpgatherdd) and decoded with
 *    a 32-entry vpermt2d table (bits <= 5) or the bit decode.
 *  - batched linear: the blocked GEMM with a 14x32 micro-kernel and masked
 *    edge tiles.
 *  - fixed point and row decode: the AVX2 kernels.
 */
#include <immintrin.h>
#include <string.h>

#include "fxs_internal.h"
#include "gemm_common.h"

#define FXS_INLINE static inline __attribute__((always_inline))
#define SIGN_BIT ((int)0x80000000u)

/* ---- 16-lane float32 decode (GEMM packing) ----------------------------------------- */
FXS_INLINE __m512i dec16_at(__m512i w, const int P, const int BITS, const int HZ)
{
    const int mmask = (1 << (BITS - 1)) - 1;
    __m512i m23, e, s, f;
    if (P <= 23)
        m23 = _mm512_slli_epi32(w, 23 - P);
    else
        m23 = _mm512_srli_epi32(w, P - 23);
    m23 = _mm512_and_si512(m23, _mm512_set1_epi32(mmask << 23));
    if (BITS == 9)
        m23 = _mm512_min_epu32(m23, _mm512_set1_epi32(127 << 23));
    e = _mm512_xor_si512(m23, _mm512_set1_epi32(127 << 23));
    s = _mm512_and_si512(_mm512_slli_epi32(w, 32 - BITS - P), _mm512_set1_epi32(SIGN_BIT));
    f = _mm512_or_si512(e, s);
    if (HZ) {
        const int mz = mmask > 127 ? 127 : mmask;
        __m512i zf = _mm512_set1_epi32((int)(0x80000000u | ((uint32_t)(127 - mz) << 23)));
        f = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(f, zf), f);
    }
    return f;
}

/* ---- GEMV: multishift + bf16 table ----------------------------------------------------- */
#define GEMV_WORDS 16   /* words per block (one zmm) */
#define MAX_MS 8        /* multishifts per block: ceil(2 * codes_per_word / 4) <= 8 */

typedef struct {
    const float *xp;
    int64_t xp_stride;  /* floats per batch element */
    const uint32_t *w;
    int64_t row_words, nfull;
    int tail;           /* words in the last partial block (0: none) */
    const float *bias;
    float *y;
    int64_t ldy;
    int nms;            /* multishifts per block */
    uint8_t ctl[MAX_MS][64] __attribute__((aligned(64)));
    uint16_t lut[64] __attribute__((aligned(64)));
} gemv_args;

static inline int ms_count(int bits) { return (2 * (32 / bits) + 3) / 4; }

/* Bit position in a qword of the qword's c-th code (two words of pw codes). */
static inline int code_pos(int c, int bits)
{
    int pw = 32 / bits;
    return c < pw ? c * bits : 32 + (c - pw) * bits;
}

static void gemv_setup(gemv_args *g, int bits, int has_zero)
{
    int pw = 32 / bits, r, q, j, i;
    g->nms = ms_count(bits);
    for (r = 0; r < g->nms; ++r)
        for (q = 0; q < 8; ++q)
            for (j = 0; j < 4; ++j) {
                int c = 4 * r + j;
                int pos = c < 2 * pw ? code_pos(c, bits) : 0;
                g->ctl[r][q * 8 + 2 * j] = (uint8_t)pos;
                g->ctl[r][q * 8 + 2 * j + 1] = (uint8_t)((pos + 8) & 63);
            }
    for (i = 0; i < 64; ++i) {
        uint32_t code = (uint32_t)i & ((1u << bits) - 1u);
        g->lut[i] = (uint16_t)(fxs_elem_decode_bits(code, bits, has_zero) >> 16);
    }
}

/* xp[((j * nms + r) * 2 + h) * 16 + d]: the x of the code that lands in fp32
 * lane d of half h (h = 0: even 16-bit lanes, 1: odd) of multishift r of block j. */
static void gemv_permute_x(const uint32_t *x, int64_t K, int bits, int64_t nblk, int nms,
                           uint32_t *xp)
{
    const int pw = 32 / bits;
    int64_t j;
    int r, h, d;
    for (j = 0; j < nblk; ++j)
        for (r = 0; r < nms; ++r)
            for (h = 0; h < 2; ++h)
                for (d = 0; d < 16; ++d) {
                    int q = d / 2, jj = 2 * (d % 2) + h, c = 4 * r + jj;
                    uint32_t v = 0u;
                    if (c < 2 * pw) {
                        int64_t word = GEMV_WORDS * j + 2 * q + c / pw;
                        int64_t k = word * pw + c % pw;
                        if (k < K)
                            v = x[k];
                    }
                    xp[((j * nms + r) * 2 + h) * 16 + d] = v;
                }
}

/* bf16 weights of the codes in the low bits of the 16-bit lanes of ms. */
FXS_INLINE __m512i dec_bf16(__m512i ms, __m512i lut_lo, __m512i lut_hi, const int BITS,
                            const int HZ)
{
    if (BITS <= 5)
        return _mm512_permutexvar_epi16(ms, lut_lo);
    if (BITS == 6)
        return _mm512_permutex2var_epi16(lut_lo, ms, lut_hi);
    {
        const int mmask = (1 << (BITS - 1)) - 1;
        __m512i m = _mm512_and_si512(ms, _mm512_set1_epi16((short)mmask));
        __m512i e, s, v;
        if (BITS == 9)
            m = _mm512_min_epu16(m, _mm512_set1_epi16(127));
        e = _mm512_xor_si512(_mm512_slli_epi16(m, 7), _mm512_set1_epi16(127 << 7));
        s = _mm512_and_si512(_mm512_slli_epi16(ms, 16 - BITS), _mm512_set1_epi16((short)0x8000));
        v = _mm512_or_si512(e, s);
        if (HZ) {
            const short cm = (short)((1 << BITS) - 1);
            __mmask32 nz = _mm512_cmpneq_epi16_mask(_mm512_and_si512(ms, _mm512_set1_epi16(cm)),
                                                    _mm512_set1_epi16(cm));
            v = _mm512_maskz_mov_epi16(nz, v);
        }
        return v;
    }
}

FXS_INLINE void gemv_block(const gemv_args *g, const __m512i *wv, const float *xj, __m512 *acc,
                           __m512i lut_lo, __m512i lut_hi, const int BITS, const int HZ,
                           const int B, const int R)
{
    const int NMS = (2 * (32 / BITS) + 3) / 4;
    const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
    int r, b, rr;
#pragma GCC unroll 8
    for (r = 0; r < NMS; ++r) {
        const __m512i ctl = _mm512_load_si512((const void *)g->ctl[r]);
        __m512 xe[4], xo[4];
#pragma GCC unroll 4
        for (b = 0; b < B; ++b) {
            xe[b] = _mm512_loadu_ps(xj + b * g->xp_stride + r * 32);
            xo[b] = _mm512_loadu_ps(xj + b * g->xp_stride + r * 32 + 16);
        }
#pragma GCC unroll 4
        for (rr = 0; rr < R; ++rr) {
            __m512i v = dec_bf16(_mm512_multishift_epi64_epi8(ctl, wv[rr]), lut_lo, lut_hi, BITS,
                                 HZ);
            __m512 fe = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            __m512 fo = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
#pragma GCC unroll 4
            for (b = 0; b < B; ++b) {
                acc[(rr * B + b) * 2] = _mm512_fmadd_ps(fe, xe[b], acc[(rr * B + b) * 2]);
                acc[(rr * B + b) * 2 + 1] = _mm512_fmadd_ps(fo, xo[b], acc[(rr * B + b) * 2 + 1]);
            }
        }
    }
}

FXS_INLINE void gemv_group(const gemv_args *g, int64_t r, const int BITS, const int HZ,
                           const int B, const int R)
{
    const int NMS = (2 * (32 / BITS) + 3) / 4;
    const __m512i lut_lo = _mm512_load_si512((const void *)g->lut);
    const __m512i lut_hi = _mm512_load_si512((const void *)(g->lut + 32));
    __m512 acc[16];
    __m512i wv[4];
    const uint32_t *rows[4];
    int64_t j;
    int rr, b;
#pragma GCC unroll 16
    for (rr = 0; rr < 2 * R * B; ++rr)
        acc[rr] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (rr = 0; rr < R; ++rr)
        rows[rr] = g->w + (r + rr) * g->row_words;
    for (j = 0; j < g->nfull; ++j) {
#pragma GCC unroll 4
        for (rr = 0; rr < R; ++rr)
            wv[rr] = _mm512_loadu_si512((const void *)(rows[rr] + GEMV_WORDS * j));
        gemv_block(g, wv, g->xp + j * NMS * 32, acc, lut_lo, lut_hi, BITS, HZ, B, R);
    }
    if (g->tail) {
        __mmask16 m = (__mmask16)((1u << g->tail) - 1u);
#pragma GCC unroll 4
        for (rr = 0; rr < R; ++rr)
            wv[rr] = _mm512_maskz_loadu_epi32(m, rows[rr] + GEMV_WORDS * j);
        gemv_block(g, wv, g->xp + j * NMS * 32, acc, lut_lo, lut_hi, BITS, HZ, B, R);
    }
#pragma GCC unroll 4
    for (rr = 0; rr < R; ++rr)
#pragma GCC unroll 4
        for (b = 0; b < B; ++b)
            g->y[b * g->ldy + r + rr] =
                _mm512_reduce_add_ps(_mm512_add_ps(acc[(rr * B + b) * 2], acc[(rr * B + b) * 2 + 1])) +
                (g->bias ? g->bias[r + rr] : 0.0f);
}

FXS_INLINE void gemv_rows_tmpl(const gemv_args *g, int64_t r0, int64_t r1, const int BITS,
                               const int HZ, const int B)
{
    const int R = B <= 2 ? 4 : 2;
    int64_t r = r0;
    for (; r + R <= r1; r += R)
        gemv_group(g, r, BITS, HZ, B, R);
    for (; r < r1; ++r)
        gemv_group(g, r, BITS, HZ, B, 1);
}

typedef void (*gemv_fn)(const gemv_args *g, int64_t r0, int64_t r1);

#define GEMV_INST(BITS, HZ, B)                                                                 \
    static void gemv_##BITS##_##HZ##_##B(const gemv_args *g, int64_t r0, int64_t r1)           \
    {                                                                                          \
        gemv_rows_tmpl(g, r0, r1, BITS, HZ, B);                                                \
    }
#define GEMV_INST_B(BITS, HZ)                                                                  \
    GEMV_INST(BITS, HZ, 1) GEMV_INST(BITS, HZ, 2) GEMV_INST(BITS, HZ, 3) GEMV_INST(BITS, HZ, 4)
/* For bits <= 6 the table lookup handles the zero code: one variant serves both. */
GEMV_INST_B(2, 0)
GEMV_INST_B(3, 0)
GEMV_INST_B(4, 0)
GEMV_INST_B(5, 0)
GEMV_INST_B(6, 0)
GEMV_INST_B(7, 0)
GEMV_INST_B(7, 1)
GEMV_INST_B(8, 0)
GEMV_INST_B(8, 1)
GEMV_INST_B(9, 0)
GEMV_INST_B(9, 1)
#define GEMV_VARIANTS(BITS, HZ)                                                                \
    {gemv_##BITS##_##HZ##_1, gemv_##BITS##_##HZ##_2, gemv_##BITS##_##HZ##_3, gemv_##BITS##_##HZ##_4}
#define GEMV_ROW_LUT(BITS) {GEMV_VARIANTS(BITS, 0), GEMV_VARIANTS(BITS, 0)}
#define GEMV_ROW(BITS) {GEMV_VARIANTS(BITS, 0), GEMV_VARIANTS(BITS, 1)}
static const gemv_fn gemv_tab[8][2][4] = {GEMV_ROW_LUT(2), GEMV_ROW_LUT(3), GEMV_ROW_LUT(4),
                                          GEMV_ROW_LUT(5), GEMV_ROW_LUT(6), GEMV_ROW(7),
                                          GEMV_ROW(8),     GEMV_ROW(9)};

#define GEMV_ROWS_PER_JOB 32

#define GEMV_CHUNK 4 /* batch rows per pass over a row block (the instantiated B) */

typedef struct {
    gemv_args *g;
    int64_t rows, batch;
    int bits, has_zero;
} gemv_ctx;

/* job = a block of rows; batch chunks of up to GEMV_CHUNK run over it in turn,
 * while its words are still in L2. */
static void gemv_job(void *vctx, int64_t job, int tid)
{
    const gemv_ctx *c = (const gemv_ctx *)vctx;
    int64_t r0 = job * GEMV_ROWS_PER_JOB, b0;
    int64_t r1 = r0 + GEMV_ROWS_PER_JOB < c->rows ? r0 + GEMV_ROWS_PER_JOB : c->rows;
    (void)tid;
    if (c->batch <= GEMV_CHUNK) {
        gemv_tab[c->bits - 2][c->has_zero][c->batch - 1](c->g, r0, r1);
        return;
    }
    for (b0 = 0; b0 < c->batch; b0 += GEMV_CHUNK) {
        int64_t nb = c->batch - b0 < GEMV_CHUNK ? c->batch - b0 : GEMV_CHUNK;
        gemv_args g = *c->g;
        g.xp += b0 * g.xp_stride;
        g.y += b0 * g.ldy;
        gemv_tab[c->bits - 2][c->has_zero][nb - 1](&g, r0, r1);
    }
}

static int avx512_gemv(const fxs_linear_args *a)
{
    gemv_ctx c;
    gemv_args *g = (gemv_args *)fxs_alloc(sizeof(gemv_args));
    int64_t nblk = (a->row_words + GEMV_WORDS - 1) / GEMV_WORDS, b;
    float *xp;
    if (!g)
        return FXS_ERR_OUT_OF_MEMORY;
    gemv_setup(g, a->bits, a->has_zero);
    g->xp_stride = nblk * g->nms * 32;
    xp = (float *)fxs_alloc(fxs_bytes3(a->batch, g->xp_stride, 4));
    if (!xp) {
        fxs_free(g);
        return FXS_ERR_OUT_OF_MEMORY;
    }
    for (b = 0; b < a->batch; ++b)
        gemv_permute_x((const uint32_t *)a->x + b * a->in_features, a->in_features, a->bits, nblk,
                       g->nms, (uint32_t *)xp + b * g->xp_stride);
    g->xp = xp;
    g->w = a->w;
    g->row_words = a->row_words;
    g->nfull = a->row_words / GEMV_WORDS;
    g->tail = (int)(a->row_words % GEMV_WORDS);
    g->bias = (const float *)a->bias;
    g->y = a->y;
    g->ldy = a->out_features;
    c.g = g;
    c.bits = a->bits;
    c.has_zero = a->has_zero;
    c.batch = a->batch;
    c.rows = a->out_features;
    fxs_parallel((a->out_features + GEMV_ROWS_PER_JOB - 1) / GEMV_ROWS_PER_JOB,
                 a->out_features * a->in_features * a->batch < FXS_PARALLEL_MIN_MACS ? 1 : FXS_MAX_THREADS,
                 gemv_job, &c);
    fxs_free(xp);
    fxs_free(g);
    return FXS_OK;
}

/* ---- GEMM micro-kernel 14x32 ------------------------------------------------------------ */
#define UMR 14
#define UNR 32

static void ukernel_14x32(int64_t kc, const float *a, const float *b, float *c, int64_t rs_c,
                          int64_t cs_c, int mr, int nr, const float *bias_m, const float *bias_n,
                          int accumulate)
{
    __m512 acc0[UMR], acc1[UMR];
    int64_t k;
    int i;
#pragma GCC unroll 14
    for (i = 0; i < UMR; ++i) {
        acc0[i] = _mm512_setzero_ps();
        acc1[i] = _mm512_setzero_ps();
    }
    for (k = 0; k < kc; ++k) {
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 14
        for (i = 0; i < UMR; ++i) {
            const __m512 av = _mm512_set1_ps(a[i]);
            acc0[i] = _mm512_fmadd_ps(av, b0, acc0[i]);
            acc1[i] = _mm512_fmadd_ps(av, b1, acc1[i]);
        }
        a += UMR;
        b += UNR;
    }
    if (cs_c == 1) {
        const __mmask16 m0 = (__mmask16)(nr >= 16 ? 0xFFFFu : (1u << nr) - 1u);
        const __mmask16 m1 = (__mmask16)(nr >= 32 ? 0xFFFFu : (nr > 16 ? (1u << (nr - 16)) - 1u : 0u));
        __m512 bn0 = _mm512_setzero_ps(), bn1 = bn0;
        if (bias_n) {
            bn0 = _mm512_maskz_loadu_ps(m0, bias_n);
            bn1 = _mm512_maskz_loadu_ps(m1, bias_n + 16);
        }
#pragma GCC unroll 14
        for (i = 0; i < UMR; ++i) {
            float *row = c + i * rs_c;
            __m512 v0 = _mm512_add_ps(acc0[i], bn0), v1 = _mm512_add_ps(acc1[i], bn1);
            if (i >= mr)
                break;
            if (bias_m) {
                const __m512 bm = _mm512_set1_ps(bias_m[i]);
                v0 = _mm512_add_ps(v0, bm);
                v1 = _mm512_add_ps(v1, bm);
            }
            if (accumulate) {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row + 16));
            }
            _mm512_mask_storeu_ps(row, m0, v0);
            _mm512_mask_storeu_ps(row + 16, m1, v1);
        }
    } else {
        float tmp[UMR * UNR];
        for (i = 0; i < UMR; ++i) {
            _mm512_storeu_ps(tmp + i * UNR, acc0[i]);
            _mm512_storeu_ps(tmp + i * UNR + 16, acc1[i]);
        }
        fxs_store_tile(tmp, UNR, c, rs_c, cs_c, mr, nr, bias_m, bias_n, accumulate);
    }
}

/* Direct-conv tile: B rows are NV*16 contiguous floats at bbase + off[k]. */
FXS_INLINE void ukernel_ind_tmpl(int64_t K, const float *a, const float *bbase, const int64_t *off,
                                 float *tile, const int MR, const int NV)
{
    __m512 acc[3][14];
    int64_t k;
    int i, v;
#pragma GCC unroll 14
    for (i = 0; i < MR; ++i)
#pragma GCC unroll 3
        for (v = 0; v < NV; ++v)
            acc[v][i] = _mm512_setzero_ps();
    for (k = 0; k < K; ++k) {
        const float *b = bbase + off[k];
        __m512 bv[3];
#pragma GCC unroll 3
        for (v = 0; v < NV; ++v)
            bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 14
        for (i = 0; i < MR; ++i) {
            const __m512 av = _mm512_set1_ps(a[i]);
#pragma GCC unroll 3
            for (v = 0; v < NV; ++v)
                acc[v][i] = _mm512_fmadd_ps(av, bv[v], acc[v][i]);
        }
        a += MR;
    }
#pragma GCC unroll 14
    for (i = 0; i < MR; ++i)
#pragma GCC unroll 3
        for (v = 0; v < NV; ++v)
            _mm512_storeu_ps(tile + i * 16 * NV + 16 * v, acc[v][i]);
}

static void ukernel_ind_14x32(int64_t K, const float *a, const float *bbase, const int64_t *off,
                              float *tile)
{
    ukernel_ind_tmpl(K, a, bbase, off, tile, 14, 2);
}

static void ukernel_ind_8x48(int64_t K, const float *a, const float *bbase, const int64_t *off,
                             float *tile)
{
    ukernel_ind_tmpl(K, a, bbase, off, tile, 8, 3);
}

/* tile (rows x NV*16) columns [j, j + len) + bias -> y0 rows, masked. */
FXS_INLINE void tile_store_tmpl(const float *tile, int rows, int j, int len, float *y0, int64_t ldy,
                                const float *bias, const int NV)
{
    __mmask16 m[3];
    int i, v;
    for (v = 0; v < NV; ++v) {
        int l = len - 16 * v;
        m[v] = (__mmask16)(l >= 16 ? 0xFFFFu : (l > 0 ? (1u << l) - 1u : 0u));
    }
    for (i = 0; i < rows; ++i) {
        const float *src = tile + i * 16 * NV + j;
        float *dst = y0 + i * ldy;
        __m512 b = _mm512_set1_ps(bias ? bias[i] : 0.0f);
        for (v = 0; v < NV; ++v)
            if (m[v])
                _mm512_mask_storeu_ps(dst + 16 * v, m[v],
                                      _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], src + 16 * v), b));
    }
}

static void tile_store_32(const float *tile, int rows, int j, int len, float *y0, int64_t ldy,
                          const float *bias)
{
    tile_store_tmpl(tile, rows, j, len, y0, ldy, bias, 2);
}

static void tile_store_48(const float *tile, int rows, int j, int len, float *y0, int64_t ldy,
                          const float *bias)
{
    tile_store_tmpl(tile, rows, j, len, y0, ldy, bias, 3);
}

/* ---- packing for the GEMM drivers --------------------------------------------------------- */
/* Float32 bit patterns of the 32 codes of (bits <= 5, has_zero) as two
 * 16-entry halves for vpermt2d (index = code, garbage above bit 4 ignored;
 * narrower codes see the table repeated). */
FXS_INLINE void f32_lut(int bits, int has_zero, __m512i *lo, __m512i *hi)
{
    uint32_t t[32] __attribute__((aligned(64)));
    int i;
    for (i = 0; i < 32; ++i)
        t[i] = fxs_elem_decode_bits((uint32_t)i & ((1u << bits) - 1u), bits, has_zero);
    *lo = _mm512_load_si512((const void *)t);
    *hi = _mm512_load_si512((const void *)(t + 16));
}

/* Float bits of slot i (codes at bit i*BITS) of 16 words. */
FXS_INLINE __m512i dec16_slot(__m512i w, const int i, __m512i lo, __m512i hi, const int BITS,
                              const int HZ)
{
    if (BITS <= 5)
        return _mm512_permutex2var_epi32(lo, i ? _mm512_srli_epi32(w, i * BITS) : w, hi);
    return dec16_at(w, i * BITS, BITS, HZ);
}

/* One A panel [K][MR] from MR packed rows: the rows' words are gathered
 * (one vector per word index), then slot i of every row decodes at once. */
FXS_INLINE void pack_a_codes_tmpl(const uint32_t *w, int64_t row_words, int rows, int64_t K,
                                  float *panel, const int BITS, const int HZ, const int MR)
{
    const int PW = 32 / BITS;
    const __mmask16 mmr = (__mmask16)((1u << MR) - 1u);
    const __mmask16 mrows = (__mmask16)((1u << rows) - 1u);
    const int use_gather = row_words <= (int64_t)0x7fffffff / 16;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                             12, 13, 14, 15),
                                           _mm512_set1_epi32(use_gather ? (int)row_words : 0));
    __m512i lo, hi;
    int64_t wi;
    f32_lut(BITS, HZ, &lo, &hi);
    for (wi = 0; wi < row_words; ++wi) {
        __m512i v;
        int i;
        if (use_gather) {
            v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mrows, idx, w + wi, 4);
        } else {
            uint32_t wt[16] __attribute__((aligned(64)));
            int r;
            for (r = 0; r < 16; ++r)
                wt[r] = r < rows ? w[r * row_words + wi] : 0u;
            v = _mm512_load_si512((const void *)wt);
        }
        if ((wi + 1) * PW <= K) {
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i)
                _mm512_mask_storeu_ps(panel + (wi * PW + i) * MR, mmr,
                                      _mm512_castsi512_ps(dec16_slot(v, i, lo, hi, BITS, HZ)));
        } else {
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i)
                if (wi * PW + i < K)
                    _mm512_mask_storeu_ps(panel + (wi * PW + i) * MR, mmr,
                                          _mm512_castsi512_ps(dec16_slot(v, i, lo, hi, BITS, HZ)));
        }
    }
}

#define PACK_A_INST(BITS, MR)                                                                  \
    static void pack_a##MR##_##BITS##_0(const uint32_t *w, int64_t rw, int rows, int64_t K,    \
                                        float *p)                                              \
    {                                                                                          \
        pack_a_codes_tmpl(w, rw, rows, K, p, BITS, 0, MR);                                     \
    }                                                                                          \
    static void pack_a##MR##_##BITS##_1(const uint32_t *w, int64_t rw, int rows, int64_t K,    \
                                        float *p)                                              \
    {                                                                                          \
        pack_a_codes_tmpl(w, rw, rows, K, p, BITS, 1, MR);                                     \
    }
#define PACK_A_ALL(MR)                                                                         \
    PACK_A_INST(2, MR) PACK_A_INST(3, MR) PACK_A_INST(4, MR) PACK_A_INST(5, MR)               \
    PACK_A_INST(6, MR) PACK_A_INST(7, MR) PACK_A_INST(8, MR) PACK_A_INST(9, MR)
PACK_A_ALL(14)
PACK_A_ALL(8)
typedef void (*pack_a_fn)(const uint32_t *w, int64_t rw, int rows, int64_t K, float *p);
#define PACK_A_ROW(MR, BITS) {pack_a##MR##_##BITS##_0, pack_a##MR##_##BITS##_1}
#define PACK_A_TAB(MR)                                                                         \
    {PACK_A_ROW(MR, 2), PACK_A_ROW(MR, 3), PACK_A_ROW(MR, 4), PACK_A_ROW(MR, 5),               \
     PACK_A_ROW(MR, 6), PACK_A_ROW(MR, 7), PACK_A_ROW(MR, 8), PACK_A_ROW(MR, 9)}
static const pack_a_fn pack_a14_tab[8][2] = PACK_A_TAB(14);
static const pack_a_fn pack_a8_tab[8][2] = PACK_A_TAB(8);

static void pack_a_codes(const uint32_t *w, int64_t row_words, int rows, int64_t K, int bits,
                         int has_zero, float *panel)
{
    pack_a14_tab[bits - 2][has_zero](w, row_words, rows, K, panel);
}

static void pack_a_codes8(const uint32_t *w, int64_t row_words, int rows, int64_t K, int bits,
                          int has_zero, float *panel)
{
    pack_a8_tab[bits - 2][has_zero](w, row_words, rows, K, panel);
}

static void pack_im2col_32(const void *ctx, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                           float *bp)
{
    fxs_im2col_pack((const fxs_im2col *)ctx, n0, nc, k0, kc, (uint32_t *)bp, UNR);
}

FXS_INLINE void pack_wt_tmpl(const fxs_wt_ctx *c, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                             float *bp, const int BITS, const int HZ)
{
    const int PW = 32 / BITS;
    int64_t q, wi, wfirst = k0 / PW, wlast = (k0 + kc - 1) / PW;
    __m512i lo, hi;
    f32_lut(BITS, HZ, &lo, &hi);
    for (q = 0; q < nc; q += UNR) {
        float *pan = bp + (q / UNR) * UNR * kc;
        int cnt = (int)(nc - q < UNR ? nc - q : UNR), jj;
        const uint32_t *rowp[UNR];
        for (jj = 0; jj < UNR; ++jj)
            rowp[jj] = jj < cnt ? c->w + (n0 + q + jj) * c->row_words : NULL;
        for (wi = wfirst; wi <= wlast; ++wi) {
            uint32_t wt[UNR] __attribute__((aligned(64)));
            __m512i w0, w1;
            int64_t kbase = wi * PW - k0;
            int i;
            for (jj = 0; jj < UNR; ++jj)
                wt[jj] = rowp[jj] ? rowp[jj][wi] : 0u;
            w0 = _mm512_load_si512((const void *)wt);
            w1 = _mm512_load_si512((const void *)(wt + 16));
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i) {
                float *dst = pan + (kbase + i) * UNR;
                if (kbase + i < 0 || kbase + i >= kc)
                    continue;
                _mm512_storeu_si512((void *)dst, dec16_slot(w0, i, lo, hi, BITS, HZ));
                _mm512_storeu_si512((void *)(dst + 16), dec16_slot(w1, i, lo, hi, BITS, HZ));
            }
        }
    }
}

#define PACK_WT_INST(BITS)                                                                     \
    static void pack_wt_##BITS##_0(const void *c, int64_t n0, int64_t nc, int64_t k0,          \
                                   int64_t kc, float *bp)                                      \
    {                                                                                          \
        pack_wt_tmpl((const fxs_wt_ctx *)c, n0, nc, k0, kc, bp, BITS, 0);                      \
    }                                                                                          \
    static void pack_wt_##BITS##_1(const void *c, int64_t n0, int64_t nc, int64_t k0,          \
                                   int64_t kc, float *bp)                                      \
    {                                                                                          \
        pack_wt_tmpl((const fxs_wt_ctx *)c, n0, nc, k0, kc, bp, BITS, 1);                      \
    }
PACK_WT_INST(2)
PACK_WT_INST(3)
PACK_WT_INST(4)
PACK_WT_INST(5)
PACK_WT_INST(6)
PACK_WT_INST(7)
PACK_WT_INST(8)
PACK_WT_INST(9)

static const fxs_gemm_isa avx512_gemm = {
    UMR,
    UNR,
    ukernel_14x32,
    pack_a_codes,
    pack_im2col_32,
    {{pack_wt_2_0, pack_wt_2_1},
     {pack_wt_3_0, pack_wt_3_1},
     {pack_wt_4_0, pack_wt_4_1},
     {pack_wt_5_0, pack_wt_5_1},
     {pack_wt_6_0, pack_wt_6_1},
     {pack_wt_7_0, pack_wt_7_1},
     {pack_wt_8_0, pack_wt_8_1},
     {pack_wt_9_0, pack_wt_9_1}},
    2,
    {{14, 32, ukernel_ind_14x32, tile_store_32, pack_a_codes},
     {8, 48, ukernel_ind_8x48, tile_store_48, pack_a_codes8}},
};

#ifndef GEMV_MAX_BATCH
#define GEMV_MAX_BATCH 32 /* above it the blocked GEMM is faster (measured, 1024x4096) */
#endif

static int avx512_linear_f32(const fxs_linear_args *a)
{
    return a->batch <= GEMV_MAX_BATCH ? avx512_gemv(a) : fxs_linear_gemm(a, &avx512_gemm);
}

static int avx512_conv2d_f32(const fxs_conv_args *a) { return fxs_conv2d_f32(a, &avx512_gemm); }

/* Fixed point and the row decode (unpack) reuse the AVX2 kernels. */
static int avx512_linear_fixed(const fxs_linear_args *a) { return fxs_kernels_avx2.linear_fixed(a); }
static int avx512_conv2d_fixed(const fxs_conv_args *a) { return fxs_kernels_avx2.conv2d_fixed(a); }
static void avx512_decode_row(const uint32_t *row, int64_t j0, int64_t n, int bits, int has_zero,
                              float *out)
{
    fxs_kernels_avx2.decode_row(row, j0, n, bits, has_zero, out);
}

const fxs_kernels fxs_kernels_avx512 = {
    FXS_ISA_AVX512,      avx512_linear_f32,   avx512_conv2d_f32,
    avx512_linear_fixed, avx512_conv2d_fixed, avx512_decode_row,
};
