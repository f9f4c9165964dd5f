// Blockwise 4-bit quantization kernel: float16/bfloat16/float32 -> (packed nibbles, float32 absmax per block).
//   full block : s = x * (1 / max(absmax, 1e-38))     short last block : s = x / max(absmax, 1e-38)
//   code index = number of midpoints strictly below s (NaN -> 15), mapped through `enc` (FP4 order).
// A header so bench/cuda/sweep.cu can instantiate other tile shapes; quantize.cu holds the launcher.
#pragma once

#include "async_copy.cuh"
#include "common.cuh"

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace fsdp4bit {

// Bucket index * 4 (a byte offset into float tables): count of midpoints strictly below s, by a
// branch-free binary search over the 15 sorted midpoints in shared memory. Keeping the count pre-scaled
// lets every probe be one shared load at [register + immediate]. !(s <= m) is true for NaN, so NaN lands
// in bucket 15 like torch.bucketize. The short last block uses it, and it builds the bin table below.
__device__ __forceinline__ uint32_t bucket4(float s, const float* __restrict__ mids) {
  const char* m = reinterpret_cast<const char*>(mids);
  uint32_t c4 = 0;
  c4 += !(s <= *reinterpret_cast<const float*>(m + c4 + 28)) ? 32u : 0u;
  c4 += !(s <= *reinterpret_cast<const float*>(m + c4 + 12)) ? 16u : 0u;
  c4 += !(s <= *reinterpret_cast<const float*>(m + c4 + 4)) ? 8u : 0u;
  c4 += !(s <= *reinterpret_cast<const float*>(m + c4)) ? 4u : 0u;
  return c4;
}

// Bin table: the scaled value s (|s| <= 1 + 2^-23, or NaN) picks bin round(s * BPU) + BPU of 2 * BPU + 1
// equal bins over [-1, 1] with one FFMA (the float's exponent makes the rounding); a bin holds at most one
// midpoint (the launcher picks BPU so that midpoints are more than 1 / BPU apart), so the bucket is the bin's
// count of lower midpoints plus one compare. A value on a bin edge may round either way and gets the same
// bucket from both bins. fminf sends NaN to the top bin, which holds no midpoint and the code of bucket 15, as
// the binary search does. Coarse tables (NF4: BPU = 16, 33 bins) are replicated for each lane, so a warp's
// lookups never share a bank (random bins of one copy cost ~5 bank conflicts per lookup); fine ones (FP4's
// midpoints are 0.005 apart: BPU = 512) are one copy.
struct Bin {
  float mid;       // the midpoint inside the bin, or +Inf
  uint32_t codes;  // code of the bucket below `mid` | code of the bucket above it << 4
};

template <int BPU>
struct BinLayout {
  static constexpr int kBins = 2 * BPU + 1;
  static constexpr bool kPerLane = BPU <= 32;  // entry of bin b for lane l at b * 32 + l
  static constexpr int kEntries = kBins * (kPerLane ? 32 : 1);
};

template <int BPU>
__device__ __forceinline__ void fill_bins(Bin* bins, const float* mids, const uint8_t* enc) {
  using L = BinLayout<BPU>;
  for (int i = threadIdx.x; i < L::kEntries; i += blockDim.x) {
    const int b = L::kPerLane ? i / 32 : i;
    const float center = float(b - BPU) * (1.0f / BPU);  // exact: BPU is a power of two
    const int lo = int(bucket4(center - 0.5f / BPU, mids) >> 2);  // midpoints below the bin
    const int hi = int(bucket4(center + 0.5f / BPU, mids) >> 2);
    bins[i].mid = hi > lo ? mids[lo] : __int_as_float(0x7f800000);
    bins[i].codes = uint32_t(enc[lo]) | (uint32_t(enc[hi > lo ? lo + 1 : lo]) << 4);
  }
}

// 4-bit code of s (bucket mapped through enc), from the bin table in shared memory; lane8 = lane * 8
template <int BPU>
__device__ __forceinline__ uint32_t code_of(float s, const Bin* __restrict__ bins, uint32_t lane8) {
  constexpr float kMagic = 8388608.0f + BPU;  // 2^23: the integer part lands in the mantissa
  const float f = fminf(fmaf(s, float(BPU), kMagic), 8388608.0f + 2 * BPU);
  uint32_t off;
  if constexpr (BinLayout<BPU>::kPerLane)
    off = (__float_as_uint(f) << 8) + lane8;  // bin * 256 + lane * 8: the exponent bits 0x4b shift out
  else
    off = (__float_as_uint(f) - 0x4b000000u) * uint32_t(sizeof(Bin));
  const Bin bin = *reinterpret_cast<const Bin*>(reinterpret_cast<const char*>(bins) + off);
  return (s > bin.mid ? bin.codes >> 4 : bin.codes) & 15u;
}

// The 4 packed bytes of a chunk of 8 elements of a full block (element 2k in byte k's high nibble): both quantize
// kernels pack with this, so their bytes are the same.
template <int BPU, typename T>
__device__ __forceinline__ uint32_t pack_full_chunk(const Chunk8<T>& t, const BlockNorm& bn, const Bin* __restrict__ bins,
                                                    uint32_t lane8) {
  uint32_t word = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t hi = code_of<BPU>(bn.scale(chunk_at(t, 2 * k)), bins, lane8);
    const uint32_t lo = code_of<BPU>(bn.scale(chunk_at(t, 2 * k + 1)), bins, lane8);
    word |= ((hi << 4) | lo) << (8 * k);
  }
  return word;
}

