// Blockwise 4-bit dequantization: code[nibble] * absmax[block] in float32, one RNE cast to the output
// dtype. With double quantization the float32 scale is computed in the same kernel from the 8-bit
// absmax (1 byte read per block): nested_code[q] * nested_absmax[b / nested_blocksize] + offset.
#include "common.cuh"

namespace fsdp4bit {
namespace {

// ------------------------------------------------------------------------- dequantize
// Each thread turns 8 packed bytes into 16 outputs (one quantization block: blocks are >= 32 elements
// and chunks start at multiples of 16), with 16-byte stores.
template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(256) dequantize_kernel(const uint8_t* __restrict__ packed, int64_t n, Code16 code,
                                                         Scales sc, int log2bs, bool vec_ok, OutT* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[NESTED ? 256 : 1];
  float off = 0.0f;
  copy_table(s_code, code.v);
  load_scale_tables<NESTED>(sc, s_ncode, off);
  __syncthreads();

  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t e0 = t * 16;
  if (e0 >= n) return;
  const float scale = block_scale<NESTED>(sc, s_ncode, off, e0 >> log2bs);

  if (vec_ok && e0 + 16 <= n) {
    const uint2 raw = __ldcs(reinterpret_cast<const uint2*>(packed + e0 / 2));
    const uint32_t w[2] = {raw.x, raw.y};
    OutT vals[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t byte = (w[k >> 2] >> (8 * (k & 3))) & 0xffu;
      vals[2 * k] = from_f32<OutT>(__fmul_rn(s_code[byte >> 4], scale));
      vals[2 * k + 1] = from_f32<OutT>(__fmul_rn(s_code[byte & 15], scale));
    }
    uint4* dst = reinterpret_cast<uint4*>(out + e0);
    const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
    for (int k = 0; k < int(16 * sizeof(OutT) / 16); ++k) dst[k] = src[k];
  } else {
    for (int64_t e = e0; e < e0 + 16 && e < n; ++e) {
      const uint8_t byte = packed[e / 2];
      const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
      out[e] = from_f32<OutT>(__fmul_rn(s_code[nib], scale));
    }
  }
}

template <typename T>
void launch_typed(const uint8_t* packed, int64_t n, const Code16& code, const Scales& sc, bool nested, int log2bs,
                  bool vec_ok, T* out, cudaStream_t stream) {
  const int64_t grid = ((n + 15) / 16 + 255) / 256;
  if (nested)
    dequantize_kernel<T, true><<<grid, 256, 0, stream>>>(packed, n, code, sc, log2bs, vec_ok, out);
  else
    dequantize_kernel<T, false><<<grid, 256, 0, stream>>>(packed, n, code, sc, log2bs, vec_ok, out);
}

}  // namespace

void launch_dequantize(const uint8_t* packed, int64_t n, const Code16& code, const Scales& sc, bool nested, int log2bs,
                       bool vec_ok, void* out, FloatType dtype, cudaStream_t stream) {
  switch (dtype) {
    case FloatType::kF32: launch_typed(packed, n, code, sc, nested, log2bs, vec_ok, static_cast<float*>(out), stream); break;
    case FloatType::kF16: launch_typed(packed, n, code, sc, nested, log2bs, vec_ok, static_cast<__half*>(out), stream); break;
    case FloatType::kBF16: launch_typed(packed, n, code, sc, nested, log2bs, vec_ok, static_cast<__nv_bfloat16*>(out), stream); break;
  }
}

}  // namespace fsdp4bit
