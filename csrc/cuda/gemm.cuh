// Fused 4-bit GEMM on Hopper (sm_90a): out = A @ W.T + bias with W (N, K) NF4/FP4 and A (M, K) fp16/bf16, float32
// accumulation, the packed weight dequantized in registers straight into the tensor cores' A operand (no 16-bit
// copy of W in device memory). fsdp4bit uses it where it beats dequantize + cuBLAS (gemm.cu's gemm_applies:
// 9 to 512 tokens, a weight of 2^22 to 2^25 entries or more by the token count; 513 to 1536 tokens where the
// tiles fill their waves of SMs); at 2048 tokens and more (training shapes) it reaches ~600 TFLOP/s against
// cuBLAS' ~710, so those keep dequantize + cuBLAS: without the dequantization (constant fragments) the same kernel
// matches cuBLAS, and the shuffle lookups are what it costs. Moving the dequantization to its own warpgroup, which
// writes 16-bit W to shared memory for shared-memory wgmmas, was slower still (NOTES.md, "Fused 4-bit GEMM").
//
// The product is computed transposed, out.T (N x M) = W (N x K) @ A.T, so that W is wgmma's register operand
// (64 rows of W per consumer warpgroup) and A, read by the tensor copy engine with the 128-byte swizzle, its
// shared-memory operand (TOK = 32 to 256 tokens, the fewest that hold M: few tokens cost no 256-wide wgmmas). A
// CTA has one producer warpgroup, whose thread 0 streams 64-wide k steps of A, of the packed W and of the block
// scales through STAGES shared-memory stages, and two consumer warpgroups; the grid is persistent, each CTA
// taking work units in turn: a tile (128 rows of W x TOK tokens), or with split-K one of a tile's `splits` k
// ranges, whose float32 partial product a second kernel sums in order. Where a CTA takes several tiles, each
// consumer warpgroup writes its finished block (plus the bias) to shared memory with stmatrix and one thread hands
// it to the tensor store, which runs while the next tile's k steps do; else each thread stores its outputs.
//
// Each weight is code[nibble] * scale in float32, rounded once to the 16-bit type: the same values as
// dequantize_4bit, so only the order of the float32 sums differs from dequantize + cuBLAS. The block scales
// (double quant resolved) come from a small first kernel, transposed to (K / 64, N) for the tensor copy; a
// 64-wide k step lies in one quantization block (blocksize a multiple of 64, K % 64 == 0).
#pragma once

#include "async_copy.cuh"
#include "common.cuh"

