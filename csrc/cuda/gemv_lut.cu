// Pair-table gemv (gemv_lut.cuh) for one token of fp16/bf16 A and the rule that picks it over the CUDA-core gemv.
#include "gemv_lut.cuh"

namespace fsdp4bit {

// One tile shape for all calls: 4 rows per warp, 16 warps, half2 pair table (the sweep's best: 14336x4096 on
// H100 20.9 vs 22.0 us for the CUDA-core kernel, 28672x8192 55.7 vs 64.3 us).
constexpr int kLutRows = 4, kLutWarps = 16;

bool gemv_lut_applies(FloatType dtype, bool nested, const Scales& sc, int64_t M, int64_t K) {
  return M == 1 && dtype != FloatType::kF32 && (!nested || sc.nested_log2 >= 0) && K <= gemv_lut_max_k();
}

void launch_gemv_lut_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t N, int64_t K, void* out, const void* bias,
                         cudaStream_t stream) {
  with_16bit_type(dtype, A, out, bias, [&](auto a, auto o, auto b) {
    launch_gemv_lut<element_of<decltype(a)>, kLutRows, kLutWarps, true>(a, packed, code, sc, nested, log2bs, N, K, o,
                                                                        b, stream);
  });
}

}  // namespace fsdp4bit
