// Row access and reductions shared by the CUDA kernels (and, through cuda_compat.cuh, by their CPU
// emulation in tests).
//
// Every dtype is read four elements at a time: one 16-byte load for fp32, 8 bytes for fp16/bf16,
// 32 bytes (two loads) for fp64. The element type is a runtime code, not a template parameter: the
// switch is uniform across a warp and costs nothing next to the memory access, and it keeps the
// number of kernel instantiations (compile time, binary size) independent of the 9 student/teacher
// dtype pairs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cuda_compat.cuh"
#include "row_math.h"

namespace kdseq {
namespace cuda_rows {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };
constexpr int kVec = 4;             // elements per vector access
constexpr int kBlockThreads = 256;  // threads of every CTA

struct LaunchDims {
  unsigned grid = 1, block = kBlockThreads, cluster = 1;
  unsigned smem = 0;  // dynamic shared memory per CTA, bytes
};

__host__ __device__ inline int dtype_size(int dtype) {
  return dtype == kF32 ? 4 : dtype == kF64 ? 8 : 2;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename acc_t>
__device__ __forceinline__ acc_t load_one(const void* row, int dtype, int64_t j) {
  switch (dtype) {
    case kF32: return static_cast<acc_t>(static_cast<const float*>(row)[j]);
    case kF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(row)[j]));
    case kBF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(row)[j]));
    default: return static_cast<acc_t>(static_cast<const double*>(row)[j]);
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const void* row, int64_t j, acc_t (&out)[kVec]) {
  const AlignedVec<T, kVec> v = *reinterpret_cast<const AlignedVec<T, kVec>*>(static_cast<const T*>(row) + j);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = static_cast<acc_t>(static_cast<float>(v.v[i]));
}

template <typename acc_t>
__device__ __forceinline__ void load_vec_f64(const void* row, int64_t j, acc_t (&out)[kVec]) {
  const AlignedVec<double, kVec> v = *reinterpret_cast<const AlignedVec<double, kVec>*>(static_cast<const double*>(row) + j);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = static_cast<acc_t>(v.v[i]);
}

// Elements [j, j + 4) of a row of `cols` elements; past the end: `fill`. VECTOR: the row start is
// aligned to 4 elements and cols % 4 == 0, so a vector is either wholly inside or wholly outside.
template <bool VECTOR, typename acc_t>
__device__ __forceinline__ void load4(const void* row, int dtype, int64_t j, int64_t cols, acc_t fill,
                                      acc_t (&out)[kVec]) {
  if (VECTOR) {
    if (j >= cols) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = fill;
      return;
    }
    switch (dtype) {
      case kF32: load_vec<float>(row, j, out); return;
      case kF16: load_vec<c10::Half>(row, j, out); return;
      case kBF16: load_vec<c10::BFloat16>(row, j, out); return;
      default: load_vec_f64(row, j, out); return;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = j + i < cols ? load_one<acc_t>(row, dtype, j + i) : fill;
  }
}

// The bytes of one vector access of a 16- or 32-bit element type (8 or 16 bytes), not yet converted.
struct RawVec {
  uint32_t w[kVec];
};

// Issues the load of elements [j, j + 4) (aligned vector rows, fp32/fp16/bf16) and nothing else:
// no instruction reads the registers until decode4(). A conversion right behind each load would
// make the thread wait for that load before issuing the next one (the runtime dtype switch keeps
// them in separate branches), so a bf16 row was read one vector latency at a time.
__device__ __forceinline__ void load_raw4(const void* row, int dtype, int64_t j, int64_t cols, RawVec& r) {
  if (j >= cols) return;
  if (dtype == kF32) {
    const AlignedVec<uint32_t, 4> v = *reinterpret_cast<const AlignedVec<uint32_t, 4>*>(static_cast<const float*>(row) + j);
#pragma unroll
    for (int i = 0; i < 4; ++i) r.w[i] = v.v[i];
  } else {
    const AlignedVec<uint32_t, 2> v = *reinterpret_cast<const AlignedVec<uint32_t, 2>*>(static_cast<const uint16_t*>(row) + j);
    r.w[0] = v.v[0];
    r.w[1] = v.v[1];
  }
}

