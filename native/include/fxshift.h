/*
 * fxshift.h - the C ABI of fxshift's native shift kernels (C99, usable from C++).
 *
 * ===========================================================================
 *  Packed shift-weight format (shared by Python, ONNX and C; do not change)
 * ===========================================================================
 *  A shift weight is zero or (-1)^sign * 2^(-m), with m >= 0 an integer shift
 *  magnitude.  Each weight is stored as a `bits`-wide code, 2 <= bits <= 9:
 *
 *      code = sign << (bits - 1) | m            (0 <= m <= 2^(bits-1) - 1)
 *
 *  The top bit of the code is the sign, the low (bits - 1) bits are m.
 *  If the layer flag `has_zero` is 1, the code with sign = 1 and m = all ones
 *  (code value 2^bits - 1) means the weight 0, so negative weights can use m
 *  up to 2^(bits-1) - 2 (positive ones up to 2^(bits-1) - 1).  If has_zero is
 *  0 there is no zero code.
 *
 *  Codes are packed into little-endian uint32 words, floor(32 / bits) codes
 *  per word (bits 2->16, 3->10, 4->8, 5->6, 6->5, 7->4, 8->4, 9->3).  Code i
 *  of a word occupies bits [i*bits, (i+1)*bits); unused high bits are 0.
 *
 *  A weight tensor of shape (O, K) is packed row by row, each row starting on
 *  a new word:  row_words = ceil(K / codes_per_word), total = O * row_words.
 *  Linear: O = out_features, K = in_features.  Conv2d: O = out_channels,
 *  K = (C_in / groups) * kh * kw flattened in torch order (c, ky, kx).
 *  Unused code slots at the end of a row should be 0 (the kernels ignore them).
 *
 *  Decoding is total (defined for any bit pattern): a code decodes to
 *      0                      if has_zero and code == 2^bits - 1,
 *      (-1)^sign * 0.0        if m >= 127 (below the float32 normal range;
 *                             only reachable with bits = 8 or 9),
 *      (-1)^sign * 2^(-m)     otherwise.
 *  The fixed-point kernels use m without that clamp (x >> m with m >= 31
 *  gives 0 or -1, the floor of x / 2^m).
 *
 * ===========================================================================
 *  Conventions
 * ===========================================================================
 *  - Every entry point validates its arguments and returns an int status:
 *    FXS_OK (0) or a negative fxs_status code; fxs_status_message() names it.
 *    Nothing aborts, nothing reads or writes outside the lengths passed in.
 *  - Sizes are int64_t.  Every buffer comes with the number of elements (or
 *    words) the caller actually has; the kernel checks that it equals what
 *    the shapes require (exactly: a mismatch usually means a wrong shape).
 *  - Tensors are dense and row-major: x of a linear is (batch, in_features),
 *    y is (batch, out_features); conv tensors are NCHW.
 *  - Outputs are overwritten, never accumulated into.
 *  - Kernels may run on several threads (fxs_set_num_threads); they are
 *    safe to call concurrently from several threads.
 */
#ifndef FXSHIFT_H
#define FXSHIFT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  if defined(FXSHIFT_BUILDING_LIBRARY)
#    define FXS_API __declspec(dllexport)
#  else
#    define FXS_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define FXS_API __attribute__((visibility("default")))
#else
#  define FXS_API
#endif

/* Bumped whenever a declaration below changes incompatibly. */
#define FXS_ABI_VERSION 1

#define FXS_MIN_BITS 2
#define FXS_MAX_BITS 9
#define FXS_MAX_THREADS 256

/* Status codes (0 = success, negative = error). */
typedef enum fxs_status {
    FXS_OK = 0,
    FXS_ERR_NULL_POINTER = -1,     /* a required pointer is NULL */
    FXS_ERR_BAD_SIZE = -2,         /* a dimension is < 1 (or < 0) or a size product overflows */
    FXS_ERR_BAD_BITS = -3,         /* bits outside [FXS_MIN_BITS, FXS_MAX_BITS] or has_zero not 0/1 */
    FXS_ERR_WORD_COUNT = -4,       /* packed buffer length != rows * row_words */
    FXS_ERR_INPUT_SIZE = -5,       /* an input length != what the shapes require */
    FXS_ERR_OUTPUT_SIZE = -6,      /* output length != what the shapes produce */
    FXS_ERR_BIAS_SIZE = -7,        /* bias (or scale) length != number of output features/channels */
    FXS_ERR_CONV_GEOMETRY = -8,    /* stride/dilation < 1, padding < 0 or output size < 1 */
    FXS_ERR_GROUPS = -9,           /* groups < 1 or not dividing in/out channels */
    FXS_ERR_VALUE_RANGE = -10,     /* pack: sign/magnitude not representable in the format */
    FXS_ERR_FRAC_BITS = -11,       /* frac_bits outside [0, 31] */
    FXS_ERR_BAD_ISA = -12,         /* unknown ISA, or not supported by this CPU/build */
    FXS_ERR_THREADS = -13,         /* thread count outside [0, FXS_MAX_THREADS] */
    FXS_ERR_OUT_OF_MEMORY = -14,   /* scratch allocation failed */
    FXS_ERR_CUDA = -15,            /* a CUDA runtime call failed (CUDA library only) */
    FXS_ERR_NO_DEVICE = -16,       /* no usable CUDA device (CUDA library only) */
    FXS_ERR_BAD_POINTER = -17      /* a pointer is not device memory (CUDA library only) */
} fxs_status;

