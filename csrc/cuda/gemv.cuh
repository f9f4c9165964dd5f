// Fused 4-bit gemv for 1 to 8 rows of A: out = A @ W.T with W (N, K) 4-bit, float32 accumulation. The CUDA-core
// kernel for what the faster ones do not take (gemv.cu picks): float32 A, 2-3 tokens, and 1 or 4-8 tokens whose
// shape or GPU rules out the pair-table (gemv_lut.cuh) or tensor-core (gemv_tma.cuh) kernel.
// Instantiated once per A dtype (gemv_f32.cu, gemv_f16.cu, gemv_bf16.cu) so ninja compiles them in parallel.
#pragma once

#include "common.cuh"

namespace fsdp4bit {

// ------------------------------------------------------------------------- gemv
// out[m, n] = sum_k A[m, k] * W[n, k] + bias[n], W 4-bit of shape (N, K) with K % 32 == 0 (the bias, if any, added
// to the float32 sum before its one rounding).
// A CTA of 4 warps computes R rows of W for all M rows of A; the warps split K, each lane takes
// 16-byte chunks (32 weights) and reuses its A values (held in registers) across the R rows.
// Partial sums: per chunk sum(code * a) in float32, times the block scale, accumulated in float32.
constexpr int kGemvWarps = 4;

template <typename AT>
__device__ __forceinline__ void load_a8(const AT* __restrict__ p, float (&a)[8]) {
  if constexpr (sizeof(AT) == 2) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const AT* h = reinterpret_cast<const AT*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = to_f32(h[j]);
  } else {
    const float4 x = __ldg(reinterpret_cast<const float4*>(p));
    const float4 y = __ldg(reinterpret_cast<const float4*>(p) + 1);
    a[0] = x.x; a[1] = x.y; a[2] = x.z; a[3] = x.w;
    a[4] = y.x; a[5] = y.y; a[6] = y.z; a[7] = y.w;
  }
}

template <typename AT, int M, int R, bool NESTED>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const AT* __restrict__ A, const uint8_t* __restrict__ packed,
                                                               Code16 code, Scales sc, int log2bs, int64_t N, int64_t K,
                                                               AT* __restrict__ out, const AT* __restrict__ bias) {
  __shared__ float s_code[16];
  __shared__ float s_ncode[NESTED ? 256 : 1];
  __shared__ float s_part[kGemvWarps][R * M];
  float off = 0.0f;
  copy_table(s_code, code.v);
  load_scale_tables<NESTED>(sc, s_ncode, off);
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n0 = int64_t(blockIdx.x) * R;
  const int64_t chunks = K / 32;

  int64_t rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = min(n0 + r, N - 1);  // rows past N repeat the last (not written)

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

  for (int64_t c = int64_t(warp) * 32 + lane; c < chunks; c += kGemvWarps * 32) {
    uint4 w[R];
    float scale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t e = rows[r] * K + c * 32;
      w[r] = __ldcs(reinterpret_cast<const uint4*>(packed + e / 2));
      scale[r] = block_scale<NESTED>(sc, s_ncode, off, e >> log2bs);
    }
    float part[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) part[r][m] = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 4 words of 8 weights
      float a[M][8];
#pragma unroll
      for (int m = 0; m < M; ++m) load_a8(A + m * K + c * 32 + q * 8, a[m]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t word = q == 0 ? w[r].x : q == 1 ? w[r].y : q == 2 ? w[r].z : w[r].w;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          // element j of the word: byte j/2, high nibble for even j
          const int shift = 8 * (j >> 1) + ((j & 1) ? 0 : 4);
          const float wv = s_code[(word >> shift) & 15u];
#pragma unroll
          for (int m = 0; m < M; ++m) part[r][m] = fmaf(wv, a[m][j], part[r][m]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = fmaf(part[r][m], scale[r], acc[r][m]);
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) s_part[warp][r * M + m] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < R * M; i += blockDim.x) {
    const int r = i / M, m = i % M;
    if (n0 + r < N) {
      float v = 0.0f;
#pragma unroll
      for (int wi = 0; wi < kGemvWarps; ++wi) v += s_part[wi][i];
      out[m * N + n0 + r] = from_f32<AT>(v + bias_at(bias, n0 + r, N));
    }
  }
}

template <typename AT, int M, int R>
void launch_gemv(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs, int64_t N,
                 int64_t K, AT* o, const AT* bias, cudaStream_t stream) {
  const int64_t grid = (N + R - 1) / R;
  if (nested)
    gemv_kernel<AT, M, R, true><<<grid, kGemvWarps * 32, 0, stream>>>(a, p, c, sc, log2bs, N, K, o, bias);
  else
    gemv_kernel<AT, M, R, false><<<grid, kGemvWarps * 32, 0, stream>>>(a, p, c, sc, log2bs, N, K, o, bias);
}


// All M in [1, 8] for one A dtype: R (rows of W per CTA) shrinks as M grows to bound registers.
template <typename AT>
void gemv_dispatch(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                   int64_t M, int64_t N, int64_t K, AT* o, const AT* bias, cudaStream_t stream) {
  switch (M) {
    case 1: launch_gemv<AT, 1, 4>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    case 2: launch_gemv<AT, 2, 4>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    case 3: launch_gemv<AT, 3, 4>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    case 4: launch_gemv<AT, 4, 4>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    case 5: launch_gemv<AT, 5, 2>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    case 6: launch_gemv<AT, 6, 2>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    case 7: launch_gemv<AT, 7, 2>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
    default: launch_gemv<AT, 8, 2>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream); break;
  }
}

extern template void gemv_dispatch<float>(const float*, const uint8_t*, const Code16&, const Scales&, bool, int,
                                          int64_t, int64_t, int64_t, float*, const float*, cudaStream_t);
extern template void gemv_dispatch<__half>(const __half*, const uint8_t*, const Code16&, const Scales&, bool, int,
                                           int64_t, int64_t, int64_t, __half*, const __half*, cudaStream_t);
extern template void gemv_dispatch<__nv_bfloat16>(const __nv_bfloat16*, const uint8_t*, const Code16&, const Scales&,
                                                  bool, int, int64_t, int64_t, int64_t, __nv_bfloat16*,
                                                  const __nv_bfloat16*, cudaStream_t);

}  // namespace fsdp4bit
