// Blockwise 4-bit dequantization: code[nibble] * absmax[block] in float32, one RNE cast to the output
// dtype. With double quantization the float32 scale is computed in the same kernel from the 8-bit
// absmax (1 byte read per block): nested_code[q] * nested_absmax[b / nested_blocksize] + offset.
#include "dequantize.cuh"

namespace fsdp4bit {
namespace {

template <typename T>
void launch_typed(const uint8_t* packed, int64_t n, const float* code, const Scales& sc, bool nested, int log2bs,
                  bool vec_ok, T* out, cudaStream_t stream) {
  const int64_t grid = dequantize_grid(n);
  if (nested)
    dequantize_kernel<T, true><<<grid, kDequantThreads, 0, stream>>>(packed, n, code, sc, log2bs, vec_ok, out);
  else
    dequantize_kernel<T, false><<<grid, kDequantThreads, 0, stream>>>(packed, n, code, sc, log2bs, vec_ok, out);
}

}  // namespace

void launch_dequantize(const uint8_t* packed, int64_t n, const float* code, const Scales& sc, bool nested, int log2bs,
                       bool vec_ok, void* out, FloatType dtype, cudaStream_t stream) {
  switch (dtype) {
    case FloatType::kF32: launch_typed(packed, n, code, sc, nested, log2bs, vec_ok, static_cast<float*>(out), stream); break;
    case FloatType::kF16: launch_typed(packed, n, code, sc, nested, log2bs, vec_ok, static_cast<__half*>(out), stream); break;
    case FloatType::kBF16: launch_typed(packed, n, code, sc, nested, log2bs, vec_ok, static_cast<__nv_bfloat16*>(out), stream); break;
  }
}

}  // namespace fsdp4bit
