// Tile-shape sweep of the fused gemv, dequantize and 4-bit quantize kernels, outside torch (nvcc only), so one
// device call compares many instantiations (the CUDA-core gemv of gemv.cuh; for 1 token the row kernel of
// gemv_row.cuh, which fsdp4bit uses for K in (3072, 4096], and the pair-table one of gemv_lut.cuh, which it
// uses for other K; the tensor-core one of gemv_tma.cuh that it uses for 4 to 8 tokens).
// Each variant is checked first (gemv against a float64 host reference, dequantize and quantize byte for byte
// against host replicas of the reference), then timed as the median of CUDA-graph
// replays that rotate through enough weight sets to defeat the 50 MB L2.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -I csrc/cuda \
//        bench/cuda/sweep.cu -o /tmp/sweep && /tmp/sweep [gemv|dequantize|quantize] [variant] [shape]
// (SWEEP_SHAPES=NxK,NxK,... replaces the gemv shapes)
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gemv.cuh"
#include "gemv_tma.cuh"
#include "gemv_lut.cuh"
#include "gemv_row.cuh"
#include "dequantize.cuh"
#include "quantize.cuh"

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

static const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                               -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                               0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                               0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Optional filters (argv[2], argv[3]): run only variants / shapes whose name contains them (for ncu).
static std::string g_variant, g_shape;
// whether `name` contains one of the '|'-separated alternatives of `alts`
static bool matches(const std::string& name, const std::string& alts) {
  for (size_t start = 0;;) {
    const size_t bar = alts.find('|', start);
    if (name.find(alts.substr(start, bar == std::string::npos ? std::string::npos : bar - start)) != std::string::npos)
      return true;
    if (bar == std::string::npos) return false;
    start = bar + 1;
  }
}

