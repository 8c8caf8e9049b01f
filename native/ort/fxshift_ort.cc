// libfxshift_ort: onnxruntime custom-op library for the "fxshift" domain, a thin adapter over the
// kernels of libfxshift (native/include/fxshift.h).
//
//   fxshift.ShiftConv2d(X float (N,C,H,W), W int32 packed, B float (O,)?, scale float (O,)?) -> Y (N,O,OH,OW)
//       attributes: weight_shape (O, C/group, kh, kw), strides (2), pads (4, begin == end),
//                   dilations (2), group, bits, has_zero
//   fxshift.ShiftLinear(X float (..., K), W int32 packed, B float (O,)?, scale float (O,)?) -> Y (..., O)
//       attributes: in_features (K), out_features (O), bits, has_zero
//
// scale (optional, absent = 1): a per-output-channel multiplier applied to the accumulated sum before
// the bias, y = sum * scale[o] + B[o] (fxs_shift_conv2d_ex / fxs_shift_linear_ex).
//
// Threads: the kernels' parallel loops run on onnxruntime's intra-op pool (KernelContext_ParallelFor
// through libfxshift's fxs_exec callback), never on a second pool beside it.
//
// The packed format and the op semantics are those of fxshift.ops.packing / fxshift.onnx.functions
// (the model-local function bodies an exported file carries; a registered kernel takes precedence).
//
// Robustness: attributes are validated when the kernel is created (a bad node fails session
// creation with a message), shapes and buffer lengths on every call; libfxshift checks every length
// again and returns a status, which becomes an onnxruntime error. Nothing here throws across the C
// API: the library uses the C API only (OrtCustomOp filled by hand, CreateKernelV2/KernelComputeV2
// returning OrtStatus*), and every callback catches everything. Kernels hold only immutable
// attributes, so one session may run on many threads.
//
// Built against onnxruntime >= 1.16 headers (API version of the headers, e.g. 21 for 1.21); a newer
// onnxruntime loads it (the API is versioned and backward compatible).
#include <onnxruntime_c_api.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "fxshift.h"

#if defined(_WIN32)
#define FXS_ORT_EXPORT __declspec(dllexport)
#else
#define FXS_ORT_EXPORT __attribute__((visibility("default")))
#endif

namespace {

const OrtApi* g_api = nullptr;
constexpr const char* kDomain = "fxshift";
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

OrtStatus* Error(const std::string& what) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, what.c_str()); }
OrtStatus* Fail(const std::string& what) { return g_api->CreateStatus(ORT_FAIL, what.c_str()); }

std::string Join(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

bool MulOk(int64_t a, int64_t b, int64_t* out) {
  return a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, out);
}

// ---- attributes -------------------------------------------------------------------------------
OrtStatus* GetInt(const OrtKernelInfo* info, const char* op, const char* name, int64_t* out) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (st) {
    g_api->ReleaseStatus(st);
    return Error(std::string("fxshift.") + op + ": missing or non-integer attribute '" + name + "'");
  }
  return nullptr;
}

OrtStatus* GetInts(const OrtKernelInfo* info, const char* op, const char* name, size_t expected,
                   std::vector<int64_t>* out) {
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (st) {
    g_api->ReleaseStatus(st);
    return Error(std::string("fxshift.") + op + ": missing or non-integer-list attribute '" + name + "'");
  }
  if (size != expected)
    return Error(std::string("fxshift.") + op + ": attribute '" + name + "' must have " + std::to_string(expected) +
                 " values, got " + std::to_string(size));
  out->assign(size, 0);
  st = g_api->KernelInfoGetAttributeArray_int64(info, name, out->data(), &size);
  if (st || size != expected) {
    if (st) g_api->ReleaseStatus(st);
    return Error(std::string("fxshift.") + op + ": cannot read attribute '" + name + "'");
  }
  return nullptr;
}

OrtStatus* CheckFormat(const char* op, int64_t bits, int64_t has_zero) {
  if (bits < FXS_MIN_BITS || bits > FXS_MAX_BITS)
    return Error(std::string("fxshift.") + op + ": attribute bits=" + std::to_string(bits) + " is outside [" +
                 std::to_string(FXS_MIN_BITS) + ", " + std::to_string(FXS_MAX_BITS) + "]");
  if (has_zero != 0 && has_zero != 1)
    return Error(std::string("fxshift.") + op + ": attribute has_zero=" + std::to_string(has_zero) + " must be 0 or 1");
  return nullptr;
}

// ---- tensors ----------------------------------------------------------------------------------
struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t count = 0;
  const void* data = nullptr;
};

