/*
 * test_cuda.c - host-side checks of libfxshift_cuda that run without a GPU:
 * argument validation (shared with the CPU library) happens before any CUDA
 * call; a valid call returns FXS_ERR_NO_DEVICE without a device, and
 * FXS_ERR_BAD_POINTER for host memory when a device exists.  Numerical tests
 * on a GPU go through Python (tests/test_native_kernels.py).
 */
#include <stdio.h>

#include "fxshift_cuda.h"

static int failures;

#define EXPECT(expr, want)                                                                     \
    do {                                                                                       \
        int st_ = (expr);                                                                      \
        if (st_ != (want)) {                                                                   \
            fprintf(stderr, "FAIL line %d: %s = %d, expected %d\n", __LINE__, #expr, st_,     \
                    (int)(want));                                                              \
            ++failures;                                                                        \
        }                                                                                      \
    } while (0)

int main(void)
{
    float x[64] = {0}, y[64], bias[8] = {0};
    uint32_t w[16] = {0};
    fxs_conv2d_shape s = {1, 2, 4, 4, 2, 3, 3, 1, 1, 1, 1, 1, 1, 1};
    int devices = fxs_cuda_device_count();
    int valid = devices > 0 ? FXS_ERR_BAD_POINTER : FXS_ERR_NO_DEVICE;
    printf("libfxshift_cuda: %d device(s)\n", devices);
    EXPECT(fxs_cuda_abi_version(), FXS_ABI_VERSION);
    /* linear: B=2, K=8, O=4, bits 5 -> 8 words */
    EXPECT(fxs_cuda_shift_linear(NULL, 16, 2, 8, w, 8, 4, 5, 0, bias, 4, y, 8, NULL),
           FXS_ERR_NULL_POINTER);
    EXPECT(fxs_cuda_shift_linear(x, 16, 2, 8, w, 8, 4, 1, 0, bias, 4, y, 8, NULL), FXS_ERR_BAD_BITS);
    EXPECT(fxs_cuda_shift_linear(x, 16, 0, 8, w, 8, 4, 5, 0, bias, 4, y, 8, NULL), FXS_ERR_BAD_SIZE);
    EXPECT(fxs_cuda_shift_linear(x, 16, 2, 8, w, 7, 4, 5, 0, bias, 4, y, 8, NULL), FXS_ERR_WORD_COUNT);
    EXPECT(fxs_cuda_shift_linear(x, 15, 2, 8, w, 8, 4, 5, 0, bias, 4, y, 8, NULL), FXS_ERR_INPUT_SIZE);
    EXPECT(fxs_cuda_shift_linear(x, 16, 2, 8, w, 8, 4, 5, 0, bias, 3, y, 8, NULL), FXS_ERR_BIAS_SIZE);
    EXPECT(fxs_cuda_shift_linear(x, 16, 2, 8, w, 8, 4, 5, 0, bias, 4, y, 9, NULL), FXS_ERR_OUTPUT_SIZE);
    EXPECT(fxs_cuda_shift_linear(x, 16, 2, 8, w, 8, 4, 5, 0, bias, 4, y, 8, NULL), valid);
    /* conv: K = 18 -> 3 words per row, 6 words; y = 32 */
    EXPECT(fxs_cuda_shift_conv2d(NULL, x, 32, w, 6, 5, 1, bias, 2, y, 32, NULL), FXS_ERR_NULL_POINTER);
    EXPECT(fxs_cuda_shift_conv2d(&s, x, 32, w, 5, 5, 1, bias, 2, y, 32, NULL), FXS_ERR_WORD_COUNT);
    s.groups = 3;
    EXPECT(fxs_cuda_shift_conv2d(&s, x, 32, w, 6, 5, 1, bias, 2, y, 32, NULL), FXS_ERR_GROUPS);
    s.groups = 1;
    s.stride_w = 0;
    EXPECT(fxs_cuda_shift_conv2d(&s, x, 32, w, 6, 5, 1, bias, 2, y, 32, NULL), FXS_ERR_CONV_GEOMETRY);
    s.stride_w = 1;
    EXPECT(fxs_cuda_shift_conv2d(&s, x, 32, w, 6, 5, 1, bias, 2, y, 31, NULL), FXS_ERR_OUTPUT_SIZE);
    EXPECT(fxs_cuda_shift_conv2d(&s, x, 32, w, 6, 5, 1, bias, 2, y, 32, NULL), valid);
    /* the scale variants: same checks, plus the scale length */
    EXPECT(fxs_cuda_shift_linear_ex(x, 16, 2, 8, w, 8, 4, 5, 0, bias, 3, bias, 4, y, 8, NULL),
           FXS_ERR_BIAS_SIZE);
    EXPECT(fxs_cuda_shift_linear_ex(x, 16, 2, 8, w, 7, 4, 5, 0, bias, 4, bias, 4, y, 8, NULL),
           FXS_ERR_WORD_COUNT);
    EXPECT(fxs_cuda_shift_linear_ex(x, 16, 2, 8, w, 8, 4, 5, 0, bias, 4, bias, 4, y, 8, NULL), valid);
    EXPECT(fxs_cuda_shift_conv2d_ex(&s, x, 32, w, 6, 5, 1, bias, 1, bias, 2, y, 32, NULL),
           FXS_ERR_BIAS_SIZE);
    EXPECT(fxs_cuda_shift_conv2d_ex(&s, x, 32, w, 6, 5, 1, bias, 2, bias, 2, y, 32, NULL), valid);
    printf("%s\n", failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
