/*
 * avx2.c - AVX2 + FMA kernels (this file alone is compiled with -mavx2 -mfma;
 * dispatch only calls it on CPUs that have both).
 *
 * Float decode without tables: a code becomes the float bit pattern
 *     sign << 31 | (127 - m) << 23          ((127 - m) == 127 ^ m for m < 128)
 * built with two shifts, two masks, an xor and an or per 8 weights; the zero
 * code is masked with one compare.
 *
 * Kernels:
 *  - linear, batch <= 8 (GEMV, memory bound): streams the packed words once
 *    per chunk of up to 4 batch rows (the chunks of a block of rows follow
 *    one another while its words are in L2).
 *    Lane l of an 8-word vector holds codes (8j + l) * pw + i for slots
 *    i < pw, so slot i of all 8 lanes is extracted with immediate shifts; x is
 *    permuted once per call to the same order ("xp"), so no shuffles are
 *    needed in the inner loop.  Several rows per pass share the x loads;
 *    rows are split across threads.
 *  - linear, batch > 8: blocked GEMM (gemm_common.h); W^T panels are decoded
 *    per block straight from the packed words (16 rows' words transposed,
 *    then decoded with uniform shifts).
 *  - conv2d: direct convolution (gemm_common.h) with a 6x16 register-blocked
 *    micro-kernel; weight panels decoded per job from transposed words.
 *  - fixed point: the same layouts with int32 lanes, x >> m by vpsravd
 *    (counts >= 32 fill with the sign: exactly floor), int64 accumulation.
 */
#include <immintrin.h>
#include <string.h>

#include "fxs_internal.h"
#include "gemm_common.h"

#define FXS_INLINE static inline __attribute__((always_inline))
#define SIGN_BIT ((int)0x80000000u)

/* ---- decode ----------------------------------------------------------------------- */

/* Float bits of the code that sits at bit P of each lane of w (garbage elsewhere). */
FXS_INLINE __m256i dec8_at(__m256i w, const int P, const int BITS, const int HZ)
{
    const int mmask = (1 << (BITS - 1)) - 1;
    __m256i m23, e, s, f;
    if (P <= 23)
        m23 = _mm256_slli_epi32(w, 23 - P);
    else
        m23 = _mm256_srli_epi32(w, P - 23);
    m23 = _mm256_and_si256(m23, _mm256_set1_epi32(mmask << 23));
    if (BITS == 9) /* m >= 127 decodes to a zero */
        m23 = _mm256_min_epu32(m23, _mm256_set1_epi32(127 << 23));
    e = _mm256_xor_si256(m23, _mm256_set1_epi32(127 << 23));
    s = _mm256_and_si256(_mm256_slli_epi32(w, 32 - BITS - P), _mm256_set1_epi32(SIGN_BIT));
    f = _mm256_or_si256(e, s);
    if (HZ) {
        /* The zero code (sign 1, m all ones) is the only code with these bits
         * (for bits 9 also codes that decode to -0.0 anyway). */
        const int mz = mmask > 127 ? 127 : mmask;
        __m256i zf = _mm256_set1_epi32((int)(0x80000000u | ((uint32_t)(127 - mz) << 23)));
        f = _mm256_andnot_si256(_mm256_cmpeq_epi32(f, zf), f);
    }
    return f;
}

/* Same with runtime bits/has_zero, codes at bit 0 (garbage above). */
FXS_INLINE __m256i dec8_rt(__m256i t, int bits, int hz)
{
    switch (bits) {
    case 2: return hz ? dec8_at(t, 0, 2, 1) : dec8_at(t, 0, 2, 0);
    case 3: return hz ? dec8_at(t, 0, 3, 1) : dec8_at(t, 0, 3, 0);
    case 4: return hz ? dec8_at(t, 0, 4, 1) : dec8_at(t, 0, 4, 0);
    case 5: return hz ? dec8_at(t, 0, 5, 1) : dec8_at(t, 0, 5, 0);
    case 6: return hz ? dec8_at(t, 0, 6, 1) : dec8_at(t, 0, 6, 0);
    case 7: return hz ? dec8_at(t, 0, 7, 1) : dec8_at(t, 0, 7, 0);
    case 8: return hz ? dec8_at(t, 0, 8, 1) : dec8_at(t, 0, 8, 0);
    default: return hz ? dec8_at(t, 0, 9, 1) : dec8_at(t, 0, 9, 0);
    }
}

/* Contiguous decode of codes [j0, j0 + n) of a row.  Reads only the words that
 * hold those codes: 8 codes span at most 4 words (codes per word >= 3). */
