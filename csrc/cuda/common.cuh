// Shared pieces of the fsdp4bit CUDA kernels: code tables passed by value, dtype conversions, the
// per-block float32 scale (double quant fused), and host-side argument checks.
//
// Bit-exactness with fsdp4bit/reference.py: the same float32 operations in the same order, with the
// IEEE-rounded intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn) wherever nvcc could otherwise fuse a
// multiply-add or approximate a division.
#pragma once

#include "launch.h"

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace fsdp4bit {

constexpr float kTiny = 1e-38f;  // float32 rounding of the reference's 1e-38 (a subnormal)

// Copy a by-value table to `dst` (shared or global memory) with compile-time indices only (a run-time index into a
// kernel parameter would copy the whole struct to the local-memory stack of every thread).
template <typename T, int N>
__device__ __forceinline__ void copy_table(T* dst, const T (&src)[N]) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// an attribute of the current device (SM count, compute capability, shared memory), for the launchers; remembered
// per (attribute, device), since a 1-token decode step asks several per layer. A slot packs (key, value).
inline int device_attribute(cudaDeviceAttr attr) {
  static std::atomic<uint64_t> cache[256] = {};
  int device = 0;
  cudaGetDevice(&device);
  const uint64_t key = ((uint64_t(uint32_t(attr)) << 16) | uint64_t(uint32_t(device) & 0xffffu)) + 1;  // never 0
  std::atomic<uint64_t>& slot = cache[(uint32_t(attr) * 31u + uint32_t(device)) & 255u];
  const uint64_t v = slot.load(std::memory_order_relaxed);
  if ((v >> 32) == key) return int(uint32_t(v));
  int value = 0;
  if (cudaDeviceGetAttribute(&value, attr, device) == cudaSuccess)  // a failed query is asked again next time
    slot.store((key << 32) | uint64_t(uint32_t(value)), std::memory_order_relaxed);
  return value;
}

// Lets `kernel` use up to `bytes` of dynamic shared memory (past the 48 KB default) on the current device. The
// attribute is per device: `devices_done` (one per kernel, kept by the caller) records where it is set.
template <typename Kernel>
inline void allow_dynamic_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& devices_done) {
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (devices_done.load() & bit) return;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  devices_done.fetch_or(bit);
}

// CTAs of `kernel` resident on one SM at once (at least 1)
template <typename Kernel>
inline int ctas_per_sm(Kernel kernel, int threads, size_t smem = 0) {
  int per_sm = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  return per_sm > 0 ? per_sm : 1;
}

// CTAs of `kernel` that the device runs at once: a grid-stride kernel's grid
template <typename Kernel>
inline int64_t one_wave(Kernel kernel, int threads, size_t smem = 0) {
  return int64_t(ctas_per_sm(kernel, threads, smem)) * device_attribute(cudaDevAttrMultiProcessorCount);
}

// one_wave() remembered per device and dynamic shared-memory size: the occupancy query costs host time on every
// launch, which a 1-token decode step pays per layer. Each slot packs (device, smem bytes, CTAs) in one word.
struct WaveCache {
  std::atomic<uint64_t> slot[16] = {};
};

template <typename Kernel>
inline int64_t one_wave_cached(Kernel kernel, int threads, size_t smem, WaveCache& cache) {
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t key = (uint64_t(dev & 0xff) << 32) | uint64_t(smem & 0xffffffffu);
  std::atomic<uint64_t>& slot = cache.slot[(smem / 16 + uint64_t(dev)) % 16];
  const uint64_t v = slot.load(std::memory_order_relaxed);
  if (v != 0 && (v >> 16) == key) return int64_t(v & 0xffffu);
  const int64_t wave = one_wave(kernel, threads, smem);  // >= 1, and < 2^16 (SMs x CTAs per SM)
  slot.store((key << 16) | uint64_t(wave & 0xffff), std::memory_order_relaxed);
  return wave;
}

