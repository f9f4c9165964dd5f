// Session 24's experiment, not part of fsdp4bit: a 4-bit GEMM that dequantizes each weight once, into a ring of
// bf16 tiles in L2, beside its tensor-core work (results: NOTES.md, "Status (end of session 24)").
//
// The fused kernel (gemm.cuh) dequantizes W in the registers of the warpgroups that issue the wgmmas: each weight
// is looked up once per 256-token tile that uses it (16 times at 4096 tokens), and the shuffle lookups cost it
// 16-19% at training shapes. Here each weight is dequantized once, into L2, and the tensor-core warps only load it:
// - every CTA's producer warpgroup has one thread streaming the tensor copies; its other three warps write W's bf16
//   values, 8 rows at a time ("items"), into a ring of SLOTS 128-row tile slots in device memory (small enough to
//   stay mostly in L2), and publish each item on its tile's release counter;
// - the producer thread streams A (the tokens) and the bf16 W tile once the tile's counter is full, and two
//   consumer warpgroups load W's fragments with ldmatrix (no lookup) for register-operand wgmmas, as gemm.cuh
//   does; when a unit's last stage has arrived its tile's consumed counter goes up, and a slot is written again
//   once every unit of the tile it held has arrived.
// At the start all threads of every CTA write the first PROLOGUE tiles. Per SM that is ~1% of its issue slots
// (a weight is dequantized once, not once per token tile); the question is whether the GEMM runs at cuBLAS' speed.
// Prototype limits: bf16, blocksize 64 with float32 absmax (no double quant), K % 64 == 0, N % 128 == 0, a static
// deal of tiles and items (all CTAs must be resident at once: one per SM, nothing else running), flags cleared per
// call. Also timed: the same GEMM on a bf16 copy of all of W ("plain"), and dequantize + cuBLAS.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -I csrc/cuda \
//        bench/experiments/gemm_ring.cu -o /tmp/gemm_ring -lcublas -lcuda && /tmp/gemm_ring [M N K]...
#include "dequantize.cuh"
#include "gemm.cuh"

#include <cublas_v2.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace fsdp4bit;
using bf16 = __nv_bfloat16;

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

constexpr int kTok = 256;
constexpr int kChunksPerTile = 16;  // a tile's 128 rows are written in 16 items of 8 rows
constexpr int kItemRows = kGemmRows / kChunksPerTile;

template <int STAGES, bool ASYNC>
struct RingLayout {
  static constexpr int kABytes = kTok * kGemmK * 2;
  static constexpr int kWBytes = kGemmRows * kGemmK * 2;
  static constexpr int kOBytes = kTok * 64 * 2;
  static constexpr int kWOffset = STAGES * kABytes;
  static constexpr int kOOffset = kWOffset + STAGES * kWBytes;
  static constexpr int kBarOffset = kOOffset + (ASYNC ? 2 * kOBytes : 0);
  static constexpr size_t kSmem = kBarOffset + 2 * STAGES * 8 + 1024;
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
// generic-proxy writes this thread has acquired become visible to the tensor copies it issues next
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// rows [row0, row0 + kItemRows) of W as bf16 to dst (their first value), from packed bytes and float32 absmax
// (blocksize 64), 8 x 16 packed bytes in flight per thread; plain stores, so the values stay in L2 for the GEMM
template <int U>
__device__ __forceinline__ void dequant_item(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                             float lane_code, bf16* dst, int64_t row0, int K, int tid, int nthreads) {
  const int64_t c0 = row0 * (K / 32), n = int64_t(kItemRows) * (K / 32);  // 16-byte chunks (32 values)
  for (int64_t base = 0; base < n; base += int64_t(nthreads) * U) {
    uint4 v[U];
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + tid + int64_t(u) * nthreads;
      if (c < n) {
        v[u] = __ldcs(reinterpret_cast<const uint4*>(packed) + c0 + c);
        s[u] = __ldg(absmax + ((c0 + c) >> 1));
      } else {
        v[u] = make_uint4(0u, 0u, 0u, 0u);
        s[u] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = base + tid + int64_t(u) * nthreads;
      const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
      uint4* d = reinterpret_cast<uint4*>(dst) + c * 4;
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // packed word q: 8 values, one 16-byte store
        uint32_t o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t byte = (w[q] >> (8 * k)) & 0xffu;
          o[k] = pack_pair<bf16>(__fmul_rn(code_at(lane_code, byte >> 4), s[u]),
                                 __fmul_rn(code_at(lane_code, byte & 15), s[u]));
        }
        if (c < n) d[q] = make_uint4(o[0], o[1], o[2], o[3]);
      }
    }
  }
}