static bool picked(const std::string& variant, const std::string& shape) {
  return (variant.empty() || matches(variant, g_variant)) &&
         (shape.empty() || shape.find(g_shape) != std::string::npos);
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median microseconds per call: a graph of `reps` calls (call i gets set i % sets) replayed 7 times.
static float time_us(const std::function<void(int, cudaStream_t)>& call, int sets, int reps = 20) {
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int i = 0; i < sets; ++i) call(i, s);  // warm up
  CK(cudaStreamSynchronize(s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < reps; ++i) call(i % sets, s);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < 8; ++r) {
    CK(cudaEventRecord(a, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (r) t.push_back(ms * 1000.0f / reps);
  }
  CK(cudaGetLastError());
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  return median(t);
}

__global__ void copy_kernel(const uint4* __restrict__ a, uint4* __restrict__ b, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    __stcs(b + i, __ldcs(a + i));
}

// Device-to-device copy bandwidth (bytes read + written) as the best of cudaMemcpyAsync and a 16-byte copy kernel.
__global__ void fill_kernel(uint4* __restrict__ dst, size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = make_uint4(1u, 2u, 3u, 4u);
}

__global__ void read_kernel(const uint4* __restrict__ src, size_t n, uint32_t* __restrict__ sink) {
  uint32_t acc = 0;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(src + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads alive
}

static double copy_bandwidth(int sms) {
  const size_t bytes = size_t(1) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  const float us_memcpy =
      time_us([&](int, cudaStream_t s) { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s)); }, 1, 5);
  const float us_kernel = time_us(
      [&](int, cudaStream_t s) {
        copy_kernel<<<sms * 8, 256, 0, s>>>(static_cast<const uint4*>(a), static_cast<uint4*>(b), bytes / 16);
      },
      1, 5);
  std::printf("copy 1 GiB: cudaMemcpyAsync %.3f TB/s, copy kernel %.3f TB/s\n", 2.0 * bytes / us_memcpy / 1e6,
              2.0 * bytes / us_kernel / 1e6);
  // one-direction streams, for kernels whose traffic is mostly reads (gemv) or mostly writes (dequantize)
  for (const size_t sz : {bytes, size_t(117440512), size_t(29360128), size_t(8388608)}) {
    const float us_write = time_us(
        [&](int, cudaStream_t s) { fill_kernel<<<sms * 8, 256, 0, s>>>(static_cast<uint4*>(b), sz / 16); }, 1, 5);
    const float us_read = time_us(
        [&](int, cudaStream_t s) {
          read_kernel<<<sms * 8, 256, 0, s>>>(static_cast<const uint4*>(a), sz / 16, static_cast<uint32_t*>(b));
        },
        1, 5);
    std::printf("%zu MB: write-only kernel %.3f TB/s, read-only kernel %.3f TB/s\n", sz >> 20, sz / us_write / 1e6,
                sz / us_read / 1e6);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (std::min(us_memcpy, us_kernel) * 1e-6);
}

// ------------------------------------------------------------------------- gemv
struct GemvSet {  // one random NF4 weight with double-quant statistics, blocksize 64, nested blocksize 256
  uint8_t *packed, *aq;
  float *nabs, *ncode, *off;
  bf16* A;
  bf16* out;
};

struct HostGemv {
  std::vector<uint8_t> packed, aq;
  std::vector<float> nabs, ncode;
  float off;
  std::vector<bf16> A;
};

static HostGemv make_host_gemv(int64_t M, int64_t N, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> nrm(0.0f, 1.0f);
  HostGemv h;
  const int64_t n = N * K, nb = (n + 63) / 64;
  h.packed.resize(n / 2);
  for (auto& v : h.packed) v = uint8_t(byte(rng));
  h.aq.resize(nb);
  for (auto& v : h.aq) v = uint8_t(byte(rng));
  h.nabs.resize((nb + 255) / 256);
  for (auto& v : h.nabs) v = 0.01f + 0.01f * std::fabs(nrm(rng));
  h.ncode.resize(256);
  for (int i = 0; i < 256; ++i) h.ncode[i] = -1.0f + 2.0f * i / 255.0f;
  h.off = 0.02f;
  h.A.resize(M * K);
  for (auto& v : h.A) v = __float2bfloat16(nrm(rng));
  return h;
}

template <typename T>
static T* upload(const std::vector<T>& v) {
  T* d;
  CK(cudaMalloc(&d, v.size() * sizeof(T) + 16));
  CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

static GemvSet upload_gemv(const HostGemv& h, int64_t M, int64_t N) {
  GemvSet s;
  s.packed = upload(h.packed);
  s.aq = upload(h.aq);
  s.nabs = upload(h.nabs);
  s.ncode = upload(h.ncode);
  s.off = upload(std::vector<float>{h.off});
  s.A = upload(h.A);
  CK(cudaMalloc(&s.out, M * N * sizeof(bf16)));
  return s;
}

static void free_gemv(GemvSet& s) {
  for (void* p : {(void*)s.packed, (void*)s.aq, (void*)s.nabs, (void*)s.ncode, (void*)s.off, (void*)s.A, (void*)s.out})
    cudaFree(p);
}

static Scales scales_of(const GemvSet& s) { return Scales{nullptr, s.aq, s.nabs, s.ncode, s.off, 256, 8}; }

static Code16 nf4_code() {
  Code16 c;
  std::memcpy(c.v, kNF4, sizeof(kNF4));
  return c;
}

using GemvLaunch = void (*)(const bf16*, const uint8_t*, const Code16&, const Scales&, bool, int, int64_t, int64_t,
                            bf16*, cudaStream_t);

struct GemvVariant {
  std::string name;
  int M;
  GemvLaunch fn;
  int kmod = 32;  // the kernel needs K % kmod == 0
};

// relative L2 error of the kernel against a float64 reference (float32 block scale as the kernel computes it)
static double check_gemv(const GemvVariant& v, int64_t N, int64_t K) {
  const int64_t M = v.M;
  HostGemv h = make_host_gemv(M, N, K, 7 + uint32_t(N));
  GemvSet s = upload_gemv(h, M, N);
  CK(cudaMemset(s.out, 0xff, M * N * sizeof(bf16)));  // NaN poison
  v.fn(s.A, s.packed, nf4_code(), scales_of(s), true, 6, N, K, s.out, 0);
  CK(cudaGetLastError());
  std::vector<bf16> out(M * N);
  CK(cudaMemcpy(out.data(), s.out, out.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < N; ++r) {
      double ref = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = r * K + k;
        const uint8_t byte = h.packed[e / 2];
        const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
        const float scale = h.ncode[h.aq[e / 64]] * h.nabs[e / 64 / 256] + h.off;
        ref += double(kNF4[nib]) * double(scale) * double(__bfloat162float(h.A[m * K + k]));
      }
      const double got = __bfloat162float(out[m * N + r]);
      if (!std::isfinite(got)) return INFINITY;
      num += (got - ref) * (got - ref);
      den += ref * ref;
    }
  free_gemv(s);
  return std::sqrt(num / den);
}

template <int M, int R>
static void gemv_call(const bf16* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                      int64_t N, int64_t K, bf16* o, cudaStream_t st) {
  launch_gemv<bf16, M, R>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
}

template <int M, int WARPS, int CSPANS, int STAGES, int CPS>
static void gemv_tma_call(const bf16* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                          int64_t N, int64_t K, bf16* o, cudaStream_t st) {
  launch_gemv_tma<bf16, WARPS, CSPANS, STAGES>(a, p, c, sc, nested, log2bs, M, N, K, o, nullptr, CPS, st);
}

template <int R, int WARPS, bool F16>
static void gemv_lut_call(const bf16* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                          int64_t N, int64_t K, bf16* o, cudaStream_t st) {
  launch_gemv_lut<bf16, R, WARPS, F16>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
}

// the row kernels (a in registers for K <= 4096, D = K / 1024 rounded up; a in shared memory past it) where
// their blocks fit (whole blocks of <= 1024 weights per row), else the pair-table kernel
template <int WARPS>
static void gemv_row_call(const bf16* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                          int64_t N, int64_t K, bf16* o, cudaStream_t st) {
  if (!row_blocks_whole(log2bs, K))
    launch_gemv_lut<bf16, 4, 16, true>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
  else if (K > 4096)
    launch_gemv_row_stream<bf16, WARPS>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
  else if (K > 3072)
    launch_gemv_row<bf16, WARPS, 4>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
  else if (K > 2048)
    launch_gemv_row<bf16, WARPS, 3>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
  else if (K > 1024)
    launch_gemv_row<bf16, WARPS, 2>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
  else
    launch_gemv_row<bf16, WARPS, 1>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
}

template <int P, int D>
struct PD {
  static constexpr int first = P, second = D;
};

// the row kernel with P parts per row of at most D chunk rounds each; false for a (P, D) pair it has no instance of
template <int WARPS>
static bool launch_split_pd(int P, int D, const bf16* a, const uint8_t* p, const Code16& c, const Scales& sc,
                            bool nested, int log2bs, int64_t N, int64_t K, bf16* o, cudaStream_t st) {
  auto run = [&](auto pd) {
    constexpr int kP = decltype(pd)::first, kD = decltype(pd)::second;
    launch_gemv_row<bf16, WARPS, kD, kP>(a, p, c, sc, nested, log2bs, N, K, o, nullptr, st);
    return true;
  };
  switch (P * 16 + D) {
    case 2 * 16 + 1: return run(PD<2, 1>{});
    case 2 * 16 + 2: return run(PD<2, 2>{});
    case 2 * 16 + 3: return run(PD<2, 3>{});
    case 2 * 16 + 4: return run(PD<2, 4>{});
    case 4 * 16 + 1: return run(PD<4, 1>{});
    case 4 * 16 + 2: return run(PD<4, 2>{});
    case 4 * 16 + 3: return run(PD<4, 3>{});
    case 4 * 16 + 4: return run(PD<4, 4>{});
    case 8 * 16 + 2: return run(PD<8, 2>{});
    case 8 * 16 + 3: return run(PD<8, 3>{});
    case 8 * 16 + 4: return run(PD<8, 4>{});
    default: return false;
  }
}

// The split register row kernel for K past 4096 in `scale` times the parts row_split_parts takes, at most 8 (scale 1:
// at most 4 chunk rounds per part, the library's usual rule; 2: at most 2, its rule for few rows; no variant applies
// the library's choice between them), and for K up to 4096 in `short_parts` parts (0: one part, the row kernel);
// else (K past 32768, blocks the row kernels do not take) as gemv_row_call.
template <int WARPS, int scale, int short_parts>
static void gemv_split_call(const bf16* a, const uint8_t* p, const Code16& c, const Scales& sc, bool nested, int log2bs,
                            int64_t N, int64_t K, bf16* o, cudaStream_t st) {
  int parts = 0;
  if (row_blocks_whole(log2bs, K))
    parts = K > 4096 ? (scale * row_split_parts(K) <= 8 ? scale : 1) * row_split_parts(K)
                     : (row_rounds(K) >= 2 ? short_parts : 0);
  if (parts == 0 || !launch_split_pd<WARPS>(parts, row_split_rounds(K, parts), a, p, c, sc, nested, log2bs, N, K, o, st))
    gemv_row_call<WARPS>(a, p, c, sc, nested, log2bs, N, K, o, st);
}

static void sweep_gemv(double bw) {
  const std::vector<GemvVariant> variants = {
      {"M1 row W16", 1, gemv_row_call<16>}, {"M1 row W8", 1, gemv_row_call<8>},
      {"M1 split W16", 1, gemv_split_call<16, 1, 0>}, {"M1 splitmore W16", 1, gemv_split_call<16, 2, 0>},
      {"M1 split2 W16", 1, gemv_split_call<16, 1, 2>},
      {"M1 lut R2W16", 1, gemv_lut_call<2, 16, false>}, {"M1 lut R4W16", 1, gemv_lut_call<4, 16, false>},
      {"M1 lut R4W8", 1, gemv_lut_call<4, 8, false>}, {"M1 lut R2W16h", 1, gemv_lut_call<2, 16, true>},
      {"M1 lut R4W16h", 1, gemv_lut_call<4, 16, true>}, {"M1 lut R4W8h", 1, gemv_lut_call<4, 8, true>},
      {"M1 R2", 1, gemv_call<1, 2>}, {"M1 R4", 1, gemv_call<1, 4>}, {"M1 R8", 1, gemv_call<1, 8>},
      {"M4 R2", 4, gemv_call<4, 2>}, {"M4 R4", 4, gemv_call<4, 4>}, {"M8 R2", 8, gemv_call<8, 2>},
      {"M1 tma W8C32S2c2", 1, gemv_tma_call<1, 8, 32, 2, 2>, 64},
      {"M1 tma W8C16S4c2", 1, gemv_tma_call<1, 8, 16, 4, 2>, 64},
      {"M1 tma W4C16S4c2", 1, gemv_tma_call<1, 4, 16, 4, 2>, 64},
      {"M1 tma W8C32S3c1", 1, gemv_tma_call<1, 8, 32, 3, 1>, 64},
      {"M1 tma W16C32S3c1", 1, gemv_tma_call<1, 16, 32, 3, 1>, 64},
      {"M1 tma W8C64S2c1", 1, gemv_tma_call<1, 8, 64, 2, 1>, 64},
      {"M4 tma W8C32S2c2", 4, gemv_tma_call<4, 8, 32, 2, 2>, 64},
      {"M8 tma W8C32S2c2", 8, gemv_tma_call<8, 8, 32, 2, 2>, 64},
  };
  for (const auto& v : variants) {
    if (!picked(v.name, "")) continue;
    const double e1 = check_gemv(v, 203, 4096), e2 = check_gemv(v, 37, 14336), e3 = check_gemv(v, 5, 3 * v.kmod),
                 e4 = check_gemv(v, 61, 65 * v.kmod), e5 = check_gemv(v, 29, 3136), e6 = check_gemv(v, 45, 11008),
                 e7 = check_gemv(v, 300, 1984), e8 = check_gemv(v, 5003, 4096), e9 = check_gemv(v, 4100, 8192);
    std::printf("check gemv %-15s rel err %.2e %.2e %.2e %.2e %.2e %.2e %.2e %.2e %.2e %s\n", v.name.c_str(), e1, e2, e3,
                e4, e5, e6, e7, e8, e9, std::max({e1, e2, e3, e4, e5, e6, e7, e8, e9}) < 8e-3 ? "ok" : "FAIL");
  }
  std::vector<std::array<int64_t, 2>> shapes = {{4096, 4096}, {14336, 4096}, {4096, 14336}, {8192, 8192}, {28672, 8192},
                               {4096, 11008}, {11008, 4096}, {3072, 3072}, {8192, 3072}, {2048, 2048},
                               {8192, 2048}, {1024, 1024}, {4096, 1024}, {2048, 512}, {5120, 13824}, {8192, 28672},
                               {3584, 18944}, {5120, 27648}, {8192, 22016}, {4096, 16384}, {4096, 12288},
                               {4096, 7168}, {4096, 6144}, {4096, 5120}, {5120, 5120}, {2048, 8192},
                               {1024, 8192}, {3072, 8192}, {4096, 8192}, {6144, 8192}, {2048, 7168}, {8192, 7168},
                               {1536, 8960}, {2304, 9216}, {2048, 11008}, {1024, 14336}, {2048, 14336}, {896, 4864},
                               {1024, 5120}, {2048, 6144}, {1536, 5120}, {3072, 6144}};
  if (const char* env = std::getenv("SWEEP_SHAPES")) {  // "NxK,NxK,...": these shapes instead
    shapes.clear();
    for (const char* c = env; *c != '\0';) {
      char* end = nullptr;
      const int64_t N = std::strtoll(c, &end, 10), K = std::strtoll(end + 1, &end, 10);
      shapes.push_back({N, K});
      c = *end == ',' ? end + 1 : end;
    }
  }
  std::printf("\n%-14s %-15s %9s %8s\n", "shape", "variant", "us", "floor%");
  for (const auto& sh : shapes) {
    const int64_t N = sh[0], K = sh[1], n = N * K;
    if (!picked("", std::to_string(N) + "x" + std::to_string(K))) continue;
    const double bytes = n / 2 + n / 64 + 4.0 * (n / 64 / 256) + 2.0 * 8 * K + 2.0 * 8 * N;
    const int sets = int(std::max<int64_t>(2, (200LL << 20) / (n / 2)));
    std::vector<GemvSet> ss;
    for (int i = 0; i < sets; ++i) ss.push_back(upload_gemv(make_host_gemv(8, N, K, 100 + i), 8, N));
    for (const auto& v : variants) {
      if (!picked(v.name, "")) continue;
      const float us = time_us(
          [&](int i, cudaStream_t st) {
            v.fn(ss[i].A, ss[i].packed, nf4_code(), scales_of(ss[i]), true, 6, N, K, ss[i].out, st);
          },
          sets);
      const double floor_us = (bytes - 2.0 * 7 * K - 2.0 * 7 * N + 2.0 * (v.M - 1) * (K + N)) / bw * 1e6;
      std::printf("%-14s %-15s %9.2f %7.0f%%\n", (std::to_string(N) + "x" + std::to_string(K)).c_str(), v.name.c_str(), us,
                  100.0 * floor_us / us);
    }
    for (auto& s : ss) free_gemv(s);
  }
}

// ------------------------------------------------------------------------- dequantize
using DequantLaunch = void (*)(const GemvSet&, int64_t, int, cudaStream_t);

static void dequant_call(const GemvSet& s, int64_t n, int, cudaStream_t st) {
  static const float* code = upload(std::vector<float>(kNF4, kNF4 + 16));
  dequantize_kernel<bf16, true><<<dequantize_grid(n), kDequantThreads, 0, st>>>(s.packed, n, code, scales_of(s), 6,
                                                                                  true, s.out);
}

struct DequantVariant {
  std::string name;
  DequantLaunch fn;
};

// bit-exact against the host: bf16(code[nibble] * (ncode[q] * nested_absmax + offset)), every element written
static bool check_dequant(const DequantVariant& v, int64_t N, int64_t K, int sms) {
  const int64_t n = N * K;
  HostGemv h = make_host_gemv(1, N, K, 11 + uint32_t(n));
  GemvSet s = upload_gemv(h, 1, 1);
  CK(cudaFree(s.out));
  CK(cudaMalloc(&s.out, n * sizeof(bf16)));
  CK(cudaMemset(s.out, 0xff, n * sizeof(bf16)));
  v.fn(s, n, sms, 0);
  CK(cudaGetLastError());
  std::vector<bf16> out(n);
  CK(cudaMemcpy(out.data(), s.out, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  free_gemv(s);
  for (int64_t e = 0; e < n; ++e) {
    const uint8_t byte = h.packed[e / 2];
    const int nib = (e & 1) ? (byte & 15) : (byte >> 4);
    const volatile float prod = h.ncode[h.aq[e / 64]] * h.nabs[e / 64 / 256];
    const volatile float scale = prod + h.off;
    const bf16 ref = __float2bfloat16(kNF4[nib] * scale);
    if (std::memcmp(&ref, &out[e], 2)) {
      std::printf("  %lldx%lld: first mismatch at %lld\n", (long long)N, (long long)K, (long long)e);
      return false;
    }
  }
  return true;
}

static void sweep_dequant(double bw, int sms) {
  const std::vector<DequantVariant> variants = {
      {"kernel", dequant_call},
  };
  for (const auto& v : variants) {
    if (!picked(v.name, "")) continue;
    const bool ok = check_dequant(v, 203, 4096, sms) && check_dequant(v, 1, 4104, sms) && check_dequant(v, 4096, 4096, sms);
    std::printf("check dequantize %-8s %s\n", v.name.c_str(), ok ? "ok (bit-exact)" : "FAIL");
  }
  const int64_t shapes[][2] = {{4096, 4096}, {14336, 4096}, {8192, 8192}, {28672, 8192}};
  std::printf("\n%-14s %-8s %9s %8s\n", "shape", "variant", "us", "floor%");
  for (const auto& sh : shapes) {
    const int64_t N = sh[0], K = sh[1], n = N * K;
    if (!picked("", std::to_string(N) + "x" + std::to_string(K))) continue;
    const double bytes = n / 2 + n / 64 + 4.0 * (n / 64 / 256) + 2.0 * n;
    const int sets = int(std::max<int64_t>(2, (200LL << 20) / (n / 2)));
    std::vector<GemvSet> ss;
    for (int i = 0; i < sets; ++i) {
      ss.push_back(upload_gemv(make_host_gemv(1, N, K, 300 + i), 1, 1));
      CK(cudaFree(ss.back().out));
      CK(cudaMalloc(&ss.back().out, n * sizeof(bf16)));
    }
    for (const auto& v : variants) {
      if (!picked(v.name, "")) continue;
      const float us = time_us([&](int i, cudaStream_t st) { v.fn(ss[i], n, sms, st); }, sets);
      std::printf("%-14s %-8s %9.2f %7.0f%%\n", (std::to_string(N) + "x" + std::to_string(K)).c_str(), v.name.c_str(), us,
                  100.0 * bytes / bw * 1e6 / us);
    }
    for (auto& s : ss) free_gemv(s);
  }
}

// ------------------------------------------------------------------------- quantize
struct QTab {
  QuantTables tab;
};

static QuantTables nf4_tables() {
  QuantTables t{};  // code_out null: the sweep wants no code copy
  for (int i = 0; i < 15; ++i) t.mids[i] = (kNF4[i] + kNF4[i + 1]) / 2.0f;
  t.mids[15] = 2.0f;
  for (int i = 0; i < 16; ++i) t.enc[i] = uint8_t(i);
  return t;
}

// FP4 as codebooks.quantize_bounds builds it: midpoints of the sorted code, enc = the sort order
static QuantTables fp4_tables() {
  const float code[16] = {0.0f, 0.0052083334885537624f, 0.6666666865348816f, 1.0f, 0.3333333432674408f, 0.5f,
                          0.1666666716337204f, 0.25f, -0.0f, -0.0052083334885537624f, -0.6666666865348816f, -1.0f,
                          -0.3333333432674408f, -0.5f, -0.1666666716337204f, -0.25f};
  const uint8_t order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
  QuantTables t{};  // code_out null: the sweep wants no code copy
  for (int i = 0; i < 15; ++i) t.mids[i] = (code[order[i]] + code[order[i + 1]]) / 2.0f;
  t.mids[15] = 2.0f;
  for (int i = 0; i < 16; ++i) t.enc[i] = order[i];
  return t;
}

// host replica of reference.quantize_4bit (full blocks: x * (1 / clamped); short last block: x / clamped)
static void host_quantize(const std::vector<bf16>& x, int bs, const QuantTables& t, std::vector<uint8_t>& packed,
                          std::vector<float>& absmax) {
  const int64_t n = x.size(), nb = (n + bs - 1) / bs;
  packed.assign((n + 1) / 2, 0);
  absmax.assign(nb, 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t s0 = b * bs, s1 = std::min(n, s0 + bs);
    float m = 0.0f;
    bool nan = false;
    for (int64_t e = s0; e < s1; ++e) {
      const float v = std::fabs(__bfloat162float(x[e]));
      if (std::isnan(v)) nan = true;
      m = std::max(m, v);
    }
    const float amax = nan ? NAN : m;
    const float clamped = nan ? amax : std::max(amax, 1e-38f);
    const bool tail = s1 - s0 < bs;
    absmax[b] = tail ? clamped : amax;
    const volatile float inv = 1.0f / clamped;
    for (int64_t e = s0; e < s1; ++e) {
      const float xv = __bfloat162float(x[e]);
      const volatile float s = tail ? xv / clamped : xv * inv;
      int q = 0;
      for (int i = 0; i < 15; ++i) q += !(s <= t.mids[i]);
      q = t.enc[q];
      packed[e / 2] |= uint8_t((e & 1) ? q : q << 4);
    }
  }
  if (n & 1) {  // the zero pad of an odd length is quantized too (0.0 -> the bucket of zero)
    int q = 0;
    for (int i = 0; i < 15; ++i) q += !(0.0f <= t.mids[i]);
    packed[n / 2] |= uint8_t(t.enc[q]);
  }
}

using QuantLaunch = void (*)(const bf16*, int64_t, uint8_t*, float*, int64_t, cudaStream_t);

// cap: the grid's CTA cap, or < 0 for one wave (what fits on the GPU at once)
template <int P, bool FP4, int BPU, int PFD = 0>
static void quant_call(const bf16* x, int64_t n, uint8_t* out, float* absmax, int64_t cap, cudaStream_t st) {
  const int64_t nb = (n + 63) / 64;
  auto kernel = quantize_kernel<bf16, 64, P, BPU, PFD>;
  if (cap < 0) cap = one_wave(kernel, kQuantThreads);
  kernel<<<quantize_grid<64, P>(nb, cap), kQuantThreads, 0, st>>>(x, n, nb, FP4 ? fp4_tables() : nf4_tables(), !FP4,
                                                                  true, out, absmax);
}

// the shipped launcher: quantize_bulk_kernel over whole tiles, quantize_kernel for the rest
template <bool FP4>
static void quant_bulk_call(const bf16* x, int64_t n, uint8_t* out, float* absmax, int64_t, cudaStream_t st) {
  launch_quantize_blocks<bf16, 64, FP4 ? 512 : 16>(x, n, FP4 ? fp4_tables() : nf4_tables(), !FP4, true, out, absmax,
                                                   st);
}

struct QuantVariant {
  std::string name;
  QuantLaunch fn;
  int ctas_per_sm;  // grid cap in CTAs per SM; < 0: one wave (what fits on the GPU at once)
};

static bool check_quant(const QuantVariant& v, int64_t n, int sms) {
  std::mt19937 rng{static_cast<uint32_t>(n)};
  std::normal_distribution<float> nrm(0.0f, 1.0f);
  std::vector<bf16> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = __float2bfloat16(nrm(rng) * (i % 977 == 0 ? 1e30f : 1.0f));
  for (int64_t i = 0; i < std::min<int64_t>(n, 64); ++i) x[i] = __float2bfloat16(0.0f);  // an all-zero block
  if (n > 200) x[130] = __float2bfloat16(NAN), x[200] = __float2bfloat16(INFINITY);
  if (n > 384) {  // a block with absmax 1: signed zeros, tiny values, FP4 midpoints, bin edges (+-2^-10 ...)
    const float special[] = {1.0f, -0.0f, 1e-30f, -1e-30f, 0.0859375f, -0.0859375f, 0.0009765625f, -0.0009765625f,
                             0.0029296875f, -0.0029296875f, 0.5f, -0.5f, 0.25f, -0.25f, 0.998046875f, -1.0f};
    for (int i = 0; i < 64; ++i) x[320 + i] = __float2bfloat16(special[i % 16] * (i < 16 ? 1.0f : 1.0f - i / 128.0f));
    x[320] = __float2bfloat16(1.0f);
  }
  std::vector<uint8_t> ref_p;
  std::vector<float> ref_a;
  host_quantize(x, 64, v.name.find("fp4") != std::string::npos ? fp4_tables() : nf4_tables(), ref_p, ref_a);
  bf16* dx = upload(x);
  uint8_t* dp;
  float* da;
  CK(cudaMalloc(&dp, ref_p.size() + 16));
  CK(cudaMalloc(&da, ref_a.size() * 4));
  CK(cudaMemset(dp, 0xa5, ref_p.size()));
  CK(cudaMemset(da, 0xff, ref_a.size() * 4));
  v.fn(dx, n, dp, da, int64_t(sms) * v.ctas_per_sm, 0);
  CK(cudaGetLastError());
  std::vector<uint8_t> p(ref_p.size());
  std::vector<float> a(ref_a.size());
  CK(cudaMemcpy(p.data(), dp, p.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(a.data(), da, a.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(dp);
  cudaFree(da);
  for (size_t i = 0; i < p.size(); ++i)
    if (p[i] != ref_p[i]) {
      std::printf("  n=%lld: first packed mismatch at byte %zu: %02x, reference %02x\n", (long long)n, i, p[i], ref_p[i]);
      return false;
    }
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &ref_a[i], 4)) {
      std::printf("  n=%lld: first absmax mismatch at block %zu: %g, reference %g\n", (long long)n, i, a[i], ref_a[i]);
      return false;
    }
  return true;
}

static void sweep_quantize(double bw, int sms) {
  std::vector<QuantVariant> variants;
  variants.push_back({"P2 cps16 b512", quant_call<2, false, 512>, 16});
  variants.push_back({"P2 wave b512", quant_call<2, false, 512>, -1});
  variants.push_back({"P2 cps16 b16", quant_call<2, false, 16>, 16});
  variants.push_back({"P2 wave b16", quant_call<2, false, 16>, -1});
  variants.push_back({"P4 wave b16", quant_call<4, false, 16>, -1});
  variants.push_back({"P2 wave fp4", quant_call<2, true, 512>, -1});
  variants.push_back({"P2 wave b16 pf1", quant_call<2, false, 16, 1>, -1});
  variants.push_back({"P2 wave b16 pf2", quant_call<2, false, 16, 2>, -1});
  variants.push_back({"P4 wave b16 pf1", quant_call<4, false, 16, 1>, -1});
  variants.push_back({"P2 wave fp4 pf1", quant_call<2, true, 512, 1>, -1});
  variants.push_back({"bulk b16", quant_bulk_call<false>, -1});
  variants.push_back({"bulk fp4", quant_bulk_call<true>, -1});
  for (const auto& v : variants) {
    if (!picked(v.name, "")) continue;
    const bool ok = check_quant(v, 4096 * 4096 + 64 * 3 + 37, sms) && check_quant(v, 1001, sms);
    std::printf("check quantize %-14s %s\n", v.name.c_str(), ok ? "ok (bit-exact)" : "FAIL");
  }
  const int64_t shapes[][2] = {{4096, 4096}, {14336, 4096}, {8192, 8192}, {28672, 8192}};
  std::printf("\n%-14s %-14s %9s %8s\n", "shape", "variant", "us", "floor%");
  for (const auto& sh : shapes) {
    const int64_t n = sh[0] * sh[1];
    if (!picked("", std::to_string(sh[0]) + "x" + std::to_string(sh[1]))) continue;
    const double bytes = 2.0 * n + n / 2 + 4.0 * (n / 64);
    const int sets = int(std::max<int64_t>(2, (200LL << 20) / (2 * n)));
    std::vector<bf16*> xs;
    std::mt19937 rng(1);
    std::normal_distribution<float> nrm(0.0f, 1.0f);
    std::vector<bf16> hx(n);
    for (auto& v : hx) v = __float2bfloat16(nrm(rng));
    for (int i = 0; i < sets; ++i) xs.push_back(upload(hx));
    uint8_t* dp;
    float* da;
    CK(cudaMalloc(&dp, n / 2 + 16));
    CK(cudaMalloc(&da, n / 64 * 4));
    for (const auto& v : variants) {
      if (!picked(v.name, "")) continue;
      const float us =
          time_us([&](int i, cudaStream_t st) { v.fn(xs[i], n, dp, da, int64_t(sms) * v.ctas_per_sm, st); }, sets);
      std::printf("%-14s %-14s %9.2f %7.0f%%\n", (std::to_string(sh[0]) + "x" + std::to_string(sh[1])).c_str(),
                  v.name.c_str(), us, 100.0 * bytes / bw * 1e6 / us);
    }
    for (auto* p : xs) cudaFree(p);
    cudaFree(dp);
    cudaFree(da);
  }
}

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "all";
  g_variant = argc > 2 ? argv[2] : "";
  g_shape = argc > 3 ? argv[3] : "";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const double bw = copy_bandwidth(prop.multiProcessorCount);
  std::printf("%s, %d SMs, copy bandwidth %.3f TB/s\n", prop.name, prop.multiProcessorCount, bw / 1e12);
  if (what == "all" || what == "gemv") sweep_gemv(bw);
  if (what == "all" || what == "dequantize") sweep_dequant(bw, prop.multiProcessorCount);
  if (what == "all" || what == "quantize") sweep_quantize(bw, prop.multiProcessorCount);
  return 0;
}
