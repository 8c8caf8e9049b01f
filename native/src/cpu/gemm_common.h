/*
 * gemm_common.h - ISA-neutral pieces of the blocked GEMM used by the SIMD
 * conv and batched-linear kernels.  Included (static) by each ISA file so the
 * compiler specialises it with that file's target flags.
 *
 *   C[M, N] (+)= A[M, K] * B[K, N]   (+ bias per row or per column)
 *
 * A is packed once per call into panels of MR rows over the full K:
 *     ap[(i / MR) * MR * K + k * MR + i % MR]   (rows beyond M zero)
 * B is packed per (KC x NC) block by a callback into panels of NR columns:
 *     bp[(j / NR) * NR * kc + k * NR + j % NR]  (columns beyond nc zero)
 * A micro-kernel computes an MR x NR tile over kc and writes or accumulates it.
 */
#ifndef FXS_GEMM_COMMON_H
#define FXS_GEMM_COMMON_H

#include <string.h>

#include "fxs_internal.h"

#define FXS_KC 256

/* Packs B rows [k0, k0 + kc) x columns [n0, n0 + nc) into NR-panels. */
typedef void (*fxs_pack_b_fn)(const void *ctx, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                              float *bp);

/* Tile kernel: c[i * rs_c + j * cs_c] (i < mr, j < nr) = (accumulate ? c : 0) + sum_k a*b
 * (+ bias_m[i] + bias_n[j] when those are non-NULL). */
typedef void (*fxs_ukernel_fn)(int64_t kc, const float *a, const float *b, float *c,
                               int64_t rs_c, int64_t cs_c, int mr, int nr, const float *bias_m,
                               const float *bias_n, int accumulate);

typedef struct fxs_gemm {
    int64_t M, N, K;
    int MR, NR;
    const float *ap;          /* A packed over the full K */
    fxs_pack_b_fn pack_b;
    const void *ctx_b;
    fxs_ukernel_fn ukernel;
    float *c;
    int64_t rs_c, cs_c;
    const float *bias_m;      /* length M or NULL */
    const float *bias_n;      /* length N or NULL */
} fxs_gemm;

/* Computes the C block [m0, m0 + mc) x [n0, n0 + nc); m0 is a multiple of MR.
 * bp holds FXS_KC * roundup(nc, NR) floats. */
static void fxs_gemm_block(const fxs_gemm *g, int64_t m0, int64_t mc, int64_t n0, int64_t nc,
                           float *bp)
{
    int64_t pc, ir, jr;
    for (pc = 0; pc < g->K; pc += FXS_KC) {
        int64_t kc = g->K - pc < FXS_KC ? g->K - pc : FXS_KC;
        int first = pc == 0;
        g->pack_b(g->ctx_b, n0, nc, pc, kc, bp);
        for (jr = 0; jr < nc; jr += g->NR) {
            const float *bpan = bp + (jr / g->NR) * g->NR * kc;
            int nr = (int)(nc - jr < g->NR ? nc - jr : g->NR);
            for (ir = 0; ir < mc; ir += g->MR) {
                const float *apan = g->ap + ((m0 + ir) / g->MR) * g->MR * g->K + pc * g->MR;
                int mr = (int)(mc - ir < g->MR ? mc - ir : g->MR);
                g->ukernel(kc, apan, bpan, g->c + (m0 + ir) * g->rs_c + (n0 + jr) * g->cs_c,
                           g->rs_c, g->cs_c, mr, nr,
                           (first && g->bias_m) ? g->bias_m + m0 + ir : NULL,
                           (first && g->bias_n) ? g->bias_n + n0 + jr : NULL, !first);
            }
        }
    }
}

/* Generic tile store for partial or strided tiles: acc is MR x NR row-major. */
static inline void fxs_store_tile(const float *acc, int ld_acc, float *c, int64_t rs_c,
                                  int64_t cs_c, int mr, int nr, const float *bias_m,
                                  const float *bias_n, int accumulate)
{
    int i, j;
    for (i = 0; i < mr; ++i) {
        for (j = 0; j < nr; ++j) {
            float v = acc[i * ld_acc + j];
            float *dst = c + i * rs_c + j * cs_c;
            if (bias_m)
                v += bias_m[i];
            if (bias_n)
                v += bias_n[j];
            *dst = accumulate ? *dst + v : v;
        }
    }
}

/* Chooses block sizes so there are enough jobs for the threads while keeping
 * blocks large: returns mc (multiple of MR) and nc (multiple of NR). */
