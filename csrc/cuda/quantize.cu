// Blockwise 4-bit quantization: float16/bfloat16/float32 -> (packed nibbles, float32 absmax per block).
//   full block : s = x * (1 / max(absmax, 1e-38))     short last block : s = x / max(absmax, 1e-38)
//   code index = number of midpoints strictly below s (NaN -> 15), mapped through `enc` (FP4 order).
#include <type_traits>

#include "common.cuh"

namespace fsdp4bit {
namespace {

// Bucket index: count of midpoints strictly below s by a branch-free binary search over the 15 sorted
// midpoints in shared memory. !(s <= m) is true for NaN, so NaN lands in bucket 15 like torch.bucketize.
__device__ __forceinline__ int bucket(float s, const float* __restrict__ mids) {
  int c = 0;
  c += !(s <= mids[c + 7]) ? 8 : 0;
  c += !(s <= mids[c + 3]) ? 4 : 0;
  c += !(s <= mids[c + 1]) ? 2 : 0;
  c += !(s <= mids[c]) ? 1 : 0;
  return c;
}

// ------------------------------------------------------------------------- quantize
// G threads (a power of two <= 32, aligned inside the warp) share one quantization block of BS elements;
// each thread owns NCH chunks of 8 elements (chunk i at g + i * G, so a warp's loads are contiguous).
template <typename T, int BS>
__global__ void __launch_bounds__(256) quantize_kernel(const T* __restrict__ x, int64_t n, int64_t nblocks,
                                                       QuantTables tab, bool identity, bool vec_ok,
                                                       uint8_t* __restrict__ out, float* __restrict__ absmax) {
  constexpr int G = BS / 8 < 32 ? BS / 8 : 32;
  constexpr int NCH = BS / (8 * G);
  constexpr bool KEEP = NCH <= 4;  // keep the block in registers, else reread it (L1/L2) in pass 2
  __shared__ float s_mids[16];
  __shared__ uint8_t s_enc[16];
  copy_table(s_mids, tab.mids);
  copy_table(s_enc, tab.enc);
  __syncthreads();

  const int64_t gtid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = gtid / G;
  const int g = int(gtid % G);
  const bool active = b < nblocks;
  const int64_t bstart = b * BS;

  float v[KEEP ? NCH : 1][8];
  uint32_t m = 0;  // max of |x| bits: integer order = float order for |x|, NaNs above +Inf
#pragma unroll
  for (int i = 0; i < NCH; ++i) {
    float t[8];
    if (active) {
      load8(x, bstart + 8 * (g + i * G), n, vec_ok, t);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) t[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      m = max(m, __float_as_uint(t[j]) & 0x7fffffffu);
      if constexpr (KEEP) v[i][j] = t[j];
    }
  }
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!active) return;

  const bool is_nan = m > 0x7f800000u;
  const float amax = is_nan ? __uint_as_float(0x7fc00000u) : __uint_as_float(m);
  const float clamped = is_nan ? amax : fmaxf(amax, kTiny);
  const bool tail = bstart + BS > n;  // short last block: divide by the clamped max and store it
  const float inv = __fdiv_rn(1.0f, clamped);
  if (g == 0) absmax[b] = tail ? clamped : amax;

  const int64_t nbytes = (n + 1) / 2;
#pragma unroll
  for (int i = 0; i < NCH; ++i) {
    const int64_t e0 = bstart + 8 * (g + i * G);
    float t[8];
    if constexpr (KEEP) {
#pragma unroll
      for (int j = 0; j < 8; ++j) t[j] = v[i][j];
    } else {
      load8(x, e0, n, vec_ok, t);
    }
    uint32_t word = 0;
    if (!tail) {  // full block: every element in range, scale by the reciprocal
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        int hi = bucket(__fmul_rn(t[2 * k], inv), s_mids);
        int lo = bucket(__fmul_rn(t[2 * k + 1], inv), s_mids);
        if (!identity) {
          hi = s_enc[hi];
          lo = s_enc[lo];
        }
        word |= uint32_t((hi << 4) | lo) << (8 * k);
      }
      *reinterpret_cast<uint32_t*>(out + e0 / 2) = word;  // out is freshly allocated: 4-byte aligned
      continue;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      // Short last block: divide. The element at n is the zero pad of an odd length (0.0 after scaling,
      // as the reference pads the scaled tensor); later ones fall in bytes that are not written.
      const float s = (e0 + j >= n) ? 0.0f : __fdiv_rn(t[j], clamped);
      int q = bucket(s, s_mids);
      if (!identity) q = s_enc[q];
      word |= uint32_t(q) << ((j & 1) ? 8 * (j >> 1) : 8 * (j >> 1) + 4);  // byte k: elements 2k (high), 2k+1
    }
    const int64_t byte0 = e0 / 2;
    for (int k = 0; k < 4 && byte0 + k < nbytes; ++k) out[byte0 + k] = uint8_t(word >> (8 * k));
  }
}

template <typename T>
void launch_typed(const T* x, int64_t n, int blocksize, const QuantTables& tab, bool identity, bool vec_ok, uint8_t* out,
                  float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto go = [&](auto bs_tag) {
    constexpr int BS = decltype(bs_tag)::value;
    constexpr int G = BS / 8 < 32 ? BS / 8 : 32;
    const int64_t grid = (nblocks * G + 255) / 256;
    quantize_kernel<T, BS><<<grid, 256, 0, stream>>>(x, n, nblocks, tab, identity, vec_ok, out, absmax);
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

}  // namespace

void launch_quantize(const void* x, FloatType dtype, int64_t n, int blocksize, const QuantTables& tab, bool identity,
                     bool vec_ok, uint8_t* out, float* absmax, cudaStream_t stream) {
  switch (dtype) {
    case FloatType::kF32: launch_typed(static_cast<const float*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream); break;
    case FloatType::kF16: launch_typed(static_cast<const __half*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream); break;
    case FloatType::kBF16: launch_typed(static_cast<const __nv_bfloat16*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream); break;
  }
}

}  // namespace fsdp4bit
