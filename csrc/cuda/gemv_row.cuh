// 4-bit gemvs for one token of fp16/bf16 a, a warp per weight row: out[n] = a . W[n] + bias[n], W (N, K) 4-bit.
// gemv_row_kernel (K up to 4096: the hidden size of most models up to 8B): lane l takes the 16-byte chunks
// l, l + 32, ... of a row (D = K / 1024 rounded up of them), so a warp's loads are contiguous and the lane's
// chunks of a are the same for every row: they live in registers, as half2 scaled by a power of two (max |a|
// lands in [2^9, 2^10), so 16 products of |w| <= 1 sum to at most 2^14 in half precision).
// Past 4096 (down projections, 70B-class models) the same kernel splits each row into 2, 4 or 8 parts of at most
// 4096 values (2048 where that measured faster), a group of warps per row, up to K = 32768; past that
// gemv_row_stream_kernel reads a from shared memory per chunk. How rows are dealt to warps: RowOrder.
// Per packed byte: one PRMT (the byte and the lane make the table address), one conflict-free LDS of both
// weights as half2 (the pair table is replicated per lane) and one HFMA2; each 32-weight partial sum is widened
// to float32 and scaled by its block's absmax there. The next chunks are loaded while a row is computed (each
// as soon as its ring slot is free); a row's sum meets across its lanes once, with no barrier after the
// prologue. Both are programmatic dependent launches. Measured against the pair-table kernel (gemv_lut.cuh)
// in NOTES.md.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <atomic>

namespace fsdp4bit {

constexpr size_t kRowTableBytes = 256 * 256;  // half2 pair of byte e for lane l at e * 256 + l * 4 (one PRMT)
constexpr int kRowMaxWarps = 32;
// bytes of its first row a warp asks of L2 before pdl_wait() (sweep, H100, back to back: 2 KB took 14336x4096
// 13.58 -> 12.55 us, 1 KB took 4096x14336 14.55 -> 13.98 and 8192^2 16.0 -> 15.36; NOTES.md)
constexpr int kRowPrefetchBytes = 2048, kStreamPrefetchBytes = 1024;
// Shared memory of the row kernels: the pair table, the nested code (256 floats), the max's partials (one per
// warp), a as half2, the 16-entry code.
constexpr size_t kRowNcodeOffset = kRowTableBytes, kRowXOffset = kRowNcodeOffset + 4 * (256 + kRowMaxWarps);
// chunk rounds of a row: a warp's 32 lanes read 1024 values (32 x 16 packed bytes) per round, the last one partial
// when K % 1024 != 0
__host__ __device__ constexpr int64_t row_rounds(int64_t K) { return (K + 1023) / 1024; }
// whole blocks of at most 1024 weights per row: the row kernels' precondition on the blocksize (a chunk of 32 values
// lies in one block, a round of 1024 in whole blocks)
__host__ __device__ constexpr bool row_blocks_whole(int log2bs, int64_t K) {
  return log2bs <= 10 && (K >> log2bs) << log2bs == K;
}
// a as half2, padded with zeros to whole rounds of 1024 values (a lane's chunks past K read zeros)
constexpr size_t row_x_bytes(int64_t K) { return 2 * size_t(row_rounds(K) * 1024); }
constexpr size_t row_code_offset(int64_t K) { return kRowXOffset + row_x_bytes(K); }
constexpr size_t row_smem_bytes(int64_t K) { return row_code_offset(K) + 4 * 16; }

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
__device__ __forceinline__ uint32_t row_x_quad(uint32_t c, int q) { return c * 4 + (uint32_t(q) ^ ((c >> 1) & 3)); }

// where a (as half2) and the nested code lie in the row kernels' shared memory
__device__ __forceinline__ uint4* row_x(unsigned char* row_smem) {
  return reinterpret_cast<uint4*>(row_smem + kRowXOffset);
}
__device__ __forceinline__ float* row_ncode(unsigned char* row_smem) {
  return reinterpret_cast<float*>(row_smem + kRowNcodeOffset);
}

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
    stash[t] = i < nquads ? ld_after_wait(a4 + i) : make_uint4(0u, 0u, 0u, 0u);
    quad_max(stash[t]);
  }
  for (int64_t i = threadIdx.x + int64_t(kStash) * blockDim.x; i < nquads; i += blockDim.x)
    quad_max(ld_after_wait(a4 + i));
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
    s_x[row_x_quad(uint32_t(i / 4), int(i % 4))] = v;
  };
