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

// The CTA's dynamic shared memory (bytes, 16-byte aligned; its size is the launch's LaunchDims::smem).
#if defined(KDSEQ_CUDA_EMULATION)
#define KDSEQ_DYN_SHARED(name) unsigned char* name = ::kdseq_emu::dyn_shared()
#else
#define KDSEQ_DYN_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
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

// An asynchronous copy of 16 bytes (both addresses 16-byte aligned) from global to shared memory
// (sm_80's cp.async, through L2 only): it holds no register while in flight, so a thread can have
// its whole share of a row slice on the way at once. The bytes may be read only after
// cp_async_wait_all() and a barrier. The emulation defers the copy to cp_async_wait_all(), so a
// read before the wait sees the uninitialized (NaN) bytes and fails the tests.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(KDSEQ_CUDA_EMULATION)
  ::kdseq_emu::cp_async16(smem_dst, gmem_src);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}

// Waits for every cp_async16() this thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(KDSEQ_CUDA_EMULATION)
  ::kdseq_emu::cp_async_wait_all();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
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
