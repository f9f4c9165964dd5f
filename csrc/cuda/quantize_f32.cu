// quantize instantiations for x in float.
#include "quantize.cuh"

namespace fsdp4bit {
template void launch_quantize_typed<float>(const float*, int64_t, int, const QuantTables&, bool, bool, uint8_t*, float*,
                                        cudaStream_t);
}  // namespace fsdp4bit