#pragma unroll
  for (int t = 0; t < kStash; ++t) {
    const int64_t i = threadIdx.x + int64_t(t) * blockDim.x;
    if (i < nquads) put_quad(i, stash[t]);
  }
  for (int64_t i = threadIdx.x + int64_t(kStash) * blockDim.x; i < nquads; i += blockDim.x)
    put_quad(i, ld_after_wait(a4 + i));
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

// Before pdl_wait(): the warp asks L2 for the scale inputs of `blocks` blocks from block b (its first row), so the
// ring's first scale loads, which must follow the wait, hit L2. (A load issued before the wait may read what the
// kernel before is still writing: the compiler had moved the split kernel's __ldg scale loads there.)
template <bool NESTED>
__device__ __forceinline__ void row_prefetch_scales(const Scales& sc, uint32_t b, uint32_t blocks) {
  if constexpr (NESTED) {
    prefetch_l2_lines(sc.absmax_q + b, blocks);
    const uint32_t n0 = b >> sc.nested_log2, n1 = (b + blocks - 1) >> sc.nested_log2;
    prefetch_l2_lines(sc.nested_absmax + n0, 4 * (n1 - n0 + 1));
  } else {
    prefetch_l2_lines(sc.absmax_f + b, 4 * blocks);
  }
}

// A row kernel's start: it lets the next kernel launch, asks L2 for the first `pf_bytes` of the warp's first row
// (`pf_from`, null past N), fills the pair table (byte -> both weights as half2, per lane) from the by-value code,
// which no earlier kernel writes, then waits for the kernel before it.
__device__ __forceinline__ void row_table_then_wait(const Code16& code, unsigned char* row_smem, const uint8_t* pf_from,
                                                    uint32_t pf_bytes, int64_t K) {
  pdl_launch_dependents();
  // a bulk prefetch returns nothing to the program and L2 stays coherent with the kernel before, which may still
  // write those bytes: their DRAM reads overlap its tail
  if (pf_bytes > 0 && pf_from != nullptr && threadIdx.x % 32 == 0) prefetch_l2(pf_from, pf_bytes);
  float* s_code = reinterpret_cast<float*>(row_smem + row_code_offset(K));
  copy_table(s_code, code.v);
  __syncthreads();
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
    const int e = i / 32, l = i % 32;
    *reinterpret_cast<__half2*>(row_smem + e * 256 + l * 4) = __floats2half2_rn(s_code[e >> 4], s_code[e & 15]);
  }
  pdl_wait();
}

// After pdl_wait(): the nested code into shared memory and a staged as scaled half2, zero past K to the end of
// its last round (published by a barrier).
// Returns the factor that undoes a's scaling; `off` gets the double-quant offset.
template <typename AT, int WARPS, bool NESTED>
__device__ __forceinline__ float row_prologue(const AT* __restrict__ a, const Scales& sc, int64_t K,
                                              unsigned char* row_smem, float& off) {
  static_assert(WARPS <= kRowMaxWarps, "too many warps for the max's partials");
  float* s_ncode = row_ncode(row_smem);
  uint32_t* s_red = reinterpret_cast<uint32_t*>(s_ncode + 256);
  load_scale_tables<NESTED>(sc, s_ncode, off);
  const uint32_t quads = uint32_t(K / 8), padded = uint32_t(row_x_bytes(K) / 16);
  for (uint32_t i = quads + threadIdx.x; i < padded; i += blockDim.x)
    row_x(row_smem)[row_x_quad(i / 4, int(i % 4))] = make_uint4(0u, 0u, 0u, 0u);
  const float down = row_stage_a<AT, WARPS>(a, K, row_x(row_smem), s_red);
  __syncthreads();
  return down;
}

