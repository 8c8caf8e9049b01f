/*
 * gemm_common.h - ISA-neutral drivers of the SIMD float kernels.  Included
 * (static) by each ISA file, which supplies micro-kernels and packing routines
 * in an fxs_gemm_isa, so everything compiles with that file's flags.
 *
 * conv2d, main path (fxs_conv2d_direct, "indirect GEMM" without im2col): the
 *   zero-padded input is copied once per call, split into stride phases, and
 *   output tiles of MR channels x NR positions are computed over "wide" rows
 *   so that, for every tap, the NR inputs are one contiguous load at a
 *   precomputed offset.  Weights are decoded per job, a block of MR-row panels
 *   at a time, into a thread-local buffer.  Several tile shapes can be offered
 *   (fxs_direct_cfg); the one with the least padding waste is used.
 * conv2d, fallback for huge padding (fxs_conv2d_gemm): blocked GEMM with the
 *   input packed per block (im2col panels) and the weights decoded once.
 * linear with batch > 4 (fxs_linear_gemm): blocked GEMM, A = x, B = W^T
 *   decoded per block from the packed words.
 *
 * Blocked GEMM layout:  C[M, N] (+)= A[M, K] * B[K, N]  (+ bias per row/column)
 *   A packed once into panels of MR rows over the full K:
 *       ap[(i / MR) * MR * K + k * MR + i % MR]   (rows beyond M zero)
 *   B packed per (KC x NC) block by a callback into panels of NR columns:
 *       bp[(j / NR) * NR * kc + k * NR + j % NR]  (columns beyond nc: any finite value)
 *   A micro-kernel computes an MR x NR tile over kc and writes or accumulates it.
 */
#ifndef FXS_GEMM_COMMON_H
#define FXS_GEMM_COMMON_H

#include <string.h>

#include "fxs_internal.h"

#define FXS_KC 256
/* Below these sizes a call (or its input copy) stays on the calling thread. */
#define FXS_PARALLEL_MIN_MACS ((int64_t)1 << 19)
#define FXS_PARALLEL_MIN_COPY ((int64_t)1 << 16)

/* Packs B rows [k0, k0 + kc) x columns [n0, n0 + nc) into NR-panels. */
typedef void (*fxs_pack_b_fn)(const void *ctx, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                              float *bp);

/* Tile kernel: c[i * rs_c + j * cs_c] (i < mr, j < nr) = (accumulate ? c : 0) + sum_k a*b
 * (+ bias_m[i] + bias_n[j] when those are non-NULL). */
typedef void (*fxs_ukernel_fn)(int64_t kc, const float *a, const float *b, float *c,
                               int64_t rs_c, int64_t cs_c, int mr, int nr, const float *bias_m,
                               const float *bias_n, int accumulate);

/* Decodes `rows` (<= MR) packed rows of K codes into one A panel [K][MR]
 * (rows beyond `rows` zero). */
typedef void (*fxs_pack_a_codes_fn)(const uint32_t *w, int64_t row_words, int rows, int64_t K,
                                    int bits, int has_zero, float *panel);

/* Direct-conv tile kernel: tile[i * NR + j] = sum_k a[k * MR + i] * bbase[off[k] + j]
 * (i < MR, j < NR), over the full K. */
typedef void (*fxs_ukernel_ind_fn)(int64_t K, const float *a, const float *bbase, const int64_t *off,
                                   float *tile);

/* y0[i * ldy + e] = tile[i * NR + j + e] + (bias ? bias[i] : 0), i < rows, e < len */
typedef void (*fxs_tile_store_fn)(const float *tile, int rows, int j, int len, float *y0,
                                  int64_t ldy, const float *bias);

/* A direct-conv tile shape: MR output channels x NR (wide) output positions. */
typedef struct fxs_direct_cfg {
    int MR, NR;
    fxs_ukernel_ind_fn ukernel_ind;
    fxs_tile_store_fn tile_store;
    fxs_pack_a_codes_fn pack_a_codes;
} fxs_direct_cfg;

