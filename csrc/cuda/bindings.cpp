// Python bindings of the fsdp4bit CUDA extension. Every argument check, allocation and exception lives
// here (host compiler); the .cu launchers behind launch.h receive validated raw pointers and never throw.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "host_ops.h"
#include "launch.h"

namespace fsdp4bit {
namespace {

FloatType float_type(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return FloatType::kF32;
    case at::kHalf: return FloatType::kF16;
    case at::kBFloat16: return FloatType::kBF16;
    default: TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16 or float32, got ", t);
  }
}

// the float type named "float32", "float16" or "bfloat16" (the kernel-query bindings take dtype names)
FloatType float_type_named(const std::string& dtype) {
  TORCH_CHECK_VALUE(dtype == "float32" || dtype == "float16" || dtype == "bfloat16",
                    "dtype must be 'float32', 'float16' or 'bfloat16', got '", dtype, "'");
  return dtype == "float32" ? FloatType::kF32 : dtype == "float16" ? FloatType::kF16 : FloatType::kBF16;
}

int log2_blocksize(int64_t bs) {
  TORCH_CHECK_VALUE(bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0, "blocksize must be a power of two in [32, 4096], got ", bs);
  int l = 0;
  while ((int64_t(1) << l) < bs) ++l;
  return l;
}

void check_on(const at::Tensor& t, const at::Device& dev, const char* name) {
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
}

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

Code16 make_code(const at::Tensor& code) {
  TORCH_CHECK(code.device().is_cpu() && code.scalar_type() == at::kFloat && code.numel() == 16,
              "code must be a CPU float32 tensor of 16 entries");
  Code16 c{};
  std::memcpy(c.v, code.contiguous().data_ptr<float>(), sizeof(c.v));
  return c;
}

Scales make_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                   const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                   int64_t nblocks, int64_t nested_bs, const at::Device& dev) {
  Scales s{};
  check_on(absmax, dev, "absmax");
  TORCH_CHECK(absmax.is_contiguous() && absmax.dim() == 1, "absmax must be a contiguous 1-D tensor");
  TORCH_CHECK(absmax.numel() >= nblocks, "absmax has ", absmax.numel(), " entries, need ", nblocks);
  if (nested_absmax.has_value()) {
    TORCH_CHECK(nested_code.has_value() && offset.has_value(), "nested_absmax needs nested_code and offset");
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "absmax must be uint8 when nested_absmax is given");
    TORCH_CHECK(nested_bs >= 1, "nested_blocksize must be positive");
    const auto& na = *nested_absmax;
    const auto& nc = *nested_code;
    const auto& off = *offset;
    check_on(na, dev, "nested_absmax");
    check_on(nc, dev, "nested_code");
    check_on(off, dev, "offset");
    TORCH_CHECK(na.scalar_type() == at::kFloat && na.is_contiguous() && na.numel() >= (nblocks + nested_bs - 1) / nested_bs,
                "nested_absmax must be a contiguous float32 tensor of ceil(blocks / nested_blocksize) entries");
    TORCH_CHECK(nc.scalar_type() == at::kFloat && nc.is_contiguous() && nc.numel() == 256,
                "nested_code must be a contiguous float32 tensor of 256 entries");
    TORCH_CHECK(off.scalar_type() == at::kFloat && off.numel() == 1, "offset must be a one-element float32 tensor");
    s.absmax_q = absmax.data_ptr<uint8_t>();
    s.nested_absmax = na.data_ptr<float>();
    s.nested_code = nc.data_ptr<float>();
    s.offset = off.data_ptr<float>();
    s.nested_bs = nested_bs;
    s.nested_log2 = (nested_bs & (nested_bs - 1)) == 0 ? __builtin_ctzll(uint64_t(nested_bs)) : -1;
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32 without double quantization");
    s.absmax_f = absmax.data_ptr<float>();
  }
  return s;
}