// ------------------------------------------------------------------------- programmatic dependent launch
// A kernel launched with launch_dependent() may start while the kernel before it in the stream finishes (Hopper's
// programmatic dependent launch): its CTAs take SMs as the earlier kernel's CTAs leave and can do work that reads
// nothing an earlier kernel writes (kernel parameters, shared memory) before pdl_wait(), which returns once every
// earlier kernel has finished and its writes are visible. The only global accesses allowed before it are L2
// prefetches (prefetch_l2, prefetch_l2_lines): they return nothing to the program, and L2 stays coherent with a
// kernel still writing those bytes; after it, such data is read with ld_after_wait(), never __ldg. Both are no-ops
// before sm_90 (and pdl_wait() is one when the kernel was launched without the attribute).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A load of data an earlier kernel may have written, for code that runs after pdl_wait() in a kernel launched with
// launch_dependent(): ld.global.ca, which the compiler keeps behind griddepcontrol.wait. __ldg (ld.global.nc)
// declares the data read-only for the kernel's whole life, and ptxas did move such loads above the wait (the split
// row gemv's scale loads; tests/test_kernels.py reads the built kernels' SASS for it).
template <typename T>
__device__ __forceinline__ T ld_after_wait(const T* p) {
  return __ldca(p);
}

// an empty kernel compiled like every other: its PTX version tells whether griddepcontrol was compiled in
static __global__ void pdl_probe_kernel() {}

// whether launches are programmatic dependent ones: the current device runs them (compute capability 9.0 or
// later), the kernels were compiled for it (PTX 9.0 or later: an older-arch build JIT-compiled for Hopper would
// launch with the attribute but never wait), the runtime captures them into graphs (CUDA 12.3 or later), and
// FSDP4BIT_NO_PDL is unset or "0" (a switch for measuring a kernel on its own, or for ruling PDL out when
// debugging). Kept per device so a launch costs no query.
inline bool pdl_supported() {
  static const bool disabled = [] {
    const char* v = std::getenv("FSDP4BIT_NO_PDL");
    return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
  }();
  static const bool runtime_ok = [] {
    int version = 0;
    return cudaRuntimeGetVersion(&version) == cudaSuccess && version >= 12030;
  }();
  if (disabled || !runtime_ok) return false;
  static std::atomic<uint64_t> known{0}, yes{0};
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (!(known.load(std::memory_order_relaxed) & bit)) {
    cudaFuncAttributes attr{};
    const bool compiled = cudaFuncGetAttributes(&attr, pdl_probe_kernel) == cudaSuccess && attr.ptxVersion >= 90;
    if (compiled && device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9) yes.fetch_or(bit);
    known.fetch_or(bit);
  }
  return (yes.load(std::memory_order_relaxed) & bit) != 0;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch where the device has them
template <typename... Params, typename... Args>
inline void launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_supported() ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// Ask L2 to fetch `bytes` (a multiple of 16) from 16-byte aligned global `p`, without registers or waiting
// (Hopper's bulk prefetch; a no-op before sm_90): keeps DRAM busy while the threads compute on what they
// loaded before.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Ask L2 for the 128-byte lines that hold bytes [p, p + bytes), line i by lane i of the warp (prefetch.global.L2,
// one plain instruction each: cheaper to issue than a bulk prefetch); lines past the 32nd are left out.
__device__ __forceinline__ void prefetch_l2_lines(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(127);
  const uintptr_t line = first + 128 * (threadIdx.x % 32);
  if (bytes > 0 && line < reinterpret_cast<uintptr_t>(p) + bytes)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(line) : "memory");
#endif
}

