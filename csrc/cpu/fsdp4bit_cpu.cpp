// fsdp4bit CPU kernels: blockwise 4-bit quantize / dequantize / fused gemv.
//
// Bit-exact with fsdp4bit/reference.py. Every float32 operation the reference performs is performed
// here in the same order (built with -ffp-contract=off so no multiply-add is fused):
//   full block : s = x * (1 / max(absmax, 1e-38))     short last block : s = x / max(absmax, 1e-38)
//   code index = number of midpoints strictly below s (NaN -> 15), mapped through `enc` (FP4 order)
//   dequantize : code[nibble] * absmax[block], one round-to-nearest-even cast to the output dtype.
// Work is split over quantization blocks with at::parallel_for (OpenMP inside torch).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>
#include <cstring>

#include "host_ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FSDP4BIT_AVX512 1
#elif defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define FSDP4BIT_AVX2 1  // the gemv's 8-wide decode and dot
#endif

namespace {

constexpr float kTiny = 1e-38f;  // float32 rounding of the reference's 1e-38 (a subnormal)
constexpr int kMaxBlock = 4096;

// Large fresh outputs: ask for transparent huge pages before the first touch. A new 32 MB buffer
// otherwise costs ~8k page faults, several times the dequantization itself. Only a hint: without
// THP (or on other systems) nothing changes.
void advise_huge_pages(void* ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)nbytes;
#endif
}

// ---------------------------------------------------------------- conversions to float32
inline void to_f32(const float* x, int64_t n, float* out) { std::memcpy(out, x, n * sizeof(float)); }

inline void to_f32(const c10::BFloat16* x, int64_t n, float* out) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < n; ++i) o[i] = uint32_t(u[i]) << 16;  // exact, vectorises
}

inline void to_f32(const c10::Half* x, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));  // exact (every half is a float)
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// ---------------------------------------------------------------- float32 -> output dtype (RNE)
template <typename T> inline T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline c10::BFloat16 from_f32<c10::BFloat16>(float v) { return c10::BFloat16(v); }  // RNE, NaN kept
template <> inline c10::Half from_f32<c10::Half>(float v) { return c10::Half(v); }                 // RNE

// ---------------------------------------------------------------- quantize
struct QuantTables {
  float mids[15];   // sorted midpoints between code values (exact float32 from codebooks.quantize_bounds)
  uint8_t enc[16];  // bucket index -> 4-bit code (identity for NF4, argsort order for FP4)
  bool identity;
};

// Bucket index of one scaled value: count of midpoints strictly below it; NaN compares false with
// everything, so !(s <= m) counts it past every midpoint -> 15, as torch.bucketize does.
inline uint8_t bucket(float s, const float* mids) {
  int c = 0;
  for (int j = 0; j < 15; ++j) c += !(s <= mids[j]);
  return static_cast<uint8_t>(c);
}

// max |x| over a block with NaN propagating: on the bits of |x|, integer order is float order and
// every NaN is above +Inf. Returns the canonical quiet NaN when any element is NaN.
inline float block_absmax(const float* v, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(v);
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, u[i] & 0x7fffffffu);
  if (m > 0x7f800000u) return std::numeric_limits<float>::quiet_NaN();
  float r;
  std::memcpy(&r, &m, 4);
  return r;
}

inline float clamp_tiny(float a) { return std::isnan(a) ? a : std::max(a, kTiny); }

template <typename T>
void quantize_impl(const T* x, int64_t n, int64_t bs, const QuantTables& tab, uint8_t* out, float* absmax) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t grain = std::max<int64_t>(1, 16384 / bs);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float buf[kMaxBlock];
    alignas(64) uint8_t q[kMaxBlock + 2];
    float mids[15];
    std::memcpy(mids, tab.mids, sizeof(mids));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs;
      const int64_t len = std::min(bs, n - start);
      to_f32(x + start, len, buf);
      const float amax = block_absmax(buf, len);
      if (len == bs) {
        const float inv = 1.0f / clamp_tiny(amax);
        absmax[b] = amax;
        for (int64_t i = 0; i < len; ++i) {
          const float s = buf[i] * inv;
          int c = 0;
          for (int j = 0; j < 15; ++j) c += !(s <= mids[j]);
          q[i] = static_cast<uint8_t>(c);
        }
      } else {  // short last block: stores the clamped max and divides
        const float tmax = clamp_tiny(amax);
        absmax[b] = tmax;
        for (int64_t i = 0; i < len; ++i) q[i] = bucket(buf[i] / tmax, mids);
      }
      q[len] = bucket(0.0f, mids);  // zero pad of an odd total length (after scaling, as the reference)
      const int64_t nbytes = (len + 1) / 2;
      if (!tab.identity)
        for (int64_t i = 0; i < 2 * nbytes; ++i) q[i] = tab.enc[q[i]];
      uint8_t* o = out + start / 2;
      for (int64_t j = 0; j < nbytes; ++j) o[j] = static_cast<uint8_t>((q[2 * j] << 4) | q[2 * j + 1]);
    }
  });
}

