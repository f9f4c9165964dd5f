// Tensor-core 4-bit gemv for 1 to 8 tokens of fp16/bf16 A: out = A @ W.T + bias, W (N, K) 4-bit, blocksize >= 64,
// K % 64 == 0 (sm_90: TMA bulk copies and mbarriers). The CUDA-core gemv (gemv.cuh) spends ~8 instructions
// per weight (nibble extract, shared-memory code lookup, bf16 convert, FMA); here one shared-memory lookup
// turns a packed byte into both of its weights as a 16-bit pair and mma.sync multiplies them with float32
// accumulation. A producer warp streams the packed rows into a ring of STAGES shared-memory stages with
// cp.async.bulk and computes their block scales while the consumer warps run the MMAs.
//
// Used for 4 to 8 tokens, where it beats the CUDA-core gemv (14336x4096, H100: M = 4 31 vs 40 us, M = 8 32 vs
// 86 us); for 1 token it is slower (31 vs 22 us: issue slots 32% busy, half the stalls wait on the PRMT -> IADD
// -> LDS -> HMMA chains, 4 consumer warps per scheduler as the 64 KB pair table allows 2 CTAs per SM).
// bench/cuda/sweep.cu checks and times other tile shapes.
//
// Layout: 16 rows of W are the MMA's A operand (m16 x k16), up to 8 tokens of A its B operand (k16 x n8). The
// dot product does not care in which order k is summed, so k is permuted to match the loads: in a 64-wide
// span of k, lane (g, t) reads rows g and g + 8's bytes [8t, 8t + 8) (k in [16t, 16t + 16)) and token g's A
// values at the same k, and MMA j takes the bytes 2j, 2j + 1 and A's words 2j, 2j + 1. A span never crosses
// a quantization block (blocksize >= 64 and a multiple of 64), so it has one scale per row, applied to the
// float32 MMA result.
#pragma once

#include "async_copy.cuh"
#include "common.cuh"

#include <algorithm>
#include <atomic>

