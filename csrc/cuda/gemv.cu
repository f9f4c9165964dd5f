// Launcher of the fused gemv: for one token a row kernel (gemv_row.cu: a in registers up to K = 4096 and, rows split
// in parts, up to 32768 where that measured faster; else in shared memory) or the pair-table kernel (gemv_lut.cu:
// rows ending inside a block, blocks past 1024 weights),
// the tensor-core kernel for 4 to 8 tokens (gemv_tma.cu) where they apply, else the CUDA-core kernel with one
// dispatch on the A dtype (the instantiations live in gemv_<dtype>.cu).
#include "gemv.cuh"
#include "gemv_lut.cuh"
#include "gemv_row.cuh"
#include "gemv_tma.cuh"

namespace fsdp4bit {

namespace {

enum class GemvKernel { kRow, kRowSplit, kRowStream, kPairTable, kTensorCore, kCudaCore };

// the first kernel, in order of speed, whose conditions the call meets
GemvKernel pick_gemv(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N, int64_t K) {
  if (gemv_row_applies(dtype, nested, sc, log2bs, M, N, K)) return GemvKernel::kRow;
  if (gemv_row_split_applies(dtype, nested, sc, log2bs, M, N, K)) return GemvKernel::kRowSplit;
  if (gemv_row_stream_applies(dtype, nested, sc, log2bs, M, N, K)) return GemvKernel::kRowStream;
  if (gemv_lut_applies(dtype, nested, sc, M, K)) return GemvKernel::kPairTable;
  if (gemv_tma_applies(dtype, log2bs, M, K)) return GemvKernel::kTensorCore;
  return GemvKernel::kCudaCore;
}

}  // namespace

const char* gemv_kernel_name(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                             int64_t K) {
  switch (pick_gemv(dtype, nested, sc, log2bs, M, N, K)) {
    case GemvKernel::kRow: return "row";
    case GemvKernel::kRowSplit: return "row_split";
    case GemvKernel::kRowStream: return "row_stream";
    case GemvKernel::kPairTable: return "pair_table";
    case GemvKernel::kTensorCore: return "tensor_core";
    default: return "cuda_core";
  }
}

void launch_gemv(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc, bool nested,
                 int log2bs, int64_t M, int64_t N, int64_t K, void* out, const void* bias, cudaStream_t stream) {
  switch (pick_gemv(dtype, nested, sc, log2bs, M, N, K)) {
    case GemvKernel::kRow:
      launch_gemv_row_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
      return;
    case GemvKernel::kRowSplit:
      launch_gemv_row_split_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
      return;
    case GemvKernel::kRowStream:
      launch_gemv_row_stream_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
      return;
    case GemvKernel::kPairTable:
      launch_gemv_lut_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
      return;
    case GemvKernel::kTensorCore:
      launch_gemv_tma_any(A, dtype, packed, code, sc, nested, log2bs, M, N, K, out, bias, stream);
      return;
    case GemvKernel::kCudaCore:
      break;
  }
  switch (dtype) {
    case FloatType::kF32:
      gemv_dispatch(static_cast<const float*>(A), packed, code, sc, nested, log2bs, M, N, K, static_cast<float*>(out),
                    static_cast<const float*>(bias), stream);
      break;
    case FloatType::kF16:
      gemv_dispatch(static_cast<const __half*>(A), packed, code, sc, nested, log2bs, M, N, K, static_cast<__half*>(out),
                    static_cast<const __half*>(bias), stream);
      break;
    case FloatType::kBF16:
      gemv_dispatch(static_cast<const __nv_bfloat16*>(A), packed, code, sc, nested, log2bs, M, N, K,
                    static_cast<__nv_bfloat16*>(out), static_cast<const __nv_bfloat16*>(bias), stream);
      break;
  }
}

}  // namespace fsdp4bit
