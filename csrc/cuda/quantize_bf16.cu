// quantize instantiations for x in __nv_bfloat16.
#include "quantize.cuh"

namespace fsdp4bit {
template void launch_quantize_typed<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int, const QuantTables&, bool, bool, uint8_t*, float*,
                                        cudaStream_t);
}  // namespace fsdp4bit