// The four elements of a load_raw4() as floats (past the end of the row: `fill`).
__device__ __forceinline__ void decode4(const RawVec& r, int dtype, int64_t j, int64_t cols, float fill,
                                        float (&out)[kVec]) {
  if (j >= cols) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = fill;
    return;
  }
  if (dtype == kF32) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = rowmath::bits_to_float(r.w[i]);
  } else if (dtype == kBF16) {
    // A bf16 is the top half of an fp32; pairs are little-endian.
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = rowmath::bits_to_float(i % 2 ? r.w[i / 2] & 0xffff0000u : r.w[i / 2] << 16);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      out[i] = static_cast<float>(
          c10::Half(static_cast<uint16_t>((r.w[i / 2] >> (16 * (i % 2))) & 0xffffu), c10::Half::from_bits()));
  }
}

// Elements [j[k], j[k] + 4) of a student and a teacher row for K vector positions, all 2K loads
// issued before any is converted (see load_raw4). A null teacher row reads as zeros. fp64 rows
// (the split path's gradcheck) and unaligned rows take load4 one vector at a time.
template <int K, bool VECTOR, typename acc_t>
__device__ __forceinline__ void load_pairs(const void* srow, int s_dtype, const void* trow, int t_dtype,
                                           const int64_t (&j)[K], int64_t cols, acc_t fill, acc_t (&x)[K][kVec],
                                           acc_t (&z)[K][kVec]) {
  if constexpr (VECTOR && std::is_same_v<acc_t, float>) {
    RawVec rs[K], rt[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      load_raw4(srow, s_dtype, j[k], cols, rs[k]);
      if (trow != nullptr) load_raw4(trow, t_dtype, j[k], cols, rt[k]);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      decode4(rs[k], s_dtype, j[k], cols, fill, x[k]);
      if (trow != nullptr) decode4(rt[k], t_dtype, j[k], cols, fill, z[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      load4<VECTOR>(srow, s_dtype, j[k], cols, fill, x[k]);
      if (trow != nullptr) load4<VECTOR>(trow, t_dtype, j[k], cols, fill, z[k]);
    }
  }
  if (trow == nullptr) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) z[k][i] = acc_t(0);
    }
  }
}

// Elements [j0, j0 + 8) of a student and a teacher row as flat arrays (two adjacent vectors through
// load_pairs; past the end of the row: -inf): the step of the streaming statistics loops, whose
// running state is re-based once per chunk.
constexpr int kChunk = 2 * kVec;

template <bool VECTOR, typename acc_t>
__device__ __forceinline__ void load_chunk(const void* srow, int s_dtype, const void* trow, int t_dtype, int64_t j0,
                                           int64_t cols, acc_t (&sv)[kChunk], acc_t (&tv)[kChunk]) {
  const int64_t j[2] = {j0, j0 + kVec};
  acc_t x[2][kVec], z[2][kVec];
  load_pairs<2, VECTOR>(srow, s_dtype, trow, t_dtype, j, cols, rowmath::neg_inf<acc_t>(), x, z);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      sv[h * kVec + i] = x[h][i];
      tv[h * kVec + i] = z[h][i];
    }
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_vec(void* row, int64_t j, const acc_t (&val)[kVec]) {
  AlignedVec<T, kVec> v;
#pragma unroll
  for (int i = 0; i < kVec; ++i) v.v[i] = static_cast<T>(val[i]);
  *reinterpret_cast<AlignedVec<T, kVec>*>(static_cast<T*>(row) + j) = v;
}

template <typename acc_t>
__device__ __forceinline__ void store_one(void* row, int dtype, int64_t j, acc_t v) {
  switch (dtype) {
    case kF32: static_cast<float*>(row)[j] = static_cast<float>(v); return;
    case kF16: static_cast<c10::Half*>(row)[j] = c10::Half(static_cast<float>(v)); return;
    case kBF16: static_cast<c10::BFloat16*>(row)[j] = c10::BFloat16(static_cast<float>(v)); return;
    default: static_cast<double*>(row)[j] = static_cast<double>(v); return;
  }
}

