// Dispatch of the blockwise 4-bit quantization on the input dtype; the kernels are instantiated in
// quantize_<dtype>.cu so ninja compiles them in parallel.
#include "quantize.cuh"

namespace fsdp4bit {

void launch_quantize(const void* x, FloatType dtype, int64_t n, int blocksize, const QuantTables& tab, bool identity,
                     bool vec_ok, uint8_t* out, float* absmax, cudaStream_t stream) {
  switch (dtype) {
    case FloatType::kF32:
      launch_quantize_typed(static_cast<const float*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream);
      break;
    case FloatType::kF16:
      launch_quantize_typed(static_cast<const __half*>(x), n, blocksize, tab, identity, vec_ok, out, absmax, stream);
      break;
    case FloatType::kBF16:
      launch_quantize_typed(static_cast<const __nv_bfloat16*>(x), n, blocksize, tab, identity, vec_ok, out, absmax,
                            stream);
      break;
  }
}

}  // namespace fsdp4bit