/* What an ISA file provides to the drivers below. */
typedef struct fxs_gemm_isa {
    int MR, NR;
    fxs_ukernel_fn ukernel;
    fxs_pack_a_codes_fn pack_a_codes;  /* conv weights -> A panels */
    fxs_pack_b_fn pack_b_im2col;       /* ctx: const fxs_im2col * */
    fxs_pack_b_fn pack_b_wt[8][2];     /* [bits - 2][has_zero], ctx: const fxs_wt_ctx * */
    int ndirect;                       /* direct-conv tile shapes, picked per conv */
    fxs_direct_cfg direct[2];
} fxs_gemm_isa;

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

/* Block sizes: enough jobs for the threads while keeping blocks large;
 * mc is a multiple of MR, nc of NR. */
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
        if (jobs >= want || threads == 1)
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

/* ---- im2col packing of a conv input (one image, one group) ---------------------- */
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

/* One output row's share of a panel: columns [j0, j0 + len) of the panel are
 * output positions (oh, ow0 .. ow0 + len). */
typedef struct fxs_im2col_seg {
    int32_t j0, len;
    int64_t ih0;  /* oh * stride_h */
    int64_t iw0;  /* ow0 * stride_w */
} fxs_im2col_seg;

/* Packs columns (output positions) [n0, n0 + nc) x taps [k0, k0 + kc) into
 * R-wide panels of 32-bit values (floats or int32, copied as bits): each
 * panel row is a few contiguous runs (one per output row it spans), copied
 * with the padding clipped. */
static inline __attribute__((always_inline)) void
fxs_im2col_pack(const fxs_im2col *ic, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                uint32_t *bp, const int R)
{
    const int64_t sw = ic->stride_w, W = ic->w;
    int64_t q, kk;
    for (q = 0; q < nc; q += R) {
        fxs_im2col_seg seg[66]; /* R <= 64 positions span at most R + 1 rows */
        int cnt = (int)(nc - q < R ? nc - q : R), nseg = 0, j = 0, si;
        uint32_t *pan = bp + (q / R) * R * kc;
        while (j < cnt) {
            int64_t p = n0 + q + j;
            int64_t oh = p / ic->out_w, ow = p % ic->out_w;
            int64_t len = ic->out_w - ow;
            if (len > cnt - j)
                len = cnt - j;
            seg[nseg].j0 = j;
            seg[nseg].len = (int32_t)len;
            seg[nseg].ih0 = oh * ic->stride_h;
            seg[nseg].iw0 = ow * sw;
            ++nseg;
            j += (int)len;
        }
        for (kk = 0; kk < kc; ++kk) {
            const fxs_conv_tap *t = &ic->taps[k0 + kk];
            const uint32_t *plane = ic->x + t->off;
            uint32_t *dst = pan + kk * R;
            for (si = 0; si < nseg; ++si) {
                const fxs_im2col_seg *sg = &seg[si];
                int64_t ih = sg->ih0 + t->dy, iw0 = sg->iw0 + t->dx;
                uint32_t *d = dst + sg->j0;
                int64_t len = sg->len, lo, hi, i;
                if (ih < 0 || ih >= ic->h) {
                    memset(d, 0, (size_t)len * sizeof(uint32_t));
                    continue;
                }
                /* valid i: 0 <= iw0 + i * sw < W */
                lo = iw0 >= 0 ? 0 : (-iw0 + sw - 1) / sw;
                hi = iw0 >= W ? 0 : (W - iw0 + sw - 1) / sw;
                if (lo > len)
                    lo = len;
                if (hi > len)
                    hi = len;
                if (hi < lo)
                    hi = lo;
                for (i = 0; i < lo; ++i)
                    d[i] = 0u;
                {
                    const uint32_t *src = plane + ih * W + iw0;
                    if (sw == 1)
                        memcpy(d + lo, src + lo, (size_t)(hi - lo) * sizeof(uint32_t));
                    else
                        for (i = lo; i < hi; ++i)
                            d[i] = src[i * sw];
                }
                for (i = hi; i < len; ++i)
                    d[i] = 0u;
            }
            for (j = cnt; j < R; ++j)
                dst[j] = 0u;
        }
    }
}