// Bins per unit for these midpoints: 16 when every gap exceeds 1/16 (NF4), else 512 (FP4: gaps >= 0.0052).
inline int bins_per_unit(const QuantTables& tab) {
  for (int i = 0; i + 1 < 15; ++i)
    if (!(tab.mids[i + 1] - tab.mids[i] > 1.0f / 16)) return 512;
  return 16;
}

// A quantize kernel's shared tables: the 15 midpoints, the bucket -> code map and the bin table.
template <int BPU>
struct QuantShared {
  float mids[16];
  uint8_t enc[16];
  Bin bins[BinLayout<BPU>::kEntries];
};

// Fills `sh` from `tab` (the first CTA also writes the caller's code copy); ends with a barrier.
template <int BPU>
__device__ __forceinline__ void stage_tables(QuantShared<BPU>& sh, const QuantTables& tab) {
  copy_table(sh.mids, tab.mids);
  copy_table(sh.enc, tab.enc);
  if (blockIdx.x == 0 && tab.code_out != nullptr) copy_table(tab.code_out, tab.code);
  __syncthreads();
  fill_bins<BPU>(sh.bins, sh.mids, sh.enc);
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ Chunk8<T> load_chunk(const T* __restrict__ x, int64_t e, int64_t n, bool vec_ok) {
  Chunk8<T> c;
  if (vec_ok && e + 8 <= n) {
    const uint4* p = reinterpret_cast<const uint4*>(x + e);
#pragma unroll
    for (int i = 0; i < int(sizeof(c.raw) / 16); ++i) c.raw[i] = __ldcs(p + i);
  } else {
    T* h = reinterpret_cast<T*>(c.raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      T v{};  // zero bits
      if (e + j < n) v = x[e + j];
      h[j] = v;
    }
  }
  return c;
}

// ------------------------------------------------------------------------- quantize
// G threads (a power of two <= 32, aligned inside the warp) share one quantization block of BS elements;
// each thread owns NCH chunks of 8 elements (chunk i at g + i * G, so a warp's loads are contiguous).
// The grid strides over groups of P * (256 / G) blocks; a thread loads the chunks of its P blocks before
// using any (P * NCH independent 16-byte loads in flight) when they fit in registers (KEEP), else it
// rereads each block (L1/L2) in the second pass.
constexpr int kQuantThreads = 256;

// PFD > 0: thread 0 asks L2 for this CTA's step PFD strides ahead (one bulk prefetch of its contiguous input).
template <typename T, int BS, int P, int BPU, int PFD = 0>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(const T* __restrict__ x, int64_t n, int64_t nblocks,
                                                                 QuantTables tab, bool identity, bool vec_ok,
                                                                 uint8_t* __restrict__ out, float* __restrict__ absmax) {
  constexpr int G = BS / 8 < 32 ? BS / 8 : 32;
  constexpr int NCH = BS / (8 * G);
  constexpr bool KEEP = NCH * P <= 4;
  constexpr int BPC = kQuantThreads / G;  // blocks per CTA per step
  __shared__ QuantShared<BPU> sh;
  pdl_launch_dependents();  // a programmatic dependent after it (double quant's tree) may launch and wait
  stage_tables(sh, tab);
  const uint32_t lane8 = (threadIdx.x % 32) * 8u;

  const int g = int(threadIdx.x % G);
  const int64_t nbytes = (n + 1) / 2;
  for (int64_t step = int64_t(blockIdx.x) * BPC * P; step < nblocks; step += int64_t(gridDim.x) * BPC * P) {
    if constexpr (PFD > 0) {
      const int64_t ahead = step + int64_t(PFD) * gridDim.x * BPC * P;
      if (threadIdx.x == 0 && vec_ok && ahead < nblocks) {
        const int64_t e1 = min((ahead + BPC * P) * BS, n);
        const uint32_t bytes = uint32_t((e1 - ahead * BS) * int64_t(sizeof(T))) & ~15u;
        if (bytes) prefetch_l2(x + ahead * BS, bytes);
      }
    }
    Chunk8<T> v[KEEP ? P : 1][KEEP ? NCH : 1];
    uint32_t m[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t b = step + p * BPC + threadIdx.x / G;
      m[p] = 0;
#pragma unroll
      for (int i = 0; i < NCH; ++i) {
        Chunk8<T> t{};
        if (b < nblocks) t = load_chunk(x, b * BS + 8 * (g + i * G), n, vec_ok);
        if constexpr (KEEP) {
          v[p][i] = t;
        } else {
          m[p] = max(m[p], chunk_absmax_bits(t));
        }
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t b = step + p * BPC + threadIdx.x / G;
      if constexpr (KEEP) {
#pragma unroll
        for (int i = 0; i < NCH; ++i) m[p] = max(m[p], chunk_absmax_bits(v[p][i]));
      }
      uint32_t mm = m[p];
#pragma unroll
      for (int o = G / 2; o > 0; o >>= 1) mm = max(mm, __shfl_xor_sync(0xffffffffu, mm, o));
      if (b >= nblocks) continue;

      const int64_t bstart = b * BS;
      const BlockNorm bn = block_norm(mm, bstart + BS > n);
      if (g == 0) absmax[b] = bn.stored();
#pragma unroll
      for (int i = 0; i < NCH; ++i) {
        const int64_t e0 = bstart + 8 * (g + i * G);
        Chunk8<T> t;
        if constexpr (KEEP) {
          t = v[p][i];
        } else {
          t = load_chunk(x, e0, n, vec_ok);
        }
        if (!bn.tail) {  // full block: every element in range, scale by the reciprocal
          // out is freshly allocated: 4-byte aligned
          *reinterpret_cast<uint32_t*>(out + e0 / 2) = pack_full_chunk<BPU>(t, bn, sh.bins, lane8);
          continue;
        }
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          // Short last block: divide. The element at n is the zero pad of an odd length (0.0 after scaling,
          // as the reference pads the scaled tensor); later ones fall in bytes that are not written.
          const float s = (e0 + j >= n) ? 0.0f : bn.scale(chunk_at(t, j));
          uint32_t q = bucket4(s, sh.mids) >> 2;
          if (!identity) q = sh.enc[q];
          word |= q << ((j & 1) ? 8 * (j >> 1) : 8 * (j >> 1) + 4);  // byte k: elements 2k (high), 2k+1
        }
        const int64_t byte0 = e0 / 2;
        for (int k = 0; k < 4 && byte0 + k < nbytes; ++k) out[byte0 + k] = uint8_t(word >> (8 * k));
      }
    }
  }
}

// ------------------------------------------------------------------------- quantize, bulk-copy fed
// The same quantization with the input streamed by Hopper bulk copies (sm_90): a producer warp copies whole tiles
// of kBulkTileBytes into a kBulkStages-stage shared-memory ring (cp.async.bulk, one mbarrier per stage); 8
// consumer warps load a tile into registers (LDS.128), release its stage, and quantize it as quantize_kernel
// does (block_norm, code_of: the same bytes). The grid is persistent (one wave); the partial last tile is left
// to quantize_kernel. H100 sweep (bench/cuda/sweep.cu, bf16, NF4 bs64), quantize_kernel -> this: 4096² 19.6 ->
// 19.1 us, 14336x4096 59.5 -> 57.1, 8192² 67.3 -> 64.6, 28672x8192 229.4 -> 209.8 (101% of the sweep's copy
// floor); 4 KB x 4 or 6 stages, 16 KB x 4 and 32 KB x 2 or 3 were slower.
constexpr int kBulkConsumers = 256;  // 8 consumer warps, + 1 producer warp
constexpr int kBulkTileBytes = 16384;
constexpr int kBulkStages = 3;

// blocks of BS elements of T that one consumer pass covers: G threads per block, 8 elements per thread and chunk
template <typename T, int BS>
struct BulkShape {
  static constexpr int G = BS / 8 < 32 ? BS / 8 : 32;
  static constexpr int NCH = BS / (8 * G);
  static constexpr int BPC = kBulkConsumers / G;  // blocks per pass
  static constexpr int TILE = kBulkTileBytes / int(sizeof(T));
  static constexpr int BPT = TILE / BS;  // blocks per tile
  static constexpr bool kFits = BPT >= BPC && BPT % BPC == 0;  // a tile is whole passes
  static constexpr int PASSES = kFits ? BPT / BPC : 1;
};

template <typename T, int BS, int BPU>
__global__ void __launch_bounds__(kBulkConsumers + 32)
    quantize_bulk_kernel(const T* __restrict__ x, int64_t ntiles, QuantTables tab, uint8_t* __restrict__ out,
                         float* __restrict__ absmax) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // never launched: launch_quantize_blocks requires compute capability 9.0
#else
  using Sh = BulkShape<T, BS>;
  constexpr int G = Sh::G, NCH = Sh::NCH, BPC = Sh::BPC, TILE = Sh::TILE;
  extern __shared__ __align__(128) unsigned char bulk_ring[];
  T* ring = reinterpret_cast<T*>(bulk_ring);
  __shared__ uint64_t full[kBulkStages], empty[kBulkStages];
  __shared__ QuantShared<BPU> sh;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kBulkStages; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], kBulkConsumers / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  pdl_launch_dependents();  // as quantize_kernel
  stage_tables(sh, tab);  // its barriers also publish the mbarriers' initialisation

  if (threadIdx.x >= kBulkConsumers) {  // producer warp: one lane issues the copies
    if (threadIdx.x == kBulkConsumers) {
      int64_t it = 0;
      for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x, ++it) {
        const int s = int(it % kBulkStages);
        if (it >= kBulkStages) mbar_wait(&empty[s], uint32_t(it / kBulkStages - 1) & 1u);
        mbar_arrive_expect_tx(&full[s], kBulkTileBytes);
        bulk_copy(ring + s * TILE, x + t * TILE, kBulkTileBytes, &full[s]);
      }
    }
    return;
  }
  const uint32_t lane8 = (threadIdx.x % 32) * 8u;
  const int g = int(threadIdx.x % G);
  int64_t it = 0;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x, ++it) {
    const int s = int(it % kBulkStages);
    mbar_wait(&full[s], uint32_t(it / kBulkStages) & 1u);
    const T* tile = ring + s * TILE;
    Chunk8<T> v[Sh::PASSES][NCH];
#pragma unroll
    for (int p = 0; p < Sh::PASSES; ++p)
#pragma unroll
      for (int i = 0; i < NCH; ++i) {
        const uint4* src = reinterpret_cast<const uint4*>(tile + (p * BPC + int(threadIdx.x) / G) * BS + 8 * (g + i * G));
#pragma unroll
        for (int r = 0; r < int(sizeof(v[p][i].raw) / 16); ++r) v[p][i].raw[r] = src[r];
      }
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbar_arrive(&empty[s]);  // the stage is in registers: the producer may refill it
#pragma unroll
    for (int p = 0; p < Sh::PASSES; ++p) {
      uint32_t mm = 0;
#pragma unroll
      for (int i = 0; i < NCH; ++i) mm = max(mm, chunk_absmax_bits(v[p][i]));
#pragma unroll
      for (int o = G / 2; o > 0; o >>= 1) mm = max(mm, __shfl_xor_sync(0xffffffffu, mm, o));
      const int64_t b = t * Sh::BPT + p * BPC + int(threadIdx.x) / G;
      const BlockNorm bn = block_norm(mm, false);  // whole tiles hold whole blocks
      if (g == 0) absmax[b] = bn.stored();
#pragma unroll
      for (int i = 0; i < NCH; ++i)
        *reinterpret_cast<uint32_t*>(out + (b * BS + 8 * (g + i * G)) / 2) = pack_full_chunk<BPU>(v[p][i], bn, sh.bins, lane8);
    }
  }
