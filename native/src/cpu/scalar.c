/*
 * scalar.c - the portable reference kernels: the specification every ISA
 * variant is tested against.  Straight loops over the math of fxs_elem.h,
 * summing in natural (k, then c/ky/kx) order; parallel over output rows only.
 */
#include <string.h>

#include "fxs_internal.h"

void fxs_scalar_decode_row(const uint32_t *row, int64_t j0, int64_t n, int bits, int has_zero,
                           float *out)
{
    int64_t j;
    for (j = 0; j < n; ++j)
        out[j] = fxs_elem_decode(fxs_elem_code_at(row, j0 + j, bits), bits, has_zero);
}

static void decode_codes(const uint32_t *row, int64_t k, int bits, uint32_t *out)
{
    int64_t j;
    for (j = 0; j < k; ++j)
        out[j] = fxs_elem_code_at(row, j, bits);
}

/* ---- linear ------------------------------------------------------------------ */
typedef struct {
    const fxs_linear_args *a;
    void *scratch; /* per thread: K floats or K codes */
    int64_t stride;
} lin_ctx;

static void linear_f32_job(void *vctx, int64_t o, int tid)
{
    const lin_ctx *c = (const lin_ctx *)vctx;
    const fxs_linear_args *a = c->a;
    const float *x = (const float *)a->x;
    const float *bias = (const float *)a->bias;
    float *wrow = (float *)c->scratch + (int64_t)tid * c->stride;
    int64_t b, k, K = a->in_features;
    fxs_scalar_decode_row(a->w + o * a->row_words, 0, K, a->bits, a->has_zero, wrow);
    for (b = 0; b < a->batch; ++b) {
        const float *xb = x + b * K;
        /* Without a scale the sum starts from the bias; with one the bias
         * comes after the scaling: y = fl(fl(sum * scale) + bias). */
        float acc = (bias && !a->scale) ? bias[o] : 0.0f;
        for (k = 0; k < K; ++k)
            acc += wrow[k] * xb[k];
        if (a->scale) {
            acc = acc * a->scale[o];
            if (bias)
                acc = acc + bias[o];
        }
        a->y[b * a->out_features + o] = acc;
    }
}

static void linear_fixed_job(void *vctx, int64_t o, int tid)
{
    const lin_ctx *c = (const lin_ctx *)vctx;
    const fxs_linear_args *a = c->a;
    const int32_t *x = (const int32_t *)a->x;
    const int32_t *bias = (const int32_t *)a->bias;
    uint32_t *codes = (uint32_t *)c->scratch + (int64_t)tid * c->stride;
    int64_t b, k, K = a->in_features;
    decode_codes(a->w + o * a->row_words, K, a->bits, codes);
    for (b = 0; b < a->batch; ++b) {
        const int32_t *xb = x + b * K;
        int64_t acc = bias ? (int64_t)bias[o] : 0;
        for (k = 0; k < K; ++k)
            acc += fxs_elem_shift_term(xb[k], codes[k], a->bits, a->has_zero);
        a->y[b * a->out_features + o] = fxs_elem_fixed_to_float(acc, a->frac_bits);
    }
}

static int run_linear(const fxs_linear_args *a, fxs_job_fn fn)
{
    lin_ctx c;
    int nt = fxs_planned_threads();
    c.a = a;
    c.stride = (a->in_features + 15) & ~(int64_t)15;
    c.scratch = fxs_alloc(fxs_bytes3(nt, c.stride, 4));
    if (!c.scratch)
        return FXS_ERR_OUT_OF_MEMORY;
    fxs_parallel(a->out_features, nt, fn, &c);
    fxs_free(c.scratch);
    return FXS_OK;
}

static int scalar_linear_f32(const fxs_linear_args *a) { return run_linear(a, linear_f32_job); }
static int scalar_linear_fixed(const fxs_linear_args *a) { return run_linear(a, linear_fixed_job); }

/* ---- conv2d ------------------------------------------------------------------ */
typedef struct {
    const fxs_conv_args *a;
    void *scratch;
    int64_t stride;
} conv_ctx;

/* Input index of tap (ci, ky, kx) for output (oh, ow), or -1 in the padding. */
static inline int64_t tap_index(const fxs_conv2d_shape *s, int64_t plane, int64_t oh, int64_t ow,
                                int64_t ky, int64_t kx)
{
    int64_t ih = oh * s->stride_h - s->pad_h + ky * s->dilation_h;
    int64_t iw = ow * s->stride_w - s->pad_w + kx * s->dilation_w;
    if (ih < 0 || ih >= s->h || iw < 0 || iw >= s->w)
        return -1;
    return plane + ih * s->w + iw;
}

