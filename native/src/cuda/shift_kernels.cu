/*
 * shift_kernels.cu - CUDA float kernels of libfxshift_cuda.
 *
 * The per-element math (code extraction, decode to float) is fxs_elem.h, the
 * same header the CPU kernels include; argument validation is fxs_check.h,
 * shared with the CPU library, so both libraries accept and reject exactly the
 * same calls.
 *
 *  - linear: one warp per output row streams the row's packed words
 *    (coalesced), decodes them in registers and accumulates up to LIN_BT batch
 *    rows at once; a warp shuffle reduces.  Memory bound at small batch.
 *  - conv2d: implicit GEMM (no im2col buffer): a 16x16 thread block computes
 *    a 32 (out channels) x 32 (output positions) tile; per K step it decodes a
 *    32x16 weight tile and gathers a 16x32 input tile (zero padding, stride,
 *    dilation, groups) into shared memory.
 */
#include <cuda_runtime.h>

#include "fxshift_cuda.h"
#include "fxs_check.h"
#include "fxs_elem.h"

namespace {

/* y = sum + bias, or fl(fl(sum * scale) + bias) with a scale (no FMA contraction), as the CPU
 * reference. */
__device__ __forceinline__ float finish(float sum, const float *__restrict__ scale,
                                        const float *__restrict__ bias, int64_t o)
{
    if (scale) {
        float t = __fmul_rn(sum, scale[o]);
        return bias ? __fadd_rn(t, bias[o]) : t;
    }
    return sum + (bias ? bias[o] : 0.0f);
}

constexpr int LIN_WARPS = 8;  // rows per block
constexpr int LIN_BT = 4;     // batch rows per warp pass

__global__ void linear_kernel(const float *__restrict__ x, int64_t batch, int64_t K,
                              const uint32_t *__restrict__ w, int64_t row_words, int64_t O,
                              int bits, int has_zero, const float *__restrict__ scale,
                              const float *__restrict__ bias, float *__restrict__ y)
{
    const int lane = threadIdx.x & 31;
    const int per = 32 / bits;
    const uint32_t cmask = (1u << bits) - 1u;
    for (int64_t o = (int64_t)blockIdx.x * LIN_WARPS + threadIdx.x / 32; o < O;
         o += (int64_t)gridDim.x * LIN_WARPS) {
        const uint32_t *row = w + o * row_words;
        for (int64_t b0 = (int64_t)blockIdx.y * LIN_BT; b0 < batch;
             b0 += (int64_t)gridDim.y * LIN_BT) {
            float acc[LIN_BT];
#pragma unroll
            for (int t = 0; t < LIN_BT; ++t)
                acc[t] = 0.0f;
            for (int64_t wi = lane; wi < row_words; wi += 32) {
                const uint32_t word = row[wi];
                for (int i = 0; i < per; ++i) {
                    const int64_t k = wi * per + i;
                    if (k >= K)
                        break;
                    const float v = fxs_elem_decode((word >> (i * bits)) & cmask, bits, has_zero);
#pragma unroll
                    for (int t = 0; t < LIN_BT; ++t)
                        if (b0 + t < batch)
                            acc[t] = fmaf(v, x[(b0 + t) * K + k], acc[t]);
                }
            }
#pragma unroll
            for (int t = 0; t < LIN_BT; ++t) {
                float v = acc[t];
                for (int off = 16; off > 0; off >>= 1)
                    v += __shfl_down_sync(0xffffffffu, v, off);
                if (lane == 0 && b0 + t < batch)
                    y[(b0 + t) * O + o] = finish(v, scale, bias, o);
            }
        }
    }
}

constexpr int TO = 32, TP = 32, TK = 16;

struct ConvParams {
    int64_t n, c, h, w, o, kh, kw, sh, sw, ph, pw, dh, dw, groups;
    int64_t out_h, out_w, cpg, opg, K, row_words;
    int bits, has_zero;
};

__global__ void __launch_bounds__(256) conv_kernel(ConvParams p, const float *__restrict__ x,
                                                   const uint32_t *__restrict__ w,
                                                   const float *__restrict__ scale,
                                                   const float *__restrict__ bias,
                                                   float *__restrict__ y)
{
    __shared__ float ws[TK][TO + 1];
    __shared__ float xs[TK][TP];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;
    const int64_t P = p.out_h * p.out_w;
    const int64_t o_tiles = (p.opg + TO - 1) / TO;
    const uint32_t cmask = (1u << p.bits) - 1u;
    const int per = 32 / p.bits;

    for (int64_t n = blockIdx.z; n < p.n; n += gridDim.z)
        for (int64_t gy = blockIdx.y; gy < p.groups * o_tiles; gy += gridDim.y)
            for (int64_t pt = blockIdx.x; pt * TP < P; pt += gridDim.x) {
                const int64_t g = gy / o_tiles;
                const int64_t o0 = (gy % o_tiles) * TO; /* within the group */
                const int64_t p0 = pt * TP;
                const float *xg = x + (n * p.c + g * p.cpg) * p.h * p.w;
                float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
                for (int64_t k0 = 0; k0 < p.K; k0 += TK) {
                    for (int r = tid; r < TK * TO; r += 256) {
                        const int kk = r / TO, oo = r % TO;
                        const int64_t o = o0 + oo, k = k0 + kk;
                        float v = 0.0f;
                        if (o < p.opg && k < p.K) {
                            const uint32_t *row = w + (g * p.opg + o) * p.row_words;
                            v = fxs_elem_decode((row[k / per] >> ((k % per) * p.bits)) & cmask,
                                                p.bits, p.has_zero);
                        }
                        ws[kk][oo] = v;
                    }
                    for (int r = tid; r < TK * TP; r += 256) {
                        const int kk = r / TP, pp = r % TP;
                        const int64_t k = k0 + kk, q = p0 + pp;
                        float v = 0.0f;
                        if (k < p.K && q < P) {
                            const int64_t ci = k / (p.kh * p.kw), kr = k % (p.kh * p.kw);
                            const int64_t ky = kr / p.kw, kx = kr % p.kw;
                            const int64_t ih = (q / p.out_w) * p.sh - p.ph + ky * p.dh;
                            const int64_t iw = (q % p.out_w) * p.sw - p.pw + kx * p.dw;
                            if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
                                v = xg[(ci * p.h + ih) * p.w + iw];
                        }
                        xs[kk][pp] = v;
                    }
                    __syncthreads();
#pragma unroll
                    for (int kk = 0; kk < TK; ++kk) {
                        const float a0 = ws[kk][ty], a1 = ws[kk][ty + 16];
                        const float b0 = xs[kk][tx], b1 = xs[kk][tx + 16];
                        acc[0][0] = fmaf(a0, b0, acc[0][0]);
                        acc[0][1] = fmaf(a0, b1, acc[0][1]);
                        acc[1][0] = fmaf(a1, b0, acc[1][0]);
                        acc[1][1] = fmaf(a1, b1, acc[1][1]);
                    }
                    __syncthreads();
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int64_t o = o0 + ty + 16 * i;
                    if (o >= p.opg)
                        continue;
                    const int64_t oc = g * p.opg + o;
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const int64_t q = p0 + tx + 16 * j;
                        if (q < P)
                            y[(n * p.o + oc) * P + q] = finish(acc[i][j], scale, bias, oc);
                    }
                }
            }
}