/* ---- W^T packing context (batched linear) -------------------------------------- */
typedef struct fxs_wt_ctx {
    const uint32_t *w;
    int64_t row_words, out_features;
} fxs_wt_ctx;

/* ---- drivers ------------------------------------------------------------------------ */
typedef struct {
    fxs_gemm g;
    int64_t mc, nc, nb;
    float *bbuf;
    int64_t bbuf_stride;
} fxs_lin_gemm_ctx;

static void fxs_linear_gemm_job(void *vctx, int64_t job, int tid)
{
    const fxs_lin_gemm_ctx *c = (const fxs_lin_gemm_ctx *)vctx;
    int64_t mb = job / c->nb, nb = job % c->nb;
    int64_t m0 = mb * c->mc, n0 = nb * c->nc;
    int64_t mc = c->g.M - m0 < c->mc ? c->g.M - m0 : c->mc;
    int64_t nc = c->g.N - n0 < c->nc ? c->g.N - n0 : c->nc;
    fxs_gemm_block(&c->g, m0, mc, n0, nc, c->bbuf + (int64_t)tid * c->bbuf_stride);
}

/* Packs rows [0, M) of a row-major (M, K) float matrix into MR-panels over K. */
static void fxs_pack_a_floats(const float *src, int64_t M, int64_t K, int MR, float *ap)
{
    int64_t p, k;
    int i;
    for (p = 0; p < M; p += MR) {
        float *dst = ap + p * K;
        for (k = 0; k < K; ++k)
            for (i = 0; i < MR; ++i)
                dst[k * MR + i] = p + i < M ? src[(p + i) * K + k] : 0.0f;
    }
}

/* y (batch, O) = x (batch, K) W^T + bias with W decoded per block. */
static int fxs_linear_gemm(const fxs_linear_args *a, const fxs_gemm_isa *isa)
{
    fxs_lin_gemm_ctx c;
    fxs_wt_ctx wt;
    int nt = fxs_planned_threads();
    int64_t mb;
    float *ap;
    memset(&c, 0, sizeof c);
    c.g.M = a->batch;
    c.g.N = a->out_features;
    c.g.K = a->in_features;
    c.g.MR = isa->MR;
    c.g.NR = isa->NR;
    fxs_gemm_blocking(c.g.M, c.g.N, isa->MR, isa->NR, 1, nt, 240, 256, &c.mc, &c.nc);
    ap = (float *)fxs_alloc(fxs_bytes3((c.g.M + isa->MR - 1) / isa->MR * isa->MR, c.g.K, 4));
    c.bbuf_stride = FXS_KC * c.nc;
    c.bbuf = (float *)fxs_alloc(fxs_bytes3(nt, c.bbuf_stride, 4));
    if (!ap || !c.bbuf) {
        fxs_free(ap);
        fxs_free(c.bbuf);
        return FXS_ERR_OUT_OF_MEMORY;
    }
    fxs_pack_a_floats((const float *)a->x, a->batch, a->in_features, isa->MR, ap);
    wt.w = a->w;
    wt.row_words = a->row_words;
    wt.out_features = a->out_features;
    c.g.ap = ap;
    c.g.pack_b = isa->pack_b_wt[a->bits - 2][a->has_zero];
    c.g.ctx_b = &wt;
    c.g.ukernel = isa->ukernel;
    c.g.c = a->y;
    c.g.rs_c = a->out_features;
    c.g.cs_c = 1;
    c.g.bias_n = (const float *)a->bias;
    c.nb = (c.g.N + c.nc - 1) / c.nc;
    mb = (c.g.M + c.mc - 1) / c.mc;
    fxs_parallel(mb * c.nb, nt, fxs_linear_gemm_job, &c);
    fxs_free(ap);
    fxs_free(c.bbuf);
    return FXS_OK;
}

typedef struct {
    const fxs_conv_args *a;
    int MR;
    fxs_pack_a_codes_fn pack_a_codes;
    float *ap;        /* groups x panels x K x MR */
    int64_t ap_group; /* floats per group */
} fxs_conv_apack_ctx;

