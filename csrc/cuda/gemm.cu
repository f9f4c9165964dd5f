// Launcher of the fused 4-bit GEMM (gemm.cuh), plain and transposed: which calls it takes, how many split-K parts,
// the block-scale kernel, the tensor maps (cuTensorMapEncodeTiled, found through the runtime so the extension needs no link
// against the driver library), the persistent wgmma kernel and the split-K sum. The kernel exists only in an sm_90a build (FSDP4BIT_WGMMA, set by
// fsdp4bit/kernels/_build.py when a compute capability 9.0 GPU is visible).
#include "gemm.cuh"

#include <algorithm>
#include <atomic>

namespace fsdp4bit {

namespace {

// tokens per tile (the wgmma's n): the fewest of 32, 64, 128, 256 that hold M (up to 256), so few tokens do not
// pay for 256-token wgmmas; stages per tile width: as many as fit beside the output staging tiles, up to 8
int gemm_tokens(int64_t M) { return M <= 32 ? 32 : M <= 64 ? 64 : M <= 128 ? 128 : 256; }
template <int TOK>
constexpr int kGemmStages = TOK == 256 ? 4 : 8;
// CTAs per SM: two of the 32-token kernel (80 registers at launch, the consumers raised to 104), whose units
// then balance over twice the slots (H100, GPU time, against one: 0.91x at 28672x8192, 0.81-0.83x at
// 6144x8192, 0.94x at 4096x14336, 0.97-1.02x at 14336x4096); wider tiles lost with two (up to 1.09x)
constexpr int gemm_ctas_for(int tok) { return tok == 32 ? 2 : 1; }
int gemm_ctas(int64_t M) { return gemm_ctas_for(gemm_tokens(M)); }
// the CTAs one wave of M-token tiles holds: SMs x CTAs per SM
int64_t gemm_slots(int64_t M) { return device_attribute(cudaDevAttrMultiProcessorCount) * gemm_ctas(M); }

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) return EncodeTiled(nullptr);
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// cuTensorMapEncodeTiled is a driver call and needs the device's context current on the calling thread, which a
// thread that has made no runtime call needing one lacks (autograd's backward thread: it failed there with
// CUDA_ERROR_INVALID_CONTEXT); cudaSetDevice makes the primary context current, once per thread and device
void make_context_current() {
  thread_local uint64_t done = 0;
  int dev = 0;
  cudaGetDevice(&dev);
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (done & bit) return;
  if (cudaSetDevice(dev) == cudaSuccess) done |= bit;
}

// a row-major (rows x cols) tensor, rows `stride_bytes` apart, read in boxes of box_rows x box_cols
bool tensor_map_2d(CUtensorMap* map, CUtensorMapDataType type, const void* base, uint64_t rows, uint64_t cols,
                   uint64_t stride_bytes, uint32_t box_rows, uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {stride_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  return encode_tiled()(map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// 128-row x TOK-token output tiles of an (M, N) product (0 when either is 0)
int64_t gemm_tiles(int64_t M, int64_t N) {
  const int64_t tok = gemm_tokens(M);
  return ((M + tok - 1) / tok) * ((N + kGemmRows - 1) / kGemmRows);
}

int64_t scales_ld(int64_t N) { return (N + 3) / 4 * 4; }  // float32 rows 16-byte aligned for the tensor copy

constexpr int kMaxSplits = 16;      // split-K parts at most
constexpr int kMinSplitSteps = 8;   // 64-wide k steps per part at least (a part streams its stages like a tile)

// Split-K: a call with too few tiles for 3/4 of the CTA slots (SMs x CTAs per SM; N = 4096 at up to 256 tokens:
// 32 tiles) splits K into as many parts as one wave of slots takes, each part's tiles summing its k steps into a
// float32 partial product that a second kernel adds up in order. 1 when the tiles alone fill the GPU or K is too
// short to split.
int gemm_splits(int64_t M, int64_t N, int64_t K) {
  const int64_t slots = gemm_slots(M), tiles = gemm_tiles(M, N);
  if (tiles <= 0 || 4 * tiles >= 3 * slots) return 1;
  const int64_t s = std::min<int64_t>({slots / tiles, kMaxSplits, (K + kGemmK - 1) / kGemmK / kMinSplitSteps});
  return int(std::max<int64_t>(s, 1));
}

// The share of one wave's CTA slots that `units` work units fill, summed over the waves they take: 1 when they fill
// every wave (448 units on 132 slots, four waves: 0.85). Past 512 tokens the fused GEMM wins only where this is high.
double gemm_wave_fill(int64_t units, int64_t slots) {
  const int64_t waves = (units + slots - 1) / slots;
  return waves > 0 ? double(units) / double(waves * slots) : 0.0;
}

int64_t scales_floats(int64_t N, int64_t K) { return (K / kGemmK) * scales_ld(N); }

// whether the output goes out through shared memory and the tensor store, which overlaps a tile's stores with the
// next tile's k steps: where some CTA takes several tiles (H100, GPU time: 4096 to 8192 tokens 0.86-0.98x the
// direct stores, 512 tokens 0.88-1.02x; with one tile per CTA there is nothing to overlap and it lost up to 11%
// at 16 tokens). Not for split-K's float32 partial products; out's rows must be 16-byte multiples
bool gemm_store_async(const void* out, int64_t M, int64_t N, int splits) {
  return splits == 1 && gemm_tiles(M, N) > gemm_slots(M) && N % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

// the tensor maps of A (M x k_red), packed W (N x K), the scale workspace and, with store_async, of out
// (M x n_out; else a copy of A's, unused). A tile reads W as 128 rows x 32 bytes or, with `trans`, 64 rows x 64
// bytes in the 64-byte swizzle, and the scales of its rows at one k step or of its two 64-column blocks in 64
// rows. False if a map cannot be encoded.
bool gemm_tensor_maps(const void* A, bool half, const uint8_t* packed, const float* scales, void* out, bool store_async,
                      int64_t M, int64_t N, int64_t K, bool trans, CUtensorMap (&maps)[4]) {
  const CUtensorMapDataType at = half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const GemmDims d(N, K, trans);
  const CUtensorMapDataType u8 = CU_TENSOR_MAP_DATA_TYPE_UINT8, f32 = CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  const bool ok =
      tensor_map_2d(&maps[0], at, A, M, d.k_red, d.k_red * 2, gemm_tokens(M), kGemmK, CU_TENSOR_MAP_SWIZZLE_128B) &&
      (trans ? tensor_map_2d(&maps[1], u8, packed, N, K / 2, K / 2, kGemmK, kGemmRows / 2, CU_TENSOR_MAP_SWIZZLE_64B) &&
                   tensor_map_2d(&maps[2], f32, scales, K / kGemmK, N, scales_ld(N) * 4, kGemmRows / kGemmK, kGemmK,
                                 CU_TENSOR_MAP_SWIZZLE_NONE)
             : tensor_map_2d(&maps[1], u8, packed, N, K / 2, K / 2, kGemmRows, kGemmK / 2, CU_TENSOR_MAP_SWIZZLE_NONE) &&
                   tensor_map_2d(&maps[2], f32, scales, K / kGemmK, N, scales_ld(N) * 4, 1, kGemmRows,
                                 CU_TENSOR_MAP_SWIZZLE_NONE));
  if (!ok) return false;
  if (!store_async) {
    maps[3] = maps[0];
    return true;
  }
  return tensor_map_2d(&maps[3], at, out, M, d.n_out, d.n_out * 2, gemm_tokens(M), 64, CU_TENSOR_MAP_SWIZZLE_128B);
}

// the (persistent) tile kernel and, with split-K, the sum of its parts; N and K here are the product's output
// features and summed length (GemmDims)
template <typename AT, int TOK, bool TRANS>
void launch_tiles(const CUtensorMap (&maps)[4], bool store_async, const Code16& code, int64_t M, int64_t N, int64_t K,
                  int splits, float* partial, const void* bias, void* out, cudaStream_t stream) {
  constexpr int CTAS = gemm_ctas_for(TOK);
  using L = GemmLayout<kGemmStages<TOK>, TOK>;
  auto kernel = gemm_4bit_kernel<AT, kGemmStages<TOK>, TOK, CTAS, TRANS>;
  static std::atomic<uint64_t> smem_set{0};
  allow_dynamic_smem(kernel, int(L::kSmem), smem_set);
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t grid = std::min<int64_t>(gemm_tiles(M, N) * splits, gemm_slots(M));
  launch_dependent(kernel, dim3(unsigned(grid)), dim3(kGemmThreads), L::kSmem, stream, maps[0], maps[1], maps[2], maps[3],
                   code, static_cast<const AT*>(bias), static_cast<AT*>(out), int(M), int(N), int(K), splits, partial,
                   store_async);
  if (splits > 1) {
    const int64_t part = M * N;
    const int64_t sum_grid = std::min<int64_t>((part + 255) / 256, 8 * sms);
    launch_dependent(gemm_splitk_sum_kernel<AT>, dim3(unsigned(sum_grid)), dim3(256), 0, stream,
                     static_cast<const float*>(partial), splits, part, N, static_cast<const AT*>(bias),
                     static_cast<AT*>(out));
  }
}

template <typename AT, bool TRANS>
void launch_typed(const CUtensorMap (&maps)[4], bool store_async, const Code16& code, int64_t M, int64_t N, int64_t K,
                  int splits, float* partial, const void* bias, void* out, cudaStream_t stream) {
  switch (gemm_tokens(M)) {
    case 32: return launch_tiles<AT, 32, TRANS>(maps, store_async, code, M, N, K, splits, partial, bias, out, stream);
    case 64: return launch_tiles<AT, 64, TRANS>(maps, store_async, code, M, N, K, splits, partial, bias, out, stream);
    case 128: return launch_tiles<AT, 128, TRANS>(maps, store_async, code, M, N, K, splits, partial, bias, out, stream);
    default: return launch_tiles<AT, 256, TRANS>(maps, store_async, code, M, N, K, splits, partial, bias, out, stream);
  }
}

}  // namespace

bool gemm_supported(FloatType dtype, int log2bs, int64_t M, int64_t N, int64_t K, bool trans) {
#if defined(FSDP4BIT_WGMMA)
  // 32-bit tile, step and coordinate arithmetic in the kernel, and K / 64 <= 65535 (the scale kernel once had it as
  // its grid.y; kept as the supported range). With `trans`, A's rows of N values must be 16-byte multiples for the
  // tensor copy
  const GemmDims d(N, K, trans);
  const int64_t tiles = gemm_tiles(M, d.n_out), ksteps = (d.k_red + kGemmK - 1) / kGemmK;
  return dtype != FloatType::kF32 && log2bs >= 6 && K > 0 && K % kGemmK == 0 && K / kGemmK <= 65535 && M >= 1 &&
         M < (int64_t(1) << 30) && N >= 1 && N < (int64_t(1) << 30) && (!trans || N % 8 == 0) &&
         tiles * ksteps < (int64_t(1) << 31) && device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
         device_attribute(cudaDevAttrComputeCapabilityMinor) == 0 && encode_tiled() != nullptr;
#else
  (void)dtype, (void)log2bs, (void)M, (void)N, (void)K, (void)trans;
  return false;
#endif
}

bool gemm_applies(FloatType dtype, int log2bs, int64_t M, int64_t N, int64_t K, bool trans) {
  // 9 to 512 tokens (fewer take the gemv), a weight large enough that the fused kernel's fixed cost (~10 us of GPU
  // time) pays: 2^22 entries up to 32 tokens, 2^23 up to 128, 2^24 up to 256, 2^25 past that, however few tiles
  // (and split-K parts) it has. H100, GPU time: 0.37-0.44x dequantize + cuBLAS at 16-128 tokens on 14336x4096,
  // 0.56-0.80x at 256-512; 0.75-0.91x for 2048x4096 at 16-128 tokens; smaller weights 1.1-2.5x (session 11).
  // Session 18's sweep (14 LLM shapes, 16-256 tokens, `bench/gemm4_rule_sweep.py --tokens 16,64,128,256`) found
  // every call above these sizes faster fused (0.24-0.92x), also those whose work units fill under 3/4 of the SMs,
  // which an earlier rule left to dequantize + cuBLAS (6144x4096 at 64-256 tokens 0.50-0.81x, 11008x4096
  // 0.39-0.70x, transposed 4096x11008 0.52-0.83x). Weights of 2^22 entries (sessions 18 and 19, `--shapes
  // 1024x4096,512x8192,2048x2048,4096x1024,8192x512`): 0.74-0.98x at 16 and 32 tokens; past that 1024x4096 was
  // 0.81x at 64 tokens, 0.97x at 128, 1.18x at 256, and 4096x1024 1.07x at 64. Of 3 M entries, 3072x1024 lost at
  // 32 tokens (1.01x, session 18).
  // 513 to 1536 tokens: a weight of 2^24 entries or more whose work units fill the waves of CTA slots to 85% or
  // more (gemm_wave_fill), and tokens that fill their 256-token tiles to 80% (up to 768 tokens) or 95% (past it);
  // there cuBLAS' faster main loop is worth less than the dequantization it needs first (H100, GPU time, 14 LLM
  // layer shapes: 0.82-1.00x where the rule takes it at 640-1536 tokens; 1.03-1.60x where the waves are less
  // full; with the last token tile partly empty 1.01-1.24x at 520, 576, 800, 1100 and 1300 tokens; at 2048 tokens
  // 0.97-1.22x, so more tokens keep dequantize + cuBLAS).
  // Transposed (input gradients), whose W loads cost more per weight: 9 to 512 tokens, 2^24 entries up to 256
  // tokens, 2^25 past that (H100, GPU time: 0.37-0.70x dequantize + cuBLAS at 16-256 tokens on 14336x4096,
  // 4096x14336, 28672x8192, 0.64-0.92x on 4096x4096, 0.88-0.94x at 512 tokens on the large three; 2048x4096
  // 0.98-1.14x, 4096x4096 at 512 tokens 1.16x; 1.00-1.67x at 640-1536 tokens).
  if (M < 9 || M > (trans ? 512 : 1536) || N < 1 || K < 1) return false;
  if (M > 512) {
    const GemmDims d(N, K, trans);
    const int64_t units = gemm_tiles(M, d.n_out) * gemm_splits(M, d.n_out, d.k_red);
    const int64_t tok = gemm_tokens(M);
    const double tile_use = double(M) / double((M + tok - 1) / tok * tok);
    return N * K >= (int64_t(1) << 24) && gemm_wave_fill(units, gemm_slots(M)) >= 0.85 &&
           tile_use >= (M <= 768 ? 0.8 : 0.95) && gemm_supported(dtype, log2bs, M, N, K, trans);
  }
  const int64_t min_weights =
      int64_t(1) << (trans ? (M <= 256 ? 24 : 25) : (M <= 32 ? 22 : M <= 128 ? 23 : M <= 256 ? 24 : 25));
  return N * K >= min_weights && gemm_supported(dtype, log2bs, M, N, K, trans);
}

int64_t gemm_workspace_floats(int64_t M, int64_t N, int64_t K, bool trans) {
  const GemmDims d(N, K, trans);
  const int splits = gemm_splits(M, d.n_out, d.k_red);
  return scales_floats(N, K) + (splits > 1 ? splits * M * d.n_out : 0);
}

bool launch_gemm(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                 bool nested, int log2bs, int64_t M, int64_t N, int64_t K, bool trans, float* workspace,
                 int64_t workspace_floats, const void* bias, void* out, cudaStream_t stream) {
  const bool half = dtype == FloatType::kF16;
  const GemmDims d(N, K, trans);
  // the split count again (the caller sized the workspace with gemm_workspace_floats()): no split-K unless the
  // partial products fit, should the two counts ever differ
  int splits = gemm_splits(M, d.n_out, d.k_red);
  if (scales_floats(N, K) + splits * M * d.n_out > workspace_floats) splits = 1;
  const bool store_async = gemm_store_async(out, M, d.n_out, splits);
  CUtensorMap maps[4];
  make_context_current();
  if (!gemm_tensor_maps(A, half, packed, workspace, out, store_async, M, N, K, trans, maps)) return false;
  const int ld = int(scales_ld(N));
  const dim3 sgrid(unsigned((N + 255) / 256), unsigned((K / kGemmK + kScaleSteps - 1) / kScaleSteps));
  if (nested)
    gemm_scales_kernel<true><<<sgrid, 256, 0, stream>>>(sc, log2bs, int(N), K, workspace, ld);
  else
    gemm_scales_kernel<false><<<sgrid, 256, 0, stream>>>(sc, log2bs, int(N), K, workspace, ld);
  float* partial = workspace + scales_floats(N, K);  // 16-byte aligned: scales_ld is a multiple of 4
  auto run = [&](auto typed) {
    typed(maps, store_async, code, M, d.n_out, d.k_red, splits, partial, bias, out, stream);
  };
  if (half)
    trans ? run(launch_typed<__half, true>) : run(launch_typed<__half, false>);
  else
    trans ? run(launch_typed<__nv_bfloat16, true>) : run(launch_typed<__nv_bfloat16, false>);
  return true;
}

}  // namespace fsdp4bit
