// Blockwise 4-bit dequantization kernels: code[nibble] * absmax[block] in float32, one RNE cast to the output
// dtype. With double quantization the float32 scale is computed in the same kernel from the 8-bit absmax
// (1 byte read per block): nested_code[q] * nested_absmax[b / nested_blocksize] + offset. A header so that
// bench/cuda/sweep.cu can instantiate and time them outside torch.
#pragma once

#include "common.cuh"

namespace fsdp4bit {

// 16 weights (8 packed bytes, inside one quantization block) -> 16 outputs, with 16-byte stores
template <typename OutT>
__device__ __forceinline__ void dequant_chunk(const float* s_code, uint2 raw, float scale, OutT* dst) {
  const uint32_t w[2] = {raw.x, raw.y};
  OutT vals[16];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t byte = (w[k >> 2] >> (8 * (k & 3))) & 0xffu;
    vals[2 * k] = from_f32<OutT>(__fmul_rn(s_code[byte >> 4], scale));
    vals[2 * k + 1] = from_f32<OutT>(__fmul_rn(s_code[byte & 15], scale));
  }
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* src = reinterpret_cast<const uint4*>(vals);
#pragma unroll
  for (int k = 0; k < int(16 * sizeof(OutT) / 16); ++k) d[k] = src[k];
}

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
    dequant_chunk(s_code, __ldcs(reinterpret_cast<const uint2*>(packed + e0 / 2)), scale, out + e0);
  } else {
    for (int64_t e = e0; e < e0 + 16 && e < n; ++e) {
      const uint8_t byte = packed[e / 2];
      const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
      out[e] = from_f32<OutT>(__fmul_rn(s_code[nib], scale));
    }
  }
}

}  // namespace fsdp4bit