static void avx2_decode_row(const uint32_t *row, int64_t j0, int64_t n, int bits, int has_zero,
                            float *out)
{
    const int pw = 32 / bits;
    int32_t idx_tab[16][8], sh_tab[16][8];
    int r, l;
    int64_t c = j0, end = j0 + n, last_word = n > 0 ? (end - 1) / pw : 0;
    for (r = 0; r < pw; ++r)
        for (l = 0; l < 8; ++l) {
            idx_tab[r][l] = (r + l) / pw;
            sh_tab[r][l] = ((r + l) % pw) * bits;
        }
    while (c + 8 <= end && c / pw + 3 <= last_word) {
        int64_t w0 = c / pw;
        int ph = (int)(c % pw);
        __m128i words = _mm_loadu_si128((const __m128i *)(row + w0));
        __m256i v = _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(words),
                                                _mm256_loadu_si256((const __m256i *)idx_tab[ph]));
        v = _mm256_srlv_epi32(v, _mm256_loadu_si256((const __m256i *)sh_tab[ph]));
        _mm256_storeu_ps(out + (c - j0), _mm256_castsi256_ps(dec8_rt(v, bits, has_zero)));
        c += 8;
    }
    if (c < end)
        fxs_scalar_decode_row(row, c, end - c, bits, has_zero, out + (c - j0));
}

/* ---- x permutation for the GEMV layout ------------------------------------------- */
/* xp[(j * pw + i) * 8 + l] = x[(8j + l) * pw + i], 0 past K; nblk = ceil(row_words / 8). */
static void permute_x(const uint32_t *x, int64_t K, int bits, int64_t nblk, uint32_t *xp)
{
    const int pw = 32 / bits;
    int64_t j, k;
    int i, l;
    for (j = 0; j < nblk; ++j)
        for (i = 0; i < pw; ++i)
            for (l = 0; l < 8; ++l) {
                k = (8 * j + l) * pw + i;
                xp[(j * pw + i) * 8 + l] = k < K ? x[k] : 0u;
            }
}

/* ---- float GEMV (batch <= GEMV_MAX_BATCH) ------------------------------------------------------ */
typedef struct {
    const float *xp;
    int64_t xp_stride; /* floats per batch element */
    const uint32_t *w;
    int64_t row_words, nfull; /* full 8-word blocks per row */
    int tail;                 /* words in the last partial block (0: none) */
    const float *bias;
    float *y;
    int64_t ldy;
} gemv_args;

FXS_INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

FXS_INLINE void gemv_block(const gemv_args *g, const __m256i *wv, const float *xj, __m256 *acc,
                           const int BITS, const int HZ, const int B, const int R)
{
    const int PW = 32 / BITS;
    int i, b, rr;
#pragma GCC unroll 16
    for (i = 0; i < PW; ++i) {
        __m256 xv[4];
#pragma GCC unroll 4
        for (b = 0; b < B; ++b)
            xv[b] = _mm256_loadu_ps(xj + b * g->xp_stride + i * 8);
#pragma GCC unroll 4
        for (rr = 0; rr < R; ++rr) {
            __m256 f = _mm256_castsi256_ps(dec8_at(wv[rr], i * BITS, BITS, HZ));
#pragma GCC unroll 4
            for (b = 0; b < B; ++b)
                acc[rr * B + b] = _mm256_fmadd_ps(f, xv[b], acc[rr * B + b]);
        }
    }
}

