// Row gemvs (gemv_row.cuh) for one token of fp16/bf16 A: a in registers for K up to 4096, and up to 32768 with each
// row split into 2, 4 or 8 parts (also K up to 4096 for few rows), else a in shared memory; the rules that pick them
// over the pair-table kernel.
#include "gemv_row.cuh"

namespace fsdp4bit {

// 16 warps of one CTA per SM (the register file's limit at 128 registers); the sweep's 8-warp CTAs, two per SM,
// measured the same or slower.
constexpr int kRowWarps = 16;

// groups of `parts` warps in one wave of the row kernels' 16-warp CTAs
static int64_t row_groups(int parts) { return row_wave_groups(kRowWarps, parts); }

// Both kernels index blocks in 32 bits per lane: whole blocks per row, at most 1024 weights per block and fewer
// than 2^31 blocks (bitsandbytes' NF4 default: 64-weight blocks); other calls take the pair-table kernel.
static bool row_blocks_fit(const Scales& sc, bool nested, int log2bs, int64_t N, int64_t K) {
  return (!nested || sc.nested_log2 >= 0) && row_blocks_whole(log2bs, K) &&
         N * (K >> log2bs) < (int64_t(1) << 31) &&
         int64_t(row_smem_bytes(K)) <= device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// Rows of 4 chunk rounds (K in (3072, 4096]) go to the split kernel in 2 parts of 2 rounds while there are at most 4
// rows per group of 2 warps. H100 sweeps (NOTES.md, sessions 15 and 16), us, one part against two: 512x4096 3.52 ->
// 2.90, 2048x4096 4.47 -> 4.30, 4096x4096 5.93 -> 5.72; even at 6144x4096 (7.20 -> 7.20), lost at 8192x4096 (8.30 ->
// 8.80); rows of 2 or 3 rounds lost in 2 parts (2048x2048 3.29 -> 3.75, 3072x3072 4.62 -> 4.75).
static bool row_split_short_row(int64_t N, int64_t K) {
  return row_rounds(K) == 4 && N <= 4 * row_groups(2);
}

bool gemv_row_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N, int64_t K) {
  return M == 1 && dtype != FloatType::kF32 && K <= 4096 && !row_split_short_row(N, K) &&
         row_blocks_fit(sc, nested, log2bs, N, K);
}

// The split kernel's parts per row for an N x K call: the fewest of 2, 4 or 8 that leave at most 4 chunk rounds per
// part (row_split_parts), or twice as many of at most 2 rounds where those parts are at least 13/16 full (7 or 8 rounds
// in 4 parts, 13 to 16 in 8; 6 in 4 lost) and there are at most 8 rows per group of warps: more warps share the rows,
// fewer chunks wait in each ring. H100 sweep (NOTES.md, session 16; each in its row order, gemv_row.cuh), us, at most
// 4 rounds per part against at most 2: 128x8192 3.53 -> 2.88, 1024x8192 4.93 -> 4.35, 2048x8192 6.65 -> 5.76,
// 3072x8192 7.70 -> 7.26, 4096x8192 8.80 -> 8.76, 4096x7168 8.45 -> 8.48, 256x14336 3.90 -> 3.76, 1024x14336 6.25 ->
// 5.67, 2048x14336 8.65 -> 8.52, 2048x16384 9.00 -> 8.84; lost past 8 rows per group (6144x8192 11.42 -> 11.91,
// 8192x8192 14.18 -> 15.04, 3072x14336 11.01 -> 11.43) and with emptier parts (4096x6144 7.18 -> 8.19, 2048x11008
// 6.99 -> 8.07, 1536x8960 5.93 -> 6.63).
static int row_split_parts_for(int64_t N, int64_t K) {
  const int parts = row_split_parts(K);
  if (parts == 0) return 0;  // past 32768: the streaming kernel
  const int64_t rounds = row_rounds(K);
  const bool full = rounds == 7 || rounds == 8 || (rounds >= 13 && rounds <= 16);
  const int64_t groups = row_groups(2 * parts);
  return full && N <= 8 * groups ? 2 * parts : parts;
}

bool gemv_row_split_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                            int64_t K) {
  const int parts = N < 1 ? 0 : row_split_parts_for(N, K);  // no rows: nothing to size the grid for
  if (M != 1 || dtype == FloatType::kF32 || (K <= 4096 && !row_split_short_row(N, K)) || parts == 0 ||
      !row_blocks_fit(sc, nested, log2bs, N, K))
    return false;
  // Up to K = 32768 it measured faster than the streaming kernel, or as fast (H100 sweeps, NOTES.md, sessions 14 to
  // 16, us, streaming against split): 4096x11008 13.2 -> 10.6, 5120x13824 20.6 -> 15.8, 8192x8192 15.2 -> 14.2,
  // 4096x14336 14.0 -> 13.7, 8192x7168 13.7 -> 13.55, 256x5120 5.2 -> 3.3, 1024x14336 8.8 -> 5.7, 2048x8192 6.3 ->
  // 5.8, 8192x22016 39.5 -> 35.1, 5120x27648 34.0 -> 29.7, 8192x28672 45.5 -> 45.5.
  // the parts' sums of the CTA's rows must fit beside the rest of its shared memory (a wave of one CTA per SM)
  const RowGrid grid = row_grid(row_order(parts, row_split_rounds(K, parts)), N, kRowWarps / parts,
                                device_attribute(cudaDevAttrMultiProcessorCount));
  return int64_t(row_split_smem_bytes(K, parts, kRowWarps, grid.rows_per_group)) <=
         device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

bool gemv_row_stream_applies(FloatType dtype, bool nested, const Scales& sc, int log2bs, int64_t M, int64_t N,
                             int64_t K) {
  return M == 1 && dtype != FloatType::kF32 && K > 4096 && row_blocks_fit(sc, nested, log2bs, N, K);
}

void launch_gemv_row_stream_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code,
                                const Scales& sc, bool nested, int log2bs, int64_t N, int64_t K, void* out,
                                const void* bias, cudaStream_t stream) {
  with_16bit_type(dtype, A, out, bias, [&](auto a, auto o, auto b) {
    launch_gemv_row_stream<element_of<decltype(a)>, kRowWarps>(a, packed, code, sc, nested, log2bs, N, K, o, b, stream);
  });
}