// ---------------------------------------------------------------- 8-bit blockwise quantize (double quant)
// d = a - offset; full block: s = d * (1 / max(absmax, 1e-38)), short last block: s = d / max(absmax, 1e-38);
// q = number of the 255 midpoints (code[i] + code[i + 1]) / 2 strictly below clamp(s, -1, 1) (NaN -> 255).
inline uint8_t bucket256(float s, const float* mids) {
  int c = 0;
  for (int k = 128; k > 0; k >>= 1) c += !(s <= mids[c + k - 1]) ? k : 0;  // binary search, NaN -> 255
  return static_cast<uint8_t>(c);
}

inline float clamp_unit(float s) { return std::isnan(s) ? s : std::min(std::max(s, -1.0f), 1.0f); }

void quantize_blockwise_impl(const float* a, int64_t n, int64_t bs, const float* code, const float* offset,
                             uint8_t* q, float* absmax) {
  float mids[255];
  for (int i = 0; i < 255; ++i) mids[i] = (code[i] + code[i + 1]) * 0.5f;  // == torch's (c0 + c1) / 2
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t grain = std::max<int64_t>(1, 16384 / bs);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(std::min(bs, n)));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs;
      const int64_t len = std::min(bs, n - start);
      for (int64_t i = 0; i < len; ++i) buf[i] = offset ? a[start + i] - *offset : a[start + i];
      const float amax = block_absmax(buf.data(), len);
      const float clamped = clamp_tiny(amax);
      uint8_t* o = q + start;
      if (len == bs) {
        const float inv = 1.0f / clamped;
        absmax[b] = amax;
        for (int64_t i = 0; i < len; ++i) o[i] = bucket256(clamp_unit(buf[i] * inv), mids);
      } else {  // short last block: stores the clamped max and divides
        absmax[b] = clamped;
        for (int64_t i = 0; i < len; ++i) o[i] = bucket256(clamp_unit(buf[i] / clamped), mids);
      }
    }
  });
}

// Pairwise float64 sum of a[lo, lo + len) (len a power of two) with the values past n read as +0.0: the tree of
// reference.absmax_mean, whose levels add element 2i and 2i + 1. Subtrees of 16 leaves are summed in place.
double tree_sum(const float* a, int64_t n, int64_t lo, int64_t len) {
  if (lo >= n) return 0.0;  // only padding: a tree of +0.0 leaves
  if (len <= 16) {
    double v[16];
    for (int64_t i = 0; i < len; ++i) v[i] = lo + i < n ? static_cast<double>(a[lo + i]) : 0.0;
    for (int64_t w = len; w > 1; w /= 2)
      for (int64_t i = 0; i < w / 2; ++i) v[i] = v[2 * i] + v[2 * i + 1];
    return v[0];
  }
  return tree_sum(a, n, lo, len / 2) + tree_sum(a, n, lo + len / 2, len / 2);
}

// double quant's offset: float32((tree sum + 0.0) / n), NaN for no values (reference.absmax_mean)
float absmax_mean(const float* a, int64_t n) {
  if (n == 0) return std::numeric_limits<float>::quiet_NaN();
  int64_t p = 1;
  while (p < n) p *= 2;
  return static_cast<float>((tree_sum(a, n, 0, p) + 0.0) / static_cast<double>(n));
}

// ---------------------------------------------------------------- per-block float32 scale
struct Scales {
  const float* absmax_f = nullptr;  // plain float32 absmax
  const uint8_t* absmax_q = nullptr;  // double quant: 8-bit codes ...
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.0f;
  int64_t nested_bs = 256;

  inline float operator()(int64_t b) const {
    if (absmax_q == nullptr) return absmax_f[b];
    const float v = nested_code[absmax_q[b]] * nested_absmax[b / nested_bs];  // product, then add
    return v + offset;
  }
};