FXS_INLINE void gemv_group(const gemv_args *g, int64_t r, const int BITS, const int HZ,
                           const int B, const int R)
{
    const int PW = 32 / BITS;
    __m256 acc[16];
    __m256i wv[4];
    const uint32_t *rows[4];
    int64_t j;
    int rr, b;
#pragma GCC unroll 16
    for (rr = 0; rr < R * B; ++rr)
        acc[rr] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (rr = 0; rr < R; ++rr)
        rows[rr] = g->w + (r + rr) * g->row_words;
    for (j = 0; j < g->nfull; ++j) {
#pragma GCC unroll 4
        for (rr = 0; rr < R; ++rr)
            wv[rr] = _mm256_loadu_si256((const __m256i *)(rows[rr] + 8 * j));
        gemv_block(g, wv, g->xp + j * PW * 8, acc, BITS, HZ, B, R);
    }
    if (g->tail) {
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(g->tail),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 4
        for (rr = 0; rr < R; ++rr)
            wv[rr] = _mm256_maskload_epi32((const int *)(rows[rr] + 8 * j), mask);
        gemv_block(g, wv, g->xp + j * PW * 8, acc, BITS, HZ, B, R);
    }
#pragma GCC unroll 4
    for (rr = 0; rr < R; ++rr)
#pragma GCC unroll 4
        for (b = 0; b < B; ++b)
            g->y[b * g->ldy + r + rr] =
                hsum8(acc[rr * B + b]) + (g->bias ? g->bias[r + rr] : 0.0f);
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
#define GEMV_INST_ALL(BITS) GEMV_INST_B(BITS, 0) GEMV_INST_B(BITS, 1)
GEMV_INST_ALL(2)
GEMV_INST_ALL(3)
GEMV_INST_ALL(4)
GEMV_INST_ALL(5)
GEMV_INST_ALL(6)
GEMV_INST_ALL(7)
GEMV_INST_ALL(8)
GEMV_INST_ALL(9)
#define GEMV_ROW(BITS)                                                                         \
    {{gemv_##BITS##_0_1, gemv_##BITS##_0_2, gemv_##BITS##_0_3, gemv_##BITS##_0_4},            \
     {gemv_##BITS##_1_1, gemv_##BITS##_1_2, gemv_##BITS##_1_3, gemv_##BITS##_1_4}}
static const gemv_fn gemv_tab[8][2][4] = {GEMV_ROW(2), GEMV_ROW(3), GEMV_ROW(4), GEMV_ROW(5),
                                          GEMV_ROW(6), GEMV_ROW(7), GEMV_ROW(8), GEMV_ROW(9)};

#define GEMV_ROWS_PER_JOB 32
#define GEMV_CHUNK 4 /* batch rows per pass over a row block (the instantiated B) */

typedef struct {
    gemv_args g;
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
    for (b0 = 0; b0 < c->batch; b0 += GEMV_CHUNK) {
        int64_t nb = c->batch - b0 < GEMV_CHUNK ? c->batch - b0 : GEMV_CHUNK;
        gemv_args g = c->g;
        g.xp += b0 * g.xp_stride;
        g.y += b0 * g.ldy;
        gemv_tab[c->bits - 2][c->has_zero][nb - 1](&g, r0, r1);
    }
}

static int avx2_gemv(const fxs_linear_args *a)
{
    gemv_ctx c;
    const int pw = 32 / a->bits;
    int64_t nblk = (a->row_words + 7) / 8, b;
    float *xp;
    c.g.xp_stride = nblk * pw * 8;
    xp = (float *)fxs_alloc(fxs_bytes3(a->batch, c.g.xp_stride, 4));
    if (!xp)
        return FXS_ERR_OUT_OF_MEMORY;
    for (b = 0; b < a->batch; ++b)
        permute_x((const uint32_t *)a->x + b * a->in_features, a->in_features, a->bits, nblk,
                  (uint32_t *)xp + b * c.g.xp_stride);
    c.g.xp = xp;
    c.g.w = a->w;
    c.g.row_words = a->row_words;
    c.g.nfull = a->row_words / 8;
    c.g.tail = (int)(a->row_words % 8);
    c.g.bias = (const float *)a->bias;
    c.g.y = a->y;
    c.g.ldy = a->out_features;
    c.bits = a->bits;
    c.has_zero = a->has_zero;
    c.batch = a->batch;
    c.rows = a->out_features;
    fxs_parallel((a->out_features + GEMV_ROWS_PER_JOB - 1) / GEMV_ROWS_PER_JOB,
                 a->out_features * a->in_features * a->batch < FXS_PARALLEL_MIN_MACS ? 1 : FXS_MAX_THREADS,
                 gemv_job, &c);
    fxs_free(xp);
    return FXS_OK;
}

/* ---- GEMM micro-kernel 6x16 -------------------------------------------------------- */
#define UMR 6
#define UNR 16

static void ukernel_6x16(int64_t kc, const float *a, const float *b, float *c, int64_t rs_c,
                         int64_t cs_c, int mr, int nr, const float *bias_m, const float *bias_n,
                         int accumulate)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    int64_t k;
    for (k = 0; k < kc; ++k) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), av;
        av = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(av, b0, c40);
        c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(av, b0, c50);
        c51 = _mm256_fmadd_ps(av, b1, c51);
        a += UMR;
        b += UNR;
    }
    {
        __m256 acc[UMR][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                             {c30, c31}, {c40, c41}, {c50, c51}};
        int i;
        if (mr == UMR && nr == UNR && cs_c == 1) {
            __m256 bn0 = _mm256_setzero_ps(), bn1 = bn0;
            if (bias_n) {
                bn0 = _mm256_loadu_ps(bias_n);
                bn1 = _mm256_loadu_ps(bias_n + 8);
            }
            for (i = 0; i < UMR; ++i) {
                float *row = c + i * rs_c;
                __m256 v0 = _mm256_add_ps(acc[i][0], bn0), v1 = _mm256_add_ps(acc[i][1], bn1);
                if (bias_m) {
                    __m256 bm = _mm256_broadcast_ss(bias_m + i);
                    v0 = _mm256_add_ps(v0, bm);
                    v1 = _mm256_add_ps(v1, bm);
                }
                if (accumulate) {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row + 8));
                }
                _mm256_storeu_ps(row, v0);
                _mm256_storeu_ps(row + 8, v1);
            }
        } else {
            float tmp[UMR * UNR];
            for (i = 0; i < UMR; ++i) {
                _mm256_storeu_ps(tmp + i * UNR, acc[i][0]);
                _mm256_storeu_ps(tmp + i * UNR + 8, acc[i][1]);
            }
            fxs_store_tile(tmp, UNR, c, rs_c, cs_c, mr, nr, bias_m, bias_n, accumulate);
        }
    }
}

