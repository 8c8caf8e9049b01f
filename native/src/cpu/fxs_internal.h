/*
 * fxs_internal.h - what the CPU library's files share: validated argument
 * bundles, the kernel table that dispatch picks once, and the thread pool.
 */
#ifndef FXS_INTERNAL_H
#define FXS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "fxshift.h"
#include "fxs_check.h"
#include "fxs_elem.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#  define FXS_X86 1
#else
#  define FXS_X86 0
#endif

/* Arguments of a linear call, already validated by api.c.  x/bias point to
 * float (float kernels) or int32 (fixed-point kernels). */
typedef struct fxs_linear_args {
    const void *x;
    int64_t batch, in_features, out_features, row_words;
    const uint32_t *w;
    int bits, has_zero;
    const void *bias; /* may be NULL */
    int frac_bits;    /* fixed-point only */
    float *y;
    const float *scale; /* float kernels, scalar table only (api.c applies it for the others) */
} fxs_linear_args;

/* Arguments of a conv2d call, already validated by api.c. */
typedef struct fxs_conv_args {
    fxs_conv2d_shape s;
    fxs_conv_sizes z;
    const void *x;
    const uint32_t *w;
    int bits, has_zero;
    const void *bias; /* may be NULL */
    int frac_bits;    /* fixed-point only */
    float *y;
    const float *scale; /* float kernels, scalar table only (api.c applies it for the others) */
} fxs_conv_args;

/* One ISA's kernels.  Each returns FXS_OK or FXS_ERR_OUT_OF_MEMORY. */
typedef struct fxs_kernels {
    int isa;
    int (*linear_f32)(const fxs_linear_args *a);
    int (*conv2d_f32)(const fxs_conv_args *a);
    int (*linear_fixed)(const fxs_linear_args *a);
    int (*conv2d_fixed)(const fxs_conv_args *a);
    /* Decodes codes [j0, j0 + n) of one packed row to floats. */
    void (*decode_row)(const uint32_t *row, int64_t j0, int64_t n, int bits, int has_zero,
                       float *out);
} fxs_kernels;

extern const fxs_kernels fxs_kernels_scalar;
#if FXS_X86
extern const fxs_kernels fxs_kernels_avx2;
extern const fxs_kernels fxs_kernels_avx512;
#endif

/* The active table (chosen at load time, or forced). */
const fxs_kernels *fxs_kernels_active(void);

/* Scalar decode of a row range, usable by every ISA for tails. */
void fxs_scalar_decode_row(const uint32_t *row, int64_t j0, int64_t n, int bits, int has_zero,
                           float *out);

/* ---- thread pool (threads.c) ----------------------------------------------
 * fxs_parallel runs fn(ctx, job, tid) for every job in [0, n_jobs) on up to
 * min(max_tids, fxs_planned_threads(), n_jobs) threads, the caller's thread
 * included; tid is in [0, max_tids) and unique among the threads running
 * concurrently, so callers index per-thread scratch by it.  Jobs are claimed
 * dynamically.  If the pool is in use by another caller, the jobs run on the
 * calling thread alone (tid 0).  Returns when every job has finished. */
typedef void (*fxs_job_fn)(void *ctx, int64_t job, int tid);
void fxs_parallel(int64_t n_jobs, int max_tids, fxs_job_fn fn, void *ctx);
/* During an fxs_*_ex call, the caller's parallel-for (NULL: the own pool)
 * serves this thread's fxs_parallel calls. */
void fxs_set_thread_exec(const fxs_exec *exec);
/* Threads the kernels plan scratch for: the exec's max_threads during an
 * fxs_*_ex call with one, else fxs_get_num_threads(). */
int fxs_planned_threads(void);

/* ---- scratch memory -------------------------------------------------------- */
void *fxs_alloc(size_t bytes);   /* 64-byte aligned, NULL on failure or overflow */
void fxs_free(void *p);
/* a * b * c bytes, SIZE_MAX on overflow (fxs_alloc then fails). */
size_t fxs_bytes3(int64_t a, int64_t b, int64_t c);

#endif /* FXS_INTERNAL_H */
