// 4-bit gemv for one token of fp16/bf16 a, a warp per weight row: out[n] = a . W[n], W (N, K) 4-bit,
// K % 32 == 0 and K / 1024 rounded up == D (the launcher picks D = 4: K in (3072, 4096], the hidden size of most
// 7B-8B models). Lane l takes the 16-byte chunks l, l + 32, ... of a row, so a warp's loads are contiguous and
// the lane's D chunks of a are the same for every row: they live in registers, as half2 scaled by a power of
// two (max |a| lands in [2^9, 2^10), so 16 products of |w| <= 1 sum to at most 2^14 in half precision).
// Per packed byte: one PRMT (the byte and the lane make the table address), one conflict-free LDS of both
// weights as half2 (the pair table is replicated per lane) and one HFMA2; each 32-weight partial sum is widened
// to float32 and scaled by its block's absmax there. The next row's chunks are loaded while a row is computed
// (each as soon as its ring slot is free); a row's sum meets across its lanes once, with no barrier after the
// prologue. Measured against the pair-table kernel (gemv_lut.cuh) in NOTES.md.
#pragma once

#include "common.cuh"

#include <atomic>

namespace fsdp4bit {

constexpr size_t kRowTableBytes = 256 * 256;  // half2 pair of byte e for lane l at e * 256 + l * 4 (one PRMT)
constexpr int kRowMaxWarps = 32;
// the table, the nested code, the max's partials, a as half2, the code
constexpr size_t row_smem_bytes(int64_t K) {
  return kRowTableBytes + 4 * (256 + kRowMaxWarps) + 2 * size_t(K) + 4 * 16;
}

// exponent e with max |a| * 2^e in [2^9, 2^10), from the bits of max |a| (0 for zero, Inf or NaN: no scaling)
__device__ __forceinline__ int row_x_exponent(uint32_t amax_bits) {
  const int E = int(amax_bits >> 23);
  if (amax_bits == 0u || E >= 255) return 0;
  return min(136 - E, 126);
}

// both 16-bit values of a 32-bit word of a, widened exactly to float32 (first value in .x)
template <typename AT>
__device__ __forceinline__ float2 row_word_to_float2(uint32_t w);
template <>
__device__ __forceinline__ float2 row_word_to_float2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 row_word_to_float2<__half>(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}

__device__ __forceinline__ uint32_t& row_word(uint4& v, int k) {
  return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

// a as half2 in shared memory: 16-byte quad q of chunk c (32 values) at c * 4 + (q ^ ((c >> 1) & 3)), so a
// quarter warp reading quad q of 8 consecutive chunks hits 8 distinct 16-byte bank groups
__device__ __forceinline__ int64_t row_x_quad(int64_t c, int q) { return c * 4 + (q ^ int((c >> 1) & 3)); }

// a (K values) as half2 scaled by 2^e in shared memory, e from the CTA's max |a| (every CTA finds the same);
// each thread reads its 16-byte quads of a from global memory once, keeping up to 4 in registers across the
// max's barrier. Returns the float32 factor that undoes the scaling.
template <typename AT, int WARPS>
__device__ __forceinline__ float row_stage_a(const AT* __restrict__ a, int64_t K, uint4* s_x, uint32_t* s_red) {
  static_assert(sizeof(AT) == 2, "the row gemv takes fp16/bf16 a");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint4* a4 = reinterpret_cast<const uint4*>(a);  // 16-byte aligned (the binding checks)
  constexpr int kStash = 4;
  const int64_t nquads = K / 8;
  uint4 stash[kStash];
  uint32_t m = 0;
  auto quad_max = [&](uint4 v) { m = max(m, chunk_absmax_bits(Chunk8<AT>{{v}})); };
#pragma unroll
  for (int t = 0; t < kStash; ++t) {
    const int64_t i = threadIdx.x + int64_t(t) * blockDim.x;
    stash[t] = i < nquads ? __ldg(a4 + i) : make_uint4(0u, 0u, 0u, 0u);
    quad_max(stash[t]);
  }
  for (int64_t i = threadIdx.x + int64_t(kStash) * blockDim.x; i < nquads; i += blockDim.x) quad_max(__ldg(a4 + i));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) s_red[warp] = m;
  __syncthreads();
  m = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) m = max(m, s_red[w]);
  const int ex = row_x_exponent(m);
  const float up = __int_as_float((127 + ex) << 23);
  auto put_quad = [&](int64_t i, uint4 v) {  // quad i = values 8i..8i+7: chunk i / 4, quad i % 4
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = row_word_to_float2<AT>(row_word(v, k));
      const __half2 h = __floats2half2_rn(f.x * up, f.y * up);
      uint32_t bits;
      memcpy(&bits, &h, 4);
      row_word(v, k) = bits;
    }
    s_x[row_x_quad(i / 4, int(i % 4))] = v;
  };