/* Instruction-set variants of the CPU kernels. */
typedef enum fxs_isa {
    FXS_ISA_AUTO = -1,    /* fxs_force_isa(FXS_ISA_AUTO): back to the load-time choice */
    FXS_ISA_SCALAR = 0,   /* portable C reference: the specification of every kernel */
    FXS_ISA_AVX2 = 1,     /* x86-64 AVX2 + FMA */
    FXS_ISA_AVX512 = 2    /* x86-64 AVX-512 F/BW/VL/VBMI (Ice Lake and newer, Zen 4) */
} fxs_isa;

/* Geometry of a 2-D convolution (NCHW input, OIHW-style packed weights). */
typedef struct fxs_conv2d_shape {
    int64_t n, c, h, w;              /* input batch, channels, height, width */
    int64_t out_channels;            /* O */
    int64_t kh, kw;                  /* kernel height, width */
    int64_t stride_h, stride_w;      /* >= 1 */
    int64_t pad_h, pad_w;            /* >= 0, zero padding on both sides */
    int64_t dilation_h, dilation_w;  /* >= 1 */
    int64_t groups;                  /* >= 1, divides c and out_channels */
} fxs_conv2d_shape;

/* ---- library information ------------------------------------------------ */
FXS_API int fxs_abi_version(void);
FXS_API const char *fxs_status_message(int status);

/* ---- format helpers (return a negative fxs_status for invalid bits/k) ---- */
FXS_API int fxs_codes_per_word(int bits);
FXS_API int64_t fxs_row_words(int64_t k, int bits);
/* Output height/width of a convolution; validates the whole geometry. */
FXS_API int fxs_conv2d_output_size(const fxs_conv2d_shape *shape, int64_t *out_h, int64_t *out_w);

/* ---- packing ------------------------------------------------------------ */
/* sign[i] in {-1, 0, +1} (0 only with has_zero; its magnitude is ignored),
 * shift_mag[i] = m.  Both have len == rows * k elements, row-major (rows, k).
 * Writes exactly out_words = rows * row_words(k, bits) words (padding zeroed). */
FXS_API int fxs_pack(const int8_t *sign, const uint8_t *shift_mag, int64_t len,
                     int64_t rows, int64_t k, int bits, int has_zero,
                     uint32_t *out, int64_t out_words);
/* Decodes to float32 (rows, k); out_len must equal rows * k. */
FXS_API int fxs_unpack(const uint32_t *w, int64_t w_words, int64_t rows, int64_t k,
                       int bits, int has_zero, float *out, int64_t out_len);
/* Decodes to sign in {-1, 0, +1} and magnitude (0 for zero weights); len = rows * k. */
FXS_API int fxs_unpack_codes(const uint32_t *w, int64_t w_words, int64_t rows, int64_t k,
                             int bits, int has_zero, int8_t *sign, uint8_t *shift_mag,
                             int64_t len);

/* ---- float32 kernels ------------------------------------------------------ */
/* y (batch, out_features) = x (batch, in_features) @ W^T + bias.
 * w: out_features * row_words(in_features, bits) words.  bias may be NULL
 * (then bias_len is ignored), else bias_len == out_features. */
FXS_API int fxs_shift_linear(const float *x, int64_t x_len, int64_t batch, int64_t in_features,
                             const uint32_t *w, int64_t w_words, int64_t out_features,
                             int bits, int has_zero, const float *bias, int64_t bias_len,
                             float *y, int64_t y_len);

/* y (n, out_channels, out_h, out_w) = conv2d(x (n, c, h, w), W, bias), torch
 * semantics (cross-correlation, zero padding, groups, dilation).
 * w: out_channels * row_words((c / groups) * kh * kw, bits) words. */
FXS_API int fxs_shift_conv2d(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                             const uint32_t *w, int64_t w_words, int bits, int has_zero,
                             const float *bias, int64_t bias_len, float *y, int64_t y_len);

/* ---- extended float32 entry points: per-channel scale, caller's thread pool -----
 * A caller-supplied parallel-for: run body(arg, i) once for every i in [0, n),
 * on any threads, in any order, and return when all have finished.  fxshift
 * calls it with n <= the thread count it plans for, and each i is a worker
 * that takes jobs from a shared counter (so n calls of body may run on fewer
 * threads).  body never calls back into the parallel-for. */