/* job = n * out_channels + o */
static void conv_f32_job(void *vctx, int64_t job, int tid)
{
    const conv_ctx *c = (const conv_ctx *)vctx;
    const fxs_conv_args *a = c->a;
    const fxs_conv2d_shape *s = &a->s;
    const fxs_conv_sizes *z = &a->z;
    const float *x = (const float *)a->x;
    const float *bias = (const float *)a->bias;
    float *wrow = (float *)c->scratch + (int64_t)tid * c->stride;
    int64_t n = job / s->out_channels, o = job % s->out_channels;
    int64_t g = o / z->o_per_group;
    int64_t oh, ow, ci, ky, kx;
    float *y = a->y + (n * s->out_channels + o) * z->out_h * z->out_w;
    fxs_scalar_decode_row(a->w + o * z->row_words, 0, z->k, a->bits, a->has_zero, wrow);
    for (oh = 0; oh < z->out_h; ++oh) {
        for (ow = 0; ow < z->out_w; ++ow) {
            float acc = (bias && !a->scale) ? bias[o] : 0.0f; /* see linear_f32_job */
            const float *wp = wrow;
            for (ci = 0; ci < z->c_per_group; ++ci) {
                int64_t plane = ((n * s->c) + g * z->c_per_group + ci) * s->h * s->w;
                for (ky = 0; ky < s->kh; ++ky) {
                    for (kx = 0; kx < s->kw; ++kx, ++wp) {
                        int64_t idx = tap_index(s, plane, oh, ow, ky, kx);
                        if (idx >= 0)
                            acc += *wp * x[idx];
                    }
                }
            }
            if (a->scale) {
                acc = acc * a->scale[o];
                if (bias)
                    acc = acc + bias[o];
            }
            y[oh * z->out_w + ow] = acc;
        }
    }
}

static void conv_fixed_job(void *vctx, int64_t job, int tid)
{
    const conv_ctx *c = (const conv_ctx *)vctx;
    const fxs_conv_args *a = c->a;
    const fxs_conv2d_shape *s = &a->s;
    const fxs_conv_sizes *z = &a->z;
    const int32_t *x = (const int32_t *)a->x;
    const int32_t *bias = (const int32_t *)a->bias;
    uint32_t *codes = (uint32_t *)c->scratch + (int64_t)tid * c->stride;
    int64_t n = job / s->out_channels, o = job % s->out_channels;
    int64_t g = o / z->o_per_group;
    int64_t oh, ow, ci, ky, kx;
    float *y = a->y + (n * s->out_channels + o) * z->out_h * z->out_w;
    decode_codes(a->w + o * z->row_words, z->k, a->bits, codes);
    for (oh = 0; oh < z->out_h; ++oh) {
        for (ow = 0; ow < z->out_w; ++ow) {
            int64_t acc = bias ? (int64_t)bias[o] : 0;
            const uint32_t *cp = codes;
            for (ci = 0; ci < z->c_per_group; ++ci) {
                int64_t plane = ((n * s->c) + g * z->c_per_group + ci) * s->h * s->w;
                for (ky = 0; ky < s->kh; ++ky) {
                    for (kx = 0; kx < s->kw; ++kx, ++cp) {
                        int64_t idx = tap_index(s, plane, oh, ow, ky, kx);
                        if (idx >= 0)
                            acc += fxs_elem_shift_term(x[idx], *cp, a->bits, a->has_zero);
                    }
                }
            }
            y[oh * z->out_w + ow] = fxs_elem_fixed_to_float(acc, a->frac_bits);
        }
    }
}

static int run_conv(const fxs_conv_args *a, fxs_job_fn fn)
{
    conv_ctx c;
    int nt = fxs_planned_threads();
    c.a = a;
    c.stride = (a->z.k + 15) & ~(int64_t)15;
    c.scratch = fxs_alloc(fxs_bytes3(nt, c.stride, 4));
    if (!c.scratch)
        return FXS_ERR_OUT_OF_MEMORY;
    fxs_parallel(a->s.n * a->s.out_channels, nt, fn, &c);
    fxs_free(c.scratch);
    return FXS_OK;
}

static int scalar_conv2d_f32(const fxs_conv_args *a) { return run_conv(a, conv_f32_job); }
static int scalar_conv2d_fixed(const fxs_conv_args *a) { return run_conv(a, conv_fixed_job); }

const fxs_kernels fxs_kernels_scalar = {
    FXS_ISA_SCALAR,     scalar_linear_f32,   scalar_conv2d_f32,
    scalar_linear_fixed, scalar_conv2d_fixed, fxs_scalar_decode_row,
};
