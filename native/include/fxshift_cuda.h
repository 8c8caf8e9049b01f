/*
 * fxshift_cuda.h - C entry points of libfxshift_cuda: the float shift kernels
 * on CUDA device memory.  Same packed format, argument conventions and status
 * codes as fxshift.h (the validation code is shared); all tensor pointers are
 * device pointers, `stream` is a cudaStream_t passed as void* (NULL: the
 * legacy default stream).  Kernels are enqueued asynchronously on the stream
 * of the current device; launch errors are reported, execution errors surface
 * at the caller's next synchronisation.
 */
#ifndef FXSHIFT_CUDA_H
#define FXSHIFT_CUDA_H

#include "fxshift.h"

#ifdef __cplusplus
extern "C" {
#endif

FXS_API int fxs_cuda_abi_version(void);
/* Number of CUDA devices (0 when there is no driver or device). */
FXS_API int fxs_cuda_device_count(void);

FXS_API int fxs_cuda_shift_linear(const float *x, int64_t x_len, int64_t batch, int64_t in_features,
                                  const uint32_t *w, int64_t w_words, int64_t out_features,
                                  int bits, int has_zero, const float *bias, int64_t bias_len,
                                  float *y, int64_t y_len, void *stream);

FXS_API int fxs_cuda_shift_conv2d(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                                  const uint32_t *w, int64_t w_words, int bits, int has_zero,
                                  const float *bias, int64_t bias_len, float *y, int64_t y_len,
                                  void *stream);

/* With a per-output-channel scale (nullable, scale_len == outputs; device memory):
 * y = fl(fl(sum * scale[o]) + bias[o]), as fxs_shift_linear_ex / fxs_shift_conv2d_ex. */
FXS_API int fxs_cuda_shift_linear_ex(const float *x, int64_t x_len, int64_t batch,
                                     int64_t in_features, const uint32_t *w, int64_t w_words,
                                     int64_t out_features, int bits, int has_zero,
                                     const float *scale, int64_t scale_len, const float *bias,
                                     int64_t bias_len, float *y, int64_t y_len, void *stream);
FXS_API int fxs_cuda_shift_conv2d_ex(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                                     const uint32_t *w, int64_t w_words, int bits, int has_zero,
                                     const float *scale, int64_t scale_len, const float *bias,
                                     int64_t bias_len, float *y, int64_t y_len, void *stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FXSHIFT_CUDA_H */