/* Direct-conv tile: B rows are NR contiguous floats at bbase + off[k]. */
static void ukernel_ind_6x16(int64_t K, const float *a, const float *bbase, const int64_t *off,
                             float *tile)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    int64_t k;
    for (k = 0; k < K; ++k) {
        const float *b = bbase + off[k];
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8), av;
        av = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(av, b0, c40);
        c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(av, b0, c50);
        c51 = _mm256_fmadd_ps(av, b1, c51);
        a += UMR;
    }
    _mm256_storeu_ps(tile + 0 * UNR, c00);
    _mm256_storeu_ps(tile + 0 * UNR + 8, c01);
    _mm256_storeu_ps(tile + 1 * UNR, c10);
    _mm256_storeu_ps(tile + 1 * UNR + 8, c11);
    _mm256_storeu_ps(tile + 2 * UNR, c20);
    _mm256_storeu_ps(tile + 2 * UNR + 8, c21);
    _mm256_storeu_ps(tile + 3 * UNR, c30);
    _mm256_storeu_ps(tile + 3 * UNR + 8, c31);
    _mm256_storeu_ps(tile + 4 * UNR, c40);
    _mm256_storeu_ps(tile + 4 * UNR + 8, c41);
    _mm256_storeu_ps(tile + 5 * UNR, c50);
    _mm256_storeu_ps(tile + 5 * UNR + 8, c51);
}

static void tile_store_16(const float *tile, int rows, int j, int len, float *y0, int64_t ldy,
                          const float *bias)
{
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(len), lanes);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(len - 8), lanes);
    int i;
    for (i = 0; i < rows; ++i) {
        const float *src = tile + i * UNR + j;
        float *dst = y0 + i * ldy;
        __m256 b = _mm256_set1_ps(bias ? bias[i] : 0.0f);
        _mm256_maskstore_ps(dst, m0, _mm256_add_ps(_mm256_maskload_ps(src, m0), b));
        if (len > 8)
            _mm256_maskstore_ps(dst + 8, m1, _mm256_add_ps(_mm256_maskload_ps(src + 8, m1), b));
    }
}

/* ---- packing for the GEMM drivers (gemm_common.h) ---------------------------------- */

/* A panel of up to 6 weight rows: the rows' words are transposed (one vector
 * per word index), so slot i of every row decodes with one immediate shift;
 * 6 of the 8 lanes are stored per k (masked). */
FXS_INLINE void pack_a_codes_tmpl(const uint32_t *w, int64_t row_words, int rows, int64_t K,
                                  float *panel, const int BITS, const int HZ)
{
    const int PW = 32 / BITS;
    const __m256i mask6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    int64_t wi;
    for (wi = 0; wi < row_words; ++wi) {
        uint32_t wt[8] __attribute__((aligned(32))) = {0, 0, 0, 0, 0, 0, 0, 0};
        __m256i v;
        int r, i;
        for (r = 0; r < rows; ++r)
            wt[r] = w[r * row_words + wi];
        v = _mm256_load_si256((const __m256i *)wt);
        if ((wi + 1) * PW <= K) {
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i)
                _mm256_maskstore_ps(panel + (wi * PW + i) * UMR, mask6,
                                    _mm256_castsi256_ps(dec8_at(v, i * BITS, BITS, HZ)));
        } else {
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i)
                if (wi * PW + i < K)
                    _mm256_maskstore_ps(panel + (wi * PW + i) * UMR, mask6,
                                        _mm256_castsi256_ps(dec8_at(v, i * BITS, BITS, HZ)));
        }
    }
}