// the lane's 32 staged values of a for chunk c of a row (chunk index c * 32 + lane of a)
__device__ __forceinline__ void row_load_x(unsigned char* row_smem, uint32_t chunk, uint4 (&x)[4]) {
  const uint4* s_x = row_x(row_smem);
#pragma unroll
  for (int q = 0; q < 4; ++q) x[q] = s_x[row_x_quad(chunk, q)];
}

// How the row kernel deals rows to the groups of P warps of its CTAs (G groups per CTA):
// - kBands: CTA b's groups take rows b * G + g, then the same in each next band of grid x G rows, on a grid sized so
//   that the groups' row counts differ by one at most, the last groups' being the smaller (at 14336x4096 and 8192^2
//   that leaves 4 of 132 SMs idle);
// - kShares: one wave (fewer CTAs, N / G rounded up, for fewer rows), CTA b taking the contiguous rows
//   [N b / grid, N (b + 1) / grid) (counts that differ by one at most), its group g every G-th of them from the g-th;
// - kInterleaved: the same grid, group g of CTA b taking rows g * grid + b, then the same in each next band of
//   grid x G rows (counts that differ by one at most).
// Whole rows and parts of 3 rounds keep kBands, parts of 4 rounds take kShares, parts of 1 or 2 kInterleaved unless
// that leaves a group one row or none (launch_gemv_row). H100 sweep (NOTES.md, session 16), us, kBands against the
// order taken: 4 rounds 8192^2 15.10 -> 14.18, 4096x14336 14.34 -> 13.67, 28672x8192 44.39 -> 42.59, 4096x7168 8.99 ->
// 8.45; 2 rounds 4096^2 5.98 -> 5.71, 2048x8192 6.08 -> 5.76. Against the others: whole rows in kShares 14336x4096
// 12.35 -> 12.76, in kInterleaved 2048x2048 3.29 -> 3.46; 3 rounds in kShares 8192x22016 35.14 -> 36.36, 4096x6144
// 7.07 -> 7.18; 2 rounds in kShares 4096^2 5.98 -> 6.11; 2 rounds of one row per group interleaved, 512x4096 2.88 ->
// 3.10.
enum class RowOrder { kBands, kShares, kInterleaved };
constexpr RowOrder row_order(int P, int D) {
  return P == 1 || D == 3 ? RowOrder::kBands : D == 4 ? RowOrder::kShares : RowOrder::kInterleaved;
}

// groups of `parts` warps in one wave of `warps`-warp CTAs, one per SM (the row kernels' occupancy)
inline int64_t row_wave_groups(int warps, int parts) {
  return device_attribute(cudaDevAttrMultiProcessorCount) * (warps / parts);
}

// The grid of the row kernel dealing N rows in `order` to CTAs of G groups, `wave` CTAs at most, and the most rows
// a group takes (one part sum per row of each group in shared memory when P > 1)
struct RowGrid {
  int64_t ctas, rows_per_group;
};
inline RowGrid row_grid(RowOrder order, int64_t N, int G, int64_t wave) {
  if (order == RowOrder::kBands) {
    const int64_t per_group = (N + wave * G - 1) / (wave * G), groups = (N + per_group - 1) / per_group;
    const int64_t ctas = (groups + G - 1) / G;
    return {ctas, (N + ctas * G - 1) / (ctas * G)};
  }
  const int64_t ctas = std::min(wave, (N + G - 1) / G);
  if (order == RowOrder::kShares) return {ctas, ((N + ctas - 1) / ctas + G - 1) / G};
  return {ctas, (N + ctas * G - 1) / (ctas * G)};
}

