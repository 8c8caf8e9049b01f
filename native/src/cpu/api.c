/*
 * api.c - the exported entry points: validate, then hand over to the kernel
 * table that dispatch chose once at load time.  Also pack/unpack (scalar:
 * they run once per model) and the ISA selection.
 */
#include <stdlib.h>
#include <string.h>

#include "fxs_internal.h"

int fxs_abi_version(void) { return FXS_ABI_VERSION; }

const char *fxs_status_message(int status)
{
    switch (status) {
    case FXS_OK: return "ok";
    case FXS_ERR_NULL_POINTER: return "a required pointer is NULL";
    case FXS_ERR_BAD_SIZE: return "a dimension is out of range (< 1 or > 2^31-1) or a size overflows";
    case FXS_ERR_BAD_BITS: return "bits must be in [2, 9] and has_zero 0 or 1";
    case FXS_ERR_WORD_COUNT: return "packed weight word count does not match rows * row_words(k, bits)";
    case FXS_ERR_INPUT_SIZE: return "input length does not match the given shape";
    case FXS_ERR_OUTPUT_SIZE: return "output length does not match the output shape";
    case FXS_ERR_BIAS_SIZE: return "bias (or scale) length does not match the number of outputs";
    case FXS_ERR_CONV_GEOMETRY:
        return "invalid conv geometry: stride/dilation must be >= 1, padding >= 0, and the "
               "output size positive";
    case FXS_ERR_GROUPS: return "groups must be >= 1 and divide in and out channels";
    case FXS_ERR_VALUE_RANGE:
        return "sign/shift magnitude not representable: sign must be -1, 0 (only with has_zero) "
               "or 1, and the magnitude at most 2^(bits-1)-1 (2^(bits-1)-2 for negative weights "
               "with has_zero)";
    case FXS_ERR_FRAC_BITS: return "frac_bits must be in [0, 31]";
    case FXS_ERR_BAD_ISA: return "unknown instruction set, or not supported by this CPU/build";
    case FXS_ERR_THREADS: return "thread count must be in [0, 256]";
    case FXS_ERR_OUT_OF_MEMORY: return "out of memory for kernel scratch space";
    case FXS_ERR_CUDA: return "a CUDA runtime call failed";
    case FXS_ERR_NO_DEVICE: return "no usable CUDA device";
    case FXS_ERR_BAD_POINTER: return "a pointer passed to a CUDA kernel is not device memory";
    default: return "unknown status code";
    }
}

int fxs_codes_per_word(int bits)
{
    return fxs_check_format(bits, 0) == FXS_OK ? fxs_elem_codes_per_word(bits) : FXS_ERR_BAD_BITS;
}

int64_t fxs_row_words(int64_t k, int bits)
{
    if (fxs_check_format(bits, 0) != FXS_OK)
        return FXS_ERR_BAD_BITS;
    if (k < 0 || k > FXS_MAX_DIM)
        return FXS_ERR_BAD_SIZE;
    return fxs_elem_row_words(k, bits);
}

int fxs_conv2d_output_size(const fxs_conv2d_shape *shape, int64_t *out_h, int64_t *out_w)
{
    fxs_conv_sizes z;
    int st;
    if (!shape || !out_h || !out_w)
        return FXS_ERR_NULL_POINTER;
    if ((st = fxs_check_conv_geometry(shape, &z)) != FXS_OK)
        return st;
    *out_h = z.out_h;
    *out_w = z.out_w;
    return FXS_OK;
}

/* ---- pack / unpack ------------------------------------------------------------ */
static int check_packed(int64_t w_words, int64_t rows, int64_t k, int bits, int has_zero,
                        int64_t len, int64_t *row_words)
{
    int64_t total, n;
    int st;
    if ((st = fxs_check_format(bits, has_zero)) != FXS_OK)
        return st;
    if (rows < 0 || rows > FXS_MAX_DIM || k < 0 || k > FXS_MAX_DIM)
        return FXS_ERR_BAD_SIZE;
    if (!fxs_mul_ok(rows, k, &n))
        return FXS_ERR_BAD_SIZE;
    if ((st = fxs_packed_words(rows, k, bits, row_words, &total)) != FXS_OK)
        return st;
    if (w_words != total)
        return FXS_ERR_WORD_COUNT;
    if (len != n)
        return FXS_ERR_INPUT_SIZE;
    return FXS_OK;
}

