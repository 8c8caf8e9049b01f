/*
 * fxs_check.h - argument validation shared by the CPU library and the CUDA
 * library (host code only).  Each check returns FXS_OK or the fxs_status of
 * the first problem found, in a fixed order: null pointers, bits/flags, sizes,
 * geometry, buffer lengths.  On success the derived sizes are filled in.
 */
#ifndef FXS_CHECK_H
#define FXS_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "fxshift.h"
#include "fxs_elem.h"

/* Largest single dimension accepted; products are checked for overflow. */
#define FXS_MAX_DIM ((int64_t)0x7fffffff)

static inline int fxs_mul_ok(int64_t a, int64_t b, int64_t *out)
{
    /* a, b >= 0 */
    if (a != 0 && b > INT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static inline int fxs_check_format(int bits, int has_zero)
{
    if (bits < FXS_MIN_BITS || bits > FXS_MAX_BITS)
        return FXS_ERR_BAD_BITS;
    if (has_zero != 0 && has_zero != 1)
        return FXS_ERR_BAD_BITS;
    return FXS_OK;
}

static inline int fxs_dim_ok(int64_t d) { return d >= 1 && d <= FXS_MAX_DIM; }

/* Words of a packed (rows, k) tensor; FXS_ERR_BAD_SIZE on overflow. */
static inline int fxs_packed_words(int64_t rows, int64_t k, int bits, int64_t *row_words,
                                   int64_t *total)
{
    *row_words = fxs_elem_row_words(k, bits);
    return fxs_mul_ok(rows, *row_words, total) ? FXS_OK : FXS_ERR_BAD_SIZE;
}

/* Derived sizes of a linear call. */
typedef struct fxs_linear_sizes {
    int64_t row_words;
} fxs_linear_sizes;

static inline int fxs_check_linear(const void *x, int64_t x_len, int64_t batch, int64_t in_features,
                                   const uint32_t *w, int64_t w_words, int64_t out_features,
                                   int bits, int has_zero, const void *bias, int64_t bias_len,
                                   const void *y, int64_t y_len, fxs_linear_sizes *sz)
{
    int64_t xn, yn, wn;
    int st;
    (void)bias;
    if (!x || !w || !y)
        return FXS_ERR_NULL_POINTER;
    if ((st = fxs_check_format(bits, has_zero)) != FXS_OK)
        return st;
    if (!fxs_dim_ok(batch) || !fxs_dim_ok(in_features) || !fxs_dim_ok(out_features))
        return FXS_ERR_BAD_SIZE;
    if (!fxs_mul_ok(batch, in_features, &xn) || !fxs_mul_ok(batch, out_features, &yn))
        return FXS_ERR_BAD_SIZE;
    if ((st = fxs_packed_words(out_features, in_features, bits, &sz->row_words, &wn)) != FXS_OK)
        return st;
    if (w_words != wn)
        return FXS_ERR_WORD_COUNT;
    if (x_len != xn)
        return FXS_ERR_INPUT_SIZE;
    if (bias && bias_len != out_features)
        return FXS_ERR_BIAS_SIZE;
    if (y_len != yn)
        return FXS_ERR_OUTPUT_SIZE;
    return FXS_OK;
}

/* Derived sizes of a conv2d call. */
typedef struct fxs_conv_sizes {
    int64_t out_h, out_w;
    int64_t c_per_group, o_per_group;
    int64_t k;          /* (c / groups) * kh * kw: the packed row length */
    int64_t row_words;
} fxs_conv_sizes;

static inline int fxs_check_conv_geometry(const fxs_conv2d_shape *s, fxs_conv_sizes *sz)
{
    int64_t span_h, span_w, in_h, in_w, k;
    if (!s)
        return FXS_ERR_NULL_POINTER;
    if (!fxs_dim_ok(s->n) || !fxs_dim_ok(s->c) || !fxs_dim_ok(s->h) || !fxs_dim_ok(s->w) ||
        !fxs_dim_ok(s->out_channels) || !fxs_dim_ok(s->kh) || !fxs_dim_ok(s->kw))
        return FXS_ERR_BAD_SIZE;
    if (!fxs_dim_ok(s->stride_h) || !fxs_dim_ok(s->stride_w) || !fxs_dim_ok(s->dilation_h) ||
        !fxs_dim_ok(s->dilation_w) || s->pad_h < 0 || s->pad_w < 0 || s->pad_h > FXS_MAX_DIM ||
        s->pad_w > FXS_MAX_DIM)
        return FXS_ERR_CONV_GEOMETRY;
    if (!fxs_dim_ok(s->groups) || s->c % s->groups != 0 || s->out_channels % s->groups != 0)
        return FXS_ERR_GROUPS;
    /* All terms below are < 2^62: no overflow. */
    span_h = s->dilation_h * (s->kh - 1) + 1;
    span_w = s->dilation_w * (s->kw - 1) + 1;
    in_h = s->h + 2 * s->pad_h;
    in_w = s->w + 2 * s->pad_w;
    if (in_h < span_h || in_w < span_w)
        return FXS_ERR_CONV_GEOMETRY;
    sz->out_h = (in_h - span_h) / s->stride_h + 1;
    sz->out_w = (in_w - span_w) / s->stride_w + 1;
    sz->c_per_group = s->c / s->groups;
    sz->o_per_group = s->out_channels / s->groups;
    /* K <= FXS_MAX_DIM also bounds the fixed-point sums (see fxshift.h). */
    if (!fxs_mul_ok(sz->c_per_group, s->kh, &k) || !fxs_mul_ok(k, s->kw, &k) || k > FXS_MAX_DIM)
        return FXS_ERR_BAD_SIZE;
    sz->k = k;
    sz->row_words = 0; /* depends on bits: set by fxs_check_conv */
    return FXS_OK;
}

static inline int fxs_check_conv(const fxs_conv2d_shape *s, const void *x, int64_t x_len,
                                 const uint32_t *w, int64_t w_words, int bits, int has_zero,
                                 const void *bias, int64_t bias_len, const void *y, int64_t y_len,
                                 fxs_conv_sizes *sz)
{
    int64_t xn, yn, wn;
    int st;
    if (!s || !x || !w || !y)
        return FXS_ERR_NULL_POINTER;
    if ((st = fxs_check_format(bits, has_zero)) != FXS_OK)
        return st;
    if ((st = fxs_check_conv_geometry(s, sz)) != FXS_OK)
        return st;
    if ((st = fxs_packed_words(s->out_channels, sz->k, bits, &sz->row_words, &wn)) != FXS_OK)
        return st;
    if (!fxs_mul_ok(s->n, s->c, &xn) || !fxs_mul_ok(xn, s->h, &xn) || !fxs_mul_ok(xn, s->w, &xn))
        return FXS_ERR_BAD_SIZE;
    if (!fxs_mul_ok(s->n, s->out_channels, &yn) || !fxs_mul_ok(yn, sz->out_h, &yn) ||
        !fxs_mul_ok(yn, sz->out_w, &yn))
        return FXS_ERR_BAD_SIZE;
    if (w_words != wn)
        return FXS_ERR_WORD_COUNT;
    if (x_len != xn)
        return FXS_ERR_INPUT_SIZE;
    if (bias && bias_len != s->out_channels)
        return FXS_ERR_BIAS_SIZE;
    if (y_len != yn)
        return FXS_ERR_OUTPUT_SIZE;
    return FXS_OK;
}

static inline int fxs_check_frac_bits(int frac_bits)
{
    return (frac_bits >= 0 && frac_bits <= 31) ? FXS_OK : FXS_ERR_FRAC_BITS;
}

#endif /* FXS_CHECK_H */