// Reads input `index`; *present is false for an absent optional input.
OrtStatus* Input(OrtKernelContext* ctx, const char* op, size_t index, const char* name, bool optional,
                 ONNXTensorElementDataType want, TensorView* t, bool* present) {
  *present = false;
  size_t n = 0;
  if (OrtStatus* st = g_api->KernelContext_GetInputCount(ctx, &n)) return st;
  if (index < n)
    if (OrtStatus* st = g_api->KernelContext_GetInput(ctx, index, &t->value)) return st;
  if (!t->value) {
    if (optional) return nullptr;
    return Error(std::string("fxshift.") + op + ": input " + name + " is missing");
  }
  int is_tensor = 0;
  if (OrtStatus* st = g_api->IsTensor(t->value, &is_tensor)) return st;
  if (!is_tensor) return Error(std::string("fxshift.") + op + ": input " + name + " must be a tensor");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = g_api->GetTensorTypeAndShape(t->value, &info)) return st;
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &t->type);
  if (!st) st = g_api->GetDimensionsCount(info, &rank);
  if (!st) {
    t->shape.assign(rank, 0);
    st = g_api->GetDimensions(info, t->shape.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  if (t->type != want)
    return Error(std::string("fxshift.") + op + ": input " + name + " has element type " + std::to_string(t->type) +
                 ", expected " + std::to_string(want));
  t->count = 1;
  for (int64_t d : t->shape)
    if (!MulOk(t->count, d, &t->count))
      return Error(std::string("fxshift.") + op + ": input " + name + " has an invalid shape " + Join(t->shape));
  if (t->count > 0) {
    void* p = nullptr;
    if (OrtStatus* s2 = g_api->GetTensorMutableData(const_cast<OrtValue*>(t->value), &p)) return s2;
    t->data = p;
  }
  *present = true;
  return nullptr;
}

OrtStatus* Output(OrtKernelContext* ctx, const std::vector<int64_t>& shape, float** data) {
  OrtValue* out = nullptr;
  if (OrtStatus* st = g_api->KernelContext_GetOutput(ctx, 0, shape.data(), shape.size(), &out)) return st;
  void* p = nullptr;
  if (OrtStatus* st = g_api->GetTensorMutableData(out, &p)) return st;
  *data = static_cast<float*>(p);
  return nullptr;
}

OrtStatus* KernelStatus(const char* op, int status, const std::string& detail) {
  std::string msg = std::string("fxshift.") + op + ": " + fxs_status_message(status) + " (status " +
                    std::to_string(status) + ")";
  if (!detail.empty()) msg += "; " + detail;
  if (status == FXS_ERR_OUT_OF_MEMORY) return Fail(msg);
  return Error(msg);
}

OrtStatus* CheckBias(const char* op, const TensorView& b, int64_t out, const char* name = "bias B") {
  if (b.shape.size() != 1 || b.shape[0] != out)
    return Error(std::string("fxshift.") + op + ": " + name + " has shape " + Join(b.shape) + ", expected (" +
                 std::to_string(out) + ",)");
  return nullptr;
}

// ---- onnxruntime's intra-op pool as libfxshift's parallel-for ------------------------------------
struct PoolCall {
  fxs_body_fn body;
  void* arg;
};

void PoolTrampoline(void* data, size_t i) {
  const PoolCall* call = static_cast<const PoolCall*>(data);
  call->body(call->arg, static_cast<int64_t>(i));
}

// Runs body(arg, i) for i in [0, n) on the session's intra-op pool. If onnxruntime refuses, nothing
// ran and libfxshift runs the jobs on this thread.
void OrtParallelFor(void* runner, int64_t n, fxs_body_fn body, void* arg) {
  PoolCall call{body, arg};
  OrtStatus* st = g_api->KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(runner), PoolTrampoline,
                                                   static_cast<size_t>(n), static_cast<size_t>(n), &call);
  if (st) g_api->ReleaseStatus(st);
}

fxs_exec OrtExec(OrtKernelContext* ctx) {
  fxs_exec e;
  e.parallel_for = OrtParallelFor;
  e.runner = ctx;
  e.max_threads = 0;  // libfxshift's thread count (the CPUs of this process)
  return e;
}

// ---- ShiftConv2d ------------------------------------------------------------------------------
struct ShiftConv2dKernel {
  static constexpr const char* kName = "ShiftConv2d";
  std::vector<int64_t> weight_shape, strides, pads, dilations;
  int64_t group = 1, bits = 0, has_zero = 0, k = 0;

