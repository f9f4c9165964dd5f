// Torch binding of the fused 4-bit GEMM experiment (gemm4_wgmma.cuh) for bench/gemm4_fused.py: the block-scale
// kernel, then the persistent wgmma kernel, with its three tensor maps encoded on the host
// (cuTensorMapEncodeTiled, found through the runtime so the extension needs no link against the driver).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <optional>

#include "gemm4_wgmma.cuh"

namespace fsdp4bit {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return EncodeTiled(nullptr);
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// a row-major (rows x cols) tensor, rows `stride_bytes` apart, read in boxes of box_rows x box_cols
CUtensorMap tensor_map_2d(CUtensorMapDataType type, const void* base, uint64_t rows, uint64_t cols,
                          uint64_t stride_bytes, uint32_t box_rows, uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {stride_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  TORCH_CHECK(encode_tiled() != nullptr, "cuTensorMapEncodeTiled is not available");
  const CUresult r = encode_tiled()(&map, type, 2, const_cast<void*>(base), dims, strides, box, elem_strides,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed: ", int(r));
  return map;
}

template <typename AT, int STAGES>
void launch(const CUtensorMap& tm_a, const CUtensorMap& tm_w, const CUtensorMap& tm_s, const Code16& code,
            int64_t M, int64_t N, int64_t K, void* out, cudaStream_t stream) {
  auto kernel = gemm4_kernel<AT, STAGES>;
  static std::atomic<uint64_t> smem_set{0};
  allow_dynamic_smem(kernel, int(GemmLayout<STAGES>::kSmem), smem_set);
  const int64_t tiles = ((N + kGemmRows - 1) / kGemmRows) * ((M + kGemmTokens - 1) / kGemmTokens);
  const int64_t grid = std::min<int64_t>(tiles, device_attribute(cudaDevAttrMultiProcessorCount));
  kernel<<<dim3(unsigned(grid)), kGemmThreads, GemmLayout<STAGES>::kSmem, stream>>>(
      tm_a, tm_w, tm_s, code, static_cast<AT*>(out), int(M), int(N), int(K));
}

}  // namespace
}  // namespace fsdp4bit

using namespace fsdp4bit;

// out (M, N) = A (M, K) @ dequantize(W).T; W packed uint8 (N * K / 2 bytes), absmax float32, or uint8 codes with
// the nested state (double quant); `stages` picks the pipeline depth (4, 5 or 6)
void gemm4(const torch::Tensor& A, const torch::Tensor& packed, const torch::Tensor& code, const torch::Tensor& absmax,
           const std::optional<torch::Tensor>& nested_absmax, const std::optional<torch::Tensor>& nested_code,
           const std::optional<torch::Tensor>& offset, int64_t nested_bs, int64_t blocksize, int64_t N,
           torch::Tensor& out, int64_t stages) {
  TORCH_CHECK(A.is_cuda() && A.dim() == 2 && A.is_contiguous(), "A must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(A.scalar_type() == at::kHalf || A.scalar_type() == at::kBFloat16, "A must be float16 or bfloat16");
  const int64_t M = A.size(0), K = A.size(1);
  TORCH_CHECK(K % kGemmK == 0 && blocksize % kGemmK == 0, "K and blocksize must be multiples of 64");
  TORCH_CHECK(packed.numel() * packed.element_size() == N * K / 2, "packed holds N * K / 2 bytes");
  TORCH_CHECK(out.sizes() == at::IntArrayRef({M, N}) && out.scalar_type() == A.scalar_type() && out.is_contiguous(),
              "out must be a contiguous (M, N) tensor of A's dtype");
  int log2bs = 0;
  while ((int64_t(1) << log2bs) < blocksize) ++log2bs;
  Code16 c;
  const auto cc = code.to(torch::kCPU, torch::kFloat).contiguous();
  for (int i = 0; i < 16; ++i) c.v[i] = cc.data_ptr<float>()[i];
  Scales sc{};
  const bool nested = nested_absmax.has_value();
  if (nested) {
    sc.absmax_q = absmax.data_ptr<uint8_t>();
    sc.nested_absmax = nested_absmax->data_ptr<float>();
    sc.nested_code = nested_code->data_ptr<float>();
    sc.offset = offset->data_ptr<float>();
    sc.nested_bs = nested_bs;
    int l = 0;
    while ((int64_t(1) << l) < nested_bs) ++l;
    sc.nested_log2 = (int64_t(1) << l) == nested_bs ? l : -1;
  } else {
    sc.absmax_f = absmax.data_ptr<float>();
    sc.nested_bs = 1;
    sc.nested_log2 = -1;
  }
  const c10::cuda::CUDAGuard guard(A.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int ld = int((N + 3) / 4 * 4);  // float32 rows 16-byte aligned for the tensor copy
  auto scales = torch::empty({K / kGemmK, ld}, A.options().dtype(at::kFloat));
  const dim3 sgrid(unsigned(std::min<int64_t>((N + 255) / 256, 64)), unsigned(K / kGemmK));
  if (nested)
    gemm_scales_kernel<true><<<sgrid, 256, 0, stream>>>(sc, log2bs, int(N), K, scales.data_ptr<float>(), ld);
  else
    gemm_scales_kernel<false><<<sgrid, 256, 0, stream>>>(sc, log2bs, int(N), K, scales.data_ptr<float>(), ld);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool half = A.scalar_type() == at::kHalf;
  const CUtensorMap tm_a = tensor_map_2d(half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                                         A.data_ptr(), M, K, K * 2, kGemmTokens, kGemmK, CU_TENSOR_MAP_SWIZZLE_128B);
  const CUtensorMap tm_w = tensor_map_2d(CU_TENSOR_MAP_DATA_TYPE_UINT8, packed.data_ptr(), N, K / 2, K / 2, kGemmRows,
                                         kGemmK / 2, CU_TENSOR_MAP_SWIZZLE_NONE);
  const CUtensorMap tm_s = tensor_map_2d(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, scales.data_ptr(), K / kGemmK, N,
                                         uint64_t(ld) * 4, 1, kGemmRows, CU_TENSOR_MAP_SWIZZLE_NONE);
  TORCH_CHECK(stages >= 4 && stages <= 6, "stages must be 4, 5 or 6");
  if (half) {
    if (stages == 4) launch<__half, 4>(tm_a, tm_w, tm_s, c, M, N, K, out.data_ptr(), stream);
    else if (stages == 5) launch<__half, 5>(tm_a, tm_w, tm_s, c, M, N, K, out.data_ptr(), stream);
    else launch<__half, 6>(tm_a, tm_w, tm_s, c, M, N, K, out.data_ptr(), stream);
  } else {
    if (stages == 4) launch<__nv_bfloat16, 4>(tm_a, tm_w, tm_s, c, M, N, K, out.data_ptr(), stream);
    else if (stages == 5) launch<__nv_bfloat16, 5>(tm_a, tm_w, tm_s, c, M, N, K, out.data_ptr(), stream);
    else launch<__nv_bfloat16, 6>(tm_a, tm_w, tm_s, c, M, N, K, out.data_ptr(), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemm4", &gemm4); }