typedef void (*fxs_body_fn)(void *arg, int64_t i);
typedef void (*fxs_parallel_for_fn)(void *runner, int64_t n, fxs_body_fn body, void *arg);

typedef struct fxs_exec {
    fxs_parallel_for_fn parallel_for; /* NULL: libfxshift's own pool */
    void *runner;                     /* passed back to parallel_for */
    int max_threads;                  /* workers to plan for, in [1, FXS_MAX_THREADS];
                                         0: fxs_get_num_threads() */
} fxs_exec;

/* fxs_shift_linear / fxs_shift_conv2d with two optional extras:
 *  - scale (nullable, scale_len == out_features / out_channels): a float32
 *    multiplier per output channel, applied to the accumulated sum before the
 *    bias:  y = fl(fl(sum * scale[o]) + bias[o])  (two roundings, no FMA), so
 *    the inner loops stay multiplication-free.  NULL means 1 (then scale_len
 *    is ignored and the result is bit-identical to the plain entry point).
 *  - exec (nullable): run the parallel loops through the caller's pool (e.g.
 *    onnxruntime's intra-op pool) instead of libfxshift's own threads. */
FXS_API int fxs_shift_linear_ex(const float *x, int64_t x_len, int64_t batch, int64_t in_features,
                                const uint32_t *w, int64_t w_words, int64_t out_features,
                                int bits, int has_zero, const float *scale, int64_t scale_len,
                                const float *bias, int64_t bias_len, float *y, int64_t y_len,
                                const fxs_exec *exec);
FXS_API int fxs_shift_conv2d_ex(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                                const uint32_t *w, int64_t w_words, int bits, int has_zero,
                                const float *scale, int64_t scale_len, const float *bias,
                                int64_t bias_len, float *y, int64_t y_len, const fxs_exec *exec);

/* ---- fixed-point kernels (DeepShift semantics) ------------------------------
 * x and bias are int32 fixed-point numbers with `frac_bits` fraction bits
 * (value = x * 2^-frac_bits), 0 <= frac_bits <= 31.  Each weight contributes
 *     +(x >> m)  or  -(x >> m)  (or nothing for a zero weight),
 * where >> is an arithmetic shift (floor division by 2^m; m >= 31 gives 0 or
 * -1).  The sum, started from bias, is accumulated EXACTLY in int64: no
 * wrap-around and no saturation can occur (|term| <= 2^31 and the reduction
 * length K is limited to 2^31 - 1, so |sum| < 2^63).  The result is written as
 *     y = (float)((double)acc * 2^-frac_bits)
 * i.e. int64 -> double (exact below 2^53), exact power-of-two scaling, then
 * one rounding to float32. */
FXS_API int fxs_shift_linear_fixed(const int32_t *x, int64_t x_len, int64_t batch,
                                   int64_t in_features, const uint32_t *w, int64_t w_words,
                                   int64_t out_features, int bits, int has_zero,
                                   const int32_t *bias, int64_t bias_len, int frac_bits,
                                   float *y, int64_t y_len);
FXS_API int fxs_shift_conv2d_fixed(const fxs_conv2d_shape *shape, const int32_t *x,
                                   int64_t x_len, const uint32_t *w, int64_t w_words,
                                   int bits, int has_zero, const int32_t *bias,
                                   int64_t bias_len, int frac_bits, float *y, int64_t y_len);

/* ---- threads -----------------------------------------------------------------
 * Default: the number of CPUs this process may run on (sched affinity), or the
 * environment variable FXSHIFT_NUM_THREADS.  0 restores the default.  The
 * library uses its own pthreads (no OpenMP), so it coexists with torch's.
 * Between calls its workers sleep at once (a condition variable, no spinning),
 * so they never compete with another runtime's threads;
 * fxs_set_pool_spin_us(us) lets idle workers spin up to `us` microseconds
 * first (0..100000; faster back-to-back calls when nothing else runs).  The
 * environment variable FXSHIFT_POOL_SPIN_US sets the initial value. */
FXS_API int fxs_set_num_threads(int n);
FXS_API int fxs_get_num_threads(void);
FXS_API int fxs_set_pool_spin_us(int us);        /* FXS_OK or FXS_ERR_THREADS */

/* ---- instruction-set dispatch -------------------------------------------------
 * The kernel table is chosen once, when the library loads, from CPU features
 * (a chain AVX512 -> AVX2 -> SCALAR); the environment variable FXSHIFT_ISA
 * (scalar/avx2/avx512) can lower that choice.  fxs_force_isa switches
 * process-wide (use it in tests, not while other threads run kernels). */
FXS_API int fxs_force_isa(int isa);              /* FXS_OK or FXS_ERR_BAD_ISA */
FXS_API int fxs_active_isa(void);                /* an fxs_isa value >= 0 */
FXS_API int fxs_isa_supported(int isa);          /* 1 if this CPU + build can run it */
FXS_API const char *fxs_isa_name(int isa);       /* "scalar", "avx2", "avx512", "auto" or "unknown" */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FXSHIFT_H */