// ------------------------------------------------------------------------- dtype helpers
// launch(a, out, bias) with the three pointers cast to A's 16-bit type (bfloat16, else half): the one dtype
// dispatch of the fp16/bf16-only kernels' launchers, which take the element type from their arguments
template <typename Launch>
inline void with_16bit_type(FloatType dtype, const void* a, void* out, const void* bias, Launch&& launch) {
  if (dtype == FloatType::kBF16)
    launch(static_cast<const __nv_bfloat16*>(a), static_cast<__nv_bfloat16*>(out),
           static_cast<const __nv_bfloat16*>(bias));
  else
    launch(static_cast<const __half*>(a), static_cast<__half*>(out), static_cast<const __half*>(bias));
}

// the element type behind a typed pointer that with_16bit_type() hands its launch
template <typename P>
using element_of = std::remove_cv_t<std::remove_pointer_t<P>>;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// the bias of output feature n, or -0 (which adds nothing, not even to a -0) past N or without a bias: the gemv and
// GEMM kernels add it to the float32 sum before its one rounding, as F.linear does
template <typename OT>
__device__ __forceinline__ float bias_at(const OT* __restrict__ bias, int64_t n, int64_t N) {
  return bias != nullptr && n < N ? to_f32(ld_after_wait(bias + n)) : -0.0f;
}

// two floats as a 16-bit pair in one word, each rounded once: `even` (the lower k) in the low half
template <typename AT>
__device__ __forceinline__ uint32_t pack_pair(float even, float odd);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float even, float odd) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(even))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(odd))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float even, float odd) {
  return uint32_t(__half_as_ushort(__float2half_rn(even))) | (uint32_t(__half_as_ushort(__float2half_rn(odd))) << 16);
}

// ------------------------------------------------------------------------- 8-element chunks
// 8 elements as raw 16-bit words (two per uint32) or float32 values; the raw form keeps registers low.
template <typename T>
struct Chunk8 {
  uint4 raw[sizeof(T) == 2 ? 1 : 2];
};

template <typename T>
__device__ __forceinline__ float chunk_at(const Chunk8<T>& c, int j) {
  return to_f32(reinterpret_cast<const T*>(c.raw)[j]);
}

// max over the chunk of |x| as float32 bits (integer order = float order for |x|; NaNs above +Inf)
template <typename T>
__device__ __forceinline__ uint32_t chunk_absmax_bits(const Chunk8<T>& c) {
  if constexpr (sizeof(T) == 2) {
    const uint4 r = c.raw[0];
    const uint32_t m2 = __vmaxu2(__vmaxu2(r.x & 0x7fff7fffu, r.y & 0x7fff7fffu),
                                 __vmaxu2(r.z & 0x7fff7fffu, r.w & 0x7fff7fffu));
    const uint32_t m16 = max(m2 & 0xffffu, m2 >> 16);  // |x| bits of one 16-bit float
    T h;
    const uint16_t b16 = uint16_t(m16);
    memcpy(&h, &b16, 2);
    return __float_as_uint(to_f32(h)) & 0x7fffffffu;  // exact widening; NaN stays above +Inf
  } else {
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = max(m, __float_as_uint(chunk_at(c, j)) & 0x7fffffffu);
    return m;
  }
}

// ------------------------------------------------------------------------- block normalisation
// How every quantizer here turns a block's max |x| into its scale, as the reference does: absmax is NaN if
// any element is, else the max, clamped to 1e-38; a full block multiplies by the rounded reciprocal, a short
// last block divides by the clamped max, which is also what it stores.
struct BlockNorm {
  float amax, clamped, inv;
  bool tail;
  __device__ __forceinline__ float stored() const { return tail ? clamped : amax; }
  __device__ __forceinline__ float scale(float d) const { return tail ? __fdiv_rn(d, clamped) : __fmul_rn(d, inv); }
};

// `max_abs_bits`: max over the block of the |x| float32 bits (integer order = float order, NaNs above +Inf)
__device__ __forceinline__ BlockNorm block_norm(uint32_t max_abs_bits, bool tail) {
  const bool is_nan = max_abs_bits > 0x7f800000u;
  const float amax = is_nan ? __uint_as_float(0x7fc00000u) : __uint_as_float(max_abs_bits);
  const float clamped = is_nan ? amax : fmaxf(amax, kTiny);
  return BlockNorm{amax, clamped, __fdiv_rn(1.0f, clamped), tail};
}