template <bool VECTOR, typename acc_t>
__device__ __forceinline__ void store4(void* row, int dtype, int64_t j, int64_t cols, const acc_t (&val)[kVec]) {
  if (VECTOR) {
    if (j >= cols) return;
    switch (dtype) {
      case kF32: store_vec<float>(row, j, val); return;
      case kF16: store_vec<c10::Half>(row, j, val); return;
      case kBF16: store_vec<c10::BFloat16>(row, j, val); return;
      default: store_vec<double>(row, j, val); return;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (j + i < cols) store_one(row, dtype, j + i, val[i]);
  }
}

// Reduction operators with their identities.
template <typename acc_t>
struct MaxOp {
  __device__ __forceinline__ acc_t operator()(acc_t a, acc_t b) const { return rowmath::kd_max(a, b); }
  __device__ __forceinline__ static acc_t identity() { return rowmath::neg_inf<acc_t>(); }
};

template <typename acc_t>
struct SumOp {
  __device__ __forceinline__ acc_t operator()(acc_t a, acc_t b) const { return a + b; }
  __device__ __forceinline__ static acc_t identity() { return acc_t(0); }
};

// N values reduced over a group of GROUP threads: lanes of a warp (GROUP <= 32, aligned sub-groups)
// or the whole CTA (GROUP == kBlockThreads). Every thread of the group ends with the same bits:
// butterfly steps combine a and b in both lanes (IEEE max and + are commutative), and the CTA step
// reads the warps' values in one fixed order. `smem` holds 32 * N values (CTA groups only).
template <int GROUP, int N, typename acc_t, typename Op>
__device__ __forceinline__ void group_allreduce(acc_t (&v)[N], Op op, acc_t* smem) {
  constexpr int kWarpSpan = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int off = kWarpSpan / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = op(v[i], dev::shfl_xor(v[i], off));
  }
  if constexpr (GROUP > 32) {
    constexpr int kWarps = GROUP / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the previous reduction's readers are done with smem
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) smem[warp * N + i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
      acc_t r = smem[i];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) r = op(r, smem[w * N + i]);
      v[i] = r;
    }
  }
}

#if KDSEQ_HAS_CLUSTERS
// CTA-reduced values (the same in every thread of each CTA) reduced over the CTAs of a cluster
// through distributed shared memory. Warp 0 reads the cluster's slots, lane k from CTA k, and
// butterflies them: every CTA computes the same bits in the same order. `slot` (N values) must not
// be written again before a later cluster_sync(); `bcast` (N values) is CTA-local.
template <int N, typename acc_t, typename Op>
__device__ __forceinline__ void cluster_allreduce(acc_t (&v)[N], Op op, acc_t* slot, acc_t* bcast) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) slot[i] = v[i];
  }
  dev::cluster_sync();
  const unsigned ctas = dev::cluster_size();
  if (threadIdx.x < 32) {
    acc_t w[N];
    const unsigned lane = threadIdx.x;
    const acc_t* remote = lane < ctas ? dev::cluster_map(slot, lane) : nullptr;
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = remote != nullptr ? remote[i] : Op::identity();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) w[i] = op(w[i], dev::shfl_xor(w[i], off));
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) bcast[i] = w[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = bcast[i];
}
#endif

// A state merged with `merge` over a group, like group_allreduce (for states that are not a list of
// independent values: the scores' running maxima, argmax and re-based sums). `shfl(state, off)`
// shuffles every field; `smem` holds 32 states (CTA groups only).
template <int GROUP, typename State, typename Shfl, typename Merge>
__device__ __forceinline__ State group_allmerge(State st, State* smem, Shfl shfl, Merge merge) {
  constexpr int kWarpSpan = GROUP < 32 ? GROUP : 32;
#pragma unroll
  for (int off = kWarpSpan / 2; off > 0; off >>= 1) st = merge(st, shfl(st, off));
  if constexpr (GROUP > 32) {
    constexpr int kWarps = GROUP / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) smem[warp] = st;
    __syncthreads();
    State r = smem[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = merge(r, smem[w]);
    st = r;
  }
  return st;
}

// The loss of a reduced call: every CTA takes a ticket after its row losses are written, and the CTA
// that takes the last one sums all rows in one fixed order (deterministic, no atomics on floats).
// `counter` is zeroed by the prologue kernel of the same call. Returns in every thread.
template <typename acc_t>
__device__ __forceinline__ void last_cta_reduce(const acc_t* row_loss, int64_t rows, unsigned* counter, acc_t scale,
                                                acc_t* loss, acc_t* smem /* 32 */, unsigned* flag /* 1 */) {
  dev::fence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = dev::atomic_add(counter, 1u) == gridDim.x - 1 ? 1u : 0u;
  __syncthreads();
  if (*flag == 0u) return;
  dev::fence();
  acc_t part[1] = {acc_t(0)};
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) part[0] += dev::load_volatile(row_loss + r);
  group_allreduce<kBlockThreads>(part, SumOp<acc_t>(), smem);
  if (threadIdx.x == 0) *loss = part[0] * scale;
}

}  // namespace cuda_rows
}  // namespace kdseq