// Launched as a programmatic dependent launch (launch_dependent): the pair table is filled while the kernel
// before it finishes (back to back 1-token gemvs, H100 14336x4096: 13.6 vs 15.2 us per call), and the kernel
// lets the next one start at once (that one waits for this one's output before reading anything).
// P > 1 splits each row into P parts of its 32-value chunks dealt out as evenly as they go (14336 in 4 parts are 112
// chunks, 3.5 rounds, each; at most D = 4 rounds), or of whole 1024-value chunk rounds for D = 2 (14 rounds in 8 parts
// are 2, 2, 2, 2, 2, 2, 1, 1): the CTA's warps form WARPS / P groups of P,
// warp p of a group takes part p of the group's rows and keeps that part of a in registers, and each part's sum
// goes to shared memory; after the last row the CTA adds every row's parts in order (a fixed order: the same bits
// every run) and writes the outputs. So K past 4096 keeps a in registers too.
// Rows are dealt to the groups in order O (RowOrder).
template <typename AT, int WARPS, int D, bool NESTED, int P = 1, RowOrder O = RowOrder::kBands,
          int PF = kRowPrefetchBytes>
__global__ void __launch_bounds__(WARPS * 32, 1)
    gemv_row_kernel(const AT* __restrict__ a, const uint8_t* __restrict__ packed, Code16 code, Scales sc, int log2bs,
                    int64_t N, int64_t K, AT* __restrict__ out, const AT* __restrict__ bias) {
  static_assert(WARPS % P == 0, "a CTA holds whole groups of P warps");
  constexpr int G = WARPS / P;  // row groups per CTA
  extern __shared__ __align__(16) unsigned char row_smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, part = warp % P, group = warp / P;
  // the group's rows: row, row + stride, ... below row_end
  constexpr bool kShares = O == RowOrder::kShares;
  const int64_t stride = kShares ? int64_t(G) : int64_t(gridDim.x) * G;
  const int64_t row_begin = kShares ? N * blockIdx.x / gridDim.x : 0;
  const int64_t row_end = kShares ? N * (blockIdx.x + 1) / gridDim.x : N;
  // the part's first chunk of 32 values and its chunk count: the row's K / 32 chunks dealt out as evenly as they go,
  // or for parts of at most 2 rounds its whole chunk rounds (a partial last round of the row: fewer chunks). H100
  // sweep (NOTES.md, session 17), us, whole rounds against chunks: 4 rounds 4096x14336 13.66 -> 13.52, 8192x20480
  // 33.55 -> 32.97, 4096x5120 6.78 -> 6.66; 2 rounds 1024x14336 5.70 -> 6.08, 8192^2 15.06 -> 15.85 (the same parts:
  // ptxas issued the ring's refill after the chunk's math instead of before it).
  uint32_t chunk0 = 0, part_chunks = uint32_t(K / 32);
  if constexpr (P > 1 && D == 2) {
    const uint32_t rounds = uint32_t(row_rounds(K)), base = rounds / P, extra = rounds % P;
    const uint32_t round0 = uint32_t(part) * base + min(uint32_t(part), extra);
    chunk0 = round0 * 32u;
    part_chunks = min(part_chunks - chunk0, (base + (uint32_t(part) < extra ? 1u : 0u)) * 32u);
  } else if constexpr (P > 1) {
    const uint32_t base = part_chunks / P, extra = part_chunks % P;
    chunk0 = uint32_t(part) * base + min(uint32_t(part), extra);
    part_chunks = base + (uint32_t(part) < extra ? 1u : 0u);
  }
  int64_t row = kShares                          ? row_begin + group
                : O == RowOrder::kInterleaved ? int64_t(group) * gridDim.x + blockIdx.x
                                              : int64_t(blockIdx.x) * G + group;
  const uint8_t* part_start = packed + row * (K / 2) + int64_t(chunk0) * 16;
  // split rows of 4 rounds per part: their first scale loads measured 0.5-1.9 us faster from L2 (4096x14336 14.55 ->
  // 14.05, 8192^2 15.45 -> 14.75, 28672x8192 45.5 -> 43.6); with 3 rounds, or one part, the prefetch cost 0.1-0.2 us
  // (NOTES.md). It asks for every block the part touches: a part that starts inside a block ends inside one too
  if constexpr (P > 1 && D == 4) {
    if (row < row_end) {
      const uint32_t first = (chunk0 * 32u) >> log2bs, last = ((chunk0 + part_chunks) * 32u - 1u) >> log2bs;
      row_prefetch_scales<NESTED>(sc, uint32_t(row * (K >> log2bs)) + first, last - first + 1u);
    }
  }
  row_table_then_wait(code, row_smem, row < row_end ? part_start : nullptr, min(part_chunks * 16u, uint32_t(PF)), K);

  uint32_t valid = 0;  // bit d: the lane's chunk d lies inside the part (fewer than D full rounds leave lanes out)
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (uint32_t(d * 32 + lane) < part_chunks) valid |= 1u << d;

  // The ring holds the lane's D chunks of the warp's next row: slot d is read, refilled with chunk d of the row
  // after, then computed. The row's packed bytes advance by a constant per row, and so does the block of the
  // lane's first chunk (K % blocksize == 0, blocksize <= 1024, block indices below 2^31: the launcher checks):
  // chunk d lies in block b_lane + d * 1024 / blocksize, so a chunk's addresses are a few 32-bit adds.
  const uint8_t* pw = part_start + lane * 16;
  const uint32_t row_blocks = uint32_t(K >> log2bs), blocks_per_1024 = 1024u >> log2bs;
  uint32_t b_lane = uint32_t(row) * row_blocks + (((chunk0 + uint32_t(lane)) * 32u) >> log2bs);
  const int64_t step_bytes = stride * (K / 2);
  const uint32_t step_blocks = uint32_t(stride) * row_blocks;
  const int nlog2 = NESTED ? sc.nested_log2 : 0;
  ChunkIn ring[D];
  auto fetch = [&](int d, bool ok) {
    if (ok && ((valid >> d) & 1u)) {
      ring[d].w = __ldcs(reinterpret_cast<const uint4*>(pw + d * 512));
      load_scale_in<NESTED>(sc, b_lane + uint32_t(d) * blocks_per_1024, nlog2, ring[d].q, ring[d].s);
    }
  };
#pragma unroll
  for (int d = 0; d < D; ++d) {
    ring[d] = ChunkIn{make_uint4(0u, 0u, 0u, 0u), 0u, 0.0f};  // chunks past the part stay zero (zero a too)
    fetch(d, row < row_end);  // in flight during the prologue
  }

  float off = 0.0f;
  const float down = row_prologue<AT, WARPS, NESTED>(a, sc, K, row_smem, off);
  uint4 xr[D][4];  // the lane's chunks of a, the same for every row (chunks past the part: zero)
  const uint32_t first_chunk = chunk0 + uint32_t(lane);
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if ((valid >> d) & 1u) {
      row_load_x(row_smem, first_chunk + uint32_t(d * 32), xr[d]);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) xr[d][q] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  const float* s_ncode = row_ncode(row_smem);
  float* s_part = reinterpret_cast<float*>(row_smem + row_smem_bytes(K));  // P > 1: [row of the CTA][part]

  const uint32_t lane_off = uint32_t(lane) * 4u;
  for (int64_t it = 0; row < row_end; row += stride, ++it) {
    const bool more = row + stride < row_end;
    pw += step_bytes;
    b_lane += step_blocks;
    float acc = 0.0f;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const ChunkIn t = ring[d];
      fetch(d, more);
      // the block scale with one rounding (a gemv is checked against float64 within bf16 tolerance, not
      // bit for bit)
      const float scale = NESTED ? fmaf(s_ncode[t.q], t.s, off) : t.s;
      acc = fmaf(row_chunk_dot(row_smem, lane_off, t.w, xr[d]), scale, acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) {
      if constexpr (P == 1)
        out[row] = from_f32<AT>(acc * down + bias_at(bias, row, N));
      else
        s_part[(it * G + group) * P + part] = acc;
    }
  }
  if constexpr (P > 1) {
    __syncthreads();
    // slot t holds row t / G of group t % G (the launcher sized them for every group's rows)
    const int64_t slots = kShares ? row_end - row_begin : (N + stride - 1) / stride * G;
    for (int64_t t = threadIdx.x; t < slots; t += blockDim.x) {
      const int64_t r = kShares                          ? row_begin + t
                        : O == RowOrder::kInterleaved ? t % G * gridDim.x + blockIdx.x + t / G * stride
                                                      : int64_t(blockIdx.x) * G + t % G + t / G * stride;
      if (r < N) {
        float sum = s_part[t * P];
#pragma unroll
        for (int p = 1; p < P; ++p) sum += s_part[t * P + p];
        out[r] = from_f32<AT>(sum * down + bias_at(bias, r, N));
      }
    }
  }
}