static void fxs_conv_apack_job(void *vctx, int64_t job, int tid)
{
    const fxs_conv_apack_ctx *c = (const fxs_conv_apack_ctx *)vctx;
    const fxs_conv_args *a = c->a;
    int MR = c->MR;
    int64_t K = a->z.k, Mg = a->z.o_per_group;
    int64_t panels = (Mg + MR - 1) / MR;
    int64_t g = job / panels, p = job % panels;
    int64_t rows = Mg - p * MR < MR ? Mg - p * MR : MR;
    (void)tid;
    c->pack_a_codes(a->w + (g * Mg + p * MR) * a->z.row_words, a->z.row_words, (int)rows, K,
                    a->bits, a->has_zero, c->ap + g * c->ap_group + p * MR * K);
}

typedef struct {
    const fxs_conv_args *a;
    const fxs_gemm_isa *isa;
    const float *ap;
    int64_t ap_group;
    const fxs_conv_tap *taps;
    int64_t mc, nc, mb, nb;
    float *bbuf;
    int64_t bbuf_stride;
} fxs_conv_ctx;

static void fxs_conv_job(void *vctx, int64_t job, int tid)
{
    const fxs_conv_ctx *c = (const fxs_conv_ctx *)vctx;
    const fxs_conv_args *a = c->a;
    const fxs_conv2d_shape *s = &a->s;
    int64_t per_inst = c->mb * c->nb;
    int64_t inst = job / per_inst, rem = job % per_inst;
    int64_t n = inst / s->groups, g = inst % s->groups;
    int64_t mb = rem / c->nb, nb = rem % c->nb;
    int64_t Mg = a->z.o_per_group, P = a->z.out_h * a->z.out_w;
    int64_t m0 = mb * c->mc, n0 = nb * c->nc;
    fxs_im2col ic;
    fxs_gemm gm;
    ic.x = (const uint32_t *)a->x + (n * s->c + g * a->z.c_per_group) * s->h * s->w;
    ic.h = s->h;
    ic.w = s->w;
    ic.out_w = a->z.out_w;
    ic.stride_h = s->stride_h;
    ic.stride_w = s->stride_w;
    ic.taps = c->taps;
    gm.M = Mg;
    gm.N = P;
    gm.K = a->z.k;
    gm.MR = c->isa->MR;
    gm.NR = c->isa->NR;
    gm.ap = c->ap + g * c->ap_group;
    gm.pack_b = c->isa->pack_b_im2col;
    gm.ctx_b = &ic;
    gm.ukernel = c->isa->ukernel;
    gm.c = a->y + (n * s->out_channels + g * Mg) * P;
    gm.rs_c = P;
    gm.cs_c = 1;
    gm.bias_m = a->bias ? (const float *)a->bias + g * Mg : NULL;
    gm.bias_n = NULL;
    fxs_gemm_block(&gm, m0, Mg - m0 < c->mc ? Mg - m0 : c->mc, n0, P - n0 < c->nc ? P - n0 : c->nc,
                   c->bbuf + (int64_t)tid * c->bbuf_stride);
}

static int fxs_conv2d_gemm(const fxs_conv_args *a, const fxs_gemm_isa *isa)
{
    fxs_conv_apack_ctx pc;
    fxs_conv_ctx c;
    int nt = fxs_planned_threads();
    int64_t K = a->z.k, Mg = a->z.o_per_group, P = a->z.out_h * a->z.out_w;
    int64_t panels = (Mg + isa->MR - 1) / isa->MR;
    fxs_conv_tap *taps;
    int st = FXS_OK;
    memset(&c, 0, sizeof c);
    pc.a = a;
    pc.MR = isa->MR;
    pc.pack_a_codes = isa->pack_a_codes;
    pc.ap_group = panels * isa->MR * K;
    pc.ap = (float *)fxs_alloc(fxs_bytes3(a->s.groups, pc.ap_group, 4));
    taps = (fxs_conv_tap *)fxs_alloc(fxs_bytes3(K, sizeof(fxs_conv_tap), 1));
    fxs_gemm_blocking(Mg, P, isa->MR, isa->NR, a->s.n * a->s.groups, nt, 480, 256, &c.mc, &c.nc);
    c.bbuf_stride = FXS_KC * c.nc;
    c.bbuf = (float *)fxs_alloc(fxs_bytes3(nt, c.bbuf_stride, 4));
    if (!pc.ap || !taps || !c.bbuf) {
        st = FXS_ERR_OUT_OF_MEMORY;
        goto done;
    }
    fxs_parallel(a->s.groups * panels, nt, fxs_conv_apack_job, &pc);
    fxs_conv_taps(&a->s, a->z.c_per_group, taps);
    c.a = a;
    c.isa = isa;
    c.ap = pc.ap;
    c.ap_group = pc.ap_group;
    c.taps = taps;
    c.mb = (Mg + c.mc - 1) / c.mc;
    c.nb = (P + c.nc - 1) / c.nc;
    fxs_parallel(a->s.n * a->s.groups * c.mb * c.nb, nt, fxs_conv_job, &c);
done:
    fxs_free(pc.ap);
    fxs_free(taps);
    fxs_free(c.bbuf);
    return st;
}

