// 8-bit blockwise quantization against a sorted 256-entry code (bitsandbytes' double quant of the 4-bit
// absmax), with the offset subtraction fused:
//   d = a - offset (when given)             midpoints m[i] = (code[i] + code[i + 1]) / 2
//   full block : s = d * (1 / max(absmax, 1e-38))    short last block : s = d / max(absmax, 1e-38)
//   q = number of midpoints strictly below clamp(s, -1, 1) (NaN -> 255)
// One CUDA block per quantization block (one warp per block for blocksize 256, double quant's case);
// bit-exact with reference.quantize_blockwise(a - offset, code, bs). When `code_out` is given, the first CTA
// also writes a copy of `code` there (the caller's fresh code tensor: no separate copy kernel).
// Double quant's offset is reference.absmax_mean: the pairwise float64 tree over the values (zero-padded to a
// power of two), summed in aligned spans of 4096 values per CTA, level by level, until at most 1024 partial sums
// are left, which one warp adds up. H100, against torch's absmax.mean() (reduction + memset of its semaphores),
// 14336x4096's 917504 values: 3.2 + 2.2 us (the tree's level, then its one-warp top) against 6.5 + 0.7 us.
// The tree's kernels and the blocksize-256 kernel are programmatic dependent launches (launch_dependent): each
// starts while the kernel before it finishes and waits (pdl_wait) before touching global memory.
#include "common.cuh"

#include <algorithm>

namespace fsdp4bit {
namespace {

// Count of the 255 sorted midpoints strictly below s, by binary search; !(s <= m) is true for NaN, so NaN
// counts past every midpoint (255), as torch.bucketize does.
__device__ __forceinline__ int bucket256(float s, const float* __restrict__ mids) {
  int c = 0;
#pragma unroll
  for (int k = 128; k > 0; k >>= 1) c += !(s <= mids[c + k - 1]) ? k : 0;
  return c;
}

// torch.clamp(s, -1, 1): NaN stays NaN.
__device__ __forceinline__ float clamp_unit(float s) { return s != s ? s : fminf(fmaxf(s, -1.0f), 1.0f); }

// Max of `m` over the CUDA block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ __forceinline__ uint32_t block_max(uint32_t m, uint32_t* s_red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) s_red[warp] = m;
  __syncthreads();
  m = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = max(m, s_red[w]);
  return m;
}

__global__ void __launch_bounds__(256) quantize_blockwise_kernel(const float* __restrict__ a, int64_t n, int64_t bs,
                                                                 const float* __restrict__ code,
                                                                 const float* __restrict__ offset,
                                                                 uint8_t* __restrict__ q, float* __restrict__ absmax,
                                                                 float* __restrict__ code_out) {
  __shared__ float s_mids[256];
  __shared__ uint32_t s_red[32];
  for (int i = threadIdx.x; i < 255; i += blockDim.x)
    s_mids[i] = __fmul_rn(__fadd_rn(__ldg(code + i), __ldg(code + i + 1)), 0.5f);  // == (c0 + c1) / 2
  if (code_out != nullptr && blockIdx.x == 0)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code_out[i] = __ldg(code + i);
  const bool has_off = offset != nullptr;
  const float off = has_off ? __ldg(offset) : 0.0f;
  const int64_t b = blockIdx.x;
  const int64_t start = b * bs;
  const int64_t len = min(bs, n - start);

  uint32_t m = 0;  // max of |d| bits: integer order = float order for |d|, NaNs above +Inf
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float d = has_off ? __fsub_rn(__ldg(a + start + i), off) : __ldg(a + start + i);
    m = max(m, __float_as_uint(d) & 0x7fffffffu);
  }
  m = block_max(m, s_red);  // its __syncthreads also publishes s_mids

  const BlockNorm bn = block_norm(m, len < bs);
  if (threadIdx.x == 0) absmax[b] = bn.stored();
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float d = has_off ? __fsub_rn(__ldg(a + start + i), off) : __ldg(a + start + i);
    const float s = bn.scale(d);
    q[start + i] = uint8_t(bucket256(clamp_unit(s), s_mids));
  }
}

// ------------------------------------------------------------------------- double quant's offset
constexpr int kTreeThreads = 256;
constexpr int kTreeLeaves = 16;                          // per thread
constexpr int64_t kTreeSpan = kTreeThreads * kTreeLeaves;  // values per CTA and level
constexpr int64_t kTreeTop = 1024;                       // partial sums the last warp adds

// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): one pairwise subtree
__device__ __forceinline__ double pair8(const double (&v)[8]) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// pairwise sum of p[lo, lo + 8), values at n and past it read as +0.0
template <typename In>
__device__ __forceinline__ double tree8(const In* __restrict__ p, int64_t lo, int64_t n) {
  double v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = lo + j < n ? double(ld_after_wait(p + lo + j)) : 0.0;
  return pair8(v);
}