void check_packed(const at::Tensor& packed, int64_t n, const at::Device& dev) {
  check_on(packed, dev, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(),
              "packed must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(packed.numel() >= (n + 1) / 2, "packed has ", packed.numel(), " bytes, need ", (n + 1) / 2);
}

// Returns (packed, absmax, a fresh device copy of `code` written by the kernel: the QuantState's own table).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                             const at::Tensor& mids, const at::Tensor& enc,
                                                             const at::Tensor& code) {
  TORCH_CHECK(A.is_cuda(), "A must be a CUDA tensor");
  TORCH_CHECK(A.is_contiguous(), "A must be contiguous");
  const FloatType ft = float_type(A.scalar_type(), "A");
  log2_blocksize(blocksize);
  TORCH_CHECK(mids.device().is_cpu() && mids.scalar_type() == at::kFloat && mids.numel() == 15,
              "mids must be a CPU float32 tensor of 15 midpoints");
  TORCH_CHECK(enc.device().is_cpu() && enc.scalar_type() == at::kByte && enc.numel() == 16,
              "enc must be a CPU uint8 tensor of 16 codes");
  QuantTables tab{};
  std::memcpy(tab.mids, mids.contiguous().data_ptr<float>(), 15 * sizeof(float));
  tab.mids[15] = 2.0f;
  std::memcpy(tab.enc, enc.contiguous().data_ptr<uint8_t>(), 16);
  bool identity = true;
  for (int i = 0; i < 16; ++i) {
    TORCH_CHECK(tab.enc[i] < 16, "enc entries must be < 16");
    identity = identity && tab.enc[i] == i;
  }
  TORCH_CHECK(code.device().is_cpu() && code.scalar_type() == at::kFloat && code.numel() == 16,
              "code must be a CPU float32 tensor of 16 entries");
  std::memcpy(tab.code, code.contiguous().data_ptr<float>(), sizeof(tab.code));
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  auto packed = at::empty({(n + 1) / 2}, A.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, A.options().dtype(at::kFloat));
  auto code_out = at::empty({16}, A.options().dtype(at::kFloat));
  tab.code_out = code_out.data_ptr<float>();
  if (n == 0) return {packed, absmax, code_out.copy_(code)};
  launch_quantize(A.data_ptr(), ft, n, int(blocksize), tab, identity, aligned(A.data_ptr(), 16),
                  packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, absmax, code_out};
}

}  // namespace

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                           int64_t blocksize, int64_t nested_blocksize, const at::Tensor& code, int64_t numel,
                           at::ScalarType dtype) {
  TORCH_CHECK(packed.is_cuda(), "packed must be a CUDA tensor");
  TORCH_CHECK_VALUE(numel >= 0, "numel must be non-negative");
  const at::Device dev = packed.device();
  const FloatType ft = float_type(dtype, "dtype");
  const int log2bs = log2_blocksize(blocksize);
  check_packed(packed, numel, dev);
  TORCH_CHECK(code.device() == dev && code.scalar_type() == at::kFloat && code.numel() == 16 && code.is_contiguous(),
              "code must be a contiguous float32 tensor of 16 entries on the device of packed");
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  const Scales sc = make_scales(absmax, nested_absmax, nested_code, offset, nblocks, nested_blocksize, dev);
  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty({numel}, packed.options().dtype(dtype));
  if (numel == 0) return out;
  launch_dequantize(packed.data_ptr<uint8_t>(), numel, code.data_ptr<float>(), sc, nested_absmax.has_value(), log2bs,
                    aligned(packed.data_ptr(), 8), out.data_ptr(), ft, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

namespace {

// the float type of A, checked to be a contiguous (M, K) CUDA tensor of float32, float16 or bfloat16
FloatType check_matmul_a(const at::Tensor& A, int64_t K) {
  TORCH_CHECK(A.is_cuda(), "A must be a CUDA tensor");
  const FloatType ft = float_type(A.scalar_type(), "A");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K && A.is_contiguous(), "A must be a contiguous (M, K) tensor, K = ", K);
  return ft;
}

// the bias's data (null for none), checked to be a contiguous (n_out,) tensor of A's dtype on A's device
const void* checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& A, int64_t n_out) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK_VALUE(bias->device() == A.device() && bias->scalar_type() == A.scalar_type() && bias->dim() == 1 &&
                        bias->size(0) == n_out && bias->is_contiguous(),
                    "bias must be a contiguous (", n_out, ",) tensor of A's dtype (", A.scalar_type(), ") on ",
                    A.device(), ", got ", bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  return bias->data_ptr();
}

at::Tensor gemv_4bit(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                     const at::Tensor& code, int64_t N, int64_t K, const std::optional<at::Tensor>& bias) {
  const FloatType ft = check_matmul_a(A, K);
  const at::Device dev = A.device();
  TORCH_CHECK_VALUE(N >= 0 && K >= 0, "shape must be non-negative");
  TORCH_CHECK_VALUE(K % 32 == 0, "the fused CUDA gemv needs K % 32 == 0, got K = ", K);
  const int64_t M = A.size(0);
  TORCH_CHECK_VALUE(M >= 1 && M <= 8, "the fused CUDA gemv takes 1 to 8 rows of A, got ", M);
  const int log2bs = log2_blocksize(blocksize);
  check_packed(packed, N * K, dev);
  TORCH_CHECK(aligned(packed.data_ptr(), 16), "the fused CUDA gemv needs packed 16-byte aligned");
  TORCH_CHECK(aligned(A.data_ptr(), 16), "the fused CUDA gemv needs A 16-byte aligned");
  const Code16 c = make_code(code);
  const int64_t nblocks = (N * K + blocksize - 1) / blocksize;
  const Scales sc = make_scales(absmax, nested_absmax, nested_code, offset, nblocks, nested_blocksize, dev);
  const void* bias_data = checked_bias(bias, A, N);
  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty({M, N}, A.options());
  if (N == 0) return out;
  if (K == 0) return bias.has_value() ? out.copy_(bias->expand({M, N})) : out.zero_();
  launch_gemv(A.data_ptr(), ft, packed.data_ptr<uint8_t>(), c, sc, nested_absmax.has_value(), log2bs, M, N, K,
              out.data_ptr(), bias_data, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// A (M, K) @ W (N, K).T + bias, or with `trans` A (M, N) @ W + bias (a linear layer's input gradient), through the
// fused 4-bit GEMM, for any call it supports (fsdp4bit itself takes it only where gemm_4bit_applies(), i.e. where
// it is the faster path; benchmarks and tests call it at other shapes too); the bias (one value per output feature,
// of A's dtype, or none) is added in float32 before the one rounding, as F.linear does.
at::Tensor gemm_4bit(const at::Tensor& A, const at::Tensor& packed, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t nested_blocksize,
                     const at::Tensor& code, int64_t N, int64_t K, const std::optional<at::Tensor>& bias, bool trans) {
  const GemmDims d(N, K, trans);
  const FloatType ft = check_matmul_a(A, d.k_red);
  const at::Device dev = A.device();
  const int64_t M = A.size(0);
  const int log2bs = log2_blocksize(blocksize);
  check_packed(packed, N * K, dev);
  TORCH_CHECK(aligned(packed.data_ptr(), 16) && aligned(A.data_ptr(), 16),
              "the fused CUDA GEMM needs A and packed 16-byte aligned");
  const void* bias_data = checked_bias(bias, A, d.n_out);
  const c10::cuda::CUDAGuard guard(dev);
  TORCH_CHECK_VALUE(gemm_supported(ft, log2bs, M, N, K, trans), "the fused CUDA GEMM does not support M = ", M,
                    ", N = ", N, ", K = ", K, trans ? " (transposed)" : "", ", blocksize ", blocksize, ", A ",
                    A.scalar_type(),
                    " on this device (it needs an sm_90a build, fp16/bf16 A, K % 64 == 0, blocksize >= 64, and N % 8 "
                    "== 0 transposed)");
  const Code16 c = make_code(code);
  const Scales sc = make_scales(absmax, nested_absmax, nested_code, offset, (N * K + blocksize - 1) / blocksize,
                                nested_blocksize, dev);
  auto workspace = at::empty({gemm_workspace_floats(M, N, K, trans)}, A.options().dtype(at::kFloat));
  auto out = at::empty({M, d.n_out}, A.options());
  TORCH_CHECK(launch_gemm(A.data_ptr(), ft, packed.data_ptr<uint8_t>(), c, sc, nested_absmax.has_value(), log2bs, M,
                          N, K, trans, workspace.data_ptr<float>(), workspace.numel(),
                          bias_data, out.data_ptr(),
                          c10::cuda::getCurrentCUDAStream()),
              "cuTensorMapEncodeTiled failed for the fused CUDA GEMM");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// rows of A the fused gemv takes (9 and more take the GEMM or dequantize + cuBLAS: matmul_4bit_forward)
constexpr int64_t kGemvMaxRows = 8;

// A's rows as a contiguous, 16-byte aligned (rows, cols) tensor for the fused kernels (a copy where A is not one)
at::Tensor fused_rows(const at::Tensor& A, int64_t cols) {
  at::Tensor a = A.reshape({-1, cols});
  return a.is_contiguous() && aligned(a.data_ptr(), 16) ? a : a.clone(at::MemoryFormat::Contiguous);
}

// t's sizes with the last one replaced by `last` (the shape of a product's rows of `last` features)
std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

}  // namespace

// A @ W.T + bias for the 4-bit W (N, K), the route of every CUDA matmul (NativeOps.gemv_4bit and the matmul_4bit
// operator's CUDA kernel, operators.cpp): the fused gemv for up to 8 rows (K % 32 == 0, packed 16-byte aligned),
// the fused GEMM where gemm_applies() takes the call, else W dequantized in A's dtype and at::linear (F.linear; also
// every empty product). The bias (or none) is cast to A's dtype.
at::Tensor matmul_4bit_forward(const at::Tensor& A, const std::optional<at::Tensor>& bias, const at::Tensor& packed,
                               const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t nested_blocksize, const at::Tensor& code_cpu,
                               const at::Tensor& code_dev, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(A.dim() >= 1 && A.size(-1) == K && N >= 0 && K >= 0, "matmul_4bit needs A's last dimension K = ",
                    K, " and N >= 0");
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(A.scalar_type()).contiguous()) : std::nullopt;
  const bool fusable = A.numel() > 0 && N > 0 && K > 0 && aligned(packed.data_ptr(), 16);
  const int64_t rows = fusable ? A.numel() / K : 0;
  const bool gemv = fusable && rows <= kGemvMaxRows && K % 32 == 0;
  const c10::cuda::CUDAGuard guard(A.device());
  if (gemv ||
      (fusable && gemm_applies(float_type(A.scalar_type(), "A"), log2_blocksize(blocksize), rows, N, K, false))) {
    const at::Tensor a = fused_rows(A, K);
    const at::Tensor out = gemv ? gemv_4bit(a, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                            nested_blocksize, code_cpu, N, K, b)
                                : gemm_4bit(a, packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                            nested_blocksize, code_cpu, N, K, b, false);
    return out.view(with_last(A, N));
  }
  const at::Tensor W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                       code_dev, N * K, A.scalar_type());
  return at::linear(A, W.view({N, K}), b);
}

// grad_out (.., N) @ W (N, K) for the 4-bit W, the input gradient of matmul_4bit_forward (NativeOps.input_grad_4bit
// and the input_grad_4bit operator's CUDA kernel, operators.cpp): the transposed fused GEMM where gemm_applies()
// takes it and autograd is not recording, else grad_out @ W dequantized in grad_out's dtype (differentiable in
// grad_out under create_graph)
at::Tensor matmul_4bit_input_grad(const at::Tensor& g, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                  int64_t blocksize, int64_t nested_blocksize, const at::Tensor& code_cpu,
                                  const at::Tensor& code_dev, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(g.dim() >= 1 && g.size(-1) == N && N >= 0 && K >= 0, "matmul_4bit_input_grad needs grad_out's "
                    "last dimension N = ", N, " and K >= 0");
  const c10::cuda::CUDAGuard guard(g.device());
  const bool fused = g.numel() > 0 && N > 0 && K > 0 && !at::GradMode::is_enabled() &&
                     aligned(packed.data_ptr(), 16) &&
                     (g.scalar_type() == at::kHalf || g.scalar_type() == at::kBFloat16) &&
                     gemm_applies(float_type(g.scalar_type(), "grad_out"), log2_blocksize(blocksize), g.numel() / N, N,
                                  K, true);
  if (fused)
    return gemm_4bit(fused_rows(g, N), packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                     code_cpu, N, K, std::nullopt, true)
        .view(with_last(g, K));
  const at::Tensor W = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                                       code_dev, N * K, g.scalar_type());
  return at::matmul(g, W.view({N, K}));
}

