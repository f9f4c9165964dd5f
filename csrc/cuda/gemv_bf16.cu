// gemv instantiations for A in __nv_bfloat16.
#include "gemv.cuh"

namespace fsdp4bit {
template void gemv_dispatch<__nv_bfloat16>(const __nv_bfloat16*, const uint8_t*, const Code16&, const Scales&, bool, int, int64_t, int64_t,
                                 int64_t, __nv_bfloat16*, const __nv_bfloat16*, cudaStream_t);
}  // namespace fsdp4bit