#define PACK_A_INST(BITS)                                                                      \
    static void pack_a_##BITS##_0(const uint32_t *w, int64_t rw, int rows, int64_t K, float *p) \
    {                                                                                          \
        pack_a_codes_tmpl(w, rw, rows, K, p, BITS, 0);                                         \
    }                                                                                          \
    static void pack_a_##BITS##_1(const uint32_t *w, int64_t rw, int rows, int64_t K, float *p) \
    {                                                                                          \
        pack_a_codes_tmpl(w, rw, rows, K, p, BITS, 1);                                         \
    }
PACK_A_INST(2)
PACK_A_INST(3)
PACK_A_INST(4)
PACK_A_INST(5)
PACK_A_INST(6)
PACK_A_INST(7)
PACK_A_INST(8)
PACK_A_INST(9)
typedef void (*pack_a_fn)(const uint32_t *w, int64_t rw, int rows, int64_t K, float *p);
static const pack_a_fn pack_a_tab[8][2] = {
    {pack_a_2_0, pack_a_2_1}, {pack_a_3_0, pack_a_3_1}, {pack_a_4_0, pack_a_4_1},
    {pack_a_5_0, pack_a_5_1}, {pack_a_6_0, pack_a_6_1}, {pack_a_7_0, pack_a_7_1},
    {pack_a_8_0, pack_a_8_1}, {pack_a_9_0, pack_a_9_1}};

static void pack_a_codes(const uint32_t *w, int64_t row_words, int rows, int64_t K, int bits,
                         int has_zero, float *panel)
{
    pack_a_tab[bits - 2][has_zero](w, row_words, rows, K, panel);
}

static void pack_im2col_16(const void *ctx, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                           float *bp)
{
    fxs_im2col_pack((const fxs_im2col *)ctx, n0, nc, k0, kc, (uint32_t *)bp, UNR);
}

/* B block = W^T rows k0..k0+kc, columns (output features) n0..n0+nc: the 16
 * rows' words are transposed, then each slot decodes with one immediate shift. */