namespace {

// whether gemm_4bit takes A of `dtype` ("float16" or "bfloat16"; "float32" never) of M rows and a 4-bit (N, K)
// weight of `blocksize`, transposed or not, on device `device_index`
bool gemm_4bit_applies(const std::string& dtype, int64_t blocksize, int64_t M, int64_t N, int64_t K,
                       int64_t device_index, bool trans) {
  const FloatType ft = float_type_named(dtype);
  const int log2bs = log2_blocksize(blocksize);
  const c10::cuda::CUDAGuard guard(at::Device(at::kCUDA, c10::DeviceIndex(device_index)));
  return gemm_applies(ft, log2bs, M, N, K, trans);
}

// The kernel gemv_4bit takes for A of `dtype` ("float32", "float16" or "bfloat16") (M, K) and a 4-bit (N, K) weight on device `device_index`: "row",
// "row_split", "row_stream", "pair_table", "tensor_core" or "cuda_core" (for tests and benchmarks that must know the
// path).
std::string gemv_kernel(const std::string& dtype, int64_t blocksize, bool nested, int64_t nested_blocksize, int64_t M,
                        int64_t N, int64_t K, int64_t device_index) {
  const FloatType ft = float_type_named(dtype);
  const int log2bs = log2_blocksize(blocksize);
  TORCH_CHECK_VALUE(nested_blocksize > 0, "nested_blocksize must be positive, got ", nested_blocksize);
  Scales sc{};
  sc.nested_bs = nested_blocksize;
  sc.nested_log2 = (nested_blocksize & (nested_blocksize - 1)) == 0 ? __builtin_ctzll(uint64_t(nested_blocksize)) : -1;
  const c10::cuda::CUDAGuard guard(at::Device(at::kCUDA, c10::DeviceIndex(device_index)));
  return gemv_kernel_name(ft, nested, sc, log2bs, M, N, K);
}

// The checks of an 8-bit blockwise quantization of float32 A against a 256-entry code; returns the block count.
int64_t check_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(A.is_cuda(), "A must be a CUDA tensor");
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat, "A must be float32, got ", A.scalar_type());
  TORCH_CHECK(A.dim() == 1 && A.is_contiguous(), "A must be a contiguous 1-D tensor");
  check_on(code, A.device(), "code");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 256,
              "code must be a contiguous float32 tensor of 256 entries");
  TORCH_CHECK_VALUE(blocksize >= 1, "blocksize must be positive, got ", blocksize);
  const int64_t nblocks = (A.numel() + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(nblocks <= 0x7fffffff, "too many blocks: ", nblocks);
  return nblocks;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize,
                                                      const std::optional<at::Tensor>& offset) {
  const int64_t nblocks = check_blockwise(A, code, blocksize);
  if (offset.has_value()) {
    check_on(*offset, A.device(), "offset");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, "offset must be a one-element float32 tensor");
  }
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  auto q = at::empty({n}, A.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, A.options());
  if (n == 0) return {q, absmax};
  launch_quantize_blockwise(A.data_ptr<float>(), n, blocksize, code.data_ptr<float>(),
                            offset.has_value() ? offset->data_ptr<float>() : nullptr, q.data_ptr<uint8_t>(),
                            absmax.data_ptr<float>(), nullptr, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, absmax};
}