// one item: rows of tile nt into its ring slot, then its counter (readers wait for kChunksPerTile); `tid` of
// `nthreads` threads, `sync` their barrier, tid 0 the one that waits and publishes
template <int U, bool WRITE, typename Sync>
__device__ __forceinline__ void produce_item(int item, const uint8_t* packed, const float* absmax, float lane_code,
                                             bf16* ring, int* ready, const int* consumed, int MT, int slots, int K,
                                             int tid, int nthreads, Sync sync, unsigned long long* wait_ns) {
  const int nt = item / kChunksPerTile, part = item % kChunksPerTile;
  if (nt >= slots) {  // the slot's previous tile must have been read by all its MT units
    if (tid == 0 && ld_acquire(consumed + nt - slots) < MT) {
      const unsigned long long t0 = now_ns();
      while (ld_acquire(consumed + nt - slots) < MT) __nanosleep(64);
      *wait_ns += now_ns() - t0;
    }
    sync();
  }
  const int64_t row0 = int64_t(nt) * kGemmRows + part * kItemRows;
  bf16* dst = ring + (int64_t(nt % slots) * kGemmRows + part * kItemRows) * K;
  if constexpr (WRITE) dequant_item<U>(packed, absmax, lane_code, dst, row0, K, tid, nthreads);
  __threadfence();
  sync();
  if (tid == 0) red_release_add(ready + nt, 1);
}