FXS_INLINE void pack_wt_tmpl(const fxs_wt_ctx *c, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                             float *bp, const int BITS, const int HZ)
{
    const int PW = 32 / BITS;
    int64_t q, wi, wfirst = k0 / PW, wlast = (k0 + kc - 1) / PW;
    for (q = 0; q < nc; q += UNR) {
        float *pan = bp + (q / UNR) * UNR * kc;
        int cnt = (int)(nc - q < UNR ? nc - q : UNR), jj;
        const uint32_t *rowp[UNR];
        for (jj = 0; jj < UNR; ++jj)
            rowp[jj] = jj < cnt ? c->w + (n0 + q + jj) * c->row_words : NULL;
        for (wi = wfirst; wi <= wlast; ++wi) {
            uint32_t wt[UNR] __attribute__((aligned(32)));
            __m256i w0, w1;
            int64_t kbase = wi * PW - k0;
            int i;
            for (jj = 0; jj < UNR; ++jj)
                wt[jj] = rowp[jj] ? rowp[jj][wi] : 0u;
            w0 = _mm256_load_si256((const __m256i *)wt);
            w1 = _mm256_load_si256((const __m256i *)(wt + 8));
            if (kbase >= 0 && kbase + PW <= kc) {
#pragma GCC unroll 16
                for (i = 0; i < PW; ++i) {
                    float *dst = pan + (kbase + i) * UNR;
                    _mm256_storeu_si256((__m256i *)dst, dec8_at(w0, i * BITS, BITS, HZ));
                    _mm256_storeu_si256((__m256i *)(dst + 8), dec8_at(w1, i * BITS, BITS, HZ));
                }
            } else {
#pragma GCC unroll 16
                for (i = 0; i < PW; ++i) {
                    float *dst = pan + (kbase + i) * UNR;
                    if (kbase + i < 0 || kbase + i >= kc)
                        continue;
                    _mm256_storeu_si256((__m256i *)dst, dec8_at(w0, i * BITS, BITS, HZ));
                    _mm256_storeu_si256((__m256i *)(dst + 8), dec8_at(w1, i * BITS, BITS, HZ));
                }
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

static const fxs_gemm_isa avx2_gemm = {
    UMR,
    UNR,
    ukernel_6x16,
    pack_a_codes,
    pack_im2col_16,
    {{pack_wt_2_0, pack_wt_2_1},
     {pack_wt_3_0, pack_wt_3_1},
     {pack_wt_4_0, pack_wt_4_1},
     {pack_wt_5_0, pack_wt_5_1},
     {pack_wt_6_0, pack_wt_6_1},
     {pack_wt_7_0, pack_wt_7_1},
     {pack_wt_8_0, pack_wt_8_1},
     {pack_wt_9_0, pack_wt_9_1}},
    1,
    {{UMR, UNR, ukernel_ind_6x16, tile_store_16, pack_a_codes}},
};

#ifndef GEMV_MAX_BATCH
#define GEMV_MAX_BATCH 8 /* above it the blocked GEMM is faster (measured, 1024x4096) */
#endif

static int avx2_linear_f32(const fxs_linear_args *a)
{
    return a->batch <= GEMV_MAX_BATCH ? avx2_gemv(a) : fxs_linear_gemm(a, &avx2_gemm);
}

static int avx2_conv2d_f32(const fxs_conv_args *a) { return fxs_conv2d_f32(a, &avx2_gemm); }

/* ---- fixed point ------------------------------------------------------------------- */
/* Contribution vector of 8 codes at bit P of w applied to int32 x: +-(x >> m) or 0. */
FXS_INLINE __m256i fixed_term(__m256i w, __m256i xv, const int P, const int BITS, const int HZ)
{
    const int mmask = (1 << (BITS - 1)) - 1;
    __m256i t = P ? _mm256_srli_epi32(w, P) : w;
    __m256i m = _mm256_and_si256(t, _mm256_set1_epi32(mmask));
    __m256i v = _mm256_srav_epi32(xv, m);
    __m256i s = _mm256_srai_epi32(_mm256_slli_epi32(t, 32 - BITS), 31);
    v = _mm256_sub_epi32(_mm256_xor_si256(v, s), s);
    if (HZ) {
        __m256i code = _mm256_and_si256(t, _mm256_set1_epi32((1 << BITS) - 1));
        v = _mm256_andnot_si256(_mm256_cmpeq_epi32(code, _mm256_set1_epi32((1 << BITS) - 1)), v);
    }
    return v;
}

FXS_INLINE void acc64(__m256i v, __m256i *lo, __m256i *hi)
{
    *lo = _mm256_add_epi64(*lo, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)));
    *hi = _mm256_add_epi64(*hi, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
}

FXS_INLINE int64_t hsum64(__m256i lo, __m256i hi)
{
    int64_t t[4] __attribute__((aligned(32)));
    _mm256_store_si256((__m256i *)t, _mm256_add_epi64(lo, hi));
    return t[0] + t[1] + t[2] + t[3];
}

typedef struct {
    const int32_t *xp;
    int64_t xp_stride, batch;
    const uint32_t *w;
    int64_t row_words, nfull;
    int tail;
    const int32_t *bias;
    int frac_bits;
    float *y;
    int64_t ldy;
} lfix_args;

/* A negated term -(INT32_MIN >> 0) does not fit an int32 lane; callers route
 * inputs containing INT32_MIN to the scalar reference. */
FXS_INLINE void lfix_row_tmpl(const lfix_args *g, int64_t r, const int BITS, const int HZ)
{
    const int PW = 32 / BITS;
    const uint32_t *row = g->w + r * g->row_words;
    int64_t b, j;
    int i;
    for (b = 0; b < g->batch; ++b) {
        const int32_t *xb = g->xp + b * g->xp_stride;
        __m256i lo = _mm256_setzero_si256(), hi = lo, wv, mask;
        int64_t acc;
        for (j = 0; j < g->nfull; ++j) {
            wv = _mm256_loadu_si256((const __m256i *)(row + 8 * j));
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i)
                acc64(fixed_term(wv, _mm256_loadu_si256((const __m256i *)(xb + (j * PW + i) * 8)),
                                 i * BITS, BITS, HZ),
                      &lo, &hi);
        }
        if (g->tail) {
            mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(g->tail),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            wv = _mm256_maskload_epi32((const int *)(row + 8 * j), mask);
#pragma GCC unroll 16
            for (i = 0; i < PW; ++i)
                acc64(fixed_term(wv, _mm256_loadu_si256((const __m256i *)(xb + (j * PW + i) * 8)),
                                 i * BITS, BITS, HZ),
                      &lo, &hi);
        }
        acc = hsum64(lo, hi) + (g->bias ? (int64_t)g->bias[r] : 0);
        g->y[b * g->ldy + r] = fxs_elem_fixed_to_float(acc, g->frac_bits);
    }
}

typedef void (*lfix_fn)(const lfix_args *g, int64_t r);
#define LFIX_INST(BITS)                                                                        \
    static void lfix_##BITS##_0(const lfix_args *g, int64_t r) { lfix_row_tmpl(g, r, BITS, 0); } \
    static void lfix_##BITS##_1(const lfix_args *g, int64_t r) { lfix_row_tmpl(g, r, BITS, 1); }
LFIX_INST(2)
LFIX_INST(3)
LFIX_INST(4)
LFIX_INST(5)
LFIX_INST(6)
LFIX_INST(7)
LFIX_INST(8)
LFIX_INST(9)
static const lfix_fn lfix_tab[8][2] = {{lfix_2_0, lfix_2_1}, {lfix_3_0, lfix_3_1},
                                       {lfix_4_0, lfix_4_1}, {lfix_5_0, lfix_5_1},
                                       {lfix_6_0, lfix_6_1}, {lfix_7_0, lfix_7_1},
                                       {lfix_8_0, lfix_8_1}, {lfix_9_0, lfix_9_1}};

typedef struct {
    lfix_args g;
    lfix_fn fn;
    int64_t rows;
} lfix_ctx;

static void lfix_job(void *vctx, int64_t job, int tid)
{
    const lfix_ctx *c = (const lfix_ctx *)vctx;
    int64_t r0 = job * GEMV_ROWS_PER_JOB, r;
    int64_t r1 = r0 + GEMV_ROWS_PER_JOB < c->rows ? r0 + GEMV_ROWS_PER_JOB : c->rows;
    (void)tid;
    for (r = r0; r < r1; ++r)
        c->fn(&c->g, r);
}

static int avx2_linear_fixed(const fxs_linear_args *a)
{
    lfix_ctx c;
    const int pw = 32 / a->bits;
    int64_t nblk = (a->row_words + 7) / 8, b, i, n = a->batch * a->in_features;
    int32_t *xp;
    const int32_t *x = (const int32_t *)a->x;
    /* -(INT32_MIN >> 0) does not fit the int32 lanes: rare, so hand the whole
     * call to the exact scalar reference. */
    for (i = 0; i < n; ++i)
        if (x[i] == INT32_MIN)
            return fxs_kernels_scalar.linear_fixed(a);
    c.g.xp_stride = nblk * pw * 8;
    xp = (int32_t *)fxs_alloc(fxs_bytes3(a->batch, c.g.xp_stride, 4));
    if (!xp)
        return FXS_ERR_OUT_OF_MEMORY;
    for (b = 0; b < a->batch; ++b)
        permute_x((const uint32_t *)x + b * a->in_features, a->in_features, a->bits, nblk,
                  (uint32_t *)xp + b * c.g.xp_stride);
    c.g.xp = xp;
    c.g.batch = a->batch;
    c.g.w = a->w;
    c.g.row_words = a->row_words;
    c.g.nfull = a->row_words / 8;
    c.g.tail = (int)(a->row_words % 8);
    c.g.bias = (const int32_t *)a->bias;
    c.g.frac_bits = a->frac_bits;
    c.g.y = a->y;
    c.g.ldy = a->out_features;
    c.fn = lfix_tab[a->bits - 2][a->has_zero];
    c.rows = a->out_features;
    fxs_parallel((a->out_features + GEMV_ROWS_PER_JOB - 1) / GEMV_ROWS_PER_JOB,
                 a->out_features * a->in_features * a->batch < FXS_PARALLEL_MIN_MACS ? 1 : FXS_MAX_THREADS,
                 lfix_job, &c);
    fxs_free(xp);
    return FXS_OK;
}

/* Fixed-point conv: im2col panels of 32 positions over the full K (int32),
 * per output channel a broadcast shift and sign per tap. */
#define FIX_NR 32

typedef struct {
    const fxs_conv_args *a;
    const fxs_conv_tap *taps;
    const uint8_t *mag;  /* out_channels x K */
    const int8_t *sgn;   /* out_channels x K: -1, 0 (zero weight), +1 */
    int64_t nb;
    uint32_t *bbuf;
    int64_t bbuf_stride;
} cfix_ctx;

static void cfix_job(void *vctx, int64_t job, int tid)
{
    const cfix_ctx *c = (const cfix_ctx *)vctx;
    const fxs_conv_args *a = c->a;
    const fxs_conv2d_shape *s = &a->s;
    int64_t inst = job / c->nb, nb = job % c->nb;
    int64_t n = inst / s->groups, g = inst % s->groups;
    int64_t K = a->z.k, Mg = a->z.o_per_group, P = a->z.out_h * a->z.out_w;
    int64_t n0 = nb * FIX_NR, cnt = P - n0 < FIX_NR ? P - n0 : FIX_NR, o, k;
    uint32_t *bp = c->bbuf + (int64_t)tid * c->bbuf_stride;
    const int32_t *bias = (const int32_t *)a->bias;
    fxs_im2col ic;
    ic.x = (const uint32_t *)a->x + (n * s->c + g * a->z.c_per_group) * s->h * s->w;
    ic.h = s->h;
    ic.w = s->w;
    ic.out_w = a->z.out_w;
    ic.stride_h = s->stride_h;
    ic.stride_w = s->stride_w;
    ic.taps = c->taps;
    fxs_im2col_pack(&ic, n0, cnt, 0, K, bp, FIX_NR);
    for (o = g * Mg; o < (g + 1) * Mg; ++o) {
        const uint8_t *mrow = c->mag + o * K;
        const int8_t *srow = c->sgn + o * K;
        __m256i acc[8];
        int64_t out[FIX_NR];
        int i;
        for (i = 0; i < 8; ++i)
            acc[i] = _mm256_setzero_si256();
        for (k = 0; k < K; ++k) {
            const __m256i *col = (const __m256i *)(bp + k * FIX_NR);
            __m256i m, sg;
            if (srow[k] == 0)
                continue;
            m = _mm256_set1_epi32(mrow[k]);
            sg = _mm256_set1_epi32(srow[k]);
            for (i = 0; i < 4; ++i) {
                __m256i v = _mm256_sign_epi32(_mm256_srav_epi32(_mm256_load_si256(col + i), m), sg);
                acc64(v, &acc[2 * i], &acc[2 * i + 1]);
            }
        }
        for (i = 0; i < 4; ++i) {
            _mm256_storeu_si256((__m256i *)(out + 8 * i), acc[2 * i]);
            _mm256_storeu_si256((__m256i *)(out + 8 * i + 4), acc[2 * i + 1]);
        }
        {
            float *y = a->y + (n * s->out_channels + o) * P + n0;
            int64_t b0 = bias ? (int64_t)bias[o] : 0;
            for (i = 0; i < cnt; ++i)
                y[i] = fxs_elem_fixed_to_float(out[i] + b0, a->frac_bits);
        }
    }
}

static int avx2_conv2d_fixed(const fxs_conv_args *a)
{
    cfix_ctx c;
    int nt = fxs_planned_threads();
    int64_t K = a->z.k, O = a->s.out_channels, P = a->z.out_h * a->z.out_w, o, k, i;
    int64_t nx = a->s.n * a->s.c * a->s.h * a->s.w;
    const int32_t *x = (const int32_t *)a->x;
    fxs_conv_tap *taps;
    uint8_t *mag;
    int8_t *sgn;
    int st = FXS_OK;
    for (i = 0; i < nx; ++i) /* see avx2_linear_fixed */
        if (x[i] == INT32_MIN)
            return fxs_kernels_scalar.conv2d_fixed(a);
    memset(&c, 0, sizeof c);
    taps = (fxs_conv_tap *)fxs_alloc(fxs_bytes3(K, sizeof(fxs_conv_tap), 1));
    mag = (uint8_t *)fxs_alloc(fxs_bytes3(O, K, 1));
    sgn = (int8_t *)fxs_alloc(fxs_bytes3(O, K, 1));
    c.bbuf_stride = K * FIX_NR;
    c.bbuf = (uint32_t *)fxs_alloc(fxs_bytes3(nt, c.bbuf_stride, 4));
    if (!taps || !mag || !sgn || !c.bbuf) {
        st = FXS_ERR_OUT_OF_MEMORY;
        goto done;
    }
    fxs_conv_taps(&a->s, a->z.c_per_group, taps);
    for (o = 0; o < O; ++o)
        for (k = 0; k < K; ++k) {
            uint32_t code = fxs_elem_code_at(a->w + o * a->z.row_words, k, a->bits);
            int zero = fxs_elem_is_zero(code, a->bits, a->has_zero);
            mag[o * K + k] = (uint8_t)(code & fxs_elem_mag_mask(a->bits));
            sgn[o * K + k] = zero ? 0 : ((code >> (a->bits - 1)) ? -1 : 1);
        }
    c.a = a;
    c.taps = taps;
    c.mag = mag;
    c.sgn = sgn;
    c.nb = (P + FIX_NR - 1) / FIX_NR;
    fxs_parallel(a->s.n * a->s.groups * c.nb, nt, cfix_job, &c);
done:
    fxs_free(taps);
    fxs_free(mag);
    fxs_free(sgn);
    fxs_free(c.bbuf);
    return st;
}

const fxs_kernels fxs_kernels_avx2 = {
    FXS_ISA_AVX2,      avx2_linear_f32,   avx2_conv2d_f32,
    avx2_linear_fixed, avx2_conv2d_fixed, avx2_decode_row,
};
