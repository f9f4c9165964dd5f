// Row gemvs (gemv_row.cuh) for one token of fp16/bf16 A: a in registers for K in (3072, 4096], a in shared
// memory for K % 1024 == 0 past 4096; the rules that pick them over the pair-table kernel.
#include "gemv_row.cuh"

namespace fsdp4bit {

// 16 warps of one CTA per SM (the register file's limit at 128 registers); the sweep's 8-warp CTAs, two per SM,
// measured the same or slower.
constexpr int kRowWarps = 16, kRowChunks = 4;

// The kernel's 32-bit block indexing asks for whole blocks per row, at most 1024 weights per block and fewer
// than 2^31 blocks (bitsandbytes' NF4 default: 64-weight blocks); other calls take the pair-table kernel.
bool gemv_row_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N, int64_t K) {
  return M == 1 && dtype != FloatType::kF32 && (!nested || sc.nested_log2 >= 0) && (K / 32 + 31) / 32 == kRowChunks &&
         log2bs <= 10 && (K >> log2bs) << log2bs == K && N * (K >> log2bs) < (int64_t(1) << 31) &&
         int64_t(row_smem_bytes(K)) <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// The streaming row kernel takes 1 token with K % 1024 == 0 past the register kernel's range (the MLP's
// down projection of most models, and every K of 70B-class ones), with the same block conditions.
bool gemv_row_stream_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                             int64_t K) {
  return M == 1 && dtype != FloatType::kF32 && (!nested || sc.nested_log2 >= 0) && K % 1024 == 0 && K > 4096 &&
         log2bs <= 10 && N * (K >> log2bs) < (int64_t(1) << 31) &&
         int64_t(row_smem_bytes(K)) <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

void launch_gemv_row_stream_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code,
                                const Scales& sc, bool nested, int log2bs, int64_t N, int64_t K, void* out,
                                cudaStream_t stream) {
  if (dtype == FloatType::kBF16)
    launch_gemv_row_stream<__nv_bfloat16, kRowWarps>(static_cast<const __nv_bfloat16*>(A), packed, code, sc, nested,
                                                     log2bs, N, K, static_cast<__nv_bfloat16*>(out), stream);
  else
    launch_gemv_row_stream<__half, kRowWarps>(static_cast<const __half*>(A), packed, code, sc, nested, log2bs, N, K,
                                              static_cast<__half*>(out), stream);
}

void launch_gemv_row_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t N, int64_t K, void* out, cudaStream_t stream) {
  if (dtype == FloatType::kBF16)
    launch_gemv_row<__nv_bfloat16, kRowWarps, kRowChunks>(static_cast<const __nv_bfloat16*>(A), packed, code, sc, nested,
                                                          log2bs, N, K, static_cast<__nv_bfloat16*>(out), stream);
  else
    launch_gemv_row<__half, kRowWarps, kRowChunks>(static_cast<const __half*>(A), packed, code, sc, nested, log2bs, N,
                                                   K, static_cast<__half*>(out), stream);
}

}  // namespace fsdp4bit
