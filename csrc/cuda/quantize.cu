// Launcher of the blockwise 4-bit quantization kernel (quantize.cuh) for every dtype and blocksize.
#include <type_traits>

#include "quantize.cuh"

namespace fsdp4bit {
namespace {

// Blocks of up to 256 elements take P = 2 blocks per thread and step (two 16-byte loads in flight), larger
// ones P = 1; the grid is capped at kQuantCtasPerSm CTAs per SM and strides beyond (tuned with bench/cuda/sweep.cu).
constexpr int kQuantCtasPerSm = 16;

template <typename T>
void launch_typed(const T* x, int64_t n, int blocksize, const QuantTables& tab, bool identity, bool vec_ok, uint8_t* out,
                  float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int64_t cap = int64_t(device_attribute(cudaDevAttrMultiProcessorCount)) * kQuantCtasPerSm;
  auto go = [&](auto bs_tag) {
    constexpr int BS = decltype(bs_tag)::value;
    constexpr int P = BS <= 256 ? 2 : 1;
    quantize_kernel<T, BS, P><<<quantize_grid<BS, P>(nblocks, cap), kQuantThreads, 0, stream>>>(
        x, n, nblocks, tab, identity, vec_ok, out, absmax);
  };
  switch (blocksize) {
    case 32: go(std::integral_constant<int, 32>{}); break;
    case 64: go(std::integral_constant<int, 64>{}); break;
    case 128: go(std::integral_constant<int, 128>{}); break;
    case 256: go(std::integral_constant<int, 256>{}); break;
    case 512: go(std::integral_constant<int, 512>{}); break;
    case 1024: go(std::integral_constant<int, 1024>{}); break;
    case 2048: go(std::integral_constant<int, 2048>{}); break;
    case 4096: go(std::integral_constant<int, 4096>{}); break;
    default: break;  // validated by the caller
  }
}

}  // namespace

void launch_quantize(const void* x, FloatType dtype, int64_t n, int blocksize, const QuantTables& tab, bool identity,
                     bool vec_ok, uint8_t* out, float* absmax, cudaStream_t stream) {
  switch (dtype) {
    case FloatType::kF32: launch_typed(static_cast<const float*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream); break;
    case FloatType::kF16: launch_typed(static_cast<const __half*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream); break;
    case FloatType::kBF16: launch_typed(static_cast<const __nv_bfloat16*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream); break;
  }
}

}  // namespace fsdp4bit
