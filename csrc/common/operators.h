// The fsdp4bit:: operators' dispatcher kernels and matmul_4bit's autograd node, for one backend (CPU or CUDA).
//
// fsdp4bit.ops defines the operators in Python (schemas, fake kernels, the reference path). Each extension
// instantiates Operators<Backend> for its device type and registers its kernels with the dispatcher
// (TORCH_LIBRARY_IMPL in csrc/cpu/operators.cpp and csrc/cuda/operators.cpp), so a compiled graph
// (torch.compile), a direct torch.ops call and the eager autograd node reach the kernels with no Python on the
// way: torch.library's Python custom-op layers cost tens to hundreds of microseconds of host time per call, which
// a training step of small layers waits through. A call whose arguments the fast path does not take (anything
// the Python checks would refuse, or FSDP4BIT_NO_NATIVE set) runs the operator's Python implementation, so every
// path raises the same errors and the reference stays one switch away.
//
// A Backend supplies, for tensors of device type Backend::kDevice, the extension's routes:
//   forward(A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, code_cpu,
//           code_dev, N, K)                      A @ W.T + bias, the bias cast to A's dtype
//   input_grad(grad_out, packed, ..., code_cpu, code_dev, N, K)        grad_out @ W
//   dequantize(packed, absmax, ..., blocksize, nested_blocksize, code_dev, numel, dtype)   numel values, flat
// (code_cpu: codebooks' CPU float32 table; code_dev: its copy on the tensors' device).
#pragma once

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fsdp4bit {
namespace operators_detail {

namespace py = pybind11;
using OptTensor = std::optional<at::Tensor>;

constexpr std::array<const char*, 2> kQuantTypes = {"fp4", "nf4"};
constexpr std::array<const char*, 3> kOperators = {"matmul_4bit", "input_grad_4bit", "dequantize_4bit"};
enum OperatorIndex : size_t { kMatmul = 0, kInputGrad = 1, kDequantize = 2 };

// the index of quant_type in kQuantTypes, or -1
inline int quant_index(c10::string_view quant_type) {
  for (size_t i = 0; i < kQuantTypes.size(); ++i)
    if (quant_type == kQuantTypes[i]) return int(i);
  return -1;
}

// fsdp4bit.kernels.native_disabled(), read per call as the Python path does
inline bool native_disabled() {
  const char* v = std::getenv("FSDP4BIT_NO_NATIVE");
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// -- the fast path's argument checks: true only where every Python check passes (codebooks.check_stats_counts,
// -- _native._check_state / check_matmul_args, ops._check_matmul); anything else goes to Python to be named ----------
inline bool is_blocksize(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool state_ok(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
                     const OptTensor& nested_code, const OptTensor& offset, int64_t numel, int64_t blocksize,
                     int64_t nested_blocksize, const at::Device& dev) {
  if (!is_blocksize(blocksize) || packed.scalar_type() != at::kByte || packed.device() != dev ||
      packed.numel() < (numel + 1) / 2)
    return false;
  const int64_t nblocks = ceil_div(numel, blocksize);
  if (absmax.dim() != 1 || absmax.numel() != nblocks || absmax.device() != dev) return false;
  for (const OptTensor* t : {&nested_absmax, &nested_code, &offset})
    if (t->has_value() && (*t)->device() != dev) return false;
  if (!nested_absmax.has_value()) return absmax.scalar_type() == at::kFloat;
  return nested_code.has_value() && offset.has_value() && absmax.scalar_type() == at::kByte &&
         is_blocksize(nested_blocksize) && nested_absmax->scalar_type() == at::kFloat &&
         nested_absmax->numel() == ceil_div(nblocks, nested_blocksize) && nested_code->scalar_type() == at::kFloat &&
         nested_code->numel() == 256 && offset->scalar_type() == at::kFloat && offset->numel() == 1;
}

inline bool weight_shape_ok(at::IntArrayRef shape) { return shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0; }

// the fast path's tensors: packed as flat contiguous bytes (NativeOps' _flat_bytes), the statistics contiguous
inline at::Tensor flat_bytes(const at::Tensor& packed) {
  return packed.dim() == 1 && packed.is_contiguous() ? packed : packed.reshape(-1).contiguous();
}

inline OptTensor contiguous(const OptTensor& t) { return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt; }

// -- the operators, called through the dispatcher (so a trace records them) ---------------------------------------
using MatmulSig = at::Tensor(const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, c10::string_view,
                             at::IntArrayRef);
using InputGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                const OptTensor&, const OptTensor&, int64_t, int64_t, c10::string_view,
                                at::IntArrayRef);
using DequantizeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, int64_t, int64_t, c10::string_view, at::IntArrayRef,
                                 at::ScalarType);

template <class Sig>
const c10::TypedOperatorHandle<Sig>& typed_op(const char* name) {
  return *new c10::TypedOperatorHandle<Sig>(c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>());
}

inline const c10::TypedOperatorHandle<MatmulSig>& matmul_op() {
  static const auto& op = typed_op<MatmulSig>("fsdp4bit::matmul_4bit");
  return op;
}

inline const c10::TypedOperatorHandle<InputGradSig>& input_grad_op() {
  static const auto& op = typed_op<InputGradSig>("fsdp4bit::input_grad_4bit");
  return op;
}

inline const c10::TypedOperatorHandle<DequantizeSig>& dequantize_op() {
  static const auto& op = typed_op<DequantizeSig>("fsdp4bit::dequantize_4bit");
  return op;
}

// matmul_4bit differentiable in A and bias: its operator below autograd; backward, A's gradient through the
// input_grad_4bit operator (the backend's route: on CUDA the transposed fused GEMM where it applies, else grad_out @ W
// dequantized), or under create_graph grad_out @ W from the dequantize_4bit operator (differentiable in grad_out), and
// the bias's as the sum of grad_out's rows in the bias's dtype. The frozen weight is kept (for A's gradient only) as
// plain context data, not saved variables, as fsdp4bit.ops' Python Function and bitsandbytes keep it: no version
// check, no saved-tensor hooks (save_on_cpu would copy it), and a weight quantized under inference mode (inference
// tensors, which save_for_backward refuses) still trains adapters. (The node calls operators only, so one class
// serves every backend.)
class Matmul4bitFunction : public torch::autograd::Function<Matmul4bitFunction> {
  static constexpr std::array<const char*, 5> kWeightKeys = {"packed", "absmax", "nested_absmax", "nested_code",
                                                             "offset"};

 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& A, const OptTensor& bias,
                            const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
                            const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize,
                            int64_t nested_blocksize, const std::string& quant_type,
                            const std::vector<int64_t>& shape) {
    const at::Tensor weight[kWeightKeys.size()] = {packed, absmax, nested_absmax.value_or(at::Tensor()),
                                                   nested_code.value_or(at::Tensor()), offset.value_or(at::Tensor())};
    for (size_t i = 0; i < kWeightKeys.size() && A.requires_grad(); ++i)
      if (weight[i].defined()) ctx->saved_data[kWeightKeys[i]] = weight[i];
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["nested_blocksize"] = nested_blocksize;
    ctx->saved_data["quant_type"] = quant_type;
    ctx->saved_data["shape"] = shape;
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    const at::AutoDispatchBelowADInplaceOrView below;
    return matmul_op().call(A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                            quant_type, shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto& data = ctx->saved_data;
    const std::vector<int64_t> shape = data["shape"].toIntVector();
    const at::Tensor& g = grads[0];
    at::Tensor grad_A, grad_bias;
    if (ctx->needs_input_grad(0)) {
      auto saved = [&data](const char* key) { return data.count(key) ? data[key].toTensor() : at::Tensor(); };
      auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
      const at::Tensor packed = saved(kWeightKeys[0]), absmax = saved(kWeightKeys[1]);
      const OptTensor nested_absmax = opt(saved(kWeightKeys[2])), nested_code = opt(saved(kWeightKeys[3])),
                      offset = opt(saved(kWeightKeys[4]));
      const int64_t blocksize = data["blocksize"].toInt(), nested_blocksize = data["nested_blocksize"].toInt();
      const std::string quant_type = data["quant_type"].toStringRef();
      if (at::GradMode::is_enabled()) {
        at::Tensor W;
        {
          const at::AutoDispatchBelowADInplaceOrView below;
          W = dequantize_op().call(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                   quant_type, shape, g.scalar_type());
        }
        grad_A = at::matmul(g, W);
      } else {
        const at::AutoDispatchBelowADInplaceOrView below;
        grad_A = input_grad_op().call(g, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                      nested_blocksize, quant_type, shape);
      }
    }
    if (data.count("bias_dtype") && ctx->needs_input_grad(1))
      grad_bias = g.reshape({-1, shape[0]}).sum(0).to(data["bias_dtype"].toScalarType());
    torch::autograd::variable_list out(11);
    out[0] = grad_A;
    out[1] = grad_bias;
    return out;
  }
};

}  // namespace operators_detail

// The operators' kernels for Backend's device type: register them with impl_kernels (its dispatch key) and
// impl_autograd (its autograd key), and the extension's Python entry points with def_bindings.
template <class Backend>
class Operators {
  using OptTensor = operators_detail::OptTensor;
  using py_dict = pybind11::dict;

  // what Python hands over: the code tables and the operators' Python implementations
  struct Registry {
    std::mutex mutex;
    std::array<at::Tensor, operators_detail::kQuantTypes.size()> code_cpu;  // codebooks' float32 tables
    std::array<std::unordered_map<c10::DeviceIndex, at::Tensor>, operators_detail::kQuantTypes.size()> code_dev;
    std::array<pybind11::object*, operators_detail::kOperators.size()> python_impls{};  // never freed (below)
  };

  static Registry& registry() {
    static Registry* r = new Registry();  // never destroyed: the Python objects may outlive the interpreter
    return *r;
  }

  // (CPU table, table on `device`) of quant_type (index q), the second copied there on first use; both undefined
  // until register_operators ran
  static std::pair<at::Tensor, at::Tensor> code_tables(int q, const at::Device& device) {
    Registry& r = registry();
    const std::lock_guard<std::mutex> lock(r.mutex);
    if (!r.code_cpu[q].defined()) return {};
    auto& tables = r.code_dev[q];
    auto it = tables.find(device.index());
    if (it == tables.end()) it = tables.emplace(device.index(), r.code_cpu[q].to(device)).first;
    return {r.code_cpu[q], it->second};
  }

  // the operator's Python implementation (fsdp4bit.ops: its checks, then the native path or the reference)
  template <class... Args>
  static at::Tensor python_impl(size_t op, Args&&... args) {
    pybind11::gil_scoped_acquire gil;
    pybind11::object* fn;
    {
      Registry& r = registry();
      const std::lock_guard<std::mutex> lock(r.mutex);
      fn = r.python_impls[op];
    }
    TORCH_CHECK(fn != nullptr, "fsdp4bit: the Python implementation of fsdp4bit::", operators_detail::kOperators[op],
                " is not registered (fsdp4bit.kernels registers it when it loads this extension)");
    return (*fn)(std::forward<Args>(args)...).template cast<at::Tensor>();
  }

  // the code tables of quant_type for a call on `device` that passed the fast path's checks (q >= 0), or
  // undefined ones: take the Python implementation
  static std::pair<at::Tensor, at::Tensor> fast_tables(bool fast, int q, const at::Device& device) {
    return fast && !operators_detail::native_disabled() ? code_tables(q, device) : std::pair<at::Tensor, at::Tensor>();
  }

  static bool on_device(const at::Tensor& t) { return t.device().type() == Backend::kDevice; }

 public:
  static at::Tensor matmul(const at::Tensor& A, const OptTensor& bias, const at::Tensor& packed,
                           const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& nested_code,
                           const OptTensor& offset, int64_t blocksize, int64_t nested_blocksize,
                           c10::string_view quant_type, at::IntArrayRef shape) {
    using namespace operators_detail;
    const int q = quant_index(quant_type);
    const bool fast = q >= 0 && weight_shape_ok(shape) && on_device(A) && A.dim() >= 1 &&
                      is_float(A.scalar_type()) && A.size(-1) == shape[1] &&
                      (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == shape[0] &&
                                             bias->device() == A.device())) &&
                      state_ok(packed, absmax, nested_absmax, nested_code, offset, shape[0] * shape[1], blocksize,
                               nested_blocksize, A.device());
    const auto [cpu, dev] = fast_tables(fast, q, A.device());
    if (!cpu.defined())
      return python_impl(kMatmul, A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                         nested_blocksize, std::string(quant_type), shape.vec());
    return Backend::forward(A, bias, flat_bytes(packed), absmax.contiguous(), contiguous(nested_absmax),
                            contiguous(nested_code), contiguous(offset), blocksize, nested_blocksize, cpu, dev,
                            shape[0], shape[1]);
  }

  static at::Tensor input_grad(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                               const OptTensor& nested_absmax, const OptTensor& nested_code, const OptTensor& offset,
                               int64_t blocksize, int64_t nested_blocksize, c10::string_view quant_type,
                               at::IntArrayRef shape) {
    using namespace operators_detail;
    const int q = quant_index(quant_type);
    const bool fast = q >= 0 && weight_shape_ok(shape) && on_device(grad_out) && grad_out.dim() >= 1 &&
                      is_float(grad_out.scalar_type()) && grad_out.size(-1) == shape[0] &&
                      state_ok(packed, absmax, nested_absmax, nested_code, offset, shape[0] * shape[1], blocksize,
                               nested_blocksize, grad_out.device());
    const auto [cpu, dev] = fast_tables(fast, q, grad_out.device());
    if (!cpu.defined())
      return python_impl(kInputGrad, grad_out, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                         nested_blocksize, std::string(quant_type), shape.vec());
    return Backend::input_grad(grad_out, flat_bytes(packed), absmax.contiguous(), contiguous(nested_absmax),
                               contiguous(nested_code), contiguous(offset), blocksize, nested_blocksize, cpu, dev,
                               shape[0], shape[1]);
  }

  static at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
                               const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize,
                               int64_t nested_blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                               at::ScalarType dtype) {
    using namespace operators_detail;
    const int q = quant_index(quant_type);
    int64_t numel = 1;
    bool shape_ok = true;
    for (const int64_t s : shape) {
      shape_ok = shape_ok && s >= 0;
      numel *= s;
    }
    const bool fast = q >= 0 && shape_ok && is_float(dtype) && on_device(packed) &&
                      state_ok(packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, nested_blocksize,
                               packed.device());
    const auto [cpu, dev] = fast_tables(fast, q, packed.device());
    if (!cpu.defined())
      return python_impl(kDequantize, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                         nested_blocksize, std::string(quant_type), shape.vec(), dtype);
    return Backend::dequantize(flat_bytes(packed), absmax.contiguous(), contiguous(nested_absmax),
                               contiguous(nested_code), contiguous(offset), blocksize, nested_blocksize, dev, numel,
                               dtype)
        .view(shape);
  }

  // A @ W.T + bias, differentiable in A and bias: the autograd node when autograd records, else the operator (the
  // autograd kernel's body, and the extension's matmul_4bit_autograd entry)
  static at::Tensor matmul_autograd(const at::Tensor& A, const OptTensor& bias, const at::Tensor& packed,
                                    const at::Tensor& absmax, const OptTensor& nested_absmax,
                                    const OptTensor& nested_code, const OptTensor& offset, int64_t blocksize,
                                    int64_t nested_blocksize, const std::string& quant_type,
                                    const std::vector<int64_t>& shape) {
    using operators_detail::Matmul4bitFunction;
    // the kernels have no forward derivative: a tangent would be dropped (fsdp4bit.matmul_4bit routes dual inputs
    // through dequantize + F.linear)
    TORCH_CHECK(!A._fw_grad(0).defined() && !(bias.has_value() && bias->_fw_grad(0).defined()),
                "torch.ops.fsdp4bit.matmul_4bit has no forward-mode derivative, and an input carries a tangent: call "
                "fsdp4bit.matmul_4bit (or Linear4bit), which takes dual inputs through dequantize_4bit + F.linear");
    const bool grad =
        at::GradMode::is_enabled() && (A.requires_grad() || (bias.has_value() && bias->requires_grad()));
    if (grad)
      return Matmul4bitFunction::apply(A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                       nested_blocksize, quant_type, shape);
    const at::AutoDispatchBelowADInplaceOrView below;
    return operators_detail::matmul_op().call(A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                              nested_blocksize, quant_type, shape);
  }

  // matmul_4bit's autograd kernel (SymInt arguments: a trace may pass them; the weight's are concrete)
  static at::Tensor matmul_autograd_kernel(const at::Tensor& A, const OptTensor& bias, const at::Tensor& packed,
                                           const at::Tensor& absmax, const OptTensor& nested_absmax,
                                           const OptTensor& nested_code, const OptTensor& offset,
                                           c10::SymInt blocksize, c10::SymInt nested_blocksize,
                                           c10::string_view quant_type, c10::SymIntArrayRef shape) {
    std::vector<int64_t> dims;
    dims.reserve(shape.size());
    for (const c10::SymInt& s : shape) dims.push_back(s.guard_int(__FILE__, __LINE__));
    return matmul_autograd(A, bias, packed, absmax, nested_absmax, nested_code, offset,
                           blocksize.guard_int(__FILE__, __LINE__), nested_blocksize.guard_int(__FILE__, __LINE__),
                           std::string(quant_type), dims);
  }

  // the code tables ({"nf4": CPU float32 [16], "fp4": ...}) and the Python implementations ({"matmul_4bit": f,
  // "input_grad_4bit": f, "dequantize_4bit": f}) the kernels use (NativeOps.__init__)
  static void register_operators(const py_dict& codes, const py_dict& python_impls) {
    using operators_detail::kOperators;
    using operators_detail::kQuantTypes;
    Registry& r = registry();
    std::array<at::Tensor, kQuantTypes.size()> tables;
    for (size_t i = 0; i < kQuantTypes.size(); ++i) {
      const at::Tensor t = codes[kQuantTypes[i]].template cast<at::Tensor>();
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 16,
                  "codes['", kQuantTypes[i], "'] must be a CPU float32 tensor of 16 entries");
      tables[i] = t.contiguous().clone();
    }
    std::array<pybind11::object*, kOperators.size()> impls{};
    for (size_t i = 0; i < kOperators.size(); ++i) impls[i] = new pybind11::object(python_impls[kOperators[i]]);
    const std::lock_guard<std::mutex> lock(r.mutex);
    for (size_t i = 0; i < kQuantTypes.size(); ++i) {
      r.code_cpu[i] = tables[i];
      r.code_dev[i].clear();
    }
    r.python_impls = impls;  // earlier ones stay allocated: a call in flight may hold one
  }

  // the extension's Python entry points matmul_4bit_autograd (the autograd node without the dispatcher in front:
  // bench/host_layers.py) and register_operators (NativeOps.__init__)
  static void def_bindings(pybind11::module_& m) {
    namespace py = pybind11;
    m.def("matmul_4bit_autograd", &matmul_autograd,
          "A @ W(N, K).T + bias with W 4-bit, differentiable in A and bias: the matmul_4bit operator's autograd node",
          py::arg("A"), py::arg("bias"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"),
          py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"),
          py::arg("quant_type"), py::arg("shape"));
    m.def("register_operators", &register_operators,
          "hand the operators' kernels the code tables ({quant_type: CPU float32 [16]}) and the Python "
          "implementations they defer to ({operator name: callable})",
          py::arg("codes"), py::arg("python_impls"));
  }

  // the three operators' kernels, for a TORCH_LIBRARY_IMPL block of Backend's dispatch key
  static void impl_kernels(torch::Library& m) {
    m.impl("matmul_4bit", TORCH_FN(matmul));
    m.impl("input_grad_4bit", TORCH_FN(input_grad));
    m.impl("dequantize_4bit", TORCH_FN(dequantize));
  }

  // matmul_4bit's autograd, for a TORCH_LIBRARY_IMPL block of Backend's autograd key
  static void impl_autograd(torch::Library& m) { m.impl("matmul_4bit", TORCH_FN(matmul_autograd_kernel)); }
};

}  // namespace fsdp4bit