/* 1 if ptr is device (or managed) memory of the current context. */
int device_pointer(const void *ptr)
{
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
        cudaGetLastError(); /* clear */
        return 0;
    }
    return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

int prepare_device(const void *const *ptrs, int n)
{
    int dev = 0, i;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return FXS_ERR_NO_DEVICE;
    }
    for (i = 0; i < n; ++i)
        if (ptrs[i] && !device_pointer(ptrs[i]))
            return FXS_ERR_BAD_POINTER;
    return FXS_OK;
}

int launch_status()
{
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess)
        return FXS_OK;
    return (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) ? FXS_ERR_NO_DEVICE
                                                                          : FXS_ERR_CUDA;
}

unsigned clamp_grid(int64_t v, int64_t limit)
{
    return (unsigned)(v < 1 ? 1 : (v > limit ? limit : v));
}

} // namespace

extern "C" {

FXS_API int fxs_cuda_abi_version(void) { return FXS_ABI_VERSION; }

FXS_API int fxs_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

FXS_API int fxs_cuda_shift_linear_ex(const float *x, int64_t x_len, int64_t batch,
                                     int64_t in_features, const uint32_t *w, int64_t w_words,
                                     int64_t out_features, int bits, int has_zero,
                                     const float *scale, int64_t scale_len, const float *bias,
                                     int64_t bias_len, float *y, int64_t y_len, void *stream)
{
    fxs_linear_sizes sz;
    int st = fxs_check_linear(x, x_len, batch, in_features, w, w_words, out_features, bits,
                              has_zero, bias, bias_len, y, y_len, &sz);
    const void *ptrs[5] = {x, w, bias, y, scale};
    if (st != FXS_OK)
        return st;
    if (scale && scale_len != out_features)
        return FXS_ERR_BIAS_SIZE;
    if ((st = prepare_device(ptrs, 5)) != FXS_OK)
        return st;
    dim3 grid(clamp_grid((out_features + LIN_WARPS - 1) / LIN_WARPS, 0x7fffffff),
              clamp_grid((batch + LIN_BT - 1) / LIN_BT, 65535));
    linear_kernel<<<grid, LIN_WARPS * 32, 0, (cudaStream_t)stream>>>(
        x, batch, in_features, w, sz.row_words, out_features, bits, has_zero, scale, bias, y);
    return launch_status();
}

FXS_API int fxs_cuda_shift_linear(const float *x, int64_t x_len, int64_t batch,
                                  int64_t in_features, const uint32_t *w, int64_t w_words,
                                  int64_t out_features, int bits, int has_zero, const float *bias,
                                  int64_t bias_len, float *y, int64_t y_len, void *stream)
{
    return fxs_cuda_shift_linear_ex(x, x_len, batch, in_features, w, w_words, out_features, bits,
                                    has_zero, NULL, 0, bias, bias_len, y, y_len, stream);
}

FXS_API int fxs_cuda_shift_conv2d_ex(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                                     const uint32_t *w, int64_t w_words, int bits, int has_zero,
                                     const float *scale, int64_t scale_len, const float *bias,
                                     int64_t bias_len, float *y, int64_t y_len, void *stream)
{
    fxs_conv_sizes z;
    ConvParams p;
    int st = fxs_check_conv(shape, x, x_len, w, w_words, bits, has_zero, bias, bias_len, y, y_len,
                            &z);
    const void *ptrs[5] = {x, w, bias, y, scale};
    if (st != FXS_OK)
        return st;
    if (scale && scale_len != shape->out_channels)
        return FXS_ERR_BIAS_SIZE;
    if ((st = prepare_device(ptrs, 5)) != FXS_OK)
        return st;
    p.n = shape->n; p.c = shape->c; p.h = shape->h; p.w = shape->w; p.o = shape->out_channels;
    p.kh = shape->kh; p.kw = shape->kw; p.sh = shape->stride_h; p.sw = shape->stride_w;
    p.ph = shape->pad_h; p.pw = shape->pad_w; p.dh = shape->dilation_h; p.dw = shape->dilation_w;
    p.groups = shape->groups;
    p.out_h = z.out_h; p.out_w = z.out_w; p.cpg = z.c_per_group; p.opg = z.o_per_group;
    p.K = z.k; p.row_words = z.row_words; p.bits = bits; p.has_zero = has_zero;
    dim3 block(16, 16);
    dim3 grid(clamp_grid((z.out_h * z.out_w + TP - 1) / TP, 0x7fffffff),
              clamp_grid(shape->groups * ((z.o_per_group + TO - 1) / TO), 65535),
              clamp_grid(shape->n, 65535));
    conv_kernel<<<grid, block, 0, (cudaStream_t)stream>>>(p, x, w, scale, bias, y);
    return launch_status();
}

FXS_API int fxs_cuda_shift_conv2d(const fxs_conv2d_shape *shape, const float *x, int64_t x_len,
                                  const uint32_t *w, int64_t w_words, int bits, int has_zero,
                                  const float *bias, int64_t bias_len, float *y, int64_t y_len,
                                  void *stream)
{
    return fxs_cuda_shift_conv2d_ex(shape, x, x_len, w, w_words, bits, has_zero, NULL, 0, bias,
                                    bias_len, y, y_len, stream);
}

} // extern "C"