  OrtStatus* Init(const OrtKernelInfo* info) {
    const char* op = kName;
    OrtStatus* st = nullptr;
    if ((st = GetInts(info, op, "weight_shape", 4, &weight_shape)) || (st = GetInts(info, op, "strides", 2, &strides)) ||
        (st = GetInts(info, op, "pads", 4, &pads)) || (st = GetInts(info, op, "dilations", 2, &dilations)) ||
        (st = GetInt(info, op, "group", &group)) || (st = GetInt(info, op, "bits", &bits)) ||
        (st = GetInt(info, op, "has_zero", &has_zero)) || (st = CheckFormat(op, bits, has_zero)))
      return st;
    for (int64_t d : weight_shape)
      if (d < 1 || d > kMaxDim) return Error(std::string("fxshift.ShiftConv2d: weight_shape ") + Join(weight_shape) +
                                             " must be positive (and < 2^31)");
    if (!MulOk(weight_shape[1], weight_shape[2], &k) || !MulOk(k, weight_shape[3], &k) || k > kMaxDim)
      return Error("fxshift.ShiftConv2d: weight_shape " + Join(weight_shape) + " is too large");
    if (strides[0] < 1 || strides[1] < 1 || dilations[0] < 1 || dilations[1] < 1)
      return Error("fxshift.ShiftConv2d: strides " + Join(strides) + " and dilations " + Join(dilations) +
                   " must be >= 1");
    if (pads[0] < 0 || pads[1] < 0 || pads[0] != pads[2] || pads[1] != pads[3])
      return Error("fxshift.ShiftConv2d: pads " + Join(pads) +
                   " must be non-negative and symmetric (top == bottom, left == right)");
    if (group < 1 || weight_shape[0] % group != 0)
      return Error("fxshift.ShiftConv2d: group=" + std::to_string(group) + " must be >= 1 and divide the " +
                   std::to_string(weight_shape[0]) + " output channels");
    return nullptr;
  }

  OrtStatus* Compute(OrtKernelContext* ctx) const {
    const char* op = kName;
    TensorView x, w, b, sc;
    bool has_x, has_w, has_b, has_sc;
    OrtStatus* st = nullptr;
    if ((st = Input(ctx, op, 0, "X", false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &x, &has_x)) ||
        (st = Input(ctx, op, 1, "W", false, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, &w, &has_w)) ||
        (st = Input(ctx, op, 2, "B", true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &b, &has_b)) ||
        (st = Input(ctx, op, 3, "scale", true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &sc, &has_sc)))
      return st;
    const int64_t o = weight_shape[0];
    if (x.shape.size() != 4) return Error("fxshift.ShiftConv2d: X must be 4-D (N, C, H, W), got " + Join(x.shape));
    int64_t channels = 0;
    if (!MulOk(weight_shape[1], group, &channels) || x.shape[1] != channels)
      return Error("fxshift.ShiftConv2d: X has " + std::to_string(x.shape[1]) + " channels, weight_shape " +
                   Join(weight_shape) + " with group=" + std::to_string(group) + " needs " + std::to_string(channels));
    const int64_t row_words = fxs_row_words(k, static_cast<int>(bits));
    int64_t words = 0;
    if (row_words < 0 || !MulOk(o, row_words, &words) || w.count != words)
      return Error("fxshift.ShiftConv2d: W has " + std::to_string(w.count) + " words, a " + Join(weight_shape) +
                   " weight with bits=" + std::to_string(bits) + " packs to " + std::to_string(o) + " x " +
                   std::to_string(row_words) + " = " + std::to_string(words) + " words");
    if (has_b)
      if ((st = CheckBias(op, b, o))) return st;
    if (has_sc)
      if ((st = CheckBias(op, sc, o, "scale"))) return st;
    fxs_conv2d_shape s;
    std::memset(&s, 0, sizeof s);
    s.n = x.shape[0] > 0 ? x.shape[0] : 1;  // an empty batch: validate the geometry with n = 1
    s.c = x.shape[1];
    s.h = x.shape[2];
    s.w = x.shape[3];
    s.out_channels = o;
    s.kh = weight_shape[2];
    s.kw = weight_shape[3];
    s.stride_h = strides[0];
    s.stride_w = strides[1];
    s.pad_h = pads[0];
    s.pad_w = pads[1];
    s.dilation_h = dilations[0];
    s.dilation_w = dilations[1];
    s.groups = group;
    int64_t oh = 0, ow = 0;
    int status = fxs_conv2d_output_size(&s, &oh, &ow);
    if (status != FXS_OK)
      return KernelStatus(op, status, "input " + Join(x.shape) + ", weight_shape " + Join(weight_shape) + ", strides " +
                                          Join(strides) + ", pads " + Join(pads) + ", dilations " + Join(dilations) +
                                          ", group " + std::to_string(group));
    s.n = x.shape[0];
    const std::vector<int64_t> out_shape = {x.shape[0], o, oh, ow};
    float* y = nullptr;
    if ((st = Output(ctx, out_shape, &y))) return st;
    int64_t y_len = 0;
    if (!MulOk(x.shape[0], o, &y_len) || !MulOk(y_len, oh, &y_len) || !MulOk(y_len, ow, &y_len))
      return Error("fxshift.ShiftConv2d: output " + Join(out_shape) + " is too large");
    if (y_len == 0) return nullptr;
    const fxs_exec exec = OrtExec(ctx);
    status = fxs_shift_conv2d_ex(&s, static_cast<const float*>(x.data), x.count, static_cast<const uint32_t*>(w.data),
                                 w.count, static_cast<int>(bits), static_cast<int>(has_zero),
                                 has_sc ? static_cast<const float*>(sc.data) : nullptr, has_sc ? sc.count : 0,
                                 has_b ? static_cast<const float*>(b.data) : nullptr, has_b ? b.count : 0, y, y_len,
                                 &exec);
    if (status != FXS_OK) return KernelStatus(op, status, "input " + Join(x.shape) + ", weight_shape " + Join(weight_shape));
    return nullptr;
  }
};

