// Plain-C++ interface between the host bindings (bindings.cpp, compiled by the host compiler: every
// argument check and every exception lives there) and the kernel launchers in the .cu files, which take
// validated raw pointers and never throw.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fsdp4bit {

enum class FloatType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct QuantTables {
  float mids[16];   // 15 sorted midpoints (+1 unused)
  uint8_t enc[16];  // bucket index -> 4-bit code
  float code[16];   // the 16 code values, copied to `code_out` by the first CTA when it is not null
  float* code_out;  // the caller's fresh code tensor (no separate copy kernel), or null
};

struct Code16 {
  float v[16];
};

struct Scales {
  const float* absmax_f;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;  // device, 256 entries
  const float* offset;       // device, 1 entry
  int64_t nested_bs;
  int nested_log2;  // log2(nested_bs) when it is a power of two (bitsandbytes' 256), else -1
};

void launch_quantize(const void* x, FloatType dtype, int64_t n, int blocksize, const QuantTables& tab, bool identity,
                     bool vec_ok, uint8_t* out, float* absmax, cudaStream_t stream);
// `code`: the 16 code values in device memory
void launch_dequantize(const uint8_t* packed, int64_t n, const float* code, const Scales& sc, bool nested, int log2bs,
                       bool vec_ok, void* out, FloatType dtype, cudaStream_t stream);
// out (M, N) = A (M, K) @ W.T + bias, W (N, K) 4-bit, the bias (N values of A's dtype, or null) added to the float32
// sums before their one rounding
void launch_gemv(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc, bool nested,
                 int log2bs, int64_t M, int64_t N, int64_t K, void* out, const void* bias, cudaStream_t stream);
// which kernel launch_gemv() takes for this call on the current device (only `sc.nested_log2` is read)
const char* gemv_kernel_name(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                             int64_t K);
// The fused 4-bit GEMM's output features and summed length for W (N, K): W's rows and columns, or with `trans`
// (A @ W, A of N columns) its columns and rows.
struct GemmDims {
  int64_t n_out, k_red;
  GemmDims(int64_t N, int64_t K, bool trans) : n_out(trans ? K : N), k_red(trans ? N : K) {}
};
// The fused 4-bit GEMM (sm_90a build only) with W (N, K): out (M, N) = A (M, K) @ W.T, or with `trans` out (M, K)
// = A (M, N) @ W (a linear layer's input gradient). Whether it can compute such a call on the current device:
bool gemm_supported(FloatType dtype, int log2bs, int64_t M, int64_t N, int64_t K, bool trans);
// whether fsdp4bit takes it for such a call: supported, and faster there than dequantize + cuBLAS
bool gemm_applies(FloatType dtype, int log2bs, int64_t M, int64_t N, int64_t K, bool trans);
// float32 entries of the workspace launch_gemm() needs: block scales, and split-K partial products
int64_t gemm_workspace_floats(int64_t M, int64_t N, int64_t K, bool trans);
// `out` = A @ W.T (+ bias) or, with `trans`, A @ W (+ bias) for a call gemm_supported() takes; A and packed 16-byte
// aligned, `workspace` of `workspace_floats` >= gemm_workspace_floats(), `bias` one entry per output feature of A's
// type or null, added before the one rounding. Returns false, launching nothing, when a tensor map cannot be
// encoded (they are encoded before any launch).
bool launch_gemm(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                 bool nested, int log2bs, int64_t M, int64_t N, int64_t K, bool trans, float* workspace,
                 int64_t workspace_floats, const void* bias, void* out, cudaStream_t stream);
// 8-bit blockwise quantization of float32 `a - *offset` (offset may be null) against a sorted 256-entry code;
// a copy of `code` goes to `code_out` when it is not null.
void launch_quantize_blockwise(const float* a, int64_t n, int64_t blocksize, const float* code, const float* offset,
                               uint8_t* q, float* absmax, float* code_out, cudaStream_t stream);
// float64 workspace (in values) that launch_double_quant needs for n > 0 values
int64_t double_quant_workspace(int64_t n);
// Double quant of n > 0 float32 values: *offset_out = their mean as reference.absmax_mean computes it (a pairwise
// float64 tree: the same bits as on the CPU), then launch_quantize_blockwise of a - offset.
void launch_double_quant(const float* a, int64_t n, int64_t blocksize, const float* code, double* workspace,
                         float* offset_out, uint8_t* q, float* absmax, float* code_out, cudaStream_t stream);

}  // namespace fsdp4bit
