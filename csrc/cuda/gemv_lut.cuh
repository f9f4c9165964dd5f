// 4-bit gemv for one token: out = a @ W.T + bias, W (N, K) 4-bit, K % 32 == 0, float32 accumulation.
// The CUDA-core gemv of gemv.cuh spends ~8 instructions per weight (nibble extract, address, shared-memory
// code lookup, bf16 convert, FMA) and its short-lived CTAs load, then compute, wave after wave. Here:
//  - a packed byte is looked up whole in a pair table (byte -> both of its weights as float2), replicated for
//    each lane so a warp's lookups never share a bank, with the address one byte permute of (byte, lane): per
//    weight pair one PRMT, one LDS.64 and two FFMA;
//  - a is converted to float32 once per CTA into shared memory;
//  - a persistent grid: each warp walks its rows' k-tiles (32 lanes x 32 weights) with the next tile's packed
//    words and scales loaded while it computes the current one.
// Shared memory: the 64 KB table plus 4 K bytes of a, so K is bounded (gemv_lut_max_k); gemv.cu falls back to
// the CUDA-core kernel past it.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <atomic>

namespace fsdp4bit {

// Pair table: entry e (a packed byte) for lane l at byte offset e * 256 + l * kSlot, so a warp's lookups hit
// 32 distinct banks and the address is a single byte permute of (byte, l * kSlot). F16: the pair as half2
// (one 4-byte wavefront per warp lookup, two conversions), else as float2 (exact, two wavefronts).
constexpr size_t kLutTableBytes = 256 * 256;

constexpr int kLutMaxRedFloats = 2 * 32 * 8;  // the partial-sum exchange, for up to 32 warps of 8 rows
constexpr size_t gemv_lut_smem(int64_t K) { return kLutTableBytes + 4 * (size_t(K) + 256 + 16 + kLutMaxRedFloats); }

// a (float32) in shared memory: float4 q of chunk c (32 values) at c * 8 + (q ^ (c & 7)), so the 8 lanes of
// a quarter warp reading the same q of consecutive chunks hit 8 distinct 16-byte bank groups
__device__ __forceinline__ int64_t x_slot(int64_t c, int q) { return c * 8 + (q ^ int(c & 7)); }

// what one lane holds of one k-tile of R rows: each row's chunk (16 packed bytes, raw block-scale inputs)
template <int R>
struct LutTile {
  ChunkIn c[R];
  bool valid;
};

template <int R, bool NESTED>
__device__ __forceinline__ void lut_fetch(LutTile<R>& t, const uint8_t* __restrict__ packed, const Scales& sc,
                                          int log2bs, int64_t N, int64_t K, int64_t row0, int64_t chunk) {
  t.valid = chunk < K / 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    t.c[r] = ChunkIn{make_uint4(0u, 0u, 0u, 0u), 0u, 0.0f};
    const int64_t row = min(row0 + r, N - 1);  // rows past N repeat the last (not written)
    if (t.valid) t.c[r] = load_gemv_chunk<NESTED>(packed, sc, log2bs, row * K + chunk * 32);
  }
}

// both weights of byte `sel` of `word`, looked up in the pair table
template <bool F16>
__device__ __forceinline__ float2 lut_pair(const unsigned char* smem, uint32_t word, uint32_t lane_off, int sel) {
  const uint32_t addr = __byte_perm(word, lane_off, 0x5504u | (uint32_t(sel) << 4));  // (byte << 8) | lane_off
  if constexpr (F16)
    return __half22float2(*reinterpret_cast<const __half2*>(smem + addr));
  else
    return *reinterpret_cast<const float2*>(smem + addr);
}

