/*
 * avx512.c - AVX-512 (F/BW/VL/VBMI) kernels.  Placeholder: forwards to AVX2.
 */
#include "fxs_internal.h"

static int f_linear(const fxs_linear_args *a) { return fxs_kernels_avx2.linear_f32(a); }
static int f_conv(const fxs_conv_args *a) { return fxs_kernels_avx2.conv2d_f32(a); }
static int f_linear_fixed(const fxs_linear_args *a) { return fxs_kernels_avx2.linear_fixed(a); }
static int f_conv_fixed(const fxs_conv_args *a) { return fxs_kernels_avx2.conv2d_fixed(a); }
static void f_decode(const uint32_t *row, int64_t j0, int64_t n, int bits, int hz, float *out)
{
    fxs_kernels_avx2.decode_row(row, j0, n, bits, hz, out);
}

const fxs_kernels fxs_kernels_avx512 = {
    FXS_ISA_AVX512, f_linear, f_conv, f_linear_fixed, f_conv_fixed, f_decode,
};