/* ---- direct convolution (no im2col) ----------------------------------------------------
 * The zero-padded input is copied once per call, split into stride phases:
 * channel c, phase (py, px) is a plane of Hq x Wq values with
 *     plane[r][q] = xpad[r * sh + py][q * sw + px]      (Hq = ceil(Hp / sh), Wq = ceil(Wp / sw)).
 * Outputs are computed over "wide" positions p = oh * Wq + ow, ow < Wq: for
 * tap (ci, ky, kx) the input of every position is plane(ci, ky*dh % sh, kx*dw % sw)
 * at p + (ky*dh / sh) * Wq + (kx*dw / sw), so NR consecutive positions are one
 * contiguous load at a per-tap offset -- for any stride, dilation and padding.
 * Columns ow >= out_w are computed and dropped (2/58 of the work at 56x56,
 * 3x3, pad 1).  Images are laid out one after another; reads of the dropped
 * positions may run into the next image or the zeroed slack at the end. */
typedef struct {
    const fxs_conv_args *a;
    float *xq;                 /* phase planes of images n0.. (+ slack) */
    int64_t n0;                /* first image held in xq */
    int64_t Hq, Wq, plane, chan_stride, img_floats;
    int nphase;                /* phases the taps use */
    int phase_y[64], phase_x[64];
} fxs_direct_fill_ctx;

/* One plane row: drow[q] = src[q * sw + x0] where 0 <= q * sw + x0 < w, else 0. */
static inline void fxs_fill_row(float *drow, int64_t Wq, const float *src, int64_t w, int64_t sw,
                                int64_t x0)
{
    int64_t lo = x0 >= 0 ? 0 : (-x0 + sw - 1) / sw;
    int64_t hi = x0 >= w ? 0 : (w - x0 + sw - 1) / sw, q;
    if (lo > Wq)
        lo = Wq;
    if (hi > Wq)
        hi = Wq;
    if (hi < lo)
        hi = lo;
    memset(drow, 0, (size_t)lo * sizeof(float));
    if (sw == 1) {
        memcpy(drow + lo, src + lo + x0, (size_t)(hi - lo) * sizeof(float));
    } else if (sw == 2) { /* constant stride: vectorised (even/odd deinterleave) */
        const float *sp = src + x0;
        for (q = lo; q < hi; ++q)
            drow[q] = sp[2 * q];
    } else {
        const float *sp = src + x0;
        for (q = lo; q < hi; ++q)
            drow[q] = sp[q * sw];
    }
    memset(drow + hi, 0, (size_t)(Wq - hi) * sizeof(float));
}

static void fxs_direct_fill_job(void *vctx, int64_t job, int tid)
{
    const fxs_direct_fill_ctx *c = (const fxs_direct_fill_ctx *)vctx;
    const fxs_conv2d_shape *s = &c->a->s;
    const float *x = (const float *)c->a->x;
    int64_t n = job / s->c, ch = job % s->c, r;
    const float *src = x + ((c->n0 + n) * s->c + ch) * s->h * s->w;
    float *dst = c->xq + n * c->img_floats + ch * c->chan_stride;
    int ph;
    (void)tid;
    for (ph = 0; ph < c->nphase; ++ph, dst += c->plane)
        for (r = 0; r < c->Hq; ++r) {
            int64_t ih = r * s->stride_h + c->phase_y[ph] - s->pad_h;
            if (ih < 0 || ih >= s->h)
                memset(dst + r * c->Wq, 0, (size_t)c->Wq * sizeof(float));
            else
                fxs_fill_row(dst + r * c->Wq, c->Wq, src + ih * s->w, s->w, s->stride_w,
                             c->phase_x[ph] - s->pad_w);
        }
}