// ---- ShiftLinear ------------------------------------------------------------------------------
struct ShiftLinearKernel {
  static constexpr const char* kName = "ShiftLinear";
  int64_t in_features = 0, out_features = 0, bits = 0, has_zero = 0;

  OrtStatus* Init(const OrtKernelInfo* info) {
    const char* op = kName;
    OrtStatus* st = nullptr;
    if ((st = GetInt(info, op, "in_features", &in_features)) || (st = GetInt(info, op, "out_features", &out_features)) ||
        (st = GetInt(info, op, "bits", &bits)) || (st = GetInt(info, op, "has_zero", &has_zero)) ||
        (st = CheckFormat(op, bits, has_zero)))
      return st;
    if (in_features < 1 || in_features > kMaxDim || out_features < 1 || out_features > kMaxDim)
      return Error("fxshift.ShiftLinear: in_features=" + std::to_string(in_features) + " and out_features=" +
                   std::to_string(out_features) + " must be in [1, 2^31)");
    return nullptr;
  }

  OrtStatus* Compute(OrtKernelContext* ctx) const {
    const char* op = kName;
    TensorView x, w, b, sc;
    bool has_x, has_w, has_b, has_sc;
    OrtStatus* st = nullptr;
    if ((st = Input(ctx, op, 0, "X", false, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &x, &has_x)) ||
        (st = Input(ctx, op, 1, "W", false, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, &w, &has_w)) ||
        (st = Input(ctx, op, 2, "B", true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &b, &has_b)) ||
        (st = Input(ctx, op, 3, "scale", true, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &sc, &has_sc)))
      return st;
    if (x.shape.empty() || x.shape.back() != in_features)
      return Error("fxshift.ShiftLinear: X has shape " + Join(x.shape) + ", its last dimension must be in_features=" +
                   std::to_string(in_features));
    const int64_t row_words = fxs_row_words(in_features, static_cast<int>(bits));
    int64_t words = 0;
    if (row_words < 0 || !MulOk(out_features, row_words, &words) || w.count != words)
      return Error("fxshift.ShiftLinear: W has " + std::to_string(w.count) + " words, a (" +
                   std::to_string(out_features) + ", " + std::to_string(in_features) + ") weight with bits=" +
                   std::to_string(bits) + " packs to " + std::to_string(words) + " words");
    if (has_b)
      if ((st = CheckBias(op, b, out_features))) return st;
    if (has_sc)
      if ((st = CheckBias(op, sc, out_features, "scale"))) return st;
    int64_t batch = 1;
    for (size_t i = 0; i + 1 < x.shape.size(); ++i)
      if (!MulOk(batch, x.shape[i], &batch)) return Error("fxshift.ShiftLinear: X shape " + Join(x.shape) + " is too large");
    std::vector<int64_t> out_shape(x.shape.begin(), x.shape.end() - 1);
    out_shape.push_back(out_features);
    int64_t y_len = 0;
    if (!MulOk(batch, out_features, &y_len)) return Error("fxshift.ShiftLinear: output is too large");
    float* y = nullptr;
    if ((st = Output(ctx, out_shape, &y))) return st;
    if (y_len == 0) return nullptr;
    const fxs_exec exec = OrtExec(ctx);
    int status = fxs_shift_linear_ex(static_cast<const float*>(x.data), x.count, batch, in_features,
                                     static_cast<const uint32_t*>(w.data), w.count, out_features,
                                     static_cast<int>(bits), static_cast<int>(has_zero),
                                     has_sc ? static_cast<const float*>(sc.data) : nullptr, has_sc ? sc.count : 0,
                                     has_b ? static_cast<const float*>(b.data) : nullptr, has_b ? b.count : 0, y,
                                     y_len, &exec);
    if (status != FXS_OK) return KernelStatus(op, status, "input " + Join(x.shape));
    return nullptr;
  }
};

