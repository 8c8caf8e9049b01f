/*
 * fxs_elem.h - per-element math of the packed shift format, shared by the CPU
 * kernels (C99) and the CUDA kernels (nvcc): code extraction, decode to float,
 * fixed-point shift-accumulate, encode.  Every function is `static inline` and
 * FXS_HD, which expands to __host__ __device__ under nvcc and to nothing under
 * a C compiler, so the host tests exercise exactly the code the GPU runs.
 *
 * The format itself is documented in native/include/fxshift.h.
 */
#ifndef FXS_ELEM_H
#define FXS_ELEM_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#  define FXS_HD __host__ __device__
#else
#  define FXS_HD
#endif

#define FXS_ELEM_MAX_NORMAL_SHIFT 126 /* 2^-126 is the smallest normal float32 */

/* Codes per 32-bit word, 0 for an invalid bits value. */
FXS_HD static inline int fxs_elem_codes_per_word(int bits)
{
    return (bits >= 2 && bits <= 9) ? 32 / bits : 0;
}

/* Words per packed row of k codes (k >= 0, bits valid). */
FXS_HD static inline int64_t fxs_elem_row_words(int64_t k, int bits)
{
    int64_t per = fxs_elem_codes_per_word(bits);
    return per > 0 ? (k + per - 1) / per : 0;
}

/* The code for column j of a packed row (j < row_words * codes_per_word). */
FXS_HD static inline uint32_t fxs_elem_code_at(const uint32_t *row, int64_t j, int bits)
{
    int per = 32 / bits;
    uint32_t word = row[j / per];
    unsigned shift = (unsigned)((j % per) * bits);
    return (word >> shift) & ((1u << bits) - 1u);
}

FXS_HD static inline uint32_t fxs_elem_mag_mask(int bits) { return (1u << (bits - 1)) - 1u; }
FXS_HD static inline uint32_t fxs_elem_zero_code(int bits) { return (1u << bits) - 1u; }

FXS_HD static inline int fxs_elem_is_zero(uint32_t code, int bits, int has_zero)
{
    return has_zero && code == fxs_elem_zero_code(bits);
}

/* IEEE-754 bit pattern of the float32 value of a code. */
FXS_HD static inline uint32_t fxs_elem_decode_bits(uint32_t code, int bits, int has_zero)
{
    uint32_t sign = (code >> (bits - 1)) & 1u;
    uint32_t m = code & fxs_elem_mag_mask(bits);
    if (fxs_elem_is_zero(code, bits, has_zero))
        return 0u;
    if (m > FXS_ELEM_MAX_NORMAL_SHIFT)
        return sign << 31; /* below the normal range: a signed zero */
    return (sign << 31) | ((127u - m) << 23);
}

FXS_HD static inline float fxs_elem_bits_to_float(uint32_t b)
{
#if defined(__CUDA_ARCH__)
    return __uint_as_float(b);
#else
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
#endif
}

/* Float32 value of a code: 0, or (-1)^sign * 2^-m (a signed zero for m > 126). */
FXS_HD static inline float fxs_elem_decode(uint32_t code, int bits, int has_zero)
{
    return fxs_elem_bits_to_float(fxs_elem_decode_bits(code, bits, has_zero));
}

/* floor(x / 2^m) for any m (m >= 31 gives 0 or -1); arithmetic shift without UB. */
FXS_HD static inline int32_t fxs_elem_sra(int32_t x, uint32_t m)
{
    unsigned s = m > 31u ? 31u : m;
    /* Right shift of a negative value is implementation-defined in C99; build
     * the floor explicitly so that every compiler agrees. */
    if (x >= 0)
        return (int32_t)((uint32_t)x >> s);
    return (int32_t)~(~(uint32_t)x >> s);
}

/* Fixed-point contribution of one weight: +(x >> m), -(x >> m) or 0. */
FXS_HD static inline int64_t fxs_elem_shift_term(int32_t x, uint32_t code, int bits, int has_zero)
{
    int64_t t;
    if (fxs_elem_is_zero(code, bits, has_zero))
        return 0;
    t = (int64_t)fxs_elem_sra(x, code & fxs_elem_mag_mask(bits));
    return ((code >> (bits - 1)) & 1u) ? -t : t;
}

/* Encodes (sign, m); returns 0 and the code, or -1 if not representable. */
FXS_HD static inline int fxs_elem_encode(int sign, uint32_t m, int bits, int has_zero, uint32_t *code)
{
    uint32_t mmax = fxs_elem_mag_mask(bits);
    if (sign == 0) {
        if (!has_zero)
            return -1;
        *code = fxs_elem_zero_code(bits);
        return 0;
    }
    if (sign == 1) {
        if (m > mmax)
            return -1;
        *code = m;
        return 0;
    }
    if (sign == -1) {
        if (m > (has_zero ? mmax - 1u : mmax))
            return -1;
        *code = (1u << (bits - 1)) | m;
        return 0;
    }
    return -1;
}

/* Output scaling of the fixed-point kernels: (float)((double)acc * 2^-frac_bits). */
FXS_HD static inline float fxs_elem_fixed_to_float(int64_t acc, int frac_bits)
{
    double scale = 1.0 / (double)((int64_t)1 << frac_bits);
    return (float)((double)acc * scale);
}

#endif /* FXS_ELEM_H */