#define FXS_DIRECT_A_BYTES (1 << 20)   /* decoded weights per job: about half an L2 */
#define FXS_DIRECT_IMG_BYTES (1 << 18) /* phase copies above this go one image at a time */

typedef struct {
    const fxs_conv_args *a;
    const fxs_direct_cfg *cfg;
    const float *xq;           /* phase planes of images n0 .. n0 + nimg */
    int64_t n0, nimg;
    const int64_t *off;
    int64_t Wq, chan_stride, img_floats;
    int64_t tiles;             /* tiles per image */
    int64_t panels;            /* A panels per group */
    int64_t panel_blk, n_pb;   /* blocks of panels */
    int64_t tile_blk, n_tb;    /* blocks over the (image, tile) pairs */
    int64_t ap_stride;         /* floats per thread in ap */
    float *ap;                 /* per thread: panel_blk decoded A panels (K x MR each) */
    float *tmp;                /* per thread: MR * NR floats */
} fxs_direct_ctx;

/* job = (group, block of panels, block of (image, tile) pairs): the block's
 * weights are decoded into a thread-local buffer (<= FXS_DIRECT_A_BYTES, stays
 * in L2), then each tile's input is used for every panel while it is in L1. */
static void fxs_direct_job(void *vctx, int64_t job, int tid)
{
    const fxs_direct_ctx *c = (const fxs_direct_ctx *)vctx;
    const fxs_conv_args *a = c->a;
    const fxs_conv2d_shape *s = &a->s;
    const int MR = c->cfg->MR, NR = c->cfg->NR;
    int64_t per_g = c->n_pb * c->n_tb;
    int64_t g = job / per_g, rem = job % per_g;
    int64_t pb = rem / c->n_tb, tb = rem % c->n_tb;
    int64_t Mg = a->z.o_per_group, out_w = a->z.out_w, out_h = a->z.out_h, K = a->z.k;
    int64_t P = out_h * out_w, it, p;
    int64_t p0 = pb * c->panel_blk, p1 = p0 + c->panel_blk < c->panels ? p0 + c->panel_blk : c->panels;
    int64_t it1 = (tb + 1) * c->tile_blk < c->nimg * c->tiles ? (tb + 1) * c->tile_blk
                                                                : c->nimg * c->tiles;
    const float *bias = (const float *)a->bias;
    float *ap = c->ap + (int64_t)tid * c->ap_stride;
    float *tmp = c->tmp + (int64_t)tid * MR * NR;
    for (p = p0; p < p1; ++p) {
        int64_t o = g * Mg + p * MR;
        int rows = (int)(Mg - p * MR < MR ? Mg - p * MR : MR);
        c->cfg->pack_a_codes(a->w + o * a->z.row_words, a->z.row_words, rows, K, a->bits,
                             a->has_zero, ap + (p - p0) * MR * K);
    }
    for (it = tb * c->tile_blk; it < it1; ++it) {
        int64_t n = it / c->tiles, t = it % c->tiles;
        const float *bimg = c->xq + n * c->img_floats + g * a->z.c_per_group * c->chan_stride;
        int64_t q0 = t * NR;
        for (p = p0; p < p1; ++p) {
            int64_t o = g * Mg + p * MR, j = 0;
            int rows = (int)(Mg - p * MR < MR ? Mg - p * MR : MR);
            float *yimg = a->y + ((c->n0 + n) * s->out_channels + o) * P;
            c->cfg->ukernel_ind(K, ap + (p - p0) * MR * K, bimg + q0, c->off, tmp);
            /* scatter the valid columns: one contiguous run per output row */
            while (j < NR) {
                int64_t q = q0 + j, oh = q / c->Wq, ow = q % c->Wq, len;
                if (oh >= out_h)
                    break;
                len = c->Wq - ow;
                if (len > NR - j)
                    len = NR - j;
                if (ow < out_w) {
                    int64_t valid = out_w - ow < len ? out_w - ow : len;
                    c->cfg->tile_store(tmp, rows, (int)j, (int)valid, yimg + oh * out_w + ow, P,
                                       bias ? bias + o : NULL);
                }
                j += (int)len;
            }
        }
    }
}

