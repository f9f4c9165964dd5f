// gemv instantiations for A in float.
#include "gemv.cuh"

namespace fsdp4bit {
template void gemv_dispatch<float>(const float*, const uint8_t*, const Code16&, const Scales&, bool, int, int64_t, int64_t,
                                 int64_t, float*, const float*, cudaStream_t);
}  // namespace fsdp4bit