int fxs_pack(const int8_t *sign, const uint8_t *shift_mag, int64_t len, int64_t rows, int64_t k,
             int bits, int has_zero, uint32_t *out, int64_t out_words)
{
    int64_t rw, r, j;
    int st, per;
    if (!sign || !shift_mag || !out)
        return FXS_ERR_NULL_POINTER;
    if ((st = check_packed(out_words, rows, k, bits, has_zero, len, &rw)) != FXS_OK)
        return st == FXS_ERR_WORD_COUNT ? FXS_ERR_OUTPUT_SIZE : st;
    per = fxs_elem_codes_per_word(bits);
    /* Validate everything before writing, so a failed call leaves out untouched. */
    for (j = 0; j < len; ++j) {
        uint32_t code;
        if (fxs_elem_encode(sign[j], shift_mag[j], bits, has_zero, &code) != 0)
            return FXS_ERR_VALUE_RANGE;
    }
    for (r = 0; r < rows; ++r) {
        uint32_t *orow = out + r * rw;
        const int8_t *srow = sign + r * k;
        const uint8_t *mrow = shift_mag + r * k;
        memset(orow, 0, (size_t)rw * sizeof(uint32_t));
        for (j = 0; j < k; ++j) {
            uint32_t code = 0;
            fxs_elem_encode(srow[j], mrow[j], bits, has_zero, &code);
            orow[j / per] |= code << ((j % per) * bits);
        }
    }
    return FXS_OK;
}

int fxs_unpack(const uint32_t *w, int64_t w_words, int64_t rows, int64_t k, int bits, int has_zero,
               float *out, int64_t out_len)
{
    const fxs_kernels *kt = fxs_kernels_active();
    int64_t rw, r;
    int st;
    if (!w || !out)
        return FXS_ERR_NULL_POINTER;
    if ((st = check_packed(w_words, rows, k, bits, has_zero, out_len, &rw)) != FXS_OK)
        return st == FXS_ERR_INPUT_SIZE ? FXS_ERR_OUTPUT_SIZE : st;
    for (r = 0; r < rows; ++r)
        kt->decode_row(w + r * rw, 0, k, bits, has_zero, out + r * k);
    return FXS_OK;
}

int fxs_unpack_codes(const uint32_t *w, int64_t w_words, int64_t rows, int64_t k, int bits,
                     int has_zero, int8_t *sign, uint8_t *shift_mag, int64_t len)
{
    int64_t rw, r, j;
    int st;
    if (!w || !sign || !shift_mag)
        return FXS_ERR_NULL_POINTER;
    if ((st = check_packed(w_words, rows, k, bits, has_zero, len, &rw)) != FXS_OK)
        return st == FXS_ERR_INPUT_SIZE ? FXS_ERR_OUTPUT_SIZE : st;
    for (r = 0; r < rows; ++r) {
        for (j = 0; j < k; ++j) {
            uint32_t code = fxs_elem_code_at(w + r * rw, j, bits);
            int64_t i = r * k + j;
            if (fxs_elem_is_zero(code, bits, has_zero)) {
                sign[i] = 0;
                shift_mag[i] = 0;
            } else {
                sign[i] = (code >> (bits - 1)) ? -1 : 1;
                shift_mag[i] = (uint8_t)(code & fxs_elem_mag_mask(bits));
            }
        }
    }
    return FXS_OK;
}

/* ---- kernels -------------------------------------------------------------------- */
int fxs_shift_linear(const float *x, int64_t x_len, int64_t batch, int64_t in_features,
                     const uint32_t *w, int64_t w_words, int64_t out_features, int bits,
                     int has_zero, const float *bias, int64_t bias_len, float *y, int64_t y_len)
{
    /* the plain call is the scaled one with no scale, on libfxshift's own pool */
    return fxs_shift_linear_ex(x, x_len, batch, in_features, w, w_words, out_features, bits, has_zero,
                               NULL, 0, bias, bias_len, y, y_len, NULL);
}