#endif
}

// Grid for the kernel above: enough CTAs to cover every block once, capped at `max_ctas` (0: no cap),
// beyond which the grid-stride loop takes over.
template <int BS, int P>
inline int64_t quantize_grid(int64_t nblocks, int64_t max_ctas) {
  constexpr int G = BS / 8 < 32 ? BS / 8 : 32;
  constexpr int64_t per_cta = int64_t(kQuantThreads / G) * P;
  const int64_t need = (nblocks + per_cta - 1) / per_cta;
  return max_ctas > 0 && need > max_ctas ? max_ctas : need;
}

// Blocks of up to 256 elements take P = 2 blocks per thread and step (two 16-byte loads in flight), larger
// ones P = 1; the grid is what fits on the GPU at once (one wave) and strides beyond (tuned with
// bench/cuda/sweep.cu: a capped grid of 16 CTAs per SM ran 2.67 waves, the last one partly idle). Each CTA asks
// L2 for its next step's input (kQuantPrefetch): H100 14336x4096 61.9 -> 59.4 us, where two steps ahead or
// register prefetching were slower.
constexpr int kQuantPrefetch = 1;

template <typename T, int BS, int BPU>
void launch_quantize_plain(const T* x, int64_t n, const QuantTables& tab, bool identity, bool vec_ok, uint8_t* out,
                           float* absmax, cudaStream_t stream) {
  constexpr int P = BS <= 256 ? 2 : 1;
  auto kernel = quantize_kernel<T, BS, P, BPU, kQuantPrefetch>;
  static const int per_sm = ctas_per_sm(kernel, kQuantThreads);
  const int64_t nblocks = (n + BS - 1) / BS;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  kernel<<<quantize_grid<BS, P>(nblocks, per_sm * sms), kQuantThreads, 0, stream>>>(x, n, nblocks, tab, identity,
                                                                                    vec_ok, out, absmax);
}