// Parts of a row for the split register kernel (K past 4096): the fewest of 2, 4 or 8 that leave at most 4 chunk
// rounds of 1024 values per part; 0 past 8 x 4096 (the streaming kernel takes it).
inline int row_split_parts(int64_t K) {
  const int64_t rounds = row_rounds(K);
  for (int parts : {2, 4, 8})
    if (rounds <= 4 * parts) return parts;
  return 0;
}

// chunk rounds of the split kernel's longest part (its D): the row's rounds dealt out to `parts` parts
inline int row_split_rounds(int64_t K, int parts) { return int((row_rounds(K) + parts - 1) / parts); }

// Shared memory of the row kernel with P parts per row: the P = 1 layout, then (P > 1) one float per part of each
// row the CTA's groups take (`rows_per_group` each)
constexpr size_t row_split_smem_bytes(int64_t K, int P, int warps, int64_t rows_per_group) {
  return row_smem_bytes(K) + (P > 1 ? size_t(warps) * size_t(rows_per_group) * 4 : 0);
}

// Grid: one wave at most, rows dealt in `O` (row_grid). `configured` and `waves` belong to `kernel` (its raised
// shared-memory limit per device, its occupancy).
template <typename AT, int WARPS, int P = 1, RowOrder O = RowOrder::kBands, typename Kernel>
void launch_row_kernel(Kernel kernel, std::atomic<uint64_t>& configured, WaveCache& waves, const AT* a,
                       const uint8_t* p, const Code16& c, const Scales& sc, int log2bs, int64_t N, int64_t K, AT* o,
                       const AT* bias, cudaStream_t stream) {
  allow_dynamic_smem(kernel, device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin), configured);
  constexpr int G = WARPS / P;
  const RowGrid grid = row_grid(O, N, G, one_wave_cached(kernel, WARPS * 32, row_smem_bytes(K), waves));
  launch_dependent(kernel, dim3(unsigned(grid.ctas)), dim3(WARPS * 32),
                   row_split_smem_bytes(K, P, WARPS, grid.rows_per_group), stream, a, p, c, sc, log2bs, N, K, o, bias);
}

