// Device primitives of the CUDA kernels, in one place, so that the same kernel source compiles two
// ways: with nvcc for the GPU, and as plain host C++ against the CPU emulation in
// tests/cuda_emulation (KDSEQ_CUDA_EMULATION), where every CUDA thread is a host thread with real
// barriers, warp shuffles, per-CTA shared memory and clusters. The emulation is how the kernels'
// indexing, reductions and cluster exchanges are tested on machines without a GPU.
//
// Kernels use CUDA's own names for the thread indices (threadIdx, blockIdx, blockDim, gridDim) and
// __syncthreads(); everything else goes through kdseq::dev below.
#pragma once

#include <cstdint>

#if defined(KDSEQ_CUDA_EMULATION)
#include "emu_runtime.h"
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif

// Thread-block clusters and distributed shared memory: sm_90 and newer (and the emulation).
#if defined(KDSEQ_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define KDSEQ_HAS_CLUSTERS 1
#else
#define KDSEQ_HAS_CLUSTERS 0
#endif

// A per-CTA shared array. The emulation keys it by source line (plus type and size), which is
// unique per declaration; every CTA of an emulated cluster gets its own copy.
#if defined(KDSEQ_CUDA_EMULATION)
#define KDSEQ_SHARED(type, name, count) type* name = ::kdseq_emu::cta_shared<type, count>(__LINE__)
#else
#define KDSEQ_SHARED(type, name, count) __shared__ type name[count]
#endif

namespace kdseq {
namespace dev {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
#if defined(KDSEQ_CUDA_EMULATION)
  return ::kdseq_emu::shfl_xor(v, lane_mask);
#else
  return __shfl_xor_sync(kFullMask, v, lane_mask);
#endif
}

// Makes this thread's global writes visible device-wide before a later signal (the last-CTA
// reduction's ticket).
__device__ __forceinline__ void fence() {
#if defined(KDSEQ_CUDA_EMULATION)
  ::kdseq_emu::fence();
#else
  __threadfence();
#endif
}

__device__ __forceinline__ unsigned atomic_add(unsigned* p, unsigned v) {
#if defined(KDSEQ_CUDA_EMULATION)
  return ::kdseq_emu::atomic_add(p, v);
#else
  return atomicAdd(p, v);
#endif
}

// A read that bypasses caches which may hold a stale copy (the last CTA reads other CTAs' writes).
template <typename T>
__device__ __forceinline__ T load_volatile(const T* p) {
  return *static_cast<const volatile T*>(p);
}

#if KDSEQ_HAS_CLUSTERS
// Rank of this CTA in its (1-D) cluster, the cluster size, a cluster-wide barrier (with the
// acquire/release that makes shared-memory writes visible to the other CTAs), and the address of
// the same shared variable in another CTA of the cluster.
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(KDSEQ_CUDA_EMULATION)
  return ::kdseq_emu::cluster_rank();
#else
  return cooperative_groups::this_cluster().block_rank();
#endif
}

__device__ __forceinline__ unsigned cluster_size() {
#if defined(KDSEQ_CUDA_EMULATION)
  return ::kdseq_emu::cluster_size();
#else
  return cooperative_groups::this_cluster().num_blocks();
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(KDSEQ_CUDA_EMULATION)
  ::kdseq_emu::cluster_sync();
#else
  cooperative_groups::this_cluster().sync();
#endif
}

template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, unsigned rank) {
#if defined(KDSEQ_CUDA_EMULATION)
  return ::kdseq_emu::cluster_map(p, rank);
#else
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#endif
}
#endif  // KDSEQ_HAS_CLUSTERS

// Stops a kernel that was launched where it cannot run (a cluster kernel on a GPU without
// clusters); the host never does that, this turns a planning bug into a launch error.
__device__ __forceinline__ void unreachable() {
#if defined(KDSEQ_CUDA_EMULATION)
  ::kdseq_emu::unreachable();
#else
  __trap();
#endif
}

}  // namespace dev
}  // namespace kdseq