int fxs_shift_linear_fixed(const int32_t *x, int64_t x_len, int64_t batch, int64_t in_features,
                           const uint32_t *w, int64_t w_words, int64_t out_features, int bits,
                           int has_zero, const int32_t *bias, int64_t bias_len, int frac_bits,
                           float *y, int64_t y_len)
{
    fxs_linear_sizes sz;
    fxs_linear_args a;
    int st = fxs_check_linear(x, x_len, batch, in_features, w, w_words, out_features, bits,
                              has_zero, bias, bias_len, y, y_len, &sz);
    if (st != FXS_OK)
        return st;
    if ((st = fxs_check_frac_bits(frac_bits)) != FXS_OK)
        return st;
    memset(&a, 0, sizeof a);
    a.x = x;
    a.batch = batch;
    a.in_features = in_features;
    a.out_features = out_features;
    a.row_words = sz.row_words;
    a.w = w;
    a.bits = bits;
    a.has_zero = has_zero;
    a.bias = bias;
    a.frac_bits = frac_bits;
    a.y = y;
    return fxs_kernels_active()->linear_fixed(&a);
}

/* ---- scale and caller's pool (the _ex entry points) ------------------------------ */
typedef struct {
    float *y;
    const float *scale, *bias;
    int64_t channels, plane; /* y is (rows, channels, plane) */
} scale_ctx;

/* job = row * channels + o: y = fl(fl(y * scale[o]) + bias[o]) over one plane.
 * api.c is built without FMA flags in ISO C (no contraction): two roundings. */
static void scale_job(void *vctx, int64_t job, int tid)
{
    const scale_ctx *c = (const scale_ctx *)vctx;
    int64_t o = job % c->channels, i;
    float *y = c->y + job * c->plane;
    const float s = c->scale[o], b = c->bias ? c->bias[o] : 0.0f;
    (void)tid;
    if (c->bias) {
        for (i = 0; i < c->plane; ++i) {
            float t = y[i] * s;
            y[i] = t + b;
        }
    } else {
        for (i = 0; i < c->plane; ++i)
            y[i] = y[i] * s;
    }
}

static void apply_scale(float *y, int64_t rows, int64_t channels, int64_t plane,
                        const float *scale, const float *bias)
{
    scale_ctx c;
    c.y = y;
    c.scale = scale;
    c.bias = bias;
    c.channels = channels;
    c.plane = plane;
    fxs_parallel(rows * channels, rows * channels * plane < ((int64_t)1 << 16) ? 1 : FXS_MAX_THREADS,
                 scale_job, &c);
}

/* The same for a linear's y (batch, O): one job per batch row. */
typedef struct {
    float *y;
    const float *scale, *bias;
    int64_t o;
} row_scale_ctx;

static void row_scale_job(void *vctx, int64_t b, int tid)
{
    const row_scale_ctx *c = (const row_scale_ctx *)vctx;
    float *y = c->y + b * c->o;
    int64_t i;
    (void)tid;
    for (i = 0; i < c->o; ++i) {
        float t = y[i] * c->scale[i];
        y[i] = c->bias ? t + c->bias[i] : t;
    }
}

static int check_scale(const float *scale, int64_t scale_len, int64_t channels)
{
    if (scale && scale_len != channels)
        return FXS_ERR_BIAS_SIZE;
    return FXS_OK;
}

static int check_exec(const fxs_exec *exec)
{
    if (exec && (exec->max_threads < 0 || exec->max_threads > FXS_MAX_THREADS))
        return FXS_ERR_THREADS;
    return FXS_OK;
}