// RING: W comes from the ring; else from a bf16 copy of all of W (tm_w over it), a plain GEMM. WRITE = false (a
// probe): the ring is a bf16 copy of all of W already, and its writers only wait, fence and publish. PROBE (with
// WRITE = false) takes parts of the ring's plumbing out: 1 the register split of the plain kernel (40 / 232), 2 the
// tensor-copy thread's wait and proxy fence per unit, 4 the consumers' consumed counts.
template <int STAGES, bool RING, bool ASYNC, bool WRITE = true, int PROBE = 0>
__global__ void __launch_bounds__(kGemmThreads, 1)
    ring_gemm_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_w,
                     const __grid_constant__ CUtensorMap tm_o, Code16 code, const uint8_t* __restrict__ packed,
                     const float* __restrict__ absmax, bf16* ring, int* ready, int* consumed, bf16* out, int M, int N,
                     int K, int slots, int prologue_tiles, int band, unsigned long long* stats) {
  // stats per CTA: ns the tensor-copy thread waited for ring tiles, ns the ring writers waited for free slots, ns
  // from the start to the prologue's end, to the ring writers' end, to the tensor-copy thread's end
  unsigned long long* my = stats + 8 * blockIdx.x;
  const unsigned long long t_start = now_ns();
  using L = RingLayout<STAGES, ASYNC>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  __shared__ float s_code[16];
  copy_table(s_code, code.v);
  __syncthreads();
  const float lane_code = s_code[threadIdx.x % 16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int MT = (M + kTok - 1) / kTok, NT = N / kGemmRows, units = MT * NT, ksteps = K / kGemmK;
  const int first_items = RING ? min(prologue_tiles, NT) * kChunksPerTile : 0;
  if constexpr (RING) {
    for (int item = blockIdx.x; item < first_items; item += gridDim.x)
      produce_item<4, WRITE>(item, packed, absmax, lane_code, ring, ready, consumed, MT, slots, K, threadIdx.x, blockDim.x,
                      [] { __syncthreads(); }, my + 1);
  }
  if (threadIdx.x == 0) my[2] = now_ns() - t_start;
  const int gidx = blockIdx.x, G = gridDim.x;
  // units in bands of `band` 128-row tiles of W (the last band may be narrower): within a band token tile by token
  // tile, and in a token tile its band's W tiles in turn, so the units in flight share a few MB of A and of W in L2
  auto unit_at = [&](int u, int& nt, int& m0) {
    const int b = u / (band * MT), r = u % (band * MT), width = min(band, NT - b * band);
    nt = b * band + r % width;
    m0 = (r / width) * kTok;
  };
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarOffset);
  uint64_t* empty = full + STAGES;
  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 2 * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp < 4) {
    if constexpr (RING && !(PROBE & 1))  // the ring's writers need more than the tensor-copy thread alone
      asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    else
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if constexpr (RING) {
      if (warp >= 1) {  // warps 1-3: the ring's items after the prologue, this CTA's every gridDim.x-th
        for (int item = first_items + blockIdx.x; item < NT * kChunksPerTile; item += gridDim.x)
          produce_item<1, WRITE>(item, packed, absmax, lane_code, ring, ready, consumed, MT, slots, K, threadIdx.x - 32, 96,
                          [] { named_barrier<3, 96>(); }, my + 1);
        if (threadIdx.x == 32) my[3] = now_ns() - t_start;
      }
    }
    if (threadIdx.x == 0) {
      int it = 0;
      for (int u = gidx; u < units; u += G) {
        int nt, m0;
        unit_at(u, nt, m0);
        int wrow = nt * kGemmRows;
        if constexpr (RING && !(PROBE & 2)) {
          if (ld_acquire(ready + nt) < kChunksPerTile) {
            const unsigned long long t0 = now_ns();
            while (ld_acquire(ready + nt) < kChunksPerTile) __nanosleep(32);
            my[0] += now_ns() - t0;
          }
          fence_proxy_async_global();
        }
        if constexpr (RING) wrow = (nt % slots) * kGemmRows;
        for (int kb = 0; kb < ksteps; ++kb, ++it) {
          const int s = it % STAGES;
          mbar_wait(&empty[s], uint32_t((it / STAGES) & 1) ^ 1u);
          mbar_arrive_expect_tx(&full[s], uint32_t(L::kABytes + L::kWBytes));
          tma_load_2d(smem + s * L::kABytes, &tm_a, kb * kGemmK, m0, &full[s]);
          tma_load_2d(smem + L::kWOffset + s * L::kWBytes, &tm_w, kb * kGemmK, wrow, &full[s]);
        }
      }
      my[4] = now_ns() - t_start;
    }
  } else {
    if constexpr (RING && !(PROBE & 1))
      asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");
    else
      asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int wg = warp / 4 - 1, w = warp % 4, g = lane / 4, t = lane % 4;
    const bool leader = w == 0 && lane == 0;
    const int row = wg * 64 + w * 16 + g;
    const int lrow = wg * 64 + w * 16 + (lane & 15);  // the row whose 16 bytes this lane's ldmatrix address names
    const uint32_t lsw = uint32_t(lrow & 7), lhalf = uint32_t(lane >> 4);
    float acc[kTok / 2];
    uint32_t a0[4][4], a1[4][4];
    int cur_nt = 0;
    auto step = [&](int i, int it, int nk, uint32_t(&a)[4][4]) {
      const int s = it % STAGES;
      mbar_wait(&full[s], uint32_t((it / STAGES) & 1));
      if constexpr (RING && !(PROBE & 4)) {
        if (i == nk - 1 && wg == 0 && leader) red_release_add(consumed + cur_nt, 1);
      }
      const uint32_t wbase = smem_addr(smem + L::kWOffset + s * L::kWBytes) + uint32_t(lrow) * 128u;
#pragma unroll
      for (int j = 0; j < 4; ++j) ldmatrix_x4(wbase + (((2u * j + lhalf) ^ lsw) << 4), a[j]);
      const uint32_t a_base = smem_addr(smem + s * L::kABytes);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs<bf16, kTok>(acc, a[j], sw128_desc(a_base + 32 * j), i > 0 || j > 0);
      wgmma_commit();
    };
    auto retire = [&](int it_prev, uint32_t(&a)[4][4]) {
      wgmma_wait<1>();
      keep_live(a);
      mbar_arrive(&empty[it_prev % STAGES]);
    };
    int it = 0;
    for (int u = gidx; u < units; u += G) {
      int nt, m0;
      unit_at(u, nt, m0);
      const int n0 = nt * kGemmRows;
      cur_nt = nt;
      const int nk = ksteps;
#pragma unroll 1
      for (int i = 0; i < nk; i += 2, it += 2) {
        step(i, it, nk, a0);
        if (i > 0) retire(it - 1, a1);
        if (i + 1 < nk) {
          step(i + 1, it + 1, nk, a1);
          retire(it, a0);
        }
      }
      if (nk % 2) it -= 1;
      wgmma_wait<0>();
      mbar_arrive(&empty[(it - 1) % STAGES]);
      if constexpr (ASYNC) {
        uint8_t* tile = smem + L::kOOffset + wg * L::kOBytes;
        auto sync_warpgroup = [&] { wg == 0 ? named_barrier<1, 128>() : named_barrier<2, 128>(); };
        if (leader) bulk_wait_read_all();
        sync_warpgroup();
        stage_tile<bf16, kTok>(acc, -0.0f, -0.0f, tile, w, lane);
        fence_async_shared();
        sync_warpgroup();
        if (leader) {
          tma_store_2d(&tm_o, tile, n0 + 64 * wg, m0);
          bulk_commit();
        }
      } else {
        store_tile<bf16, kTok>(acc, nullptr, out, M, N, m0, n0 + row, g, t);
      }
    }
    if (leader) bulk_wait_all();
  }
}