template <typename AT, int WARPS, int D, int P, RowOrder O>
void launch_gemv_row_in(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                        int64_t N, int64_t K, AT* o, const AT* bias, cudaStream_t stream) {
  static std::atomic<uint64_t> configured[2] = {0, 0};
  static WaveCache waves[2];
  launch_row_kernel<AT, WARPS, P, O>(nested ? gemv_row_kernel<AT, WARPS, D, true, P, O>
                                            : gemv_row_kernel<AT, WARPS, D, false, P, O>,
                                     configured[nested], waves[nested], a, p, c, sc, log2bs, N, K, o, bias, stream);
}

// The row kernel with P parts of at most D chunk rounds per row, its rows in row_order(P, D); kInterleaved with at
// most one row per group of a full wave (one CTA per SM) takes kBands instead.
template <typename AT, int WARPS, int D, int P = 1>
void launch_gemv_row(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                     int64_t N, int64_t K, AT* o, const AT* bias, cudaStream_t stream) {
  constexpr RowOrder O = row_order(P, D);
  if constexpr (O == RowOrder::kInterleaved) {
    if (N <= row_wave_groups(WARPS, P))
      return launch_gemv_row_in<AT, WARPS, D, P, RowOrder::kBands>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream);
  }
  launch_gemv_row_in<AT, WARPS, D, P, O>(a, p, c, sc, nested, log2bs, N, K, o, bias, stream);
}