int fxs_shift_linear_ex(const float *x, int64_t x_len, int64_t batch, int64_t in_features,
                        const uint32_t *w, int64_t w_words, int64_t out_features, int bits,
                        int has_zero, const float *scale, int64_t scale_len, const float *bias,
                        int64_t bias_len, float *y, int64_t y_len, const fxs_exec *exec)
{
    const fxs_kernels *kt = fxs_kernels_active();
    fxs_linear_sizes sz;
    fxs_linear_args a;
    int st = fxs_check_linear(x, x_len, batch, in_features, w, w_words, out_features, bits,
                              has_zero, bias, bias_len, y, y_len, &sz);
    if (st != FXS_OK)
        return st;
    if ((st = check_scale(scale, scale_len, out_features)) != FXS_OK ||
        (st = check_exec(exec)) != FXS_OK)
        return st;
    memset(&a, 0, sizeof a);
    a.x = x;
    a.batch = batch;
    a.in_features = in_features;
    a.out_features = out_features;
    a.row_words = sz.row_words;
    a.w = w;
    a.bits = bits;
    a.has_zero = has_zero;
    a.bias = bias;
    a.y = y;
    fxs_set_thread_exec(exec);
    if (scale && kt->isa == FXS_ISA_SCALAR) {
        a.scale = scale;
        st = kt->linear_f32(&a);
    } else if (scale) {
        a.bias = NULL;
        st = kt->linear_f32(&a);
        if (st == FXS_OK) {
            row_scale_ctx c;
            c.y = y;
            c.scale = scale;
            c.bias = bias;
            c.o = out_features;
            fxs_parallel(batch, batch * out_features < ((int64_t)1 << 16) ? 1 : FXS_MAX_THREADS,
                         row_scale_job, &c);
        }
    } else {
        st = kt->linear_f32(&a);
    }
    fxs_set_thread_exec(NULL);
    return st;
}

int fxs_shift_conv2d_ex(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                        const uint32_t *w, int64_t w_words, int bits, int has_zero,
                        const float *scale, int64_t scale_len, const float *bias,
                        int64_t bias_len, float *y, int64_t y_len, const fxs_exec *exec)
{
    const fxs_kernels *kt = fxs_kernels_active();
    fxs_conv_args a;
    int st;
    memset(&a, 0, sizeof a);
    st = fxs_check_conv(shape, x, x_len, w, w_words, bits, has_zero, bias, bias_len, y, y_len,
                        &a.z);
    if (st != FXS_OK)
        return st;
    if ((st = check_scale(scale, scale_len, shape->out_channels)) != FXS_OK ||
        (st = check_exec(exec)) != FXS_OK)
        return st;
    a.s = *shape;
    a.x = x;
    a.w = w;
    a.bits = bits;
    a.has_zero = has_zero;
    a.bias = bias;
    a.y = y;
    fxs_set_thread_exec(exec);
    if (scale && kt->isa == FXS_ISA_SCALAR) {
        a.scale = scale;
        st = kt->conv2d_f32(&a);
    } else if (scale) {
        a.bias = NULL;
        st = kt->conv2d_f32(&a);
        if (st == FXS_OK)
            apply_scale(y, shape->n, shape->out_channels, a.z.out_h * a.z.out_w, scale, bias);
    } else {
        st = kt->conv2d_f32(&a);
    }
    fxs_set_thread_exec(NULL);
    return st;
}

int fxs_shift_conv2d(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                     const uint32_t *w, int64_t w_words, int bits, int has_zero, const float *bias,
                     int64_t bias_len, float *y, int64_t y_len)
{
    return fxs_shift_conv2d_ex(shape, x, x_len, w, w_words, bits, has_zero, NULL, 0, bias, bias_len, y,
                               y_len, NULL);
}

int fxs_shift_conv2d_fixed(const fxs_conv2d_shape *shape, const int32_t *x, int64_t x_len,
                           const uint32_t *w, int64_t w_words, int bits, int has_zero,
                           const int32_t *bias, int64_t bias_len, int frac_bits, float *y,
                           int64_t y_len)
{
    fxs_conv_args a;
    int st;
    memset(&a, 0, sizeof a);
    st = fxs_check_conv(shape, x, x_len, w, w_words, bits, has_zero, bias, bias_len, y, y_len,
                        &a.z);
    if (st != FXS_OK)
        return st;
    if ((st = fxs_check_frac_bits(frac_bits)) != FXS_OK)
        return st;
    a.s = *shape;
    a.x = x;
    a.w = w;
    a.bits = bits;
    a.has_zero = has_zero;
    a.bias = bias;
    a.frac_bits = frac_bits;
    a.y = y;
    return fxs_kernels_active()->conv2d_fixed(&a);
}