/* Returns FXS_OK, FXS_ERR_OUT_OF_MEMORY, or 1 when the padded copy would be
 * unreasonably large (huge padding): the caller then uses the im2col path. */
static int fxs_conv2d_direct(const fxs_conv_args *a, const fxs_gemm_isa *isa)
{
    const fxs_conv2d_shape *s = &a->s;
    const fxs_direct_cfg *cfg = &isa->direct[0];
    int MR, NR;
    fxs_direct_fill_ctx fc;
    fxs_direct_ctx c;
    int nt = fxs_planned_threads();
    int64_t Hp = s->h + 2 * s->pad_h, Wp = s->w + 2 * s->pad_w, K = a->z.k, Mg = a->z.o_per_group;
    int64_t Hq = (Hp + s->stride_h - 1) / s->stride_h, Wq = (Wp + s->stride_w - 1) / s->stride_w;
    int64_t plane, chan_stride, img_floats, total, ci, ky, kx, k, nimg, n0;
    int64_t want = (int64_t)nt * 4, jobs;
    int64_t *off = NULL;
    int st = FXS_OK, ph, phase_of[8][8];
    /* Sizes (all fit easily once the input fits; guard against huge padding). */
    if (Hq > ((int64_t)1 << 24) || Wq > ((int64_t)1 << 24) || s->stride_h > 8 || s->stride_w > 8)
        return 1;
    /* A small conv runs on the calling thread: waking a pool costs more than it saves. */
    {
        int64_t macs;
        if (!fxs_mul_ok(s->n * s->out_channels, a->z.out_h * a->z.out_w, &macs) ||
            !fxs_mul_ok(macs, K, &macs))
            macs = INT64_MAX;
        if (macs < FXS_PARALLEL_MIN_MACS)
            nt = 1;
    }
    plane = Hq * Wq;
    /* Only the stride phases some tap reads are materialised (one for a 1x1 s2). */
    memset(phase_of, -1, sizeof phase_of);
    fc.nphase = 0;
    for (ky = 0; ky < s->kh && fc.nphase < 64; ++ky)
        for (kx = 0; kx < s->kw && fc.nphase < 64; ++kx) {
            int py = (int)((ky * s->dilation_h) % s->stride_h);
            int px = (int)((kx * s->dilation_w) % s->stride_w);
            if (phase_of[py][px] < 0) {
                phase_of[py][px] = fc.nphase;
                fc.phase_y[fc.nphase] = py;
                fc.phase_x[fc.nphase] = px;
                ++fc.nphase;
            }
        }
    chan_stride = fc.nphase * plane;
    /* Tile shape with the least padding waste: channels rounded up to MR,
     * wide positions to NR. */
    {
        double best = -1.0;
        int i;
        for (i = 0; i < isa->ndirect; ++i) {
            const fxs_direct_cfg *d = &isa->direct[i];
            double em = (double)Mg / (double)((Mg + d->MR - 1) / d->MR * d->MR);
            double en = (double)(a->z.out_h * a->z.out_w) /
                        (double)((a->z.out_h * Wq + d->NR - 1) / d->NR * d->NR);
            if (em * en > best + 1e-9) {
                best = em * en;
                cfg = d;
            }
        }
    }
    MR = cfg->MR;
    NR = cfg->NR;
    if (!fxs_mul_ok(s->c, chan_stride, &img_floats) || !fxs_mul_ok(s->n, img_floats, &total) ||
        total > 4 * s->n * s->c * s->h * s->w + ((int64_t)1 << 20))
        return 1;
    memset(&c, 0, sizeof c);
    c.Wq = Wq;
    c.tiles = (a->z.out_h * Wq + NR - 1) / NR;
    /* Images whose copy is large go one at a time, so it is still in L2 when
     * the tiles read it; small ones are batched (more tiles per weight decode). */
    nimg = img_floats * (int64_t)sizeof(float) > FXS_DIRECT_IMG_BYTES ? 1 : s->n;
    total = nimg * img_floats + c.tiles * NR + 64; /* slack for the dropped positions' reads */
    fc.a = a;
    fc.Hq = Hq;
    fc.Wq = Wq;
    fc.plane = plane;
    fc.chan_stride = chan_stride;
    fc.img_floats = img_floats;
    fc.xq = (float *)fxs_alloc(fxs_bytes3(total, 4, 1));
    c.panels = (Mg + MR - 1) / MR;
    c.panel_blk = FXS_DIRECT_A_BYTES / (MR * K * 4);
    if (c.panel_blk < 1)
        c.panel_blk = 1;
    if (c.panel_blk > c.panels)
        c.panel_blk = c.panels;
    c.n_pb = (c.panels + c.panel_blk - 1) / c.panel_blk;
    c.ap_stride = ((c.panel_blk * K * MR) + 15) & ~(int64_t)15;
    c.ap = (float *)fxs_alloc(fxs_bytes3(nt, c.ap_stride, 4));
    off = (int64_t *)fxs_alloc(fxs_bytes3(K, 8, 1));
    c.tmp = (float *)fxs_alloc(fxs_bytes3(nt, (int64_t)MR * NR, 4));
    if (!fc.xq || !c.ap || !off || !c.tmp) {
        st = FXS_ERR_OUT_OF_MEMORY;
        goto done;
    }
    memset(fc.xq + nimg * img_floats, 0, (size_t)(total - nimg * img_floats) * sizeof(float));
    for (ci = 0, k = 0; ci < a->z.c_per_group; ++ci)
        for (ky = 0; ky < s->kh; ++ky)
            for (kx = 0; kx < s->kw; ++kx, ++k) {
                int64_t dy = ky * s->dilation_h, dx = kx * s->dilation_w;
                ph = phase_of[dy % s->stride_h][dx % s->stride_w];
                off[k] = ci * chan_stride + ph * plane + (dy / s->stride_h) * Wq + dx / s->stride_w;
            }
    /* Jobs: (group, panel block) x blocks of (image, tile) pairs.  Each job
     * decodes its panels once, so tile blocks stay large (>= 4 tiles when
     * possible) unless the threads need more jobs. */
    {
        int64_t pairs = nimg * c.tiles, gp = s->groups * c.n_pb;
        c.tile_blk = pairs;
        while (c.tile_blk > 4 && gp * ((pairs + c.tile_blk - 1) / c.tile_blk) < want)
            c.tile_blk = (c.tile_blk + 1) / 2;
        if (c.tile_blk > 64)
            c.tile_blk = 64; /* load balance */
        c.n_tb = (pairs + c.tile_blk - 1) / c.tile_blk;
        jobs = gp * c.n_tb;
    }
    c.a = a;
    c.cfg = cfg;
    c.xq = fc.xq;
    c.off = off;
    c.chan_stride = chan_stride;
    c.img_floats = img_floats;
    c.nimg = nimg;
    for (n0 = 0; n0 < s->n; n0 += nimg) {
        fc.n0 = c.n0 = n0;
        /* the padded copy: on the pool only when it is large */
        fxs_parallel(nimg * s->c, nimg * img_floats < FXS_PARALLEL_MIN_COPY ? 1 : nt,
                     fxs_direct_fill_job, &fc);
        fxs_parallel(jobs, nt, fxs_direct_job, &c);
    }
done:
    fxs_free(fc.xq);
    fxs_free(c.ap);
    fxs_free(off);
    fxs_free(c.tmp);
    return st;
}

/* Float conv2d: direct when the padded copy is reasonable, else im2col GEMM. */
static int fxs_conv2d_f32(const fxs_conv_args *a, const fxs_gemm_isa *isa)
{
    int st = fxs_conv2d_direct(a, isa);
    return st == 1 ? fxs_conv2d_gemm(a, isa) : st;
}

#endif /* FXS_GEMM_COMMON_H */
