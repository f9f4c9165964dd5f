// The fsdp4bit:: operators' CUDA kernels and matmul_4bit's AutogradCUDA kernel: csrc/common/operators.h on the
// routes of bindings.cpp (host_ops.h).
#include "../common/operators.h"

#include "host_ops.h"

namespace fsdp4bit {
namespace {

struct CudaBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr auto forward = &matmul_4bit_forward;
  static constexpr auto input_grad = &matmul_4bit_input_grad;
  static constexpr auto dequantize = &dequantize_4bit;
};

using CudaOperators = Operators<CudaBackend>;

}  // namespace

void def_operator_bindings(pybind11::module_& m) { CudaOperators::def_bindings(m); }

}  // namespace fsdp4bit

TORCH_LIBRARY_IMPL(fsdp4bit, CUDA, m) { fsdp4bit::CudaOperators::impl_kernels(m); }

TORCH_LIBRARY_IMPL(fsdp4bit, AutogradCUDA, m) { fsdp4bit::CudaOperators::impl_autograd(m); }
