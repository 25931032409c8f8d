// Row traversal and cross-thread merging shared by the CUDA kernels.
//
// A "group" of GROUP threads owns one row: a warp (GROUP == 32) for small C, so a block carries
// several rows, or a whole block for large C. Each thread walks the row with stride GROUP * VEC,
// loading VEC consecutive elements at a time (one 128-bit load for fp32 / 8 x 16-bit, when the rows
// are contiguous and aligned), and partial states are merged with the row math's merge rules.
#pragma once

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace kdseq {
namespace cuda_rows {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpRowsMaxC = 1024;  // up to here a warp per row (<= 32 elements per lane)
constexpr int kBlockThreads = 256;   // threads per block in both modes

template <typename T>
inline bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Calls go(GroupTag, VectorTag) with the row-group size (a warp for C <= kWarpRowsMaxC, else the
// whole block) and the load mode as compile-time constants (std::integral_constant / bool_constant).
template <typename Go>
inline void dispatch_row_layout(int64_t cols, bool vector, Go&& go) {
  using Warp = std::integral_constant<int, 32>;
  using Block = std::integral_constant<int, kBlockThreads>;
  if (cols <= kWarpRowsMaxC) {
    vector ? go(Warp{}, std::true_type{}) : go(Warp{}, std::false_type{});
  } else {
    vector ? go(Block{}, std::true_type{}) : go(Block{}, std::false_type{});
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// Elements per vector load: 16 bytes of the wider of the two input types.
template <typename A, typename B>
constexpr int vec_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

// Loads elements [j, j + VEC) of a row into acc_t registers. VECTOR: contiguous, aligned, in range.
// Otherwise strided loads, elements past `cols` get `fill`.
template <bool VECTOR, int VEC, typename in_t, typename acc_t>
__device__ __forceinline__ void load_row(const in_t* row, int64_t col_step, int64_t j, int64_t cols,
                                         acc_t fill, acc_t (&out)[VEC]) {
  if constexpr (VECTOR) {
    if constexpr (sizeof(in_t) * VEC == 16 || sizeof(in_t) * VEC == 8 || sizeof(in_t) * VEC == 4) {
      const AlignedVec<in_t, VEC> v = *reinterpret_cast<const AlignedVec<in_t, VEC>*>(row + j);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(v.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(row[j + i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t c = j + i;
      out[i] = c < cols ? static_cast<acc_t>(row[c * col_step]) : fill;
    }
  }
}

template <bool VECTOR, int VEC, typename out_t, typename acc_t>
__device__ __forceinline__ void store_row(out_t* row, int64_t j, int64_t cols, const acc_t (&val)[VEC]) {
  if constexpr (VECTOR) {
    AlignedVec<out_t, VEC> v;
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.v[i] = static_cast<out_t>(val[i]);
    *reinterpret_cast<AlignedVec<out_t, VEC>*>(row + j) = v;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      if (j + i < cols) row[j + i] = static_cast<out_t>(val[i]);
  }
}

// Butterfly merge inside a warp: every lane ends with the merged state of the warp.
// `shfl(state, offset)` returns a copy of the state with each field shuffled.
template <typename State, typename Shfl, typename Merge>
__device__ __forceinline__ State warp_allmerge(State st, Shfl shfl, Merge merge) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl(st, off));
  return st;
}

// Merge across a group: a warp (GROUP == 32) or the whole block (GROUP == blockDim.x).
// `smem` must hold 32 States; `identity` is the merge identity (the init state); every thread of the
// group returns the merged state.
template <int GROUP, typename State, typename Shfl, typename Merge>
__device__ __forceinline__ State group_allmerge(State st, State identity, State* smem, Shfl shfl,
                                                Merge merge) {
  st = warp_allmerge(st, shfl, merge);
  if constexpr (GROUP == 32) {
    return st;
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int kWarps = GROUP / 32;
    __syncthreads();  // smem may still be read from a previous merge
    if (lane == 0) smem[warp] = st;
    __syncthreads();
    if (warp == 0) {
      State w = lane < kWarps ? smem[lane] : identity;
      w = warp_allmerge(w, shfl, merge);
      if (lane == 0) smem[0] = w;
    }
    __syncthreads();
    return smem[0];
  }
}

}  // namespace cuda_rows
}  // namespace kdseq