// The sum of lane-ordered subtrees over the warp: level k adds lanes l and l ^ 2^k (the same double in both,
// addition being commutative), so lane l's value is the subtree over the 32 lanes' spans in order.
__device__ __forceinline__ double warp_tree(double s) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) s = s + __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// partials[c] = the pairwise sum of v[c * kTreeSpan, (c + 1) * kTreeSpan) (past n: +0.0); thread t sums its 16
// values, the warp its 32 threads', the CTA its 8 warps'.
template <typename In>
__global__ void __launch_bounds__(kTreeThreads) tree_partials_kernel(const In* __restrict__ v, int64_t n,
                                                                     double* __restrict__ partials) {
  __shared__ double s_warp[kTreeThreads / 32];
  pdl_launch_dependents();
  pdl_wait();
  const int64_t lo = (int64_t(blockIdx.x) * kTreeThreads + threadIdx.x) * kTreeLeaves;
  double s = 0.0;
  bool vec = false;
  if constexpr (std::is_same<In, float>::value) {
    vec = lo + kTreeLeaves <= n && (reinterpret_cast<uintptr_t>(v) & 15) == 0;
    if (vec) {  // four 16-byte loads
      double h[2][8];
      const float4* p = reinterpret_cast<const float4*>(v + lo);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 f = ld_after_wait(p + i);
        h[i / 2][4 * (i % 2)] = f.x;
        h[i / 2][4 * (i % 2) + 1] = f.y;
        h[i / 2][4 * (i % 2) + 2] = f.z;
        h[i / 2][4 * (i % 2) + 3] = f.w;
      }
      s = pair8(h[0]) + pair8(h[1]);
    }
  }
  if (!vec) s = tree8(v, lo, n) + tree8(v, lo + 8, n);
  s = warp_tree(s);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double w[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = s_warp[i];
    partials[blockIdx.x] = pair8(w);
  }
}

// The offset from the last level's `count` (<= kTreeTop) partial sums, by one whole warp (every lane gets it):
// float32((sum + 0.0) / n) as reference.absmax_mean rounds it.
__device__ __forceinline__ float tree_mean(const double* __restrict__ partials, int64_t count, int64_t n) {
  const int64_t lo = int64_t(threadIdx.x % 32) * 32;
  double s = (tree8(partials, lo, count) + tree8(partials, lo + 8, count)) +
             (tree8(partials, lo + 16, count) + tree8(partials, lo + 24, count));
  s = warp_tree(s);
  return __double2float_rn(__ddiv_rn(__dadd_rn(s, 0.0), double(n)));
}

__global__ void tree_mean_kernel(const double* __restrict__ partials, int64_t count, int64_t n,
                                 float* __restrict__ offset_out) {
  pdl_launch_dependents();
  pdl_wait();
  const float m = tree_mean(partials, count, n);
  if (threadIdx.x == 0) *offset_out = m;
}

// Blocksize 256 (double quant's nested blocks): one warp per block, 8 values per lane held in registers. The CTA
// computes the 255 midpoints once into shared memory with coalesced loads (each lane loading its own 9 code
// values, 32 bytes apart, was 76% of the kernel's L1 sectors: ncu, H100, 6.3 us at 14336x4096's absmax); lane l
// then holds midpoints 8l..8l+7 in registers, so the search is two levels of warp shuffles (no bank conflicts):
// the fences mids[8g + 7] (g = 0..30) by binary search, then the 7 midpoints inside the fence's group, counted
// in parallel. Same count as bucket256 for a sorted code (the midpoints of a sorted code are sorted), so the
// same bits as the generic kernel above.
constexpr int kBs256Warps = 8;

__device__ __forceinline__ int bucket256_warp(float s, const float (&mid)[8]) {
  int g = 0;
#pragma unroll
  for (int k = 16; k > 0; k >>= 1) g += !(s <= __shfl_sync(0xffffffffu, mid[7], g + k - 1)) ? k : 0;
  int r = 0;
#pragma unroll
  for (int j = 0; j < 7; ++j) r += !(s <= __shfl_sync(0xffffffffu, mid[j], g)) ? 1 : 0;
  return 8 * g + r;
}

