// Tensor-core gemv (gemv_tma.cuh) for fp16/bf16 A and the rule that picks it over the CUDA-core gemv.
#include "gemv_tma.cuh"

namespace fsdp4bit {

// One tile shape for all calls: 8 consumer warps, 32-span chunks, 2 stages, 2 CTAs per SM (the sweep's best).
constexpr int kTmaWarps = 8, kTmaChunkSpans = 32, kTmaStages = 2, kTmaCtasPerSm = 2;

bool gemv_tma_applies(FloatType dtype, int log2bs, int64_t M, int64_t K) {
  if (dtype == FloatType::kF32 || M < 4 || M > 8 || log2bs < 6 || K % 64 != 0) return false;
  return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9;
}

void launch_gemv_tma_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t M, int64_t N, int64_t K, void* out, const void* bias,
                         cudaStream_t stream) {
  with_16bit_type(dtype, A, out, bias, [&](auto a, auto o, auto b) {
    launch_gemv_tma<element_of<decltype(a)>, kTmaWarps, kTmaChunkSpans, kTmaStages>(
        a, packed, code, sc, nested, log2bs, int(M), N, K, o, b, kTmaCtasPerSm, stream);
  });
}

}  // namespace fsdp4bit
