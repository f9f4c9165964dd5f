// The practical floor of a kernel that only reads B bytes (bench/read_floor.py): each CTA streams a contiguous
// slice with 16-byte L1-bypassing loads, UNROLL in flight per thread, and folds them into one word it never needs
// to write. Launched plainly (mode 0), or as a programmatic dependent launch that waits for the kernel before it
// first (mode 1, as a gemv must: its input comes from that kernel), optionally asking L2 for its slice before the
// wait (mode 2, as the row gemv does for its first bytes).
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

namespace {

template <int UNROLL>
__global__ void __launch_bounds__(512) read_kernel(const uint4* __restrict__ p, long long n16, unsigned* out,
                                                   int mode) {
  const long long per = (n16 + gridDim.x - 1) / gridDim.x;
  const long long b0 = (long long)blockIdx.x * per, b1 = min(n16, b0 + per);
  if (mode >= 1) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if (mode == 2 && threadIdx.x == 0) {
    for (long long o = b0; o < b1; o += 4096) {
      const unsigned bytes = unsigned(min(4096LL, b1 - o) * 16);
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(bytes) : "memory");
    }
  }
  if (mode >= 1) asm volatile("griddepcontrol.wait;" ::: "memory");
  unsigned acc = 0;
  long long i = b0 + threadIdx.x;
  for (; i + (UNROLL - 1) * blockDim.x < b1; i += UNROLL * blockDim.x) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      asm volatile("ld.global.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                   : "l"(p + i + u * blockDim.x));
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < b1; i += blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // almost never true: keeps the loads
}

}  // namespace

// Read `buf` (a multiple of 16 bytes, 16-byte aligned) with `ctas` CTAs of 512 threads in `mode`, `unroll` (4 or 8)
// loads in flight per thread; `out` takes one word per CTA at most.
void read_bytes(torch::Tensor buf, torch::Tensor out, int64_t ctas, int64_t mode, int64_t unroll) {
  TORCH_CHECK_VALUE(buf.is_cuda() && buf.is_contiguous() && buf.nbytes() % 16 == 0 && buf.data_ptr() != nullptr &&
                        reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16 == 0,
                    "buf must be a contiguous, 16-byte aligned CUDA tensor of a multiple of 16 bytes");
  TORCH_CHECK_VALUE(out.is_cuda() && out.numel() >= ctas && out.element_size() == 4, "out needs a word per CTA");
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2");
  TORCH_CHECK_VALUE(unroll == 4 || unroll == 8, "unroll must be 4 or 8");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(ctas));
  cfg.blockDim = dim3(512);
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = mode >= 1 ? 1 : 0;
  const auto* p = reinterpret_cast<const uint4*>(buf.data_ptr());
  auto* o = reinterpret_cast<unsigned*>(out.data_ptr());
  const long long n16 = (long long)(buf.nbytes() / 16);
  const int m = int(mode);
  const cudaError_t err = unroll == 4 ? cudaLaunchKernelEx(&cfg, read_kernel<4>, p, n16, o, m)
                                      : cudaLaunchKernelEx(&cfg, read_kernel<8>, p, n16, o, m);
  TORCH_CHECK(err == cudaSuccess, "read_kernel launch: ", cudaGetErrorString(err));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("read_bytes", &read_bytes); }
