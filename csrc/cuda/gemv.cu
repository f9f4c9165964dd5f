// Launcher of the fused gemv: for one token a row kernel (gemv_row.cu: K in (3072, 4096], or K % 1024 == 0
// past it) or the pair-table kernel (gemv_lut.cu), the tensor-core kernel for 4 to 8 tokens (gemv_tma.cu)
// where they apply, else the CUDA-core kernel with one dispatch on the A dtype (the instantiations live in
// gemv_<dtype>.cu).
#include "gemv.cuh"
#include "gemv_lut.cuh"
#include "gemv_row.cuh"
#include "gemv_tma.cuh"

namespace fsdp4bit {

void launch_gemv(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc, bool nested,
                 int log2bs, int64_t M, int64_t N, int64_t K, void* out, cudaStream_t stream) {
  if (gemv_row_applies(dtype, nested, sc, log2bs, M, N, K)) {
    launch_gemv_row_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, stream);
    return;
  }
  if (gemv_row_stream_applies(dtype, nested, sc, log2bs, M, N, K)) {
    launch_gemv_row_stream_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, stream);
    return;
  }
  if (gemv_lut_applies(dtype, nested, sc, M, K)) {
    launch_gemv_lut_any(A, dtype, packed, code, sc, nested, log2bs, N, K, out, stream);
    return;
  }
  if (gemv_tma_applies(dtype, log2bs, M, K)) {
    launch_gemv_tma_any(A, dtype, packed, code, sc, nested, log2bs, M, N, K, out, stream);
    return;
  }
  switch (dtype) {
    case FloatType::kF32:
      gemv_dispatch(static_cast<const float*>(A), packed, code, sc, nested, log2bs, M, N, K, static_cast<float*>(out), stream);
      break;
    case FloatType::kF16:
      gemv_dispatch(static_cast<const __half*>(A), packed, code, sc, nested, log2bs, M, N, K, static_cast<__half*>(out), stream);
      break;
    case FloatType::kBF16:
      gemv_dispatch(static_cast<const __nv_bfloat16*>(A), packed, code, sc, nested, log2bs, M, N, K,
                    static_cast<__nv_bfloat16*>(out), stream);
      break;
  }
}

}  // namespace fsdp4bit