// ---------------------------------------------------------------- dequantize
// One block's 16 output values (code * scale, cast once) serve as a lookup table for its bytes.
template <typename T>
inline void dequant_bytes_scalar(const uint8_t* p, int64_t nbytes, const T* lut, T* o) {
  for (int64_t j = 0; j < nbytes; ++j) {
    const uint8_t v = p[j];
    o[2 * j] = lut[v >> 4];
    o[2 * j + 1] = lut[v & 15];
  }
}

#ifdef FSDP4BIT_AVX512
// 16 packed bytes -> 32 16-bit outputs with one vpermw against the 16-entry table.
inline void dequant_bytes_16bit(const uint8_t* p, int64_t nbytes, const uint16_t* lut, uint16_t* o) {
  const __m512i table = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut)));
  const __m512i lo_mask = _mm512_set1_epi32(0x0f);
  int64_t j = 0;
  for (; j + 16 <= nbytes; j += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
    // dword = hi nibble (first element, low half) | lo nibble << 16 (second element)
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, lo_mask), 16));
    _mm512_storeu_si512(o + 2 * j, _mm512_permutexvar_epi16(idx, table));
  }
  for (; j < nbytes; ++j) {
    o[2 * j] = lut[p[j] >> 4];
    o[2 * j + 1] = lut[p[j] & 15];
  }
}

inline void dequant_bytes_32bit(const uint8_t* p, int64_t nbytes, const float* lut, float* o) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i lo_mask = _mm512_set1_epi32(0x0f);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int64_t j = 0;
  for (; j + 16 <= nbytes; j += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, lo_mask), table);
    _mm512_storeu_ps(o + 2 * j, _mm512_permutex2var_ps(hi, first, lo));
    _mm512_storeu_ps(o + 2 * j + 16, _mm512_permutex2var_ps(hi, second, lo));
  }
  for (; j < nbytes; ++j) {
    o[2 * j] = lut[p[j] >> 4];
    o[2 * j + 1] = lut[p[j] & 15];
  }
}
#endif

template <typename T>
inline void dequant_bytes(const uint8_t* p, int64_t nbytes, const T* lut, T* o) {
#ifdef FSDP4BIT_AVX512
  if constexpr (sizeof(T) == 2) {
    dequant_bytes_16bit(p, nbytes, reinterpret_cast<const uint16_t*>(lut), reinterpret_cast<uint16_t*>(o));
    return;
  } else {
    dequant_bytes_32bit(p, nbytes, reinterpret_cast<const float*>(lut), reinterpret_cast<float*>(o));
    return;
  }
#endif
  dequant_bytes_scalar(p, nbytes, lut, o);
}

template <typename T>
void dequantize_impl(const uint8_t* packed, const Scales& sc, const float* code, int64_t n, int64_t bs, T* out) {
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t grain = std::max<int64_t>(1, 32768 / bs);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) T lut[16];
    for (int64_t b = b0; b < b1; ++b) {
      const float s = sc(b);
      for (int i = 0; i < 16; ++i) lut[i] = from_f32<T>(code[i] * s);
      const int64_t start = b * bs;
      const int64_t len = std::min(bs, n - start);
      const int64_t pairs = len / 2;
      dequant_bytes(packed + start / 2, pairs, lut, out + start);
      if (len & 1) out[start + len - 1] = lut[packed[(start + len - 1) / 2] >> 4];
    }
  });
}

// ---------------------------------------------------------------- gemv: out[m, n] = sum_k A[m, k] W[n, k] + bias[n]
// Each output row n decodes its K weights to float32 (code * block scale: exactly the dequantized float32 value) and
// dots them with the float32 rows of A; the bias (float32, or null) joins the float32 sum, before the one rounding to
// A's dtype. With AVX2 the weights are decoded 8 at a time straight into the dots of up to 4 rows of A (more rows:
// the row decoded again per 4, from L1); without it, once into an L1-sized buffer that each row of A is dotted with
// (a loop the compiler vectorizes). NOTES.md has the timings.

