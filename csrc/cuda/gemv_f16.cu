// gemv instantiations for A in __half.
#include "gemv.cuh"

namespace fsdp4bit {
template void gemv_dispatch<__half>(const __half*, const uint8_t*, const Code16&, const Scales&, bool, int, int64_t, int64_t,
                                 int64_t, __half*, const __half*, cudaStream_t);
}  // namespace fsdp4bit
