"""libfxshift through fxshift.ops.native: kernels vs torch, every ISA vs the scalar reference,
the fixed-point path vs a pure-torch model of its semantics, argument errors, threads.

The library must be built (CI installs the package, which builds it); if it is
missing these tests fail with the NativeError that says how to build it.
"""
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fxshift.errors import FxshiftError, NativeError
from fxshift.ops import native, packing

HYP = settings(max_examples=40, deadline=None, derandomize=True)
REPO = Path(__file__).resolve().parent.parent
ISAS = native.supported_isas()  # loads the library: a missing build fails here, loudly


def random_packed(gen, shape, bits, has_zero):
    mmax = (1 << (bits - 1)) - 1
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    if has_zero:
        sign[torch.rand(shape, generator=gen) < 0.2] = 0
    # mostly small shifts (the interesting, large weights), some large
    mag = torch.where(torch.rand(shape, generator=gen) < 0.8, torch.randint(0, min(mmax, 8) + 1, shape,
                                                                           generator=gen),
                      torch.randint(0, mmax + 1, shape, generator=gen))
    mag = torch.where((sign < 0) & (mag == mmax) & bool(has_zero), mmax - 1, mag).to(torch.uint8)
    return packing.pack(sign, mag, bits, has_zero)


def assert_close_to(y, ref64, mag64, what=""):
    """|y - exact| <= 2e-5 * sum|w*x| + 1e-6, elementwise (float32 summation error only)."""
    assert y.dtype == torch.float32 and y.shape == ref64.shape, what
    err = (y.double() - ref64).abs()
    tol = 2e-5 * mag64 + 1e-6
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {y.numel()} outside tolerance, max err {err.max():.3g}"


def each_isa(fn):
    """fn() under every supported ISA: {isa: result}."""
    out = {}
    for isa in ISAS:
        with native.forced_isa(isa):
            out[isa] = fn()
    return out


def test_library_info():
    assert native.library_path().is_file()
    assert native.active_isa() in ISAS
    assert ISAS[0] == "scalar"
    assert native.get_num_threads() >= 1


def _normalize(decl: str) -> str:
    decl = re.sub(r"\s+", " ", decl).strip()
    return re.sub(r"\s*([(),*;])\s*", r"\1", decl)


def _header_text(path: Path) -> str:
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _header_functions(path: Path) -> set:
    return {_normalize(m.group(1) + ";") for m in re.finditer(r"FXS_API\s+([^;]+);", _header_text(path))}


def test_cdef_matches_headers():
    """The cffi declarations are the header's: a drifting signature would corrupt memory."""
    lines = native.CDEF.splitlines() + native.CUDA_CDEF.splitlines()
    cdef = {_normalize(line) for line in lines if line.strip().endswith(");") and not line.startswith("typedef")}
    header_text = _normalize(_header_text(REPO / "native" / "include" / "fxshift.h"))
    for typedef in (line for line in lines if line.startswith("typedef") and line.strip().endswith(");")):
        assert _normalize(typedef) in header_text, typedef  # callback types the C side calls through
    header = _header_functions(REPO / "native" / "include" / "fxshift.h")
    cuda_header = REPO / "native" / "include" / "fxshift_cuda.h"
    if cuda_header.exists():
        header |= _header_functions(cuda_header)
    assert header == cdef
    text = _header_text(REPO / "native/include/fxshift.h")
    struct = re.search(r"typedef struct fxs_conv2d_shape \{(.*?)\}", native.CDEF, re.S).group(1)
    hstruct = re.search(r"typedef struct fxs_conv2d_shape \{(.*?)\}", text, re.S).group(1)
    assert _normalize(struct) == _normalize(hstruct)
    # status codes and ISA ids
    for name, value in re.findall(r"FXS_(ERR_\w+|OK)\s*=\s*(-?\d+)", text):
        assert getattr(native, name) == int(value), name
    for name, value in re.findall(r"FXS_ISA_(\w+)\s*=\s*(-?\d+)", text):
        assert native.ISAS[name.lower()] == int(value), name
    abi = re.search(r"FXS_ABI_VERSION (\d+)", (REPO / "native/include/fxshift.h").read_text()).group(1)
    assert native.ABI_VERSION == int(abi)