#ifdef FSDP4BIT_AVX2
// the 8 weights of 4 packed bytes from the block's 16-value table (lo: values 0-7, hi: 8-15): one variable shift per
// lane moves weight i's nibble to the bottom of lane i (weight 2j is byte j's high nibble), two 8-entry permutes look
// up both halves and the nibble's bit 3, shifted to the sign, picks between them
inline __m256 decode8(const uint8_t* p, __m256 lo, __m256 hi) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)),
                                                         _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24)),
                                       _mm256_set1_epi32(15));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline float hsum(__m256 v) {
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#endif

// Weights [e, end) of the packed stream (any start and end: a row may begin or end inside a byte or a block), each
// code[nibble] * its block's scale in float32, handed to `sink` numbered from 0 at weight e: one at a time, or
// (AVX2) 8 or 16 at a time
template <typename Sink>
inline void decode_weights(const uint8_t* packed, const Scales& sc, const float* code, int64_t bs, int64_t e,
                           int64_t end, Sink& sink) {
  const int64_t shift = -e;  // weight e goes to k = 0
  float lut[16];
#ifdef FSDP4BIT_AVX2
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
#endif
  while (e < end) {
    const int64_t b = e / bs;
    const int64_t seg_end = std::min(end, (b + 1) * bs);
    const float s = sc(b);
#ifdef FSDP4BIT_AVX2
    const __m256 lo = _mm256_mul_ps(code_lo, _mm256_set1_ps(s)), hi = _mm256_mul_ps(code_hi, _mm256_set1_ps(s));
    if ((e & 1) != 0 || (seg_end - e) % 8 != 0) {  // single weights at the segment's ends use the same products
      _mm256_storeu_ps(lut, lo);
      _mm256_storeu_ps(lut + 8, hi);
    }
    if (e & 1) sink.one(e + shift, lut[packed[e >> 1] & 15]), ++e;
    for (; e + 16 <= seg_end; e += 16)
      sink.eight(e + shift, decode8(packed + (e >> 1), lo, hi), decode8(packed + (e >> 1) + 4, lo, hi));
    if (e + 8 <= seg_end) sink.eight(e + shift, decode8(packed + (e >> 1), lo, hi)), e += 8;
#else
    for (int i = 0; i < 16; ++i) lut[i] = code[i] * s;
    if (e & 1) sink.one(e + shift, lut[packed[e >> 1] & 15]), ++e;
#endif
    for (; e + 1 < seg_end; e += 2) {
      const uint8_t v = packed[e >> 1];
      sink.one(e + shift, lut[v >> 4]);
      sink.one(e + 1 + shift, lut[v & 15]);
    }
    if (e < seg_end) sink.one(e + shift, lut[packed[e >> 1] >> 4]), ++e;
  }
}

#ifdef FSDP4BIT_AVX2
// The dots of R rows of A (K apart) with one decoded weight row
template <int R>
struct DotWeights {
  static constexpr int C = R == 1 ? 2 : 1;  // FMA chains per row of A (an FMA's latency is 4 cycles)
  const float* a;
  int64_t K;
  __m256 acc[R][C];
  float tail[R] = {};
  DotWeights(const float* a_, int64_t K_) : a(a_), K(K_) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  }
  void one(int64_t k, float v) {
    for (int r = 0; r < R; ++r) tail[r] += v * a[r * K + k];
  }
  void eight(int64_t k, __m256 v0, __m256 v1) {
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(a + r * K + k), acc[r][0]);
      acc[r][C - 1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(a + r * K + k + 8), acc[r][C - 1]);
    }
  }
  void eight(int64_t k, __m256 v) {
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(a + r * K + k), acc[r][0]);
  }
  float sum(int r) const { return hsum(C == 2 ? _mm256_add_ps(acc[r][0], acc[r][C - 1]) : acc[r][0]) + tail[r]; }
};

// weight row n against R rows of A from `a`, into the R outputs of column n from `out` (rows N apart)
template <int R>
inline void gemv_row_rows(const float* a, const uint8_t* packed, const Scales& sc, const float* code, int64_t n,
                          int64_t N, int64_t K, int64_t bs, const float* bias, float* out) {
  DotWeights<R> dot(a, K);
  decode_weights(packed, sc, code, bs, n * K, (n + 1) * K, dot);
  for (int r = 0; r < R; ++r) out[r * N + n] = bias != nullptr ? dot.sum(r) + bias[n] : dot.sum(r);
}

void gemv_impl(const float* a, int64_t M, const uint8_t* packed, const Scales& sc, const float* code, int64_t N,
               int64_t K, int64_t bs, const float* bias, float* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; m += 4) {
        const float* am = a + m * K;
        float* om = out + m * N;
        switch (std::min<int64_t>(M - m, 4)) {
          case 1: gemv_row_rows<1>(am, packed, sc, code, n, N, K, bs, bias, om); break;
          case 2: gemv_row_rows<2>(am, packed, sc, code, n, N, K, bs, bias, om); break;
          case 3: gemv_row_rows<3>(am, packed, sc, code, n, N, K, bs, bias, om); break;
          default: gemv_row_rows<4>(am, packed, sc, code, n, N, K, bs, bias, om); break;
        }
      }
  });
}
#else
struct StoreWeights {
  float* w;
  void one(int64_t k, float v) { w[k] = v; }
};

