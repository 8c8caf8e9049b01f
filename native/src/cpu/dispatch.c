/*
 * dispatch.c - picks the kernel table once, when the library loads: the best
 * ISA of the chain AVX512 -> AVX2 -> SCALAR that the CPU (and OS) supports and
 * the build contains.  FXSHIFT_ISA=scalar|avx2|avx512 lowers the choice;
 * fxs_force_isa() overrides it at run time (tests use it to run the scalar
 * reference).  The table pointer is the library's only global kernel state.
 */
#include <stdlib.h>
#include <string.h>

#include "fxs_internal.h"

static const fxs_kernels *table_for(int isa)
{
    switch (isa) {
    case FXS_ISA_SCALAR: return &fxs_kernels_scalar;
#if FXS_X86
    case FXS_ISA_AVX2: return &fxs_kernels_avx2;
    case FXS_ISA_AVX512: return &fxs_kernels_avx512;
#endif
    default: return NULL;
    }
}

int fxs_isa_supported(int isa)
{
    switch (isa) {
    case FXS_ISA_SCALAR: return 1;
#if FXS_X86 && defined(__GNUC__)
    case FXS_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case FXS_ISA_AVX512:
        __builtin_cpu_init();
        return fxs_isa_supported(FXS_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vbmi");
#endif
    default: return 0;
    }
}

const char *fxs_isa_name(int isa)
{
    switch (isa) {
    case FXS_ISA_AUTO: return "auto";
    case FXS_ISA_SCALAR: return "scalar";
    case FXS_ISA_AVX2: return "avx2";
    case FXS_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

static int env_isa_cap(void)
{
    const char *s = getenv("FXSHIFT_ISA");
    if (!s || !*s)
        return FXS_ISA_AVX512;
    if (strcmp(s, "scalar") == 0)
        return FXS_ISA_SCALAR;
    if (strcmp(s, "avx2") == 0)
        return FXS_ISA_AVX2;
    return FXS_ISA_AVX512;
}

static int best_isa(void)
{
    int isa = env_isa_cap();
    for (; isa > FXS_ISA_SCALAR; --isa)
        if (table_for(isa) && fxs_isa_supported(isa))
            return isa;
    return FXS_ISA_SCALAR;
}

static const fxs_kernels *active; /* atomic pointer */
static int auto_isa = -1;

__attribute__((constructor)) static void dispatch_init(void)
{
    auto_isa = best_isa();
    __atomic_store_n(&active, table_for(auto_isa), __ATOMIC_RELEASE);
}

const fxs_kernels *fxs_kernels_active(void)
{
    const fxs_kernels *k = __atomic_load_n(&active, __ATOMIC_ACQUIRE);
    if (!k) { /* constructors did not run (static link into an odd host) */
        dispatch_init();
        k = __atomic_load_n(&active, __ATOMIC_ACQUIRE);
    }
    return k;
}

int fxs_force_isa(int isa)
{
    const fxs_kernels *k;
    if (isa == FXS_ISA_AUTO) {
        if (auto_isa < 0)
            dispatch_init();
        isa = auto_isa;
    }
    k = table_for(isa);
    if (!k || !fxs_isa_supported(isa))
        return FXS_ERR_BAD_ISA;
    __atomic_store_n(&active, k, __ATOMIC_RELEASE);
    return FXS_OK;
}

int fxs_active_isa(void) { return fxs_kernels_active()->isa; }
