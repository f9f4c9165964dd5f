// Host entry points of the CPU extension shared by its two translation units: fsdp4bit_cpu.cpp (the kernels, their
// routes and the Python bindings) and operators.cpp (the fsdp4bit:: operators' dispatcher kernels).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

namespace fsdp4bit::cpu {

// numel values of the 4-bit W as a flat tensor of dtype (code: the 16 code values, a CPU float32 tensor)
torch::Tensor dequantize_4bit(const torch::Tensor& packed, const torch::Tensor& absmax,
                              const std::optional<torch::Tensor>& nested_absmax,
                              const std::optional<torch::Tensor>& nested_code,
                              const std::optional<torch::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                              const torch::Tensor& code, int64_t numel, torch::ScalarType dtype);

// A @ W.T + bias for the 4-bit W (N, K): the fused gemv or dequantize + at::linear, as they apply
torch::Tensor matmul_4bit_forward(const torch::Tensor& A, const std::optional<torch::Tensor>& bias,
                                  const torch::Tensor& packed, const torch::Tensor& absmax,
                                  const std::optional<torch::Tensor>& nested_absmax,
                                  const std::optional<torch::Tensor>& nested_code,
                                  const std::optional<torch::Tensor>& offset, int64_t blocksize,
                                  int64_t nested_blocksize, const torch::Tensor& code_cpu,
                                  const torch::Tensor& code_dev, int64_t N, int64_t K);

// grad_out (.., N) @ W (N, K) for the 4-bit W: dequantize + at::matmul
torch::Tensor matmul_4bit_input_grad(const torch::Tensor& g, const torch::Tensor& packed, const torch::Tensor& absmax,
                                     const std::optional<torch::Tensor>& nested_absmax,
                                     const std::optional<torch::Tensor>& nested_code,
                                     const std::optional<torch::Tensor>& offset, int64_t blocksize,
                                     int64_t nested_blocksize, const torch::Tensor& code_cpu,
                                     const torch::Tensor& code_dev, int64_t N, int64_t K);

// operators.cpp: defines the extension's entry points of the operators' kernels in m (matmul_4bit_autograd,
// register_operators: csrc/common/operators.h)
void def_operator_bindings(pybind11::module_& m);

}  // namespace fsdp4bit::cpu