#pragma unroll
  for (int t = 0; t < kStash; ++t) {
    const int64_t i = threadIdx.x + int64_t(t) * blockDim.x;
    if (i < nquads) put_quad(i, stash[t]);
  }
  for (int64_t i = threadIdx.x + int64_t(kStash) * blockDim.x; i < nquads; i += blockDim.x) put_quad(i, __ldg(a4 + i));
  return __int_as_float((127 - ex) << 23);
}

// the lane's 32 weights of one chunk (16 packed bytes) . its 32 scaled values of a (4 quads of half2), unscaled
// by the block's absmax: per byte one PRMT, one conflict-free LDS of the weight pair, one HFMA2
__device__ __forceinline__ float row_chunk_dot(const unsigned char* table, uint32_t lane_off, const uint4& w,
                                               const uint4 (&x)[4]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  __half2 h0 = __float2half2_rn(0.0f), h1 = h0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t xs[4] = {x[k].x, x[k].y, x[k].z, x[k].w};
#pragma unroll
    for (int sel = 0; sel < 4; ++sel) {
      const uint32_t addr = __byte_perm(words[k], lane_off, 0x5504u | (uint32_t(sel) << 4));
      const __half2 wv = *reinterpret_cast<const __half2*>(table + addr);
      const __half2 xv = *reinterpret_cast<const __half2*>(&xs[sel]);
      if (sel & 1)
        h1 = __hfma2(wv, xv, h1);
      else
        h0 = __hfma2(wv, xv, h0);
    }
  }
  const float2 f = __half22float2(__hadd2(h0, h1));
  return f.x + f.y;
}

// The row kernel's prologue: the code and nested code into shared memory, a staged as scaled half2,
// the pair table filled, and the lane's D chunks of a loaded into `xr`. Returns the factor that undoes a's
// scaling; `off` gets the double-quant offset.
template <typename AT, int WARPS, int D, bool NESTED>
__device__ __forceinline__ float row_prologue(const AT* __restrict__ a, const Code16& code, const Scales& sc, int64_t K,
                                              unsigned char* row_smem, uint4 (&xr)[D][4], float& off) {
  static_assert(WARPS <= kRowMaxWarps, "too many warps for the max's partials");
  unsigned char* table = row_smem;
  float* s_ncode = reinterpret_cast<float*>(row_smem + kRowTableBytes);
  uint32_t* s_red = reinterpret_cast<uint32_t*>(s_ncode + 256);
  uint4* s_x = reinterpret_cast<uint4*>(s_red + kRowMaxWarps);
  float* s_code = reinterpret_cast<float*>(s_x + K / 8);
  const int lane = threadIdx.x % 32;
  const int64_t KC = K / 32;
  copy_table(s_code, code.v);
  load_scale_tables<NESTED>(sc, s_ncode, off);
  const float down = row_stage_a<AT, WARPS>(a, K, s_x, s_red);  // its barrier also publishes s_code
  // the pair table (a per-warp fill from the lanes' registers, without staging the code in shared memory,
  // measured 3.8 us slower per call on the H100)
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
    const int e = i / 32, l = i % 32;
    *reinterpret_cast<__half2*>(table + e * 256 + l * 4) = __floats2half2_rn(s_code[e >> 4], s_code[e & 15]);
  }
  __syncthreads();
#pragma unroll
  for (int d = 0; d < D; ++d)
#pragma unroll
    for (int q = 0; q < 4; ++q)
      xr[d][q] = int64_t(d) * 32 + lane < KC ? s_x[row_x_quad(int64_t(d) * 32 + lane, q)] : make_uint4(0u, 0u, 0u, 0u);
  return down;
}