// ------------------------------------------------------------------------------------------------ host
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

static CUtensorMap map_2d(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows, uint32_t box_cols) {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q));
    return reinterpret_cast<EncodeTiled>(p);
  }();
  CUtensorMap m;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * 2};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t es[2] = {1, 1};
  if (fn(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, es,
         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "tensor map failed\n");
    std::exit(1);
  }
  return m;
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Problem {
  int M, N, K;
  bf16 *x, *w, *out, *ref, *ring;
  uint8_t* packed;
  float* absmax;
  int* flags;
  unsigned long long* stats;
  Code16 code;
};

static const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                               -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                               0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                               0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                               0.7229568362236023f, 1.0f};

template <int STAGES, bool RING, bool ASYNC, bool WRITE = true, int PROBE = 0>
static std::function<void(cudaStream_t)> ring_call(const Problem& p, int grid, int slots, int prologue, int band) {
  using L = RingLayout<STAGES, ASYNC>;
  auto kernel = ring_gemm_kernel<STAGES, RING, ASYNC, WRITE, PROBE>;
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L::kSmem)));
  const CUtensorMap ta = map_2d(p.x, p.M, p.K, kTok, kGemmK);
  bf16* ring = WRITE ? p.ring : p.w;  // without writes the ring is all of W (slots = N / 128)
  const CUtensorMap tw = RING ? map_2d(ring, uint64_t(slots) * kGemmRows, p.K, kGemmRows, kGemmK)
                              : map_2d(p.w, p.N, p.K, kGemmRows, kGemmK);
  const CUtensorMap to = map_2d(p.out, p.M, p.N, kTok, 64);
  const int NT = p.N / kGemmRows;
  return [=](cudaStream_t st) {
    if (RING && (PROBE & 6) != 6) CK(cudaMemsetAsync(p.flags, 0, sizeof(int) * 2 * NT, st));
    CK(cudaMemsetAsync(p.stats, 0, sizeof(unsigned long long) * 8 * grid, st));
    kernel<<<grid, kGemmThreads, L::kSmem, st>>>(ta, tw, to, p.code, p.packed, p.absmax, ring, p.flags,
                                                 p.flags + NT, p.out, p.M, p.N, p.K, slots, prologue, band, p.stats);
  };
}