// acc[r] += scale[r] * (row r's 32 weights of the lane . its 32 values of a); a is read from shared memory
// one 8-value word at a time, shared by the R rows, so few registers hold it
template <int R, bool F16>
__device__ __forceinline__ void lut_rows(const unsigned char* smem, const float4* s_x, int64_t chunk, const uint4 (&w)[R],
                                         const float (&scale)[R], float (&acc)[R], uint32_t lane_off) {
  float part[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float4 x0 = s_x[x_slot(chunk, 2 * j)], x1 = s_x[x_slot(chunk, 2 * j + 1)];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t word = j == 0 ? w[r].x : j == 1 ? w[r].y : j == 2 ? w[r].z : w[r].w;
      const float2 v0 = lut_pair<F16>(smem, word, lane_off, 0), v1 = lut_pair<F16>(smem, word, lane_off, 1);
      const float2 v2 = lut_pair<F16>(smem, word, lane_off, 2), v3 = lut_pair<F16>(smem, word, lane_off, 3);
      part[r][0] = fmaf(v0.x, x0.x, part[r][0]);
      part[r][1] = fmaf(v0.y, x0.y, part[r][1]);
      part[r][0] = fmaf(v1.x, x0.z, part[r][0]);
      part[r][1] = fmaf(v1.y, x0.w, part[r][1]);
      part[r][0] = fmaf(v2.x, x1.x, part[r][0]);
      part[r][1] = fmaf(v2.y, x1.y, part[r][1]);
      part[r][0] = fmaf(v3.x, x1.z, part[r][0]);
      part[r][1] = fmaf(v3.y, x1.w, part[r][1]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = fmaf(part[r][0] + part[r][1], scale[r], acc[r]);
}

// A CTA step covers WARPS / kparts row groups of R rows; warp w takes row group w / kparts and the k-tiles
// (32 lanes x 32 weights) of part w % kparts, so a step's rows are spread over all warps even when N is small.
// Partial sums meet in shared memory (double-buffered: one barrier per step).
template <typename AT, int R, int WARPS, bool NESTED, bool F16>
__global__ void __launch_bounds__(WARPS * 32, WARPS >= 16 ? 1 : 16 / WARPS)
    gemv_lut_kernel(const AT* __restrict__ a, const uint8_t* __restrict__ packed, Code16 code, Scales sc, int log2bs,
                    int64_t N, int64_t K, int kparts, AT* __restrict__ out, const AT* __restrict__ bias) {
  extern __shared__ __align__(16) unsigned char lut_smem[];
  unsigned char* smem = lut_smem;
  float4* s_x = reinterpret_cast<float4*>(smem + kLutTableBytes);
  float* s_ncode = reinterpret_cast<float*>(smem + kLutTableBytes) + K;
  float* s_code = s_ncode + 256;
  auto s_red = reinterpret_cast<float(*)[WARPS][R]>(s_code + 16);  // [2][WARPS][R]
  static_assert(2 * WARPS * R <= kLutMaxRedFloats, "partial sums exceed their shared-memory area");

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t tiles = (K / 32 + 31) / 32;
  const int64_t t0 = tiles * (warp % kparts) / kparts, t1 = tiles * (warp % kparts + 1) / kparts;
  const int64_t step_rows = int64_t(WARPS / kparts) * R;
  const int64_t nsteps = (N + step_rows - 1) / step_rows;
  const int64_t row_off = int64_t(warp / kparts) * R;

  // before pdl_wait(): the pair table from the by-value code (no earlier kernel writes either)
  pdl_launch_dependents();
  copy_table(s_code, code.v);
  __syncthreads();
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
    const int e = i / 32, l = i % 32;
    if constexpr (F16)
      *reinterpret_cast<__half2*>(smem + e * 256 + l * 4) = __floats2half2_rn(s_code[e >> 4], s_code[e & 15]);
    else
      *reinterpret_cast<float2*>(smem + e * 256 + l * 8) = make_float2(s_code[e >> 4], s_code[e & 15]);
  }
  pdl_wait();

  LutTile<R> cur;
  int64_t step = blockIdx.x, tile = t0;
  if (step < nsteps && t0 < t1)
    lut_fetch<R, NESTED>(cur, packed, sc, log2bs, N, K, step * step_rows + row_off, t0 * 32 + lane);  // during setup

  float off = 0.0f;
  load_scale_tables<NESTED>(sc, s_ncode, off);
  for (int64_t i = threadIdx.x; i < K / 4; i += blockDim.x) {
    const int64_t c = i / 8;
    const AT* p = a + 4 * i;
    s_x[x_slot(c, int(i % 8))] = make_float4(to_f32(ld_after_wait(p)), to_f32(ld_after_wait(p + 1)),
                                             to_f32(ld_after_wait(p + 2)), to_f32(ld_after_wait(p + 3)));
  }
  __syncthreads();

  const uint32_t lane_off = uint32_t(lane) * (F16 ? 4u : 8u);
  for (int parity = 0; step < nsteps; step += gridDim.x, parity ^= 1) {
    const int64_t row0 = step * step_rows + row_off;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    for (tile = t0; tile < t1; ++tile) {
      LutTile<R> nxt;  // the next tile of this step, else the first of the next step
      if (tile + 1 < t1)
        lut_fetch<R, NESTED>(nxt, packed, sc, log2bs, N, K, row0, (tile + 1) * 32 + lane);
      else if (step + gridDim.x < nsteps)
        lut_fetch<R, NESTED>(nxt, packed, sc, log2bs, N, K, row0 + gridDim.x * step_rows, t0 * 32 + lane);
      if (cur.valid) {
        float scale[R];
        uint4 w[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          scale[r] = chunk_scale<NESTED>(cur.c[r].q, cur.c[r].s, s_ncode, off);
          w[r] = cur.c[r].w;
        }
        lut_rows<R, F16>(smem, s_x, tile * 32 + lane, w, scale, acc, lane_off);
      }
      cur = nxt;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) s_red[parity][warp][r] = v;
    }
    __syncthreads();
    if (threadIdx.x < step_rows) {
      const int g = int(threadIdx.x) / R, r = int(threadIdx.x) % R;
      const int64_t row = step * step_rows + threadIdx.x;
      float v = 0.0f;
      for (int p = 0; p < kparts; ++p) v += s_red[parity][g * kparts + p][r];
      if (row < N) out[row] = from_f32<AT>(v + bias_at(bias, row, N));
    }
  }
}