namespace fsdp4bit {

constexpr int kGemmRows = 128;  // rows of W per tile (64 per consumer warpgroup)
constexpr int kGemmK = 64;      // k per stage
constexpr int kGemmThreads = 384;

// shared memory of STAGES stages of TOK tokens (the tile's width and the wgmma's n: 32, 64, 128 or 256), and each
// consumer warpgroup's output tile on its way to the tensor store
template <int STAGES, int TOK>
struct GemmLayout {
  static constexpr int kABytes = TOK * kGemmK * 2;          // 128-byte rows, swizzled
  static constexpr int kOBytes = TOK * 64 * 2;              // TOK tokens x 64 rows of out, 128-byte rows, swizzled
  static constexpr int kWBytes = kGemmRows * kGemmK / 2;    // 32-byte rows of packed W
  static constexpr int kSBytes = kGemmRows * 4;             // float32 scales
  static constexpr int kOOffset = STAGES * kABytes;         // 1024-byte aligned, as the swizzle needs
  static constexpr int kWOffset = kOOffset + 2 * kOBytes;
  static constexpr int kSOffset = kWOffset + STAGES * kWBytes;
  static constexpr int kBarOffset = kSOffset + STAGES * kSBytes;
  static constexpr int kBytes = kBarOffset + 2 * STAGES * 8;
  static constexpr size_t kSmem = kBytes + 1024;  // slack to align the base to 1024 bytes (the swizzle atom)
};

// d (TOK / 2 float32 accumulators per thread: rows g and g + 8 of each 8-token column group) += A (64 x 16, this
// warpgroup's rows of W, in registers) * B (16 x TOK, tokens of A, in shared memory at desc_b); accumulate == 0
// overwrites d. One specialization per (16-bit type, TOK): the PTX differs in the type name and operand count.
template <typename AT, int TOK>
__device__ __forceinline__ void wgmma_rs(float (&d)[TOK / 2], const uint32_t (&a)[4], uint64_t desc_b, uint32_t accumulate);

// accumulator operands d[i] .. d[i + 15]
#define FSDP4BIT_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define FSDP4BIT_D16(i) FSDP4BIT_D4(i), FSDP4BIT_D4(i + 4), FSDP4BIT_D4(i + 8), FSDP4BIT_D4(i + 12)
// operand numbers of 16 accumulators, then a (4 registers), desc_b and accumulate
#define FSDP4BIT_ACC16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define FSDP4BIT_TAIL16 "{%16, %17, %18, %19}, %20"
#define FSDP4BIT_PRED16 "%21"
#define FSDP4BIT_OPS16 FSDP4BIT_D16(0)
// operand numbers of 32 accumulators, then a (4 registers), desc_b and accumulate
#define FSDP4BIT_ACC32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FSDP4BIT_TAIL32 "{%32, %33, %34, %35}, %36"
#define FSDP4BIT_PRED32 "%37"
#define FSDP4BIT_OPS32 FSDP4BIT_D16(0), FSDP4BIT_D16(16)
// operand numbers of 64 accumulators, then a (4 registers), desc_b and accumulate
#define FSDP4BIT_ACC64 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FSDP4BIT_TAIL64 "{%64, %65, %66, %67}, %68"
#define FSDP4BIT_PRED64 "%69"
#define FSDP4BIT_OPS64 FSDP4BIT_D16(0), FSDP4BIT_D16(16), FSDP4BIT_D16(32), FSDP4BIT_D16(48)
// operand numbers of 128 accumulators, then a (4 registers), desc_b and accumulate
#define FSDP4BIT_ACC128 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define FSDP4BIT_TAIL128 "{%128, %129, %130, %131}, %132"
#define FSDP4BIT_PRED128 "%133"
#define FSDP4BIT_OPS128 FSDP4BIT_D16(0), FSDP4BIT_D16(16), FSDP4BIT_D16(32), FSDP4BIT_D16(48), \
    FSDP4BIT_D16(64), FSDP4BIT_D16(80), FSDP4BIT_D16(96), FSDP4BIT_D16(112)
#define FSDP4BIT_WGMMA_RS(TOK, CPP_TYPE, PTX_TYPE, NA)                                                         \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_rs<CPP_TYPE, TOK>(float(&d)[TOK / 2], const uint32_t(&a)[4], uint64_t desc_b, \
                                                          uint32_t accumulate) {                                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FSDP4BIT_PRED##NA ", 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n" #TOK "k16.f32." PTX_TYPE "." PTX_TYPE " {" FSDP4BIT_ACC##NA  \
                 "}, " FSDP4BIT_TAIL##NA ", p, 1, 1, 0;\n}\n"                                                        \
                 : FSDP4BIT_OPS##NA                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));                       \
  }