// The row kernel for K past 4096 (a in shared memory): lane l's chunks of a row are l + 32 c for c < C =
// K / 1024 rounded up (those past K, with PAD, read zero a and a zero scale input), and the lane walks the
// chunks of its rows as one stream, the ring's slot d holding every 4th chunk of it (4 chunks in flight, across
// row ends). Each chunk reads its 32 values of a from shared memory
// (4 LDS.128); a row's sum meets across the lanes after the group of D chunks where it ended.
template <typename AT, int WARPS, bool NESTED, bool PAD, int PF = kStreamPrefetchBytes>
__global__ void __launch_bounds__(WARPS * 32, 1)
    gemv_row_stream_kernel(const AT* __restrict__ a, const uint8_t* __restrict__ packed, Code16 code, Scales sc,
                           int log2bs, int64_t N, int64_t K, AT* __restrict__ out,
                           const AT* __restrict__ bias) {
  constexpr int D = 4;
  extern __shared__ __align__(16) unsigned char row_smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t stride = int64_t(gridDim.x) * WARPS;
  int64_t row = int64_t(blockIdx.x) * WARPS + warp;
  row_table_then_wait(code, row_smem, row < N ? packed + row * (K / 2) : nullptr, uint32_t(min(K / 2, int64_t(PF))), K);

  const uint32_t C = uint32_t(row_rounds(K));  // chunk rounds per row (lanes past K in the last: zeros)
  const uint32_t KC = uint32_t(K / 32);
  const uint32_t row_blocks = uint32_t(K >> log2bs), blocks_per_chunk = 1024u >> log2bs;
  const int nlog2 = NESTED ? sc.nested_log2 : 0;

  // the fetch cursor: chunks left to load, chunk in the row, packed bytes and block of the lane's next chunk
  // (32-bit counts and blocks: the launcher checks); past a row's last chunk it jumps to the warp's next row
  uint32_t f_left = row < N ? uint32_t((N - 1 - row) / stride + 1) * C : 0u;
  uint32_t f_c = 0, f_b = uint32_t(row) * row_blocks + ((uint32_t(lane) * 32u) >> log2bs);
  const uint8_t* f_p = packed + row * (K / 2) + lane * 16;
  // from one past the row's last chunk round to the first chunk of the warp's next row (C rounds of 1024
  // weights cover more than K when PAD: the jump is the row stride less what the rounds advanced)
  const int64_t jump_bytes = stride * (K / 2) - int64_t(C) * 512;
  const uint32_t jump_blocks = uint32_t(stride) * row_blocks - C * blocks_per_chunk;
  ChunkIn ring[D];
  auto fetch = [&](int d) {
    if (f_left > 0) {
      --f_left;
      if (!PAD || f_c * 32 + uint32_t(lane) < KC) {
        ring[d].w = __ldcs(reinterpret_cast<const uint4*>(f_p));
        load_scale_in<NESTED>(sc, f_b, nlog2, ring[d].q, ring[d].s);
      } else {
        // past K: a is zero there, so the chunk adds 0 x code[0] x (its scale: the double-quant offset or 0),
        // exactly zero while those are finite (a NaN offset makes every row NaN anyway)
        ring[d] = ChunkIn{make_uint4(0u, 0u, 0u, 0u), 0u, 0.0f};
      }
    }
    f_p += 512;
    f_b += blocks_per_chunk;
    if (++f_c == C) {
      f_c = 0;
      f_p += jump_bytes;
      f_b += jump_blocks;
    }
  };
#pragma unroll
  for (int d = 0; d < D; ++d) {
    ring[d] = ChunkIn{make_uint4(0u, 0u, 0u, 0u), 0u, 0.0f};
    fetch(d);  // in flight during the prologue
  }
  float off = 0.0f;
  const float down = row_prologue<AT, WARPS, NESTED>(a, sc, K, row_smem, off);
  const float* s_ncode = row_ncode(row_smem);

  const uint32_t lane_off = uint32_t(lane) * 4u;
  // quad q of the lane's chunk c of a: row_x_quad(c * 32 + lane, q), whose swizzle depends on the lane alone
  const uint4* x_lane[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) x_lane[q] = row_x(row_smem) + row_x_quad(lane, q);
  uint32_t c = 0;
  float acc = 0.0f;
  while (row < N) {
    // a group of D chunks ends at most one row (C >= D); its sum meets across the lanes after the group, outside
    // any branch (a reduction inside the slot's branch cost the loop its uniform table base: ~20 more
    // instructions per chunk)
    float done = 0.0f;
    bool ended = false;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      uint4 x[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = x_lane[q][c * 128];
      // the slot is refilled after its chunk's math, in the same registers (refilling it first needed a copy of
      // the chunk: 13 register moves per chunk; sweep, H100: 4096x14336 14.29 -> 13.80 us, 8192^2 15.69 -> 15.27)
      const float scale = NESTED ? fmaf(s_ncode[ring[d].q], ring[d].s, off) : ring[d].s;
      const float dot = row_chunk_dot(row_smem, lane_off, ring[d].w, x);
      fetch(d);
      acc = fmaf(dot, scale, acc);
      if (++c == C) {
        done = acc;
        acc = 0.0f;
        c = 0;
        ended = true;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) done += __shfl_xor_sync(0xffffffffu, done, o);
    if (ended) {
      if (lane == 0) out[row] = from_f32<AT>(done * down + bias_at(bias, row, N));
      row += stride;
    }
  }
}

template <typename AT, int WARPS>
void launch_gemv_row_stream(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                            int64_t N, int64_t K, AT* o, const AT* bias, cudaStream_t stream) {
  static std::atomic<uint64_t> configured[4] = {0, 0, 0, 0};
  static WaveCache waves[4];
  const bool pad = K % 1024 != 0;  // a compile-time case: the per-chunk check measured 3-6% at K % 1024 == 0
  const int which = 2 * int(nested) + int(pad);
  auto kernel = nested ? (pad ? gemv_row_stream_kernel<AT, WARPS, true, true> : gemv_row_stream_kernel<AT, WARPS, true, false>)
                       : (pad ? gemv_row_stream_kernel<AT, WARPS, false, true> : gemv_row_stream_kernel<AT, WARPS, false, false>);
  launch_row_kernel<AT, WARPS>(kernel, configured[which], waves[which], a, p, c, sc, log2bs, N, K, o, bias, stream);
}

// Whether the row kernel takes this call; launch_gemv (gemv.cu) asks it first.
bool gemv_row_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N, int64_t K);
bool gemv_row_split_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                            int64_t K);
bool gemv_row_stream_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                             int64_t K);
void launch_gemv_row_stream_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code,
                                const Scales& sc, bool nested, int log2bs, int64_t N, int64_t K, void* out,
                                const void* bias, cudaStream_t stream);
void launch_gemv_row_split_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code,
                               const Scales& sc, bool nested, int log2bs, int64_t N, int64_t K, void* out,
                               const void* bias, cudaStream_t stream);
void launch_gemv_row_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t N, int64_t K, void* out, const void* bias,
                         cudaStream_t stream);

}  // namespace fsdp4bit