void gemv_impl(const float* a, int64_t M, const uint8_t* packed, const Scales& sc, const float* code, int64_t N,
               int64_t K, int64_t bs, const float* bias, float* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    std::vector<float> w(K);
    for (int64_t n = n0; n < n1; ++n) {
      StoreWeights store{w.data()};
      decode_weights(packed, sc, code, bs, n * K, (n + 1) * K, store);
      for (int64_t m = 0; m < M; ++m) {
        const float* ar = a + m * K;
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
          for (int l = 0; l < 16; ++l) acc[l] += w[k + l] * ar[k + l];
        float sum = 0.0f;
        for (; k < K; ++k) sum += w[k] * ar[k];
        for (int l = 0; l < 16; ++l) sum += acc[l];
        out[m * N + n] = bias != nullptr ? sum + bias[n] : sum;
      }
    }
  });
}
#endif

// ---------------------------------------------------------------- argument checks
void check_blocksize(int64_t bs, const char* name) {
  TORCH_CHECK(bs >= 32 && bs <= kMaxBlock && (bs & (bs - 1)) == 0, name, " must be a power of two in [32, 4096], got ",
              bs);
}

QuantTables make_tables(const torch::Tensor& mids, const torch::Tensor& enc) {
  TORCH_CHECK(mids.device().is_cpu() && mids.scalar_type() == torch::kFloat32 && mids.numel() == 15,
              "mids must be a CPU float32 tensor of 15 midpoints");
  TORCH_CHECK(enc.device().is_cpu() && enc.scalar_type() == torch::kUInt8 && enc.numel() == 16,
              "enc must be a CPU uint8 tensor of 16 codes");
  QuantTables t{};
  auto m = mids.contiguous();
  auto e = enc.contiguous();
  std::memcpy(t.mids, m.data_ptr<float>(), sizeof(t.mids));
  std::memcpy(t.enc, e.data_ptr<uint8_t>(), sizeof(t.enc));
  t.identity = true;
  for (int i = 0; i < 16; ++i) {
    TORCH_CHECK(t.enc[i] < 16, "enc entries must be < 16");
    t.identity = t.identity && t.enc[i] == i;
  }
  return t;
}

Scales make_scales(const torch::Tensor& absmax, const c10::optional<torch::Tensor>& nested_absmax,
                   const c10::optional<torch::Tensor>& nested_code, const c10::optional<torch::Tensor>& offset,
                   int64_t nblocks, int64_t nested_bs) {
  Scales s;
  TORCH_CHECK(absmax.device().is_cpu() && absmax.is_contiguous() && absmax.dim() == 1,
              "absmax must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(absmax.numel() >= nblocks, "absmax has ", absmax.numel(), " entries, need ", nblocks);
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_code.has_value() && offset.has_value(), "nested_absmax needs nested_code and offset");
    TORCH_CHECK(absmax.scalar_type() == torch::kUInt8, "absmax must be uint8 when nested_absmax is given");
    TORCH_CHECK(nested_bs >= 1, "nested_blocksize must be positive");
    const auto& na = *nested_absmax;
    const auto& nc = *nested_code;
    const auto& off = *offset;
    TORCH_CHECK(na.device().is_cpu() && na.scalar_type() == torch::kFloat32 && na.is_contiguous() &&
                    na.numel() >= (nblocks + nested_bs - 1) / nested_bs,
                "nested_absmax must be a contiguous CPU float32 tensor of ceil(blocks / nested_blocksize) entries");
    TORCH_CHECK(nc.device().is_cpu() && nc.scalar_type() == torch::kFloat32 && nc.is_contiguous() && nc.numel() == 256,
                "nested_code must be a contiguous CPU float32 tensor of 256 entries");
    TORCH_CHECK(off.device().is_cpu() && off.scalar_type() == torch::kFloat32 && off.numel() == 1,
                "offset must be a one-element CPU float32 tensor");
    s.absmax_q = absmax.data_ptr<uint8_t>();
    s.nested_absmax = na.data_ptr<float>();
    s.nested_code = nc.data_ptr<float>();
    s.offset = off.item<float>();
    s.nested_bs = nested_bs;
  } else {
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat32, "absmax must be float32 without double quantization");
    s.absmax_f = absmax.data_ptr<float>();
  }
  return s;
}

