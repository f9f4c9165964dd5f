// quantize instantiations for x in __half.
#include "quantize.cuh"

namespace fsdp4bit {
template void launch_quantize_typed<__half>(const __half*, int64_t, int, const QuantTables&, bool, bool, uint8_t*, float*,
                                        cudaStream_t);
}  // namespace fsdp4bit
