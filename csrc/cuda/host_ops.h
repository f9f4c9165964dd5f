// Host entry points of the CUDA extension shared by its two translation units: bindings.cpp (the Python bindings,
// which define the kernels' routes) and operators.cpp (the fsdp4bit:: operators' dispatcher kernels).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>

namespace fsdp4bit {

// numel values of the 4-bit W as a flat tensor of dtype (code: the 16 code values on packed's device)
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t nested_blocksize, const at::Tensor& code, int64_t numel,
                           at::ScalarType dtype);

// A @ W.T + bias for the 4-bit W (N, K): the fused gemv, the fused GEMM or dequantize + at::linear, as they apply
at::Tensor matmul_4bit_forward(const at::Tensor& A, const std::optional<at::Tensor>& bias, const at::Tensor& packed,
                               const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, const at::Tensor& code_cpu,
                               const at::Tensor& code_dev, int64_t N, int64_t K);

// grad_out (.., N) @ W (N, K) for the 4-bit W: the transposed fused GEMM or dequantize + at::matmul, as they apply
at::Tensor matmul_4bit_input_grad(const at::Tensor& g, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                  int64_t blocksize, int64_t nested_blocksize, const at::Tensor& code_cpu,
                                  const at::Tensor& code_dev, int64_t N, int64_t K);

// operators.cpp: defines the extension's entry points of the operators' kernels in m (matmul_4bit_autograd,
// register_operators: csrc/common/operators.h)
void def_operator_bindings(pybind11::module_& m);

}  // namespace fsdp4bit