void check_code(const torch::Tensor& code) {
  TORCH_CHECK(code.device().is_cpu() && code.scalar_type() == torch::kFloat32 && code.is_contiguous() &&
                  code.numel() == 16,
              "code must be a contiguous CPU float32 tensor of 16 entries");
}

void check_packed(const torch::Tensor& packed, int64_t n) {
  TORCH_CHECK(packed.device().is_cpu(), "packed must be on the CPU");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 1 && packed.is_contiguous(),
              "packed must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(packed.numel() >= (n + 1) / 2, "packed has ", packed.numel(), " bytes, need ", (n + 1) / 2);
}

}  // namespace

// ---------------------------------------------------------------- entry points
namespace fsdp4bit::cpu {

// (packed, absmax, a fresh copy of `code`: the QuantState's own table, as the CUDA extension returns it)
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_4bit(const torch::Tensor& A, int64_t blocksize,
                                                                      const torch::Tensor& mids,
                                                                      const torch::Tensor& enc,
                                                                      const torch::Tensor& code) {
  TORCH_CHECK(A.device().is_cpu(), "A must be on the CPU");
  TORCH_CHECK(A.is_contiguous(), "A must be contiguous");
  check_blocksize(blocksize, "blocksize");
  check_code(code);
  const QuantTables tab = make_tables(mids, enc);
  const int64_t n = A.numel();
  auto packed = torch::empty({(n + 1) / 2}, A.options().dtype(torch::kUInt8));
  auto absmax = torch::empty({(n + blocksize - 1) / blocksize}, A.options().dtype(torch::kFloat32));
  if (n == 0) return {packed, absmax, code.clone()};
  advise_huge_pages(packed.data_ptr(), packed.nbytes());
  uint8_t* o = packed.data_ptr<uint8_t>();
  float* am = absmax.data_ptr<float>();
  switch (A.scalar_type()) {
    case torch::kFloat32: quantize_impl(A.data_ptr<float>(), n, blocksize, tab, o, am); break;
    case torch::kBFloat16: quantize_impl(A.data_ptr<c10::BFloat16>(), n, blocksize, tab, o, am); break;
    case torch::kFloat16: quantize_impl(A.data_ptr<c10::Half>(), n, blocksize, tab, o, am); break;
    default: TORCH_CHECK(false, "A must be float16, bfloat16 or float32, got ", A.scalar_type());
  }
  return {packed, absmax, code.clone()};
}

torch::Tensor dequantize_4bit(const torch::Tensor& packed, const torch::Tensor& absmax,
                              const c10::optional<torch::Tensor>& nested_absmax,
                              const c10::optional<torch::Tensor>& nested_code, const c10::optional<torch::Tensor>& offset,
                              int64_t blocksize, int64_t nested_blocksize, const torch::Tensor& code, int64_t numel,
                              torch::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "numel must be non-negative");
  check_blocksize(blocksize, "blocksize");
  check_packed(packed, numel);
  check_code(code);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  const Scales sc = make_scales(absmax, nested_absmax, nested_code, offset, nblocks, nested_blocksize);
  auto out = torch::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* c = code.data_ptr<float>();
  switch (dtype) {
    case torch::kFloat32: dequantize_impl(p, sc, c, numel, blocksize, out.data_ptr<float>()); break;
    case torch::kBFloat16: dequantize_impl(p, sc, c, numel, blocksize, out.data_ptr<c10::BFloat16>()); break;
    case torch::kFloat16: dequantize_impl(p, sc, c, numel, blocksize, out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "dtype must be float16, bfloat16 or float32, got ", dtype);
  }
  return out;
}