// largest K whose table + float32 a fit in the device's opt-in shared memory per block
inline int64_t gemv_lut_max_k() {
  const int64_t smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  return (smem - int64_t(gemv_lut_smem(0))) / 4 / 32 * 32;
}

// k-parts per row group: the power of two <= min(WARPS, k-tiles) that keeps the most warps busy, counting the
// rows of the grid's last wave and the k-tiles of the slowest part (fewer parts on a near tie: fewer partial
// sums to combine)
inline int gemv_lut_kparts(int warps, int rows, int64_t N, int64_t K, int64_t ctas) {
  const int64_t tiles = (K / 32 + 31) / 32;
  int best = 1;
  double best_eff = 0.0;
  for (int kp = 1; kp <= warps && kp <= tiles && warps % kp == 0; kp *= 2) {
    const int64_t step_rows = int64_t(warps / kp) * rows;
    const int64_t waves = ((N + step_rows - 1) / step_rows + ctas - 1) / ctas;
    const double eff = double(N) / double(waves * ctas * step_rows) * double(tiles) / double(kp * ((tiles + kp - 1) / kp));
    if (eff > best_eff * 1.02) best = kp, best_eff = eff;
  }
  return best;
}

// Persistent grid: as many CTAs as fit on the SMs, each building the table once, as a programmatic dependent
// launch (the table is filled while the kernel before it finishes).
template <typename AT, int R, int WARPS, bool F16>
void launch_gemv_lut(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                     int64_t N, int64_t K, AT* o, const AT* bias, cudaStream_t stream) {
  auto kernel = nested ? gemv_lut_kernel<AT, R, WARPS, true, F16> : gemv_lut_kernel<AT, R, WARPS, false, F16>;
  static std::atomic<uint64_t> configured[2] = {0, 0};  // per kernel: devices where its smem limit is raised
  allow_dynamic_smem(kernel, device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin), configured[nested]);
  const size_t smem = gemv_lut_smem(K);
  static WaveCache waves[2];
  const int64_t ctas = one_wave_cached(kernel, WARPS * 32, smem, waves[nested]);
  const int kparts = gemv_lut_kparts(WARPS, R, N, K, ctas);
  const int64_t steps = (N + int64_t(WARPS / kparts) * R - 1) / (int64_t(WARPS / kparts) * R);
  const unsigned grid = unsigned(std::min(ctas, steps));
  launch_dependent(kernel, dim3(grid), dim3(WARPS * 32), smem, stream, a, p, c, sc, log2bs, N, K, kparts, o, bias);
}

// Whether the pair-table gemv takes this call (one token of fp16/bf16 A, power-of-two nested blocks, K within
// shared memory); launch_gemv (gemv.cu) asks before falling back to the CUDA-core kernel.
bool gemv_lut_applies(FloatType dtype, bool nested, const Scales& sc, int64_t M, int64_t K);
void launch_gemv_lut_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t N, int64_t K, void* out, const void* bias,
                         cudaStream_t stream);

}  // namespace fsdp4bit