// Double quant of a float32 absmax: offset = reference.absmax_mean(A) (a pairwise float64 tree: the CPU's bits,
// written by the tree's kernels), then the fused 8-bit quantization of A - offset, whose kernel also writes the
// returned copy of `code` (the nested QuantState's own table). Saves the Python round trips.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> double_quant(const at::Tensor& A, const at::Tensor& code,
                                                                        int64_t blocksize) {
  const int64_t nblocks = check_blockwise(A, code, blocksize);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  auto offset = at::empty({}, A.options());
  auto q = at::empty({n}, A.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, A.options());
  auto code_out = at::empty({256}, A.options());
  if (n == 0) {  // the mean of nothing, as torch's
    offset.fill_(std::numeric_limits<float>::quiet_NaN());
    code_out.copy_(code);
    return {offset, q, absmax, code_out};
  }
  auto workspace = at::empty({double_quant_workspace(n)}, A.options().dtype(at::kDouble));
  launch_double_quant(A.data_ptr<float>(), n, blocksize, code.data_ptr<float>(), workspace.data_ptr<double>(),
                      offset.data_ptr<float>(), q.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                      code_out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {offset, q, absmax, code_out};
}

}  // namespace
}  // namespace fsdp4bit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fsdp4bit CUDA kernels (blockwise 4-bit quantize, dequantize with fused double quant, fused gemv)";
  m.def("quantize_4bit", &fsdp4bit::quantize_4bit,
        "blockwise 4-bit quantize -> (packed uint8, float32 absmax, device copy of the 16-entry code)");
  m.def("dequantize_4bit", &fsdp4bit::dequantize_4bit, "blockwise 4-bit dequantize -> flat tensor of numel in dtype");
  m.def("quantize_blockwise", &fsdp4bit::quantize_blockwise,
        "8-bit blockwise quantize of float32 A - offset against a 256-entry code -> (uint8 codes, float32 absmax)");
  m.def("double_quant", &fsdp4bit::double_quant,
        "double quant of a float32 absmax -> (offset = mean, uint8 codes, float32 nested absmax, copy of code)");
  m.def("gemv_4bit", &fsdp4bit::gemv_4bit,
        "A (M, K) @ W(N, K).T + bias with W 4-bit, M <= 8, K % 32 == 0 -> (M, N), the bias added before rounding",
        py::arg("A"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("code"), py::arg("N"),
        py::arg("K"), py::arg("bias") = py::none());
  m.def("gemm_4bit", &fsdp4bit::gemm_4bit,
        "A (M, K) @ W(N, K).T + bias -> (M, N), or trans: A (M, N) @ W + bias -> (M, K), with W 4-bit, fused GEMM",
        py::arg("A"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("code"), py::arg("N"),
        py::arg("K"), py::arg("bias") = py::none(), py::arg("trans") = false);
  m.def("matmul_4bit", &fsdp4bit::matmul_4bit_forward,
        "A @ W(N, K).T + bias with W 4-bit: the fused gemv, the fused GEMM or dequantize + F.linear, as they apply",
        py::arg("A"), py::arg("bias"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"),
        py::arg("nested_code"), py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"),
        py::arg("code_cpu"), py::arg("code_dev"), py::arg("N"), py::arg("K"));
  m.def("matmul_4bit_input_grad", &fsdp4bit::matmul_4bit_input_grad,
        "grad_out (.., N) @ W(N, K) with W 4-bit: the transposed fused GEMM or dequantize + matmul, as they apply",
        py::arg("grad_out"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
        py::arg("offset"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("code_cpu"),
        py::arg("code_dev"), py::arg("N"), py::arg("K"));
  fsdp4bit::def_operator_bindings(m);
  m.def("gemm_4bit_applies", &fsdp4bit::gemm_4bit_applies,
        "whether gemm_4bit takes (dtype, blocksize, M, N, K) on device_index (trans: A (M, N) @ W)", py::arg("dtype"),
        py::arg("blocksize"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("device_index"),
        py::arg("trans") = false);
  m.def("gemv_kernel", &fsdp4bit::gemv_kernel,
        "the kernel gemv_4bit takes: (dtype, blocksize, nested, nested_blocksize, M, N, K, device_index) -> name");
}