torch::Tensor gemv_4bit(const torch::Tensor& A, const torch::Tensor& packed, const torch::Tensor& absmax,
                        const c10::optional<torch::Tensor>& nested_absmax,
                        const c10::optional<torch::Tensor>& nested_code, const c10::optional<torch::Tensor>& offset,
                        int64_t blocksize, int64_t nested_blocksize, const torch::Tensor& code, int64_t N, int64_t K,
                        const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(A.device().is_cpu(), "A must be on the CPU");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K, "A must be 2-D with K = ", K, " columns");
  TORCH_CHECK(A.scalar_type() == torch::kFloat32 || A.scalar_type() == torch::kBFloat16 ||
                  A.scalar_type() == torch::kFloat16,
              "A must be float16, bfloat16 or float32");
  TORCH_CHECK(N >= 0 && K >= 0, "shape must be non-negative");
  check_blocksize(blocksize, "blocksize");
  check_packed(packed, N * K);
  check_code(code);
  const int64_t nblocks = (N * K + blocksize - 1) / blocksize;
  const Scales sc = make_scales(absmax, nested_absmax, nested_code, offset, nblocks, nested_blocksize);
  torch::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == A.scalar_type() && bias->dim() == 1 &&
                          bias->size(0) == N,
                      "bias must be a (", N, ",) CPU tensor of A's dtype (", A.scalar_type(), "), got ", bias->sizes(),
                      " ", bias->scalar_type(), " on ", bias->device());
    bias32 = bias->to(torch::kFloat32).contiguous();
  }
  const auto a32 = A.to(torch::kFloat32).contiguous();
  const int64_t M = A.size(0);
  auto out = torch::empty({M, N}, A.options().dtype(torch::kFloat32));
  if (M > 0 && N > 0)
    gemv_impl(a32.data_ptr<float>(), M, packed.data_ptr<uint8_t>(), sc, code.data_ptr<float>(), N, K, blocksize,
              bias.has_value() ? bias32.data_ptr<float>() : nullptr, out.data_ptr<float>());
  return out.to(A.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor> quantize_blockwise(const torch::Tensor& A, const torch::Tensor& code,
                                                            int64_t blocksize,
                                                            const c10::optional<torch::Tensor>& offset) {
  TORCH_CHECK_TYPE(A.scalar_type() == torch::kFloat32, "A must be float32, got ", A.scalar_type());
  TORCH_CHECK(A.device().is_cpu() && A.dim() == 1 && A.is_contiguous(), "A must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(code.device().is_cpu() && code.scalar_type() == torch::kFloat32 && code.is_contiguous() &&
                  code.numel() == 256,
              "code must be a contiguous CPU float32 tensor of 256 entries");
  TORCH_CHECK_VALUE(blocksize >= 1, "blocksize must be positive, got ", blocksize);
  float off = 0.0f;
  if (offset.has_value()) {
    TORCH_CHECK(offset->device().is_cpu() && offset->scalar_type() == torch::kFloat32 && offset->numel() == 1,
                "offset must be a one-element CPU float32 tensor");
    off = offset->item<float>();
  }
  const int64_t n = A.numel();
  auto q = torch::empty({n}, A.options().dtype(torch::kUInt8));
  auto absmax = torch::empty({(n + blocksize - 1) / blocksize}, A.options());
  if (n == 0) return {q, absmax};
  quantize_blockwise_impl(A.data_ptr<float>(), n, blocksize, code.data_ptr<float>(), offset.has_value() ? &off : nullptr,
                          q.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  return {q, absmax};
}

// Double quant of a float32 absmax: offset = reference.absmax_mean(A) (absmax_mean above: the bits of every
// device), then the 8-bit quantization of A - offset; last, a fresh copy of `code`.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> double_quant(const torch::Tensor& A,
                                                                                    const torch::Tensor& code,
                                                                                    int64_t blocksize) {
  TORCH_CHECK_TYPE(A.scalar_type() == torch::kFloat32, "A must be float32, got ", A.scalar_type());
  const auto a = A.contiguous();
  auto offset = torch::full({}, absmax_mean(a.data_ptr<float>(), a.numel()), a.options());
  auto [q, absmax] = quantize_blockwise(a, code, blocksize, offset);
  return {offset, q, absmax, code.clone()};
}

namespace {

// rows of A the fused gemv takes; more rows dequantize W once and call at::linear (a GEMM)
constexpr int64_t kGemvMaxRows = 16;

// A's rows as a contiguous, 16-byte aligned (rows, K) tensor for the fused gemv (a copy where A is not one, cheap
// next to W)
torch::Tensor gemv_rows(const torch::Tensor& A, int64_t K) {
  torch::Tensor a = A.reshape({-1, K});
  return a.is_contiguous() && reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0
             ? a
             : a.clone(at::MemoryFormat::Contiguous);
}

// t's sizes with the last one replaced by `last` (the shape of a product's rows of `last` features)
std::vector<int64_t> with_last(const torch::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

}  // namespace

// A @ W.T + bias for the 4-bit W (N, K), the route of every CPU matmul (NativeOps.gemv_4bit and the matmul_4bit
// operator's CPU kernel, operators.cpp): the fused gemv for 1 to 16 rows, else W dequantized in A's dtype and
// at::linear (F.linear; also K = 0). No rows: an empty product. The bias (or none) is cast to A's dtype.
torch::Tensor matmul_4bit_forward(const torch::Tensor& A, const std::optional<torch::Tensor>& bias,
                                  const torch::Tensor& packed, const torch::Tensor& absmax,
                                  const std::optional<torch::Tensor>& nested_absmax,
                                  const std::optional<torch::Tensor>& nested_code,
                                  const std::optional<torch::Tensor>& offset, int64_t blocksize,
                                  int64_t nested_blocksize, const torch::Tensor& code_cpu,
                                  const torch::Tensor& code_dev, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(A.dim() >= 1 && A.size(-1) == K && N >= 0 && K >= 0, "matmul_4bit needs A's last dimension K = ",
                    K, " and N >= 0");
  const std::optional<torch::Tensor> b =
      bias.has_value() ? std::optional<torch::Tensor>(bias->to(A.scalar_type()).contiguous()) : std::nullopt;
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) rows *= A.size(d);
  if (rows == 0) return torch::empty(with_last(A, N), A.options());
  if (rows <= kGemvMaxRows && N > 0 && K > 0)
    return gemv_4bit(gemv_rows(A, K), packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                     code_cpu, N, K, b)
        .view(with_last(A, N));
  const torch::Tensor W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                          nested_blocksize, code_dev, N * K, A.scalar_type());
  return at::linear(A, W.view({N, K}), b);
}