# ---- float kernels vs torch ------------------------------------------------------------------
def check_linear(batch_shape, k, o, bits, has_zero, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    words = random_packed(gen, (o, k), bits, has_zero)
    w = packing.unpack(words, (o, k), bits, has_zero)
    x = torch.randn(*batch_shape, k, generator=gen)
    bias = torch.randn(o, generator=gen) if with_bias else None
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    mag = F.linear(x.double().abs(), w.double().abs(), None if bias is None else bias.double().abs())
    ys = each_isa(lambda: native.shift_linear(x, words, o, bits, has_zero, bias))
    for isa, y in ys.items():
        assert_close_to(y, ref, mag, f"shift_linear[{isa}]")
        torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-4, atol=1e-4)
        # the SIMD kernels agree with the scalar reference (summation order only)
        assert_close_to(y, ys["scalar"].double(), mag, f"{isa} vs scalar")
    return ys


@HYP
@given(batch=st.integers(1, 7), k=st.integers(1, 300), o=st.integers(1, 70), bits=st.integers(2, 9),
       has_zero=st.integers(0, 1), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_shift_linear_matches_torch(batch, k, o, bits, has_zero, with_bias, seed):
    check_linear((batch,), k, o, bits, has_zero, with_bias, seed)


@pytest.mark.parametrize("batch_shape,k,o,bits", [((1,), 4096, 19, 5), ((2, 3), 700, 40, 4), ((9,), 1030, 37, 6),
                                                  ((), 64, 8, 3)])
def test_shift_linear_shapes(batch_shape, k, o, bits):
    ys = check_linear(batch_shape, k, o, bits, 1, True, 7)
    assert ys["scalar"].shape == (*batch_shape, o)


@pytest.mark.parametrize("batch", [5, 8, 9, 31, 32, 33])
@pytest.mark.parametrize("bits,has_zero", [(5, 1), (7, 0)])
def test_shift_linear_batch_chunks(batch, bits, has_zero):
    """Batches the GEMVs run in chunks of 4 rows (avx2 up to 8, avx512 up to 32), and past those limits the
    blocked GEMM: every ISA against the scalar reference, with and without a per-channel scale."""
    check_linear((batch,), 333, 41, bits, has_zero, True, batch)
    gen = torch.Generator().manual_seed(batch)
    words = random_packed(gen, (41, 333), bits, has_zero)
    x, bias = torch.randn(batch, 333, generator=gen), torch.randn(41, generator=gen)
    scale = torch.rand(41, generator=gen) + 0.5
    w = packing.unpack(words, (41, 333), bits, has_zero)
    mag = F.linear(x.double().abs(), w.double().abs()) * scale.double() + bias.double().abs()
    ys = each_isa(lambda: native.shift_linear(x, words, 41, bits, has_zero, bias, scale=scale))
    for isa, y in ys.items():
        assert_close_to(y, ys["scalar"].double(), mag, f"scaled {isa} vs scalar")


def check_conv(n, c, h, w, o, kh, kw, stride, padding, dilation, groups, bits, has_zero, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (o, c // groups, kh, kw)
    words = random_packed(gen, shape, bits, has_zero)
    wt = packing.unpack(words, shape, bits, has_zero)
    x = torch.randn(n, c, h, w, generator=gen)
    bias = torch.randn(o, generator=gen) if with_bias else None
    kw_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = F.conv2d(x.double(), wt.double(), None if bias is None else bias.double(), **kw_args)
    mag = F.conv2d(x.double().abs(), wt.double().abs(), None if bias is None else bias.double().abs(), **kw_args)
    ys = each_isa(lambda: native.shift_conv2d(x, words, shape, stride, padding, dilation, groups, bits, has_zero,
                                              bias))
    for isa, y in ys.items():
        assert_close_to(y, ref, mag, f"shift_conv2d[{isa}]")
        torch.testing.assert_close(y, F.conv2d(x, wt, bias, **kw_args), rtol=1e-4, atol=1e-4)
        assert_close_to(y, ys["scalar"].double(), mag, f"{isa} vs scalar")


@HYP
@given(n=st.integers(1, 3), cpg=st.integers(1, 5), groups=st.integers(1, 3), opg=st.integers(1, 6),
       h=st.integers(1, 12), w=st.integers(1, 19), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 3), pw=st.integers(0, 3),
       dh=st.integers(1, 3), dw=st.integers(1, 2), bits=st.integers(2, 9), has_zero=st.integers(0, 1),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_shift_conv2d_matches_torch(n, cpg, groups, opg, h, w, kh, kw, sh, sw, ph, pw, dh, dw, bits, has_zero,
                                    with_bias, seed):
    assume(h + 2 * ph >= dh * (kh - 1) + 1 and w + 2 * pw >= dw * (kw - 1) + 1)
    check_conv(n, cpg * groups, h, w, opg * groups, kh, kw, (sh, sw), (ph, pw), (dh, dw), groups, bits, has_zero,
               with_bias, seed)


@pytest.mark.parametrize("n,c,hw,o,k,s,p", [
    (1, 3, 32, 16, 7, 2, 3),     # stem
    (2, 16, 14, 16, 3, 1, 1),    # basic block
    (1, 16, 16, 32, 3, 2, 1),    # strided
    (2, 32, 8, 48, 1, 2, 0),     # downsample
    (1, 300, 5, 8, 3, 1, 1),     # K > one GEMM K-block
    (1, 8, 35, 8, 3, 1, 1),      # output rows longer than a column panel
])
def test_shift_conv2d_resnet_like(n, c, hw, o, k, s, p):
    check_conv(n, c, hw, hw, o, k, k, s, p, 1, 1, 5, 1, True, 3)


def test_depthwise_and_dilated():
    check_conv(2, 12, 10, 9, 12, 3, 3, 1, 1, 1, 12, 4, 1, True, 11)
    check_conv(1, 6, 13, 13, 9, 3, 3, 1, 2, 2, 3, 6, 0, False, 12)


# ---- fixed point vs a pure-torch model of the semantics ------------------------------------------
def fixed_linear_model(x, words, o, bits, has_zero, bias, frac_bits):
    """int64 sum of ±(x >> m) (floor shifts) started from bias, then float32(sum * 2^-frac_bits)."""
    k = x.shape[-1]
    sign, mag = packing.unpack_codes(words, (o, k), bits, has_zero)
    m = mag.to(torch.int64).clamp(max=31)  # an int32 shifted by >= 31 is 0 or -1 either way
    terms = x.to(torch.int64).reshape(-1, 1, k) >> m.unsqueeze(0)
    acc = (terms * sign.to(torch.int64).unsqueeze(0)).sum(-1)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return (acc.to(torch.float64) * 2.0 ** -frac_bits).to(torch.float32).reshape(*x.shape[:-1], o)


def fixed_conv_model(x, words, shape, stride, padding, dilation, groups, bits, has_zero, bias, frac_bits):
    o, cpg, kh, kw = shape
    n = x.shape[0]
    sign, mag = packing.unpack_codes(words, (o, cpg * kh * kw), bits, has_zero)
    m = mag.to(torch.int64).clamp(max=31)
    cols = F.unfold(x.to(torch.float64), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.to(torch.int64)  # exact: int32 values are exact in float64
    opg = o // groups
    kg = cpg * kh * kw
    outs = []
    for g in range(groups):
        cg = cols[:, g * kg:(g + 1) * kg]                                   # (N, Kg, L)
        terms = cg.unsqueeze(1) >> m[g * opg:(g + 1) * opg].unsqueeze(0).unsqueeze(-1)
        outs.append((terms * sign[g * opg:(g + 1) * opg].to(torch.int64).unsqueeze(0).unsqueeze(-1)).sum(2))
    acc = torch.cat(outs, 1)
    if bias is not None:
        acc = acc + bias.to(torch.int64).view(1, -1, 1)
    y = (acc.to(torch.float64) * 2.0 ** -frac_bits).to(torch.float32)
    oh = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return y.reshape(n, o, oh, ow)


def random_fixed(gen, shape, extremes=True):
    x = torch.randint(-(2**17), 2**17, shape, generator=gen, dtype=torch.int64)
    if extremes:
        pick = torch.rand(shape, generator=gen)
        x = torch.where(pick < 0.05, -(2**31), x)
        x = torch.where((pick >= 0.05) & (pick < 0.1), 2**31 - 1, x)
    return x.to(torch.int32)


@HYP
@given(batch=st.integers(1, 4), k=st.integers(1, 120), o=st.integers(1, 20), bits=st.integers(2, 9),
       has_zero=st.integers(0, 1), frac_bits=st.integers(0, 31), with_bias=st.booleans(),
       extremes=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_shift_linear_fixed_matches_model(batch, k, o, bits, has_zero, frac_bits, with_bias, extremes, seed):
    gen = torch.Generator().manual_seed(seed)
    words = random_packed(gen, (o, k), bits, has_zero)
    x = random_fixed(gen, (batch, k), extremes)
    bias = random_fixed(gen, (o,)) if with_bias else None
    want = fixed_linear_model(x, words, o, bits, has_zero, bias, frac_bits)
    for isa, y in each_isa(lambda: native.shift_linear_fixed(x, words, o, bits, has_zero, bias,
                                                             frac_bits)).items():
        assert torch.equal(y, want), isa


@HYP
@given(n=st.integers(1, 2), cpg=st.integers(1, 4), groups=st.integers(1, 2), opg=st.integers(1, 4),
       h=st.integers(2, 9), w=st.integers(2, 9), k=st.integers(1, 3), stride=st.integers(1, 2),
       pad=st.integers(0, 2), dil=st.integers(1, 2), bits=st.integers(2, 9), has_zero=st.integers(0, 1),
       frac_bits=st.integers(0, 31), extremes=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_shift_conv2d_fixed_matches_model(n, cpg, groups, opg, h, w, k, stride, pad, dil, bits, has_zero,
                                          frac_bits, extremes, seed):
    assume(h + 2 * pad >= dil * (k - 1) + 1 and w + 2 * pad >= dil * (k - 1) + 1)
    gen = torch.Generator().manual_seed(seed)
    shape = (opg * groups, cpg, k, k)
    words = random_packed(gen, shape, bits, has_zero)
    x = random_fixed(gen, (n, cpg * groups, h, w), extremes)
    bias = random_fixed(gen, (shape[0],))
    args = ((stride, stride), (pad, pad), (dil, dil), groups, bits, has_zero, bias, frac_bits)
    want = fixed_conv_model(x, words, shape, *args)
    for isa, y in each_isa(lambda: native.shift_conv2d_fixed(x, words, shape, *args)).items():
        assert torch.equal(y, want), isa


def test_fixed_point_of_deepshift_activations():
    """to_fixed + the fixed kernel equal the float kernel on the rounded activations (exact weights)."""
    gen = torch.Generator().manual_seed(5)
    words = random_packed(gen, (10, 30), 5, 1)
    x = torch.randn(3, 30, generator=gen)
    xf = packing.to_fixed(x, 16, 16)
    y_fixed = native.shift_linear_fixed(xf, words, 10, 5, 1, None, 16)
    w = packing.unpack(words, (10, 30), 5, 1)
    y_float = F.linear(xf.double() * 2.0 ** -16, w.double()).float()
    torch.testing.assert_close(y_fixed, y_float, rtol=1e-4, atol=30 * 2.0 ** -16)


# ---- arguments ---------------------------------------------------------------------------------
def _linear_args():
    words = packing.pack(torch.ones(4, 12, dtype=torch.int8), torch.zeros(4, 12, dtype=torch.uint8), 5, 0)
    return torch.randn(3, 12), words, torch.randn(4)


def _conv_args():
    words = packing.pack(torch.ones(8, 18, dtype=torch.int8), torch.zeros(8, 18, dtype=torch.uint8), 5, 0)
    return torch.randn(1, 4, 6, 6), words, (8, 2, 3, 3)


LINEAR_ERRORS = {
    "x dtype": (lambda x, w, b: native.shift_linear(x.double(), w, 4, 5, 0, b), "float32"),
    "x not contiguous": (lambda x, w, b: native.shift_linear(torch.randn(12, 3).t(), w, 4, 5, 0, b), "contiguous"),
    "x device": (lambda x, w, b: native.shift_linear(x.to("meta"), w, 4, 5, 0, b), "CPU"),
    "x not a tensor": (lambda x, w, b: native.shift_linear(x.tolist(), w, 4, 5, 0, b), "torch.Tensor"),
    "words dtype": (lambda x, w, b: native.shift_linear(x, w.float(), 4, 5, 0, b), "int32"),
    "word count": (lambda x, w, b: native.shift_linear(x, w[:3], 4, 5, 0, b), "wrong word count"),
    "in_features": (lambda x, w, b: native.shift_linear(x[:, :6].contiguous(), w, 4, 5, 0, b), "word count"),
    "bias size": (lambda x, w, b: native.shift_linear(x, w, 4, 5, 0, b[:3]), "bias"),
    "bias dtype": (lambda x, w, b: native.shift_linear(x, w, 4, 5, 0, b.double()), "bias"),
    "bits": (lambda x, w, b: native.shift_linear(x, w, 4, 10, 0, b), "bits"),
    "has_zero": (lambda x, w, b: native.shift_linear(x, w, 4, 5, 3, b), "has_zero"),
    "out_features": (lambda x, w, b: native.shift_linear(x, w, 0, 5, 0, b), "out_features"),
    "fixed x dtype": (lambda x, w, b: native.shift_linear_fixed(x, w, 4, 5, 0, None, 8), "int32"),
    "frac_bits": (lambda x, w, b: native.shift_linear_fixed(x.to(torch.int32), w, 4, 5, 0, None, 32), "frac_bits"),
    "fixed bias dtype": (lambda x, w, b: native.shift_linear_fixed(x.to(torch.int32), w, 4, 5, 0, b, 8), "bias"),
}


@pytest.mark.parametrize("case", sorted(LINEAR_ERRORS))
def test_linear_argument_errors(case):
    fn, match = LINEAR_ERRORS[case]
    with pytest.raises(native.NativeArgumentError, match=match) as info:
        fn(*_linear_args())
    assert isinstance(info.value, NativeError) and isinstance(info.value, ValueError)


CONV_ERRORS = {
    "stride 0": (dict(stride=0), "geometry"),
    "negative padding": (dict(padding=(-1, 0)), "geometry"),
    "dilation 0": (dict(dilation=(1, 0)), "geometry"),
    "output empty": (dict(dilation=4), "geometry"),
    "groups 0": (dict(groups=0), "groups"),
    "groups vs channels": (dict(groups=3), "channels"),
    "groups vs out": (dict(shape=(7, 2, 3, 3)), "groups|word count"),
    "weight rank": (dict(shape=(8, 2, 3)), "weight_shape"),
    "x rank": (dict(x=torch.randn(4, 6, 6)), "4-D"),
    "word count": (dict(shape=(8, 2, 3, 2)), "wrong word count"),
    "bits": (dict(bits=1), "bits"),
    "bias": (dict(bias=torch.randn(7)), "bias"),
    "x dtype": (dict(x=torch.randn(1, 4, 6, 6).half()), "float32"),
    "stride tuple": (dict(stride=(1, 2, 3)), "stride"),
}


@pytest.mark.parametrize("case", sorted(CONV_ERRORS))
def test_conv_argument_errors(case):
    x, words, shape = _conv_args()
    args = dict(x=x, shape=shape, stride=1, padding=1, dilation=1, groups=2, bits=5, bias=None)
    args.update(CONV_ERRORS[case][0])
    with pytest.raises(native.NativeArgumentError, match=CONV_ERRORS[case][1]):
        native.shift_conv2d(args["x"], words, args["shape"], args["stride"], args["padding"], args["dilation"],
                            args["groups"], args["bits"], 0, args["bias"])


def test_errors_are_fxshift_errors():
    x, words, b = _linear_args()
    with pytest.raises(FxshiftError):
        native.shift_linear(x, words[:2].contiguous(), 4, 5, 0, b)
    x, words, shape = _conv_args()
    with pytest.raises(FxshiftError):
        native.shift_conv2d(x, torch.zeros(8, 1, dtype=torch.int32), shape, 1, 0, 1, 2, 5, 1, None)
    with pytest.raises(FxshiftError, match="unknown ISA"):
        native.force_isa("sse9")
    with pytest.raises(FxshiftError):
        native.shift_conv2d_fixed(x.to(torch.int32), words, shape, 1, 1, 1, 2, 5, 0, None, -1)


def test_empty_and_multidim_inputs():
    x, words, b = _linear_args()
    assert native.shift_linear(torch.randn(0, 12), words, 4, 5, 0, b).shape == (0, 4)
    y = native.shift_linear(x.reshape(3, 1, 12), words, 4, 5, 0, b)
    torch.testing.assert_close(y.reshape(3, 4), native.shift_linear(x, words, 4, 5, 0, b))
    x, words, shape = _conv_args()
    assert native.shift_conv2d(torch.randn(0, 4, 6, 6), words, shape, 1, 1, 1, 2, 5, 0).shape == (0, 8, 6, 6)
    assert native.conv2d_output_size((1, 4, 6, 6), shape, 2, 1, 1, 2) == (3, 3)


# ---- threads, ISA, loading ------------------------------------------------------------------------
def test_thread_counts_give_identical_results():
    gen = torch.Generator().manual_seed(3)
    words = random_packed(gen, (70, 500), 5, 1)
    x = torch.randn(2, 500, generator=gen)
    cw = random_packed(gen, (24, 16, 3, 3), 4, 0)
    cx = torch.randn(2, 16, 15, 15, generator=gen)
    default = native.get_num_threads()
    ref = native.shift_linear(x, words, 70, 5, 1)
    cref = native.shift_conv2d(cx, cw, (24, 16, 3, 3), 1, 1, 1, 1, 4, 0)
    try:
        for n in (1, 2, 3):
            native.set_num_threads(n)
            assert native.get_num_threads() == n
            assert torch.equal(native.shift_linear(x, words, 70, 5, 1), ref)
            assert torch.equal(native.shift_conv2d(cx, cw, (24, 16, 3, 3), 1, 1, 1, 1, 4, 0), cref)
        with pytest.raises(native.NativeArgumentError, match="thread"):
            native.set_num_threads(-1)
    finally:
        native.set_num_threads(0)
    assert native.get_num_threads() == default


def test_concurrent_callers():
    gen = torch.Generator().manual_seed(4)
    words = random_packed(gen, (64, 300), 5, 1)
    x = torch.randn(3, 300, generator=gen)
    ref = native.shift_linear(x, words, 64, 5, 1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: native.shift_linear(x, words, 64, 5, 1), range(16)))
    assert all(torch.equal(r, ref) for r in results)


def test_forced_isa_restores():
    before = native.active_isa()
    with native.forced_isa("scalar"):
        assert native.active_isa() == "scalar"
    assert native.active_isa() == before


def test_missing_library_raises_native_error_with_build_hint(monkeypatch):
    saved = dict(native._state)
    monkeypatch.setattr(native, "candidates", lambda stem: [Path("/nonexistent/libfxshift.so")])
    native._state.pop("cpu", None)
    try:
        with pytest.raises(NativeError, match="cmake -S . -B build/dev"):
            native.load()
    finally:
        native._state.clear()
        native._state.update(saved)
    assert native.active_isa() in ISAS


def test_search_order_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FXSHIFT_NATIVE_DIR", str(tmp_path))
    from fxshift.ops import libraries

    cands = libraries.candidates("fxshift")
    assert cands[0] == tmp_path / libraries.library_filename("fxshift")
    assert any(p.parent.name == "_native" for p in cands[1:3])


def test_cuda_entry_points_without_device():
    kernels = native.cuda()
    if kernels is None:  # built without nvcc: nothing to call
        return
    x, words, b = _linear_args()
    with pytest.raises(native.NativeArgumentError, match="CUDA"):
        kernels.shift_linear(x, words, 4, 5, 0, b)
    assert kernels.device_count() >= 0


def test_gil_released_during_kernels():
    """A second Python thread keeps running while a long kernel call is in C."""
    gen = torch.Generator().manual_seed(6)
    words = random_packed(gen, (1024, 4096), 5, 0)
    x = torch.randn(1, 4096, generator=gen)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)

    t = threading.Thread(target=ticker)
    with native.forced_isa("scalar"):  # slow enough to measure
        t.start()
        native.shift_linear(x, words, 1024, 5, 0)
        stop.set()
        t.join()
    assert len(ticks) > 100


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernels_work_in_a_forked_child():
    """The thread pool is rebuilt in a fork() child (its workers do not exist there)."""
    gen = torch.Generator().manual_seed(8)
    words = random_packed(gen, (256, 512), 5, 1)
    x = torch.randn(2, 512, generator=gen)
    native.set_num_threads(2)
    try:
        ref = native.shift_linear(x, words, 256, 5, 1)  # starts the workers
        pid = os.fork()
        if pid == 0:  # child: exit status says whether the kernel worked
            ok = False
            try:
                ok = torch.equal(native.shift_linear(x, words, 256, 5, 1), ref)
            finally:
                os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60  # a broken pool deadlocks the child: do not hang
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung in a native kernel (thread pool not reset after fork)")
            time.sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        native.set_num_threads(0)


CUDA_OK = torch.cuda.is_available() and native.cuda() is not None and native.cuda().device_count() > 0


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and libfxshift_cuda")
def test_cuda_kernels_match_cpu():
    cuda = native.cuda()
    gen = torch.Generator().manual_seed(9)
    words = random_packed(gen, (70, 300), 5, 1)
    x = torch.randn(5, 300, generator=gen)
    bias = torch.randn(70, generator=gen)
    ref = native.shift_linear(x, words, 70, 5, 1, bias)
    y = cuda.shift_linear(x.cuda(), words.cuda(), 70, 5, 1, bias.cuda())
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
    shape = (12, 3, 3, 3)
    cw = random_packed(gen, shape, 4, 0)
    cx = torch.randn(2, 6, 11, 13, generator=gen)
    for stride, pad, dil, groups in [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 2)]:
        w_shape = (12, 6 // groups, 3, 3)
        cw = random_packed(gen, w_shape, 4, 0)
        ref = native.shift_conv2d(cx, cw, w_shape, stride, pad, dil, groups, 4, 0)
        y = cuda.shift_conv2d(cx.cuda(), cw.cuda(), w_shape, stride, pad, dil, groups, 4, 0)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)