__global__ void __launch_bounds__(kBs256Warps * 32) quantize_blockwise256_kernel(const float* __restrict__ a, int64_t n,
                                                                                const float* __restrict__ code,
                                                                                const float* __restrict__ offset,
                                                                                uint8_t* __restrict__ q,
                                                                                float* __restrict__ absmax,
                                                                                float* __restrict__ code_out) {
  __shared__ __align__(16) float s_mid[256];  // midpoint i between code[i] and code[i + 1]; entry 255 unused
  const bool has_off = offset != nullptr;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t b = int64_t(blockIdx.x) * kBs256Warps + warp;
  const int64_t start = b * 256;
  const int64_t len = min(int64_t(256), n - start);  // <= 0 for warps past the last block
  pdl_launch_dependents();
  pdl_wait();

  float d[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) d[j] = lane + 32 * j < len ? ld_after_wait(a + start + lane + 32 * j) : 0.0f;
  const float off = has_off ? ld_after_wait(offset) : 0.0f;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    const float c0 = ld_after_wait(code + i);
    s_mid[i] = i < 255 ? __fmul_rn(__fadd_rn(c0, ld_after_wait(code + i + 1)), 0.5f) : 0.0f;  // == (c0 + c1) / 2
    if (code_out != nullptr && blockIdx.x == 0) code_out[i] = c0;
  }
  __syncthreads();
  if (start >= n) return;  // whole warps only: the shuffles below see every lane of a live warp
  float mid[8];  // two 16-byte shared loads
  const float4 lo = reinterpret_cast<const float4*>(s_mid + 8 * lane)[0];
  const float4 hi = reinterpret_cast<const float4*>(s_mid + 8 * lane)[1];
  memcpy(mid, &lo, sizeof(lo));
  memcpy(mid + 4, &hi, sizeof(hi));

  uint32_t m = 0;  // max of |d| bits: integer order = float order for |d|, NaNs above +Inf
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (lane + 32 * j < len) {
      if (has_off) d[j] = __fsub_rn(d[j], off);
      m = max(m, __float_as_uint(d[j]) & 0x7fffffffu);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));

  const BlockNorm bn = block_norm(m, len < 256);
  if (lane == 0) absmax[b] = bn.stored();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float sv = clamp_unit(bn.scale(d[j]));
    const int bucket = bucket256_warp(sv, mid);  // every lane searches: the shuffles need the whole warp
    if (lane + 32 * j < len) q[start + lane + 32 * j] = uint8_t(bucket);
  }
}

// partial sums the level above `count` values holds
int64_t tree_level_size(int64_t count) { return (count + kTreeSpan - 1) / kTreeSpan; }

// Sums the tree's levels into `workspace`, one after another, until at most kTreeTop partial sums are left;
// returns them and their count.
std::pair<const double*, int64_t> tree_levels(const float* a, int64_t n, double* workspace, cudaStream_t stream) {
  double* level = workspace;
  int64_t count = tree_level_size(n);
  launch_dependent(tree_partials_kernel<float>, dim3(unsigned(count)), dim3(kTreeThreads), 0, stream, a, n, level);
  while (count > kTreeTop) {
    const int64_t up = tree_level_size(count);
    launch_dependent(tree_partials_kernel<double>, dim3(unsigned(up)), dim3(kTreeThreads), 0, stream,
                     static_cast<const double*>(level), count, level + count);
    level += count;
    count = up;
  }
  return {level, count};
}

}  // namespace

void launch_quantize_blockwise(const float* a, int64_t n, int64_t blocksize, const float* code, const float* offset,
                               uint8_t* q, float* absmax, float* code_out, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  if (blocksize == 256) {
    const int64_t grid = (nblocks + kBs256Warps - 1) / kBs256Warps;
    launch_dependent(quantize_blockwise256_kernel, dim3(unsigned(grid)), dim3(kBs256Warps * 32), 0, stream, a, n, code,
                     offset, q, absmax, code_out);
    return;
  }
  int threads = 32;
  while (threads < 256 && threads < blocksize) threads *= 2;
  quantize_blockwise_kernel<<<unsigned(nblocks), threads, 0, stream>>>(a, n, blocksize, code, offset, q, absmax,
                                                                      code_out);
}

int64_t double_quant_workspace(int64_t n) {
  int64_t total = 0;
  for (int64_t count = tree_level_size(n);; count = tree_level_size(count)) {
    total += count;
    if (count <= kTreeTop) return total;
  }
}

void launch_double_quant(const float* a, int64_t n, int64_t blocksize, const float* code, double* workspace,
                         float* offset_out, uint8_t* q, float* absmax, float* code_out, cudaStream_t stream) {
  const auto [partials, count] = tree_levels(a, n, workspace, stream);
  launch_dependent(tree_mean_kernel, dim3(1), dim3(32), 0, stream, partials, count, n, offset_out);
  launch_quantize_blockwise(a, n, blocksize, code, offset_out, q, absmax, code_out, stream);
}

}  // namespace fsdp4bit