// grad_out (.., N) @ W (N, K) for the 4-bit W, the input gradient of matmul_4bit_forward (NativeOps.input_grad_4bit
// and the input_grad_4bit operator's CPU kernel): grad_out @ W dequantized in grad_out's dtype (differentiable in
// grad_out under create_graph)
torch::Tensor matmul_4bit_input_grad(const torch::Tensor& g, const torch::Tensor& packed, const torch::Tensor& absmax,
                                     const std::optional<torch::Tensor>& nested_absmax,
                                     const std::optional<torch::Tensor>& nested_code,
                                     const std::optional<torch::Tensor>& offset, int64_t blocksize,
                                     int64_t nested_blocksize, const torch::Tensor& /*code_cpu*/,
                                     const torch::Tensor& code_dev, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(g.dim() >= 1 && g.size(-1) == N && N >= 0 && K >= 0, "matmul_4bit_input_grad needs grad_out's "
                    "last dimension N = ", N, " and K >= 0");
  const torch::Tensor W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                          nested_blocksize, code_dev, N * K, g.scalar_type());
  return at::matmul(g, W.view({N, K}));
}

}  // namespace fsdp4bit::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fsdp4bit CPU kernels (blockwise 4-bit quantize, dequantize, fused gemv)";
  m.def("quantize_4bit", &fsdp4bit::cpu::quantize_4bit,
        "blockwise 4-bit quantize -> (packed uint8, float32 absmax, copy of code)");
  m.def("dequantize_4bit", &fsdp4bit::cpu::dequantize_4bit,
        "blockwise 4-bit dequantize -> flat tensor of numel in dtype");
  m.def("quantize_blockwise", &fsdp4bit::cpu::quantize_blockwise,
        "8-bit blockwise quantize of float32 A - offset against a 256-entry code -> (uint8 codes, float32 absmax)");
  m.def("double_quant", &fsdp4bit::cpu::double_quant,
        "double quant of a float32 absmax -> (offset = mean, uint8 codes, float32 nested absmax, copy of code)");
  m.def("gemv_4bit", &fsdp4bit::cpu::gemv_4bit,
        "A (M, K) @ W(N, K).T + bias with W 4-bit -> (M, N) in A's dtype, the bias added before the one rounding",
        py::arg("A"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("code"), py::arg("N"),
        py::arg("K"), py::arg("bias") = py::none());
  m.def("matmul_4bit", &fsdp4bit::cpu::matmul_4bit_forward,
        "A @ W(N, K).T + bias with W 4-bit: the fused gemv (1 to 16 rows) or dequantize + F.linear",
        py::arg("A"), py::arg("bias"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"),
        py::arg("code_cpu"), py::arg("code_dev"), py::arg("N"), py::arg("K"));
  m.def("matmul_4bit_input_grad", &fsdp4bit::cpu::matmul_4bit_input_grad,
        "grad_out (.., N) @ W(N, K) with W 4-bit: dequantize + matmul", py::arg("grad_out"), py::arg("packed"),
        py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"),
        py::arg("nested_blocksize"), py::arg("code_cpu"), py::arg("code_dev"), py::arg("N"), py::arg("K"));
  fsdp4bit::cpu::def_operator_bindings(m);
}