// ---- OrtCustomOp over a kernel type -----------------------------------------------------------
template <typename Kernel>
struct Op : OrtCustomOp {
  Op() {
    std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp*) { return Kernel::kName; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
    GetStartVersion = [](const OrtCustomOp*) { return 1; };
    GetEndVersion = [](const OrtCustomOp*) { return 1; };
    CreateKernel = nullptr;   // the V2 entry points report errors as statuses
    KernelCompute = nullptr;
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) -> OrtStatusPtr {
      *out = nullptr;
      try {
        auto* kernel = new Kernel();
        if (OrtStatus* st = kernel->Init(info)) {
          delete kernel;
          return st;
        }
        *out = kernel;
        return nullptr;
      } catch (const std::bad_alloc&) {
        return Fail(std::string("fxshift.") + Kernel::kName + ": out of memory");
      } catch (const std::exception& e) {
        return Fail(std::string("fxshift.") + Kernel::kName + ": " + e.what());
      } catch (...) {
        return Fail(std::string("fxshift.") + Kernel::kName + ": unknown error");
      }
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatusPtr {
      try {
        return static_cast<const Kernel*>(kernel)->Compute(ctx);
      } catch (const std::bad_alloc&) {
        return Fail(std::string("fxshift.") + Kernel::kName + ": out of memory");
      } catch (const std::exception& e) {
        return Fail(std::string("fxshift.") + Kernel::kName + ": " + e.what());
      } catch (...) {
        return Fail(std::string("fxshift.") + Kernel::kName + ": unknown error");
      }
    };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  }
};

Op<ShiftConv2dKernel> g_conv_op;
Op<ShiftLinearKernel> g_linear_op;

void ReleaseDomain(void* domain) {
  if (g_api && domain) g_api->ReleaseCustomOpDomain(static_cast<OrtCustomOpDomain*>(domain));
}

}  // namespace

extern "C" FXS_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* api_base) {
  if (!api_base) return nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // An onnxruntime older than these headers. CreateStatus leads every OrtApi version, so any
    // version the runtime does serve can report the mismatch.
    uint32_t served = ORT_API_VERSION;
    while (!api && --served > 0) api = api_base->GetApi(served);
    if (!api) return nullptr;  // serves no version at all: nothing can report
    const char* runtime = api_base->GetVersionString ? api_base->GetVersionString() : nullptr;
    return api->CreateStatus(ORT_FAIL, ("libfxshift_ort was built against onnxruntime API version " +
                                        std::to_string(ORT_API_VERSION) + " (onnxruntime 1." +
                                        std::to_string(ORT_API_VERSION) + "), but this onnxruntime " +
                                        (runtime ? runtime : "(unknown version)") + " serves API version " +
                                        std::to_string(served) + " at most; upgrade onnxruntime or rebuild "
                                        "fxshift against its headers (scripts/fetch_ort_headers.sh)")
                                           .c_str());
  }
  static std::once_flag once;
  std::call_once(once, [api] { g_api = api; });
  if (fxs_abi_version() != FXS_ABI_VERSION)
    return api->CreateStatus(ORT_FAIL, ("libfxshift_ort: libfxshift has ABI version " +
                                        std::to_string(fxs_abi_version()) + ", expected " +
                                        std::to_string(FXS_ABI_VERSION) + "; rebuild fxshift")
                                           .c_str());
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  OrtStatus* st = api->CustomOpDomain_Add(domain, &g_conv_op);
  if (!st) st = api->CustomOpDomain_Add(domain, &g_linear_op);
  if (!st) st = api->AddCustomOpDomain(options, domain);
  if (st) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  // The domain must outlive every session that uses it: kept until the library unloads.
  static std::mutex mutex;
  static struct Domains {
    std::vector<OrtCustomOpDomain*> list;
    ~Domains() {
      for (OrtCustomOpDomain* d : list) ReleaseDomain(d);
    }
  } domains;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    domains.list.push_back(domain);
  } catch (...) {  // not recorded: the domain is never released (a few bytes), the session still works
  }
  return nullptr;
}