// ------------------------------------------------------------------------- per-block float32 scale
// nested block of block b: a shift for power-of-two nested blocksizes (a 64-bit division costs ~40 instructions)
__device__ __forceinline__ int64_t nested_block(const Scales& sc, int64_t b) {
  return sc.nested_log2 >= 0 ? b >> sc.nested_log2 : b / sc.nested_bs;
}

// double quant's float32 block scale: nested_code[q] * nested_absmax + offset, rounded as the reference does
__device__ __forceinline__ float nested_scale(float code_q, float nested_absmax, float offset) {
  return __fadd_rn(__fmul_rn(code_q, nested_absmax), offset);
}

// scale of block b; `s_ncode` is the nested code in shared memory and `off` the offset (when nested)
template <bool NESTED>
__device__ __forceinline__ float block_scale(const Scales& sc, const float* s_ncode, float off, int64_t b) {
  if constexpr (NESTED) {
    return nested_scale(s_ncode[sc.absmax_q[b]], __ldg(sc.nested_absmax + nested_block(sc, b)), off);
  } else {
    return __ldg(sc.absmax_f + b);
  }
}

// scale of block b with the nested code read through the read-only cache (1 KB, L1-resident)
template <bool NESTED>
__device__ __forceinline__ float block_scale_ldg(const Scales& sc, int64_t b) {
  if constexpr (NESTED) {
    return nested_scale(__ldg(sc.nested_code + __ldg(sc.absmax_q + b)), __ldg(sc.nested_absmax + nested_block(sc, b)),
                        __ldg(sc.offset));
  } else {
    return __ldg(sc.absmax_f + b);
  }
}

// What a gemv lane loads for one 32-weight chunk: its 16 packed bytes and the raw inputs of its block's scale
struct ChunkIn {
  uint4 w;
  uint32_t q;  // 8-bit absmax code (double quant)
  float s;     // nested absmax (double quant) or the float32 absmax
};

// the raw scale inputs of block b, whose nested block is b >> nlog2 (power-of-two nested blocks: the gemv launchers
// check; the row kernels pass a 32-bit b and nlog2 read once)
template <bool NESTED, typename Block>
__device__ __forceinline__ void load_scale_in(const Scales& sc, Block b, int nlog2, uint32_t& q, float& s) {
  if constexpr (NESTED) {
    q = ld_after_wait(sc.absmax_q + b);
    s = ld_after_wait(sc.nested_absmax + (b >> nlog2));
  } else {
    (void)q;  // no code: q keeps what the caller gave it
    s = ld_after_wait(sc.absmax_f + b);
  }
}

// the chunk of the 32 weights from element e (a multiple of 32); the packed bytes are read once (evict-first)
template <bool NESTED>
__device__ __forceinline__ ChunkIn load_gemv_chunk(const uint8_t* __restrict__ packed, const Scales& sc, int log2bs,
                                                  int64_t e) {
  ChunkIn c{};
  c.w = __ldcs(reinterpret_cast<const uint4*>(packed + e / 2));
  load_scale_in<NESTED>(sc, e >> log2bs, sc.nested_log2, c.q, c.s);
  return c;
}

// a chunk's float32 block scale from its raw inputs; `s_ncode` is the nested code in shared memory
template <bool NESTED>
__device__ __forceinline__ float chunk_scale(uint32_t q, float s, const float* s_ncode, float off) {
  if constexpr (NESTED) {
    return nested_scale(s_ncode[q], s, off);
  } else {
    return s;
  }
}

template <bool NESTED>
__device__ __forceinline__ void load_scale_tables(const Scales& sc, float* s_ncode, float& off) {
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = ld_after_wait(sc.nested_code + i);
    off = ld_after_wait(sc.offset);
  }
}

}  // namespace fsdp4bit