static void fxs_gemm_blocking(int64_t M, int64_t N, int MR, int NR, int64_t instances, int threads,
                              int64_t max_mc, int64_t max_nc, int64_t *mc_out, int64_t *nc_out)
{
    int64_t mc = (M + MR - 1) / MR * MR, nc = (N + NR - 1) / NR * NR;
    int64_t want = (int64_t)threads * 4;
    if (mc > max_mc)
        mc = max_mc / MR * MR;
    if (nc > max_nc)
        nc = max_nc / NR * NR;
    for (;;) {
        int64_t jobs = instances * ((M + mc - 1) / mc) * ((N + nc - 1) / nc);
        if (jobs >= want)
            break;
        /* Split N first (A stays packed once); keep tiles reasonably large. */
        if (nc >= 4 * NR)
            nc = (nc / 2 + NR - 1) / NR * NR;
        else if (mc >= 4 * MR)
            mc = (mc / 2 + MR - 1) / MR * MR;
        else
            break;
    }
    *mc_out = mc;
    *nc_out = nc;
}

/* ---- im2col packing of a conv input (one image, one group) --------------------- */
typedef struct fxs_conv_tap {
    int64_t off;  /* channel plane offset: ci * h * w */
    int32_t dy;   /* ky * dilation_h - pad_h */
    int32_t dx;   /* kx * dilation_w - pad_w */
} fxs_conv_tap;

typedef struct fxs_im2col {
    const uint32_t *x;        /* first channel plane of this image and group (bit patterns) */
    int64_t h, w, out_w;
    int64_t stride_h, stride_w;
    const fxs_conv_tap *taps; /* K entries, torch order (ci, ky, kx) */
} fxs_im2col;

/* Fills taps[K] for a conv; geometry values fit int32 (FXS_MAX_DIM). */
static void fxs_conv_taps(const fxs_conv2d_shape *s, int64_t c_per_group, fxs_conv_tap *taps)
{
    int64_t ci, ky, kx, k = 0;
    for (ci = 0; ci < c_per_group; ++ci)
        for (ky = 0; ky < s->kh; ++ky)
            for (kx = 0; kx < s->kw; ++kx, ++k) {
                taps[k].off = ci * s->h * s->w;
                taps[k].dy = (int32_t)(ky * s->dilation_h - s->pad_h);
                taps[k].dx = (int32_t)(kx * s->dilation_w - s->pad_w);
            }
}

/* Packs columns (output positions) [n0, n0 + nc) x taps [k0, k0 + kc) into
 * R-wide panels of 32-bit values (floats or int32, copied as bits). */
static inline __attribute__((always_inline)) void
fxs_im2col_pack(const fxs_im2col *ic, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                uint32_t *bp, const int R)
{
    int64_t q, kk;
    int jj;
    for (q = 0; q < nc; q += R) {
        int64_t ihb[64], iwb[64]; /* R <= 64 */
        int cnt = (int)(nc - q < R ? nc - q : R);
        int one_row;
        uint32_t *pan = bp + (q / R) * R * kc;
        for (jj = 0; jj < cnt; ++jj) {
            int64_t p = n0 + q + jj;
            int64_t oh = p / ic->out_w, ow = p % ic->out_w;
            ihb[jj] = oh * ic->stride_h;
            iwb[jj] = ow * ic->stride_w;
        }
        one_row = cnt == R && ihb[0] == ihb[R - 1];
        for (kk = 0; kk < kc; ++kk) {
            const fxs_conv_tap *t = &ic->taps[k0 + kk];
            const uint32_t *plane = ic->x + t->off;
            uint32_t *dst = pan + kk * R;
            if (one_row) {
                int64_t ih = ihb[0] + t->dy;
                int64_t iw0 = iwb[0] + t->dx, iw1 = iwb[R - 1] + t->dx;
                if (ih >= 0 && ih < ic->h && iw0 >= 0 && iw1 < ic->w) {
                    const uint32_t *src = plane + ih * ic->w + iw0;
                    if (ic->stride_w == 1) {
                        memcpy(dst, src, (size_t)R * sizeof(uint32_t));
                    } else {
                        for (jj = 0; jj < R; ++jj)
                            dst[jj] = src[jj * ic->stride_w];
                    }
                    continue;
                }
            }
            for (jj = 0; jj < cnt; ++jj) {
                int64_t ih = ihb[jj] + t->dy, iw = iwb[jj] + t->dx;
                dst[jj] = (ih >= 0 && ih < ic->h && iw >= 0 && iw < ic->w) ? plane[ih * ic->w + iw]
                                                                           : 0u;
            }
            for (; jj < R; ++jj)
                dst[jj] = 0u;
        }
    }
}

#endif /* FXS_GEMM_COMMON_H */