// P parts per row, D = chunk rounds of the longest part: 3 or 4 with the fewest parts that do, 2 with twice as many
// (row_split_parts_for: P = 4 or 8) or for rows of 4 rounds (row_split_short_row: P = 2)
template <typename AT, int P>
static void launch_split_rounds(const AT* a, const uint8_t* packed, const Code16& code, const Scales& sc, bool nested,
                                int log2bs, int64_t N, int64_t K, AT* out, const AT* bias, cudaStream_t stream) {
  const int rounds = row_split_rounds(K, P);
  if (rounds == 2)
    launch_gemv_row<AT, kRowWarps, 2, P>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
  else if (rounds == 4)
    launch_gemv_row<AT, kRowWarps, 4, P>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
  else
    launch_gemv_row<AT, kRowWarps, 3, P>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
}

template <typename AT>
static void launch_split(const AT* a, const uint8_t* packed, const Code16& code, const Scales& sc, bool nested,
                         int log2bs, int64_t N, int64_t K, AT* out, const AT* bias, cudaStream_t stream) {
  switch (row_split_parts_for(N, K)) {
    case 2: return launch_split_rounds<AT, 2>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
    case 4: return launch_split_rounds<AT, 4>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
    default: return launch_split_rounds<AT, 8>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream);
  }
}

void launch_gemv_row_split_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code,
                               const Scales& sc, bool nested, int log2bs, int64_t N, int64_t K, void* out,
                               const void* bias, cudaStream_t stream) {
  with_16bit_type(dtype, A, out, bias, [&](auto a, auto o, auto b) {
    launch_split(a, packed, code, sc, nested, log2bs, N, K, o, b, stream);
  });
}

// D = chunk rounds per row (K / 1024 rounded up), a compile-time count: the lane keeps D chunks of a in registers
template <typename AT>
static void launch_row_rounds(const AT* a, const uint8_t* packed, const Code16& code, const Scales& sc, bool nested,
                              int log2bs, int64_t N, int64_t K, AT* out, const AT* bias, cudaStream_t stream) {
  switch (row_rounds(K)) {
    case 1: launch_gemv_row<AT, kRowWarps, 1>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream); break;
    case 2: launch_gemv_row<AT, kRowWarps, 2>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream); break;
    case 3: launch_gemv_row<AT, kRowWarps, 3>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream); break;
    default: launch_gemv_row<AT, kRowWarps, 4>(a, packed, code, sc, nested, log2bs, N, K, out, bias, stream); break;
  }
}

void launch_gemv_row_any(const void* A, FloatType dtype, const uint8_t* packed, const Code16& code, const Scales& sc,
                         bool nested, int log2bs, int64_t N, int64_t K, void* out, const void* bias,
                         cudaStream_t stream) {
  with_16bit_type(dtype, A, out, bias, [&](auto a, auto o, auto b) {
    launch_row_rounds(a, packed, code, sc, nested, log2bs, N, K, o, b, stream);
  });
}

}  // namespace fsdp4bit