// Whole tiles through the bulk-copy kernel where it applies (sm_90+, a 16-byte aligned input, blocks that tile
// it), the rest (or everything) through quantize_kernel.
template <typename T, int BS, int BPU>
void launch_quantize_blocks(const T* x, int64_t n, const QuantTables& tab, bool identity, bool vec_ok, uint8_t* out,
                            float* absmax, cudaStream_t stream) {
  using Sh = BulkShape<T, BS>;
  int64_t ntiles = 0;
  if constexpr (Sh::kFits) {
    ntiles = vec_ok && device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9 ? n / Sh::TILE : 0;
    if (ntiles > 0) {
      auto kernel = quantize_bulk_kernel<T, BS, BPU>;
      constexpr int smem = kBulkTileBytes * kBulkStages;
      static std::atomic<uint64_t> smem_set{0};
      allow_dynamic_smem(kernel, smem, smem_set);
      static WaveCache waves;
      const int64_t grid = std::min<int64_t>(ntiles, one_wave_cached(kernel, kBulkConsumers + 32, smem, waves));
      kernel<<<unsigned(grid), kBulkConsumers + 32, smem, stream>>>(x, ntiles, tab, out, absmax);
    }
  }
  const int64_t done = ntiles * Sh::TILE;
  if (done == n) return;
  QuantTables rest = tab;
  if (done > 0) rest.code_out = nullptr;  // the bulk kernel's first CTA writes it
  launch_quantize_plain<T, BS, BPU>(x + done, n - done, rest, identity, vec_ok, out + done / 2, absmax + done / BS,
                                    stream);
}