static void run_shape(int M, int N, int K, cublasHandle_t blas, cudaStream_t st) {
  Problem p{M, N, K};
  const int sms = [] {
    int v;
    CK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0));
    return v;
  }();
  const int NT = N / kGemmRows, slots = std::min(NT, 48);
  CK(cudaMalloc(&p.x, size_t(M) * K * 2));
  CK(cudaMalloc(&p.w, size_t(N) * K * 2));
  CK(cudaMalloc(&p.out, size_t(M) * N * 2));
  CK(cudaMalloc(&p.ref, size_t(M) * N * 2));
  CK(cudaMalloc(&p.ring, size_t(slots) * kGemmRows * K * 2));
  CK(cudaMalloc(&p.packed, size_t(N) * K / 2));
  CK(cudaMalloc(&p.absmax, size_t(N) * K / 64 * 4));
  CK(cudaMalloc(&p.flags, sizeof(int) * 2 * NT));
  CK(cudaMalloc(&p.stats, sizeof(unsigned long long) * 8 * sms));
  for (int i = 0; i < 16; ++i) p.code.v[i] = kNF4[i];
  {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(0.01f, 0.05f);
    std::vector<bf16> hx(size_t(M) * K);
    for (auto& v : hx) v = __float2bfloat16(nd(rng));
    std::vector<uint8_t> hp(size_t(N) * K / 2);
    for (auto& v : hp) v = uint8_t(rng());
    std::vector<float> ha(size_t(N) * K / 64);
    for (auto& v : ha) v = ud(rng);
    CK(cudaMemcpy(p.x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p.packed, hp.data(), hp.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p.absmax, ha.data(), ha.size() * 4, cudaMemcpyHostToDevice));
  }
  float* dcode;
  CK(cudaMalloc(&dcode, 64));
  CK(cudaMemcpy(dcode, kNF4, 64, cudaMemcpyHostToDevice));
  Scales sc{};
  sc.absmax_f = p.absmax;
  const int64_t n = int64_t(N) * K;
  auto dequant_full = [&](cudaStream_t s) {
    dequantize_kernel<bf16, false><<<unsigned(dequantize_grid(n)), kDequantThreads, 0, s>>>(p.packed, n, dcode, sc, 6,
                                                                                          true, p.w);
  };
  const float one = 1.0f, zero = 0.0f;
  auto cublas_into = [&](bf16* y, cudaStream_t s) {
    cublasSetStream(blas, s);
    if (cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, p.w, CUDA_R_16BF, K, p.x, CUDA_R_16BF, K, &zero, y,
                     CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
      std::fprintf(stderr, "cublas failed\n");
      std::exit(1);
    }
  };
  dequant_full(st);
  cublas_into(p.ref, st);
  CK(cudaStreamSynchronize(st));
  std::vector<bf16> href(size_t(M) * N), hout(size_t(M) * N);
  CK(cudaMemcpy(href.data(), p.ref, href.size() * 2, cudaMemcpyDeviceToHost));

  struct Variant {
    std::string name;
    std::function<void(cudaStream_t)> fn;
  };
  std::vector<Variant> vs;
  vs.push_back({"cublas bf16 W", [&](cudaStream_t s) { cublas_into(p.out, s); }});
  vs.push_back({"dequant + cublas", [&](cudaStream_t s) {
                  dequant_full(s);
                  cublas_into(p.out, s);
                }});
  for (int band : {8, 16}) {
    const std::string b = " band " + std::to_string(band);
    vs.push_back({"plain S4 direct" + b, ring_call<4, false, false>(p, sms, slots, 0, band)});
    vs.push_back({"plain S3 async" + b, ring_call<3, false, true>(p, sms, slots, 0, band)});
  }
  for (int band : {8, 16}) {  // the ring holds two bands, the prologue writes the first
    const std::string b = " band " + std::to_string(band);
    const int ring_slots = std::min(NT, 2 * band);
    vs.push_back({"ring S4 direct" + b, ring_call<4, true, false>(p, sms, ring_slots, band, band)});
    vs.push_back({"ring S3 async" + b, ring_call<3, true, true>(p, sms, ring_slots, band, band)});
  }
  {  // probes of the ring's plumbing: no writes (the ring is all of W), then parts of the plumbing taken out
    const int band = 8;
    const std::string b = " band 8";
    vs.push_back({"ring S3 async nowrite" + b, ring_call<3, true, true, false>(p, sms, NT, band, band)});
    vs.push_back({"ring S3 async nowrite p1" + b, ring_call<3, true, true, false, 1>(p, sms, NT, band, band)});
    vs.push_back({"ring S3 async nowrite p6" + b, ring_call<3, true, true, false, 6>(p, sms, NT, band, band)});
    vs.push_back({"ring S3 async nowrite p7" + b, ring_call<3, true, true, false, 7>(p, sms, NT, band, band)});
  }
  // check every variant against dequant + cuBLAS (bf16 outputs: relative to the output scale)
  for (auto& v : vs) {
    CK(cudaMemset(p.out, 0xff, size_t(M) * N * 2));  // poison (NaN)
    v.fn(st);
    CK(cudaStreamSynchronize(st));
    CK(cudaGetLastError());
    CK(cudaMemcpy(hout.data(), p.out, hout.size() * 2, cudaMemcpyDeviceToHost));
    double maxref = 0, maxdiff = 0;
    size_t bad = 0;
    for (size_t i = 0; i < hout.size(); ++i) {
      const double r = __bfloat162float(href[i]), o = __bfloat162float(hout[i]);
      maxref = std::max(maxref, std::abs(r));
      const double d = std::abs(r - o);
      if (!(d <= 0.02 * std::abs(r) + 0.05)) ++bad;
      if (d == d) maxdiff = std::max(maxdiff, d);
    }
    std::printf("check %dx%dx%d %-28s max|diff| %.4g (max|ref| %.4g) outliers %zu %s\n", M, N, K, v.name.c_str(),
                maxdiff, maxref, bad, bad == 0 ? "ok" : "FAIL");
    if (v.name.rfind("ring", 0) == 0) {  // the last call's per-CTA waits, averaged (and the worst), us
      std::vector<unsigned long long> hs(8 * sms);
      CK(cudaMemcpy(hs.data(), p.stats, hs.size() * 8, cudaMemcpyDeviceToHost));
      double avg[5] = {}, mx[5] = {};
      for (int b = 0; b < sms; ++b)
        for (int k = 0; k < 5; ++k) {
          avg[k] += hs[8 * b + k] / 1e3 / sms;
          mx[k] = std::max(mx[k], hs[8 * b + k] / 1e3);
        }
      std::printf("stats %-28s wait tiles %.1f (max %.1f), wait slots %.1f (max %.1f), prologue end %.1f (max %.1f), "
                  "writers end %.1f (max %.1f), copies end %.1f (max %.1f) us\n", v.name.c_str(), avg[0], mx[0], avg[1],
                  mx[1], avg[2], mx[2], avg[3], mx[3], avg[4], mx[4]);
    }
  }
  // back-to-back batches of 10 calls, variants taking turns
  std::vector<std::vector<float>> times(vs.size());
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int rep = 0; rep < 15; ++rep) {
    for (size_t i = 0; i < vs.size(); ++i) {
      CK(cudaEventRecord(e0, st));
      for (int c = 0; c < 10; ++c) vs[i].fn(st);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (rep >= 2) times[i].push_back(ms * 100.0f);
    }
  }
  const float base = median(times[0]);
  for (size_t i = 0; i < vs.size(); ++i)
    std::printf("time %dx%dx%d %-28s %8.1f us  %.3fx cublas\n", M, N, K, vs[i].name.c_str(), median(times[i]),
                median(times[i]) / base);
  CK(cudaFree(p.x));
  CK(cudaFree(p.w));
  CK(cudaFree(p.out));
  CK(cudaFree(p.ref));
  CK(cudaFree(p.ring));
  CK(cudaFree(p.packed));
  CK(cudaFree(p.absmax));
  CK(cudaFree(p.flags));
  CK(cudaFree(p.stats));
  CK(cudaFree(dcode));
}

int main(int argc, char** argv) {
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return 1;
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  std::vector<std::array<int, 3>> shapes = {{4096, 14336, 4096}, {4096, 4096, 14336}, {8192, 14336, 4096}};
  if (argc >= 4) {
    shapes.clear();
    for (int i = 1; i + 2 < argc; i += 3) shapes.push_back({std::atoi(argv[i]), std::atoi(argv[i + 1]), std::atoi(argv[i + 2])});
  }
  for (auto& s : shapes) run_shape(s[0], s[1], s[2], blas, st);
  return 0;
}
