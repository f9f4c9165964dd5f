// The fsdp4bit:: operators' CPU kernels and matmul_4bit's AutogradCPU kernel: csrc/common/operators.h on the routes
// of fsdp4bit_cpu.cpp (host_ops.h).
#include "../common/operators.h"

#include "host_ops.h"

namespace fsdp4bit::cpu {
namespace {

struct CpuBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr auto forward = &matmul_4bit_forward;
  static constexpr auto input_grad = &matmul_4bit_input_grad;
  static constexpr auto dequantize = &dequantize_4bit;
};

using CpuOperators = Operators<CpuBackend>;

}  // namespace

void def_operator_bindings(pybind11::module_& m) { CpuOperators::def_bindings(m); }

}  // namespace fsdp4bit::cpu

TORCH_LIBRARY_IMPL(fsdp4bit, CPU, m) { fsdp4bit::cpu::CpuOperators::impl_kernels(m); }

TORCH_LIBRARY_IMPL(fsdp4bit, AutogradCPU, m) { fsdp4bit::cpu::CpuOperators::impl_autograd(m); }