namespace fsdp4bit {

// byte -> packed pair of 16-bit weights (high nibble = even k in the low half), replicated for each of the
// 32 banks: entry b of lane l at word b * 64 + l, so a warp's 32 lookups never conflict and the address is a
// single byte permute of (packed byte, lane * 4). Words 32..63 of each entry are unused.
constexpr int kPairWords = 256 * 64;
constexpr size_t kPairBytes = kPairWords * sizeof(uint32_t);

// d += A (16 x 16, rows of W) * B (16 x 8, tokens of A); float32 accumulation
template <typename AT>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// pair of weights in byte `sel` (0..3) of `word`, looked up in the replicated table
__device__ __forceinline__ uint32_t pair_of(const char* s_pair, uint32_t word, uint32_t lane4, uint32_t sel) {
  const uint32_t addr = __byte_perm(word, lane4, 0x5504u | (sel << 4));  // (byte << 8) | lane * 4
  return *reinterpret_cast<const uint32_t*>(s_pair + addr);
}

// ------------------------------------------------------------------------- kernel
// A CTA has WARPS consumer warps and one producer warp and loops over tiles of 16 rows of W (tile += gridDim.x).
// A tile is cut into chunks of CSPANS 64-wide k spans; chunk q goes through stage q % STAGES. The producer's
// lane 0 copies the chunk's 16 row segments (rows padded by 16 bytes so the consumers' 8-byte reads hit every
// bank once), all its lanes write the chunk's CSPANS x 16 block scales, and they arrive on full[stage]. Each
// consumer warp takes spans warp, warp + WARPS, ... of the chunk, releases the stage on empty[stage], and at
// the end of a tile the consumers add their partial sums in shared memory.
template <int CSPANS, int STAGES>
struct GemvTmaLayout {
  static constexpr int kRows = 16;
  static constexpr int kRowBytes = CSPANS * 32 + 16;
  static constexpr int kStageBytes = kRows * kRowBytes;
  static constexpr size_t kSmem = kPairBytes + size_t(STAGES) * kStageBytes;
};

template <typename AT, int WARPS, int CSPANS, int STAGES, bool NESTED>
__global__ void __launch_bounds__((WARPS + 1) * 32, 2) gemv_tma_kernel(const AT* __restrict__ A,
                                                                       const uint8_t* __restrict__ packed, Code16 code,
                                                                       Scales sc, int log2bs, int M, int64_t N,
                                                                       int64_t K, AT* __restrict__ out,
                                                                       const AT* __restrict__ bias) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // never launched: gemv_tma_applies() requires compute capability 9.0
#else
  using L = GemvTmaLayout<CSPANS, STAGES>;
  constexpr int R = L::kRows;
  constexpr int JP = CSPANS / WARPS;  // spans per consumer warp per chunk
  constexpr int PER = CSPANS * R / 32;  // scales per producer lane per chunk
  static_assert(CSPANS % WARPS == 0 && CSPANS % 2 == 0, "each consumer warp takes CSPANS / WARPS spans of a chunk");
  extern __shared__ __align__(128) char smem[];
  char* s_pair = smem;
  char* s_stage = smem + kPairBytes;
  __shared__ float s_code[16];
  __shared__ float s_ncode[NESTED ? 256 : 1];
  __shared__ float s_scale[STAGES][CSPANS][R];
  __shared__ float4 s_red[WARPS][32];
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];

  float off = 0.0f;
  copy_table(s_code, code.v);
  load_scale_tables<NESTED>(sc, s_ncode, off);
  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&full[i], 33);  // the producer's expect_tx arrival + its 32 lanes once the scales are written
      mbar_init(&empty[i], WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256 * 32; i += (WARPS + 1) * 32) {
    const int b = i >> 5, l = i & 31;
    reinterpret_cast<uint32_t*>(s_pair)[b * 64 + l] = pack_pair<AT>(s_code[b >> 4], s_code[b & 15]);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t spans = K / 64, tiles = (N + R - 1) / R;
  const int64_t chunks_per_tile = (spans + CSPANS - 1) / CSPANS;
  const int64_t my_tiles = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x;
  const int64_t my_chunks = my_tiles * chunks_per_tile;

  if (warp == WARPS) {  // producer; lane (r, i) = (lane % 16, lane / 16) does row r, spans i, i + 2, ...
    const int r = lane & 15, i0 = lane >> 4;
    for (int64_t q = 0; q < my_chunks; ++q) {
      const int stage = int(q % STAGES);
      const int64_t tile = blockIdx.x + (q / chunks_per_tile) * gridDim.x, c = q % chunks_per_tile;
      const int cspans = int(min(int64_t(CSPANS), spans - c * CSPANS));
      if (q >= STAGES) mbar_wait(&empty[stage], uint32_t((q / STAGES) & 1) ^ 1u);
      char* dst = s_stage + stage * L::kStageBytes;
      if (lane == 0) {
        mbar_arrive_expect_tx(&full[stage], uint32_t(R * cspans * 32));
        for (int rr = 0; rr < R; ++rr) {
          const int64_t row = min(tile * R + rr, N - 1);
          bulk_copy(dst + rr * L::kRowBytes, packed + row * (K / 2) + c * CSPANS * 32, uint32_t(cspans * 32),
                    &full[stage]);
        }
      }
      const int64_t row = min(tile * R + r, N - 1);
      float a[PER];
      uint32_t qv[PER];
#pragma unroll
      for (int k = 0; k < PER; ++k) {  // all loads first: one memory latency per chunk
        const int64_t s = c * CSPANS + min(i0 + 2 * k, cspans - 1);
        const int64_t b = (row * K + s * 64) >> log2bs;
        if constexpr (NESTED) {
          qv[k] = sc.absmax_q[b];
          a[k] = __ldg(sc.nested_absmax + nested_block(sc, b));
        } else {
          a[k] = __ldg(sc.absmax_f + b);
        }
      }
#pragma unroll
      for (int k = 0; k < PER; ++k) {
        float v = a[k];
        if constexpr (NESTED) v = nested_scale(s_ncode[qv[k]], a[k], off);
        s_scale[stage][i0 + 2 * k][r] = i0 + 2 * k < cspans ? v : 0.0f;
      }
      mbar_arrive(&full[stage]);
    }
    return;
  }

  // consumers: lane (g, t) reads rows g and g + 8's bytes [8t, 8t + 8) of each of its spans and token g of A
  const int g = lane / 4, t = lane % 4;
  const uint32_t lane4 = uint32_t(lane) * 4;
  const bool has_a = g < M;
  const AT* a_row = A + int64_t(has_a ? g : 0) * K + 16 * t;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t q = 0; q < my_chunks; ++q) {
    const int stage = int(q % STAGES);
    const int64_t tile = blockIdx.x + (q / chunks_per_tile) * gridDim.x, c = q % chunks_per_tile;
    const int cspans = int(min(int64_t(CSPANS), spans - c * CSPANS));
    uint4 x[JP][2];
#pragma unroll
    for (int j = 0; j < JP; ++j) {
      const int sl = warp + j * WARPS;
      x[j][0] = x[j][1] = make_uint4(0u, 0u, 0u, 0u);
      if (has_a && sl < cspans) {
        const AT* src = a_row + (c * CSPANS + sl) * 64;
        x[j][0] = __ldg(reinterpret_cast<const uint4*>(src));
        x[j][1] = __ldg(reinterpret_cast<const uint4*>(src + 8));
      }
    }
    mbar_wait(&full[stage], uint32_t((q / STAGES) & 1));
    const char* rowp = s_stage + stage * L::kStageBytes + g * L::kRowBytes + 8 * t;
    // no branch per span, so the JP independent MMA chains interleave: a span past the chunk's end reads
    // stale (finite) weights with zero A and a zero scale
#pragma unroll
    for (int j = 0; j < JP; ++j) {
      const int sl = warp + j * WARPS;
      const uint2 w0 = *reinterpret_cast<const uint2*>(rowp + sl * 32);
      const uint2 w1 = *reinterpret_cast<const uint2*>(rowp + 8 * L::kRowBytes + sl * 32);
      const uint32_t xs[8] = {x[j][0].x, x[j][0].y, x[j][0].z, x[j][0].w,
                              x[j][1].x, x[j][1].y, x[j][1].z, x[j][1].w};
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t u0 = k < 2 ? w0.x : w0.y, u1 = k < 2 ? w1.x : w1.y;
        const uint32_t lo = 2 * (k & 1), hi = 2 * (k & 1) + 1;
        mma16816<AT>(d, pair_of(s_pair, u0, lane4, lo), pair_of(s_pair, u1, lane4, lo), pair_of(s_pair, u0, lane4, hi),
                     pair_of(s_pair, u1, lane4, hi), xs[2 * k], xs[2 * k + 1]);
      }
      const float s0 = s_scale[stage][sl][g], s1 = s_scale[stage][sl][g + 8];
      acc[0] = fmaf(d[0], s0, acc[0]);
      acc[1] = fmaf(d[1], s0, acc[1]);
      acc[2] = fmaf(d[2], s1, acc[2]);
      acc[3] = fmaf(d[3], s1, acc[3]);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[stage]);
    if (c == chunks_per_tile - 1) {  // tile done: lane (g, t) holds rows g, g + 8 for tokens 2t, 2t + 1
      s_red[warp][lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
      asm volatile("bar.sync 1, %0;" ::"n"(WARPS * 32) : "memory");
      if (threadIdx.x < 128) {
        const int l = threadIdx.x / 4, i = threadIdx.x % 4;
        const int token = 2 * (l % 4) + (i & 1);
        const int64_t row = tile * R + l / 4 + 8 * (i >> 1);
        if (token < M && row < N) {
          float v = 0.0f;
#pragma unroll
          for (int wi = 0; wi < WARPS; ++wi) v += reinterpret_cast<const float*>(&s_red[wi][l])[i];
          out[int64_t(token) * N + row] = from_f32<AT>(v + bias_at(bias, row, N));
        }
      }
      asm volatile("bar.sync 1, %0;" ::"n"(WARPS * 32) : "memory");
    }
  }