template <typename AT, int WARPS, int D, bool NESTED>
__global__ void __launch_bounds__(WARPS * 32, 1)
    gemv_row_kernel(const AT* __restrict__ a, const uint8_t* __restrict__ packed, Code16 code, Scales sc, int log2bs,
                    int64_t N, int64_t K, AT* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char row_smem[];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t stride = int64_t(gridDim.x) * WARPS;
  uint32_t valid = 0;  // bit d: the lane's chunk d lies inside the row (K < 1024 D leaves lanes past the end)
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (int64_t(d) * 32 + lane < K / 32) valid |= 1u << d;

  // The ring holds the lane's D chunks of the warp's next row: slot d is read, refilled with chunk d of the row
  // after, then computed. The row's packed bytes and first element advance by a constant per row, so a chunk's
  // addresses cost a few adds (a 64-bit element index per chunk cost ~45 instructions per chunk, as much as its
  // math).
  int64_t row = int64_t(blockIdx.x) * WARPS + warp;
  const uint8_t* pw = packed + row * (K / 2) + lane * 16;
  int64_t e_row = row * K + lane * 32;
  const int64_t step_bytes = stride * (K / 2), step_elems = stride * K;
  ChunkIn ring[D];
  auto fetch = [&](int d, bool ok) {
    if (ok && ((valid >> d) & 1u)) {
      ring[d].w = __ldcs(reinterpret_cast<const uint4*>(pw + d * 512));
      load_scale_in<NESTED>(sc, (e_row + d * 1024) >> log2bs, ring[d].q, ring[d].s);
    }
  };
#pragma unroll
  for (int d = 0; d < D; ++d) {
    ring[d] = ChunkIn{make_uint4(0u, 0u, 0u, 0u), 0u, 0.0f};  // chunks past the row stay zero (zero a too)
    fetch(d, row < N);  // in flight during the prologue
  }

  uint4 xr[D][4];  // the lane's chunks of a, the same for every row
  float off = 0.0f;
  const float down = row_prologue<AT, WARPS, D, NESTED>(a, code, sc, K, row_smem, xr, off);
  const float* s_ncode = reinterpret_cast<const float*>(row_smem + kRowTableBytes);

  const uint32_t lane_off = uint32_t(lane) * 4u;
  for (; row < N; row += stride) {
    const bool more = row + stride < N;
    pw += step_bytes;
    e_row += step_elems;
    float acc = 0.0f;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const ChunkIn t = ring[d];
      fetch(d, more);
      acc = fmaf(row_chunk_dot(row_smem, lane_off, t.w, xr[d]), chunk_scale<NESTED>(t.q, t.s, s_ncode, off), acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[row] = from_f32<AT>(acc * down);
  }
}

// Grid: rows per warp so that the warps split N evenly, at most one wave.
template <typename AT, int WARPS, int D>
void launch_gemv_row(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                     int64_t N, int64_t K, AT* o, cudaStream_t stream) {
  auto kernel = nested ? gemv_row_kernel<AT, WARPS, D, true> : gemv_row_kernel<AT, WARPS, D, false>;
  static std::atomic<uint64_t> configured[2] = {0, 0};  // per kernel: devices where its smem limit is raised
  allow_dynamic_smem(kernel, device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin), configured[nested]);
  const size_t smem = row_smem_bytes(K);
  static WaveCache waves[2];
  const int64_t max_warps = one_wave_cached(kernel, WARPS * 32, smem, waves[nested]) * WARPS;
  const int64_t rows_per_warp = (N + max_warps - 1) / max_warps;
  const int64_t warps = (N + rows_per_warp - 1) / rows_per_warp;
  kernel<<<unsigned((warps + WARPS - 1) / WARPS), WARPS * 32, smem, stream>>>(a, p, c, sc, log2bs, N, K, o);
}

// Whether the row kernel takes this call; launch_gemv (gemv.cu) asks it first.
bool gemv_row_applies(FloatType dtype, bool nested, const Scales& sc, int64_t M, int64_t K);
void launch_gemv_row_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t N, int64_t K, void* out, cudaStream_t stream);

}  // namespace fsdp4bit
