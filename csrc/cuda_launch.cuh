// How the CUDA glue launches the kernels of kd_loss_kernels.cuh / instance_scores_kernels.cuh:
// plain launches on the current stream, cluster launches through cudaLaunchKernelEx, and cached
// checks that a cluster size can be scheduled at all on this device for that kernel, and how much
// dynamic shared memory a CTA of the kernel may have.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "cuda_rows.cuh"
#include "kd_loss_kernels.cuh"

#ifndef KDSEQ_CUDA_ARCHS
#define KDSEQ_CUDA_ARCHS ""
#endif

namespace kdseq {
namespace cuda_glue {

// A launch on a GPU that the build has no code for fails with "no kernel image is available for
// execution on the device", which names neither the GPU nor the fix; say both. Python code that
// holds a device checks it before the first launch (kdseq_fast._extension.check_cuda_kernels).
inline void check_launch(cudaError_t err, int device) {
  if (err == cudaErrorNoKernelImageForDevice) {
    (void)cudaGetLastError();  // not sticky: the caller may go on with other work
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(device);
    TORCH_CHECK(false, "kdseq_fast has no CUDA kernels for ", p->name, " (compute capability ", p->major, ".",
                p->minor, "): the extension was built for TORCH_CUDA_ARCH_LIST=\"", KDSEQ_CUDA_ARCHS,
                "\" (kdseq_fast.build_info()). Rebuild it for this GPU, e.g. TORCH_CUDA_ARCH_LIST=\"", p->major,
                ".", p->minor, "\" pip install --no-build-isolation <path to kdseq-fast>");
  }
  C10_CUDA_CHECK(err);
}

struct CudaLauncher {
  cudaStream_t stream;
  int device;

  template <typename... KArgs, typename... Args>
  void operator()(const cuda_rows::LaunchDims& d, void (*kernel)(KArgs...), Args&&... args) {
    if (d.cluster > 1) {
      // Every cluster plan asks cluster_ok first; a launch without it would give wrong numbers.
      TORCH_CHECK(has_cluster_code(kernel), "kdseq: internal error: a cluster launch of a kernel compiled "
                  "without clusters (", KDSEQ_CUDA_ARCHS, " on compute capability ",
                  at::cuda::getDeviceProperties(device)->major, ".", at::cuda::getDeviceProperties(device)->minor,
                  ")");
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(d.grid);
      cfg.blockDim = dim3(d.block);
      cfg.dynamicSmemBytes = d.smem;
      cfg.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = d.cluster;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      check_launch(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), device);
    } else {
      kernel<<<d.grid, d.block, d.smem, stream>>>(std::forward<Args>(args)...);
      check_launch(cudaGetLastError(), device);
    }
  }

  // cudaFuncGetAttributes of `kernel` on this device (std::nullopt when the query is refused), asked
  // once per (kernel, device): the static facts smem_ok and has_cluster_code read.
  template <typename... KArgs>
  std::optional<cudaFuncAttributes> func_attributes(void (*kernel)(KArgs...)) {
    static std::mutex mu;
    static std::map<std::pair<const void*, int>, std::optional<cudaFuncAttributes>> known;
    const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(key);
    if (it == known.end()) {
      cudaFuncAttributes attr;
      std::optional<cudaFuncAttributes> got;
      if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) got = attr;
      (void)cudaGetLastError();  // a refused query is an answer, not a sticky error
      it = known.emplace(key, got).first;
    }
    return it->second;
  }

  // Whether a CTA of `kernel` may have `bytes` of dynamic shared memory on this device. The first
  // call per (kernel, device) raises the kernel's limit to all the device allows (above the default
  // 48 KiB a kernel must opt in), so the answer never depends on an earlier call's size.
  template <typename... KArgs>
  bool smem_ok(void (*kernel)(KArgs...), int64_t bytes) {
    static std::mutex mu;
    static std::map<std::pair<const void*, int>, int64_t> limits;
    const auto attr = func_attributes(kernel);
    const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
    std::lock_guard<std::mutex> lock(mu);
    auto it = limits.find(key);
    if (it == limits.end()) {
      int64_t limit = 0;
      if (attr) {
        limit = static_cast<int64_t>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin) -
                static_cast<int64_t>(attr->sharedSizeBytes);
        if (limit <= 0 ||
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)) !=
                cudaSuccess)
          limit = 0;
        (void)cudaGetLastError();
      }
      it = limits.emplace(key, limit).first;
    }
    return bytes <= it->second;
  }

  // Whether the code of `kernel` that runs on this device has clusters compiled in
  // (KDSEQ_HAS_CLUSTERS: built from a compute_90 or newer virtual architecture). A Hopper GPU runs a
  // build whose best match is older PTX (TORCH_CUDA_ARCH_LIST="8.0+PTX") by JIT-compiling that PTX,
  // and there every cluster branch is gone: a cluster launch would leave each CTA thinking it is
  // alone (wrong sums, unwritten gradient columns, rows out of bounds).
  template <typename... KArgs>
  bool has_cluster_code(void (*kernel)(KArgs...)) {
    // ptxVersion: the virtual architecture the code was compiled from, major * 10 + minor.
    const auto attr = func_attributes(kernel);
    return attr && attr->ptxVersion >= 90;
  }

  // Whether `ctas`-CTA clusters of `kernel` (with `smem` bytes of dynamic shared memory a CTA, after
  // smem_ok) fit on this device (asked once per kernel, size, shared memory, device): the kernel's
  // code here has clusters (has_cluster_code) and the device can schedule them.
  template <typename... KArgs>
  bool cluster_ok(void (*kernel)(KArgs...), int ctas, int64_t smem = 0) {
    if (!has_cluster_code(kernel)) return false;
    static std::mutex mu;
    static std::map<std::tuple<const void*, int, int64_t, int>, bool> known;
    const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), ctas, smem, device);
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
    bool ok = true;
    if (ctas > 8) {
      // More than 8 CTAs a cluster is a Hopper extension that each kernel must opt into.
      ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    }
    if (ok) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(ctas);
      cfg.blockDim = dim3(cuda_rows::kBlockThreads);
      cfg.dynamicSmemBytes = static_cast<size_t>(smem);
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = ctas;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      int clusters = 0;
      ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0;
    }
    if (!ok) (void)cudaGetLastError();  // a refused query is an answer, not a sticky error
    known.emplace(key, ok);
    return ok;
  }
};

inline CudaLauncher current_launcher(const at::Tensor& x) {
  return CudaLauncher{at::cuda::getCurrentCUDAStream().stream(), x.get_device()};
}

inline kd_kernels::DeviceCaps device_caps(int device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  kd_kernels::DeviceCaps caps;
  caps.sms = prop->multiProcessorCount;
  // Clusters from sm_90; up to 16 CTAs where the kernel and device allow it (cluster_ok checks).
  caps.max_cluster = prop->major >= 9 ? 16 : 0;
  return caps;
}

}  // namespace cuda_glue
}  // namespace kdseq