#endif
}

// Persistent grid: `ctas_per_sm` CTAs on each SM loop over the tiles; the pair table is built once per CTA.
template <typename AT, int WARPS, int CSPANS, int STAGES>
void launch_gemv_tma(const AT* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs, int M,
                     int64_t N, int64_t K, AT* o, const AT* bias, int ctas_per_sm, cudaStream_t stream) {
  using L = GemvTmaLayout<CSPANS, STAGES>;
  auto kernel =
      nested ? gemv_tma_kernel<AT, WARPS, CSPANS, STAGES, true> : gemv_tma_kernel<AT, WARPS, CSPANS, STAGES, false>;
  static std::atomic<uint64_t> configured[2] = {0, 0};  // per kernel: devices where its smem limit is raised
  allow_dynamic_smem(kernel, int(L::kSmem), configured[nested]);
  const int64_t tiles = (N + L::kRows - 1) / L::kRows;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const unsigned grid = unsigned(std::min<int64_t>(tiles, sms * ctas_per_sm));
  kernel<<<grid, (WARPS + 1) * 32, L::kSmem, stream>>>(a, p, c, sc, log2bs, M, N, K, o, bias);
}

// Whether the tensor-core gemv takes this call (fp16/bf16 A, 4..8 tokens, blocksize >= 64, K % 64 == 0, sm_90+);
// launch_gemv (gemv.cu) asks before falling back to the CUDA-core kernel.
bool gemv_tma_applies(FloatType dtype, int log2bs, int64_t M, int64_t K);
void launch_gemv_tma_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t M, int64_t N, int64_t K, void* out, const void* bias,
                         cudaStream_t stream);

}  // namespace fsdp4bit