template <typename T>
void launch_quantize_typed(const T* x, int64_t n, int blocksize, const QuantTables& tab, bool identity, bool vec_ok,
                           uint8_t* out, float* absmax, cudaStream_t stream) {
  const bool coarse = bins_per_unit(tab) == 16;
  auto go = [&](auto bs_tag) {
    constexpr int BS = decltype(bs_tag)::value;
    if (coarse) {
      launch_quantize_blocks<T, BS, 16>(x, n, tab, identity, vec_ok, out, absmax, stream);
    } else {
      launch_quantize_blocks<T, BS, 512>(x, n, tab, identity, vec_ok, out, absmax, stream);
    }
  };
  switch (blocksize) {
    case 32: go(std::integral_constant<int, 32>{}); break;
    case 64: go(std::integral_constant<int, 64>{}); break;
    case 128: go(std::integral_constant<int, 128>{}); break;
    case 256: go(std::integral_constant<int, 256>{}); break;
    case 512: go(std::integral_constant<int, 512>{}); break;
    case 1024: go(std::integral_constant<int, 1024>{}); break;
    case 2048: go(std::integral_constant<int, 2048>{}); break;
    case 4096: go(std::integral_constant<int, 4096>{}); break;
    default: break;  // validated by the caller
  }
}

extern template void launch_quantize_typed<float>(const float*, int64_t, int, const QuantTables&, bool, bool, uint8_t*,
                                                float*, cudaStream_t);
extern template void launch_quantize_typed<__half>(const __half*, int64_t, int, const QuantTables&, bool, bool, uint8_t*,
                                                 float*, cudaStream_t);
extern template void launch_quantize_typed<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int, const QuantTables&, bool,
                                                        bool, uint8_t*, float*, cudaStream_t);

}  // namespace fsdp4bit
