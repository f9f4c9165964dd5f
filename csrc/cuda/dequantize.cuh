// Blockwise 4-bit dequantization kernels: code[nibble] * absmax[block] in float32, one RNE cast to the output
// dtype. With double quantization the float32 scale is computed in the same kernel from the 8-bit absmax
// (1 byte read per block): nested_code[q] * nested_absmax[b / nested_blocksize] + offset. A header so that
// bench/cuda/sweep.cu can instantiate and time them outside torch.
#pragma once

#include "common.cuh"

namespace fsdp4bit {

// The 16 code values live in the registers of a warp (lane i loads code[i % 16] from device memory: a
// run-time index into a by-value table would copy it to local memory) and a lookup is a warp shuffle, so the
// kernel needs no shared memory and no barrier: every thread's loads start at once (a shared table cost each
// short-lived CTA a fill + barrier before its loads: 59.6 vs 53.9 us at 14336x4096 on H100). All 32 lanes
// must reach every shuffle, so threads past the end decode zeros and store nothing.
__device__ __forceinline__ float code_at(float lane_code, uint32_t nibble) {
  return __shfl_sync(0xffffffffu, lane_code, int(nibble));
}

// ------------------------------------------------------------------------- dequantize
// Each thread turns 8 packed bytes into 16 outputs (one quantization block: blocks are >= 32 elements and
// chunks start at multiples of 16), with 16-byte streaming (evict-first) stores: the output is written once
// and read by the next kernel, and evict-first stores keep the write stream from churning L2 (H100, session 23:
// plain stores took 14336x4096 from 52.2 to 73.9 us, 28672x8192 from 204 to 287, and the QLoRA layer's
// forward at 4096 tokens from 779-796 to 809-816 us).
constexpr int kDequantThreads = 256;

template <typename OutT, bool NESTED>
__global__ void __launch_bounds__(kDequantThreads) dequantize_kernel(const uint8_t* __restrict__ packed, int64_t n,
                                                                     const float* __restrict__ code, Scales sc,
                                                                     int log2bs, bool vec_ok, OutT* __restrict__ out) {
  const float lane_code = __ldg(code + threadIdx.x % 16);
  const int64_t e0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 16;
  const bool full = vec_ok && e0 + 16 <= n;
  uint2 raw = make_uint2(0u, 0u);
  if (full) {
    raw = __ldcs(reinterpret_cast<const uint2*>(packed + e0 / 2));
  } else {
    for (int k = 0; k < 8 && e0 + 2 * k < n; ++k)  // unaligned packed or the short tail: byte by byte
      (k < 4 ? raw.x : raw.y) |= uint32_t(packed[e0 / 2 + k]) << (8 * (k & 3));
  }
  const float scale = e0 < n ? block_scale_ldg<NESTED>(sc, e0 >> log2bs) : 0.0f;

  OutT vals[16];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t byte = ((k < 4 ? raw.x : raw.y) >> (8 * (k & 3))) & 0xffu;
    vals[2 * k] = from_f32<OutT>(__fmul_rn(code_at(lane_code, byte >> 4), scale));
    vals[2 * k + 1] = from_f32<OutT>(__fmul_rn(code_at(lane_code, byte & 15), scale));
  }
  if (full) {
    uint4* d = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
    for (int k = 0; k < int(16 * sizeof(OutT) / 16); ++k) __stcs(d + k, reinterpret_cast<const uint4*>(vals)[k]);
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (e0 + j < n) out[e0 + j] = vals[j];
  }
}

// Grid for the kernel above: one thread per 16 elements.
inline int64_t dequantize_grid(int64_t n) { return ((n + 15) / 16 + kDequantThreads - 1) / kDequantThreads; }

}  // namespace fsdp4bit