FSDP4BIT_WGMMA_RS(32, __nv_bfloat16, "bf16", 16)
FSDP4BIT_WGMMA_RS(32, __half, "f16", 16)
FSDP4BIT_WGMMA_RS(64, __nv_bfloat16, "bf16", 32)
FSDP4BIT_WGMMA_RS(64, __half, "f16", 32)
FSDP4BIT_WGMMA_RS(128, __nv_bfloat16, "bf16", 64)
FSDP4BIT_WGMMA_RS(128, __half, "f16", 64)
FSDP4BIT_WGMMA_RS(256, __nv_bfloat16, "bf16", 128)
FSDP4BIT_WGMMA_RS(256, __half, "f16", 128)
#undef FSDP4BIT_WGMMA_RS
#undef FSDP4BIT_ACC16
#undef FSDP4BIT_TAIL16
#undef FSDP4BIT_PRED16
#undef FSDP4BIT_OPS16
#undef FSDP4BIT_ACC32
#undef FSDP4BIT_TAIL32
#undef FSDP4BIT_PRED32
#undef FSDP4BIT_OPS32
#undef FSDP4BIT_ACC64
#undef FSDP4BIT_TAIL64
#undef FSDP4BIT_PRED64
#undef FSDP4BIT_OPS64
#undef FSDP4BIT_ACC128
#undef FSDP4BIT_TAIL128
#undef FSDP4BIT_PRED128
#undef FSDP4BIT_OPS128
#undef FSDP4BIT_D16
#undef FSDP4BIT_D4

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// the registers of `a` stay live (and unchanged) up to here: a wgmma reads its register operand asynchronously,
// which the compiler does not see, so without this it could reuse them while the wgmma is in flight
__device__ __forceinline__ void keep_live(uint32_t (&a)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[j][i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// shared-memory descriptor of a K-major operand tile with 128-byte rows and the 128-byte swizzle (8-row groups
// 1024 bytes apart); the start address moves by 32 bytes per 16-wide k slice within the swizzle atom
__device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_byte_addr) {
  return uint64_t((smem_byte_addr & 0x3ffffu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// two weights, the codes of the nibbles in the low bits of `first` and `second`, times their scales, each rounded
// once, as one fragment register (`first`'s in the low half). A shuffle reads only the low 5 bits of its source
// lane and every lane holds code[lane % 16], so bit 4 of either index (and all above) selects the same entry: the
// nibbles need no masking. The transposed operand's pairs are one column of W in adjacent rows, each row's scale
template <typename AT>
__device__ __forceinline__ uint32_t column_pair(float lane_code, uint32_t first, uint32_t second, float2 scales) {
  const float a = __shfl_sync(0xffffffffu, lane_code, int(first));
  const float b = __shfl_sync(0xffffffffu, lane_code, int(second));
  return pack_pair<AT>(__fmul_rn(a, scales.x), __fmul_rn(b, scales.y));
}

// the two weights of the packed byte in the low 8 bits of `b` (high nibble first in k), one scale
template <typename AT>
__device__ __forceinline__ uint32_t weight_pair(float lane_code, uint32_t b, float scale) {
  return column_pair<AT>(lane_code, b >> 4, b, make_float2(scale, scale));
}

// four 8x8 matrices of 16-bit pairs (a thread's word of matrix q: row lane / 4, columns 2 (lane % 4) and + 1)
// stored transposed: lane l gives the shared address of row l % 8 of matrix l / 8, i.e. of its column l % 8
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// the consumer's 64 x TOK accumulator tile plus the bias of its rows (ba for the thread's row, bb for row + 8),
// each output rounded once to OT, into `tile` as out's (TOK tokens x 64 rows) block in the 128-byte swizzle of the
// tensor store (16-byte chunk c of token m's row at chunk c ^ (m % 8)). Each stmatrix writes tokens 8j to 8j + 15
// of the warp's 16 rows: per 8-lane phase 8 tokens' rows, in distinct chunks (no bank conflict)
template <typename OT, int TOK>
__device__ __forceinline__ void stage_tile(const float (&acc)[TOK / 2], float ba, float bb, uint8_t* tile, int w,
                                           int lane) {
  const uint32_t base = smem_addr(tile);
  const int q = lane / 8, chunk = 2 * w + (q & 1);
#pragma unroll
  for (int j = 0; j < TOK / 8; j += 2) {
    const int m = 8 * (j + (q >> 1)) + lane % 8;
    stmatrix_x4_trans(base + m * 128 + ((chunk ^ (m & 7)) << 4), pack_pair<OT>(acc[4 * j] + ba, acc[4 * j + 1] + ba),
                      pack_pair<OT>(acc[4 * j + 2] + bb, acc[4 * j + 3] + bb),
                      pack_pair<OT>(acc[4 * j + 4] + ba, acc[4 * j + 5] + ba),
                      pack_pair<OT>(acc[4 * j + 6] + bb, acc[4 * j + 7] + bb));
  }
}

// two adjacent outputs (8-byte aligned for float, 4-byte for the 16-bit types), each rounded once
template <typename OT>
__device__ __forceinline__ void store_pair(OT* p, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(p) = pack_pair<OT>(lo, hi);
}
template <>
__device__ __forceinline__ void store_pair<float>(float* p, float lo, float hi) {
  *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
}

// the consumer's 64 x TOK accumulator tile (rows `n` and n + 8 of out.T per 8-token column group) plus the bias
// (null for none) to out (M x N), in A's type or, for a split-K part, float32: lanes g and g ^ 1 swap one value per
// row pair, so each stores two adjacent outputs of one token: even g token 2t, rows (g, g + 1); odd g token
// 2t + 1, rows (g - 1, g)
template <typename OT, int TOK>
__device__ __forceinline__ void store_tile(const float (&acc)[TOK / 2], const OT* __restrict__ bias,
                                           OT* __restrict__ out, int M, int N, int m0, int row_n, int g, int t) {
  const bool odd = g & 1;
  const int n = row_n - (odd ? 1 : 0);
  float bias_lo[2], bias_hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    bias_lo[h] = bias_at(bias, n + 8 * h, N);
    bias_hi[h] = bias_at(bias, n + 8 * h + 1, N);
  }
#pragma unroll
  for (int j = 0; j < TOK / 8; ++j) {
    const int m = m0 + 8 * j + 2 * t + (odd ? 1 : 0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float keep = odd ? acc[4 * j + 2 * h + 1] : acc[4 * j + 2 * h];
      const float give = odd ? acc[4 * j + 2 * h] : acc[4 * j + 2 * h + 1];
      const float got = __shfl_xor_sync(0xffffffffu, give, 4);
      const float lo = (odd ? got : keep) + bias_lo[h], hi = (odd ? keep : got) + bias_hi[h];
      const int nn = n + 8 * h;
      if (m < M) {
        if (nn + 1 < N && (N % 2 == 0)) {
          store_pair<OT>(out + int64_t(m) * N + nn, lo, hi);
        } else {
          if (nn < N) out[int64_t(m) * N + nn] = from_f32<OT>(lo);
          if (nn + 1 < N) out[int64_t(m) * N + nn + 1] = from_f32<OT>(hi);
        }
      }
    }
  }
}

// k steps one thread of gemm_scales_kernel covers: its row's absmax bytes for them lie in one 32-byte sector, which
// L2 then serves once per row and k-step group (one k step per thread fetched a sector per row and k step: ~7 us at
// 14336x4096)
constexpr int kScaleSteps = 8;

// row n's scales for k steps kb0 .. kb0 + steps - 1 of gemm_scales_kernel: every load first, then the stores (the
// compiler may not move a load past a store to `out`). GENERIC takes any step count and nested blocksize; the other
// form, for a whole group with a power-of-two nested blocksize, has no branch between the loads.
template <bool NESTED, bool GENERIC>
__device__ __forceinline__ void store_scale_group(const Scales& sc, const float* s_ncode, float off, int log2bs,
                                                  int64_t row, int kb0, int steps, float* __restrict__ out, int64_t ld,
                                                  int n) {
  uint32_t q[kScaleSteps] = {};
  float s[kScaleSteps];
#pragma unroll
  for (int i = 0; i < kScaleSteps; ++i) {
    if (!GENERIC || i < steps) {
      const int64_t b = (row + int64_t(kb0 + i) * kGemmK) >> log2bs;
      if constexpr (NESTED) {
        q[i] = __ldg(sc.absmax_q + b);
        s[i] = __ldg(sc.nested_absmax + (GENERIC ? nested_block(sc, b) : b >> sc.nested_log2));
      } else {
        s[i] = __ldg(sc.absmax_f + b);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kScaleSteps; ++i) {
    if (!GENERIC || i < steps) out[int64_t(kb0 + i) * ld + n] = chunk_scale<NESTED>(q[i], s[i], s_ncode, off);
  }
}

// scales of the tiles' rows for every k step, transposed: out[kb * ld + n] = scale of (n, 64 kb). A thread takes
// row n (consecutive threads, consecutive rows: each k step's stores coalesce) for the kScaleSteps k steps of
// blockIdx.y. Launched as an ordinary kernel, so it starts only once every kernel before it has finished (and may
// read through the read-only cache): the GEMM, its programmatic dependent, may then read A and W before
// griddepcontrol.wait
template <bool NESTED>
__global__ void gemm_scales_kernel(Scales sc, int log2bs, int N, int64_t K, float* __restrict__ out, int ld) {
  pdl_launch_dependents();  // the GEMM may start its prologue and its A and W copies now (it waits before S)
  __shared__ float s_ncode[NESTED ? 256 : 1];
  float off = 0.0f;
  load_scale_tables<NESTED>(sc, s_ncode, off);
  __syncthreads();
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int kb0 = blockIdx.y * kScaleSteps;
  const int steps = min(kScaleSteps, int(K / kGemmK) - kb0);
  const int64_t row = int64_t(n) * K;
  if (steps == kScaleSteps && (!NESTED || sc.nested_log2 >= 0))
    store_scale_group<NESTED, false>(sc, s_ncode, off, log2bs, row, kb0, steps, out, ld, n);
  else
    store_scale_group<NESTED, true>(sc, s_ncode, off, log2bs, row, kb0, steps, out, ld, n);
}

// split-K: out = the float32 sum of the `splits` partial products (M x N each, `part` apart), in split order (so
// the result does not depend on which CTA finished first), plus the bias (null for none), rounded once. Launched as
// the GEMM's programmatic dependent (launch_dependent): its CTAs take SMs as the GEMM's leave and wait for it
template <typename AT>
__global__ void gemm_splitk_sum_kernel(const float* __restrict__ partial, int splits, int64_t part, int64_t N,
                                       const AT* __restrict__ bias, AT* __restrict__ out) {
  pdl_wait();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < part; i += int64_t(gridDim.x) * blockDim.x) {
    float v = ld_after_wait(partial + i);
    for (int s = 1; s < splits; ++s) v += ld_after_wait(partial + s * part + i);
    out[i] = from_f32<AT>(v + bias_at(bias, i % N, N));
  }
}

template <typename AT, int STAGES, int TOK, int CTAS, bool TRANS>
__global__ void __launch_bounds__(kGemmThreads, CTAS)
    gemm_4bit_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_w,
                 const __grid_constant__ CUtensorMap tm_s, const __grid_constant__ CUtensorMap tm_o, Code16 code,
                 const AT* __restrict__ bias, AT* __restrict__ out, int M, int N, int K, int splits,
                 float* __restrict__ partial, bool store_async) {
#if !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // never launched: gemm_applies() requires an sm_90a build
#else
  using L = GemmLayout<STAGES, TOK>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBarOffset);
  uint64_t* empty = full + STAGES;
  __shared__ float s_code[16];
  copy_table(s_code, code.v);
  if (threadIdx.x == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 2 * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  // the kernel after (the split-K sum, or another programmatic dependent) may launch now: its CTAs start as this
  // grid's leave (one CTA fills an SM's registers) and wait for it before reading anything
  pdl_launch_dependents();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // a work unit is one tile's k steps [kb0, kb1) of split `split` (all of them when splits == 1)
  const int tiles_n = (N + kGemmRows - 1) / kGemmRows;
  const int units = tiles_n * ((M + TOK - 1) / TOK) * splits;
  const int ksteps = (K + kGemmK - 1) / kGemmK;  // TRANS: N rows of W need not fill the last step
  auto unit_at = [&](int u, int& n0, int& m0, int& split, int& kb0, int& kb1) {
    const int tile = u / splits;
    split = u % splits;
    n0 = (tile % tiles_n) * kGemmRows;
    m0 = (tile / tiles_n) * TOK;
    kb0 = int(int64_t(split) * ksteps / splits);
    kb1 = int(int64_t(split + 1) * ksteps / splits);
  };

  // registers per thread: the producer warpgroup gives back what the consumers take (one CTA per SM: 168 at
  // launch, 40 and 232 after; two: 80 at launch, 32 and 104 after)
  if (warp < 4) {
    if constexpr (CTAS == 1)
      asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    else
      asm volatile("setmaxnreg.dec.sync.aligned.u32 32;");
    if (threadIdx.x == 0) {
      int it = 0;
      for (int u = blockIdx.x; u < units; u += gridDim.x) {
        int n0, m0, split, kb0, kb1;
        unit_at(u, n0, m0, split, kb0, kb1);
        for (int kb = kb0; kb < kb1; ++kb, ++it) {
          const int s = it % STAGES;
          mbar_wait(&empty[s], uint32_t((it / STAGES) & 1) ^ 1u);
          mbar_arrive_expect_tx(&full[s], uint32_t(L::kABytes + L::kWBytes + L::kSBytes));
          tma_load_2d(smem + s * L::kABytes, &tm_a, kb * kGemmK, m0, &full[s]);
          if constexpr (TRANS)  // 64 rows of W (this k step) x the tile's 128 columns (64 bytes)
            tma_load_2d(smem + L::kWOffset + s * L::kWBytes, &tm_w, n0 / 2, kb * kGemmK, &full[s]);
          else  // the tile's 128 rows of W x this k step's 64 columns (32 bytes)
            tma_load_2d(smem + L::kWOffset + s * L::kWBytes, &tm_w, kb * (kGemmK / 2), n0, &full[s]);
          // the scales come from the kernel just before (a programmatic dependent launch): wait for it once,
          // after the first stage's A and W copies are under way (A and W were written before that kernel ran)
          if (it == 0) pdl_wait();
          if constexpr (TRANS)  // the scales of this step's 64 rows in the tile's two 64-column blocks
            tma_load_2d(smem + L::kSOffset + s * L::kSBytes, &tm_s, kb * kGemmK, n0 / kGemmK, &full[s]);
          else
            tma_load_2d(smem + L::kSOffset + s * L::kSBytes, &tm_s, n0, kb, &full[s]);
        }
      }
    }
  } else {
    if constexpr (CTAS == 1)
      asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    else
      asm volatile("setmaxnreg.inc.sync.aligned.u32 104;");
    const int wg = warp / 4 - 1, w = warp % 4, g = lane / 4, t = lane % 4;
    const bool leader = w == 0 && lane == 0;  // the warpgroup's thread that issues its tensor stores
    const int row = wg * 64 + w * 16 + g;  // and row + 8
    const float lane_code = s_code[lane & 15];
    const uint32_t shift = 8u * uint32_t(t);
    // TRANS: the nibble of column g of a byte pair group: byte g / 2, high nibble (the first) for even g
    const uint32_t tshift = 8u * uint32_t(g / 2) + ((g & 1) ? 0u : 4u);
    float acc[TOK / 2];
    uint32_t a0[4][4], a1[4][4];  // two register sets: one feeds the wgmmas in flight while the next is built
    // the unit's k step i: wait for stage `it`, dequantize this thread's 2 rows x 16 weights into `a`, issue its
    // wgmmas (the first of the unit's overwrites the accumulators)
    auto step = [&](int i, int it, uint32_t(&a)[4][4]) {
      const int s = it % STAGES;
      mbar_wait(&full[s], uint32_t((it / STAGES) & 1));
      const uint8_t* ws = smem + L::kWOffset + s * L::kWBytes;
      const float* sp = reinterpret_cast<const float*>(smem + L::kSOffset + s * L::kSBytes);
      if constexpr (TRANS) {
        // W.T's rows c = row and row + 8 are columns of W: bytes col + g / 2 and + 4 of the 8 at `col` in each
        // of W's rows n = 16j + 2t (+1, +8, +9), the high nibble for even g; the stage's 64-byte rows are in the
        // 64-byte swizzle (16-byte chunk q of row n at q ^ (n / 2 % 4): the 4 rows a load's lanes read lie in
        // distinct chunks); each row has its own scale (row n of this warpgroup's 64-column block)
        const int col = wg * 32 + w * 8;
        const float* sw = sp + wg * kGemmK;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t lo[4], hi[4];  // the 8 bytes of rows 16j + 2t + {0, 1, 8, 9}
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int n = 16 * j + 2 * t + (e & 1) + 8 * (e >> 1);
            const uint2 v = *reinterpret_cast<const uint2*>(ws + n * 64 + ((((col >> 4) ^ (n >> 1)) & 3) << 4) + (col & 15));
            lo[e] = v.x >> tshift;
            hi[e] = v.y >> tshift;
          }
          const float2 s01 = *reinterpret_cast<const float2*>(sw + 16 * j + 2 * t);
          const float2 s89 = *reinterpret_cast<const float2*>(sw + 16 * j + 2 * t + 8);
          a[j][0] = column_pair<AT>(lane_code, lo[0], lo[1], s01);
          a[j][1] = column_pair<AT>(lane_code, hi[0], hi[1], s01);
          a[j][2] = column_pair<AT>(lane_code, lo[2], lo[3], s89);
          a[j][3] = column_pair<AT>(lane_code, hi[2], hi[3], s89);
        }
      } else {
        const uint4* wp = reinterpret_cast<const uint4*>(ws);
        const uint4 r0 = wp[row * 2], r1 = wp[row * 2 + 1], q0 = wp[row * 2 + 16], q1 = wp[row * 2 + 17];
        const float sa = sp[row], sb = sp[row + 8];
        const uint32_t wa[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
        const uint32_t wb[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          a[j][0] = weight_pair<AT>(lane_code, wa[2 * j] >> shift, sa);
          a[j][1] = weight_pair<AT>(lane_code, wb[2 * j] >> shift, sb);
          a[j][2] = weight_pair<AT>(lane_code, wa[2 * j + 1] >> shift, sa);
          a[j][3] = weight_pair<AT>(lane_code, wb[2 * j + 1] >> shift, sb);
        }
      }
      const uint32_t a_base = smem_addr(smem + s * L::kABytes);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wgmma_rs<AT, TOK>(acc, a[j], sw128_desc(a_base + 32 * j), i > 0 || j > 0);
      wgmma_commit();
    };
    // after the wait for the step before, its registers are free and its stage goes back to the producer
    auto retire = [&](int it_prev, uint32_t(&a)[4][4]) {
      wgmma_wait<1>();
      keep_live(a);
      mbar_arrive(&empty[it_prev % STAGES]);
    };
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
      int n0, m0, split, kb0, kb1;
      unit_at(u, n0, m0, split, kb0, kb1);
      const int nk = kb1 - kb0;
#pragma unroll 1
      for (int i = 0; i < nk; i += 2, it += 2) {
        step(i, it, a0);
        if (i > 0) retire(it - 1, a1);
        if (i + 1 < nk) {
          step(i + 1, it + 1, a1);
          retire(it, a0);
        }
      }
      if (nk % 2) it -= 1;
      wgmma_wait<0>();
      mbar_arrive(&empty[(it - 1) % STAGES]);
      if (store_async) {
        // through shared memory and the tensor store, which runs on while the next tile's k steps do: thread 0 of
        // the warpgroup waits until its last store has read the staging tile, all write it, thread 0 stores it
        uint8_t* tile = smem + L::kOOffset + wg * L::kOBytes;
        auto sync_warpgroup = [&] { wg == 0 ? named_barrier<1, 128>() : named_barrier<2, 128>(); };
        if (leader) bulk_wait_read_all();
        sync_warpgroup();
        stage_tile<AT, TOK>(acc, bias_at(bias, n0 + row, N), bias_at(bias, n0 + row + 8, N), tile, w, lane);
        fence_async_shared();
        sync_warpgroup();
        if (leader) {
          tma_store_2d(&tm_o, tile, n0 + 64 * wg, m0);
          bulk_commit();
        }
      } else if (splits == 1) {
        store_tile<AT, TOK>(acc, bias, out, M, N, m0, n0 + row, g, t);
      } else {
        store_tile<float, TOK>(acc, nullptr, partial + int64_t(split) * M * N, M, N, m0, n0 + row, g, t);
      }
    }
    if (leader) bulk_wait_all();  // the output is written when the kernel ends
  }
#endif
}

}  // namespace fsdp4bit
