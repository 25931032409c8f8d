// CUDA kernel of the per-instance scores: one streaming read of each (student, teacher) row, the
// six measures written by the group's first lane. Same row/group layout as the KD-loss kernel.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda_rows.cuh"
#include "kdseq.h"
#include "row_math.h"

namespace kdseq {
namespace {

using namespace rowmath;
using namespace cuda_rows;

template <typename acc_t>
struct ScoreShfl {
  __device__ __forceinline__ ScoreStats<acc_t> operator()(const ScoreStats<acc_t>& s, int off) const {
    ScoreStats<acc_t> o;
    o.ms = __shfl_xor_sync(kFullMask, s.ms, off);
    o.z1 = __shfl_xor_sync(kFullMask, s.z1, off);
    o.w1 = __shfl_xor_sync(kFullMask, s.w1, off);
    o.m_noty = __shfl_xor_sync(kFullMask, s.m_noty, off);
    o.amax = static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(s.amax), off));
    o.zsT = __shfl_xor_sync(kFullMask, s.zsT, off);
    o.mt = __shfl_xor_sync(kFullMask, s.mt, off);
    o.ztT = __shfl_xor_sync(kFullMask, s.ztT, off);
    o.u = __shfl_xor_sync(kFullMask, s.u, off);
    return o;
  }
};

template <typename acc_t>
struct ScoreMerge {
  acc_t invT;
  bool with_teacher;
  __device__ __forceinline__ ScoreStats<acc_t> operator()(const ScoreStats<acc_t>& a,
                                                         const ScoreStats<acc_t>& b) const {
    return score_stats_merge(a, b, invT, with_teacher);
  }
};

template <typename s_t, typename t_t, typename acc_t, int GROUP, int VEC, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) instance_scores_kernel(
    const s_t* __restrict__ s, int64_t s_row, int64_t s_col, const t_t* __restrict__ t, int64_t t_row,
    int64_t t_col, const int64_t* __restrict__ labels, int64_t B, int64_t C, acc_t T, acc_t* __restrict__ out) {
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  __shared__ ScoreStats<acc_t> smem[32];
  const bool with_teacher = t != nullptr;
  const acc_t invT = acc_t(1) / T;
  const int lane = threadIdx.x % GROUP;
  const int64_t group_in_block = threadIdx.x / GROUP;
  const ScoreMerge<acc_t> merge{invT, with_teacher};

  for (int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + group_in_block; r < B;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const s_t* srow = s + r * s_row;
    const t_t* trow = with_teacher ? t + r * t_row : nullptr;
    const int64_t y = labels[r];
    ScoreStats<acc_t> st = score_stats_init<acc_t>();
    for (int64_t j = int64_t(lane) * VEC; j < C; j += int64_t(GROUP) * VEC) {
      acc_t sv[VEC], tv[VEC];
      load_row<VECTOR, VEC>(srow, s_col, j, C, neg_inf<acc_t>(), sv);
      if (with_teacher) {
        load_row<VECTOR, VEC>(trow, t_col, j, C, neg_inf<acc_t>(), tv);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) tv[i] = acc_t(0);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        // Padding past C must not become the argmax or the runner-up: skip it entirely.
        if (VECTOR || j + i < C) score_stats_push(st, sv[i], tv[i], j + i, y, invT, with_teacher);
      }
    }
    st = group_allmerge<GROUP>(st, score_stats_init<acc_t>(), smem, ScoreShfl<acc_t>(), merge);
    if (lane == 0) {
      const acc_t s_y = static_cast<acc_t>(srow[y * s_col]);
      score_finalize(st, s_y, y, T, with_teacher, out + r * kNumScoreFields);
    }
  }
}

template <typename s_t, typename t_t, typename acc_t>
void launch(const at::Tensor& student, const at::Tensor& labels, const at::Tensor& teacher, double temperature,
            at::Tensor& out) {
  constexpr int VEC = vec_width<s_t, t_t>();
  const int64_t B = student.size(0), C = student.size(1);
  const bool with_teacher = teacher.defined();
  const s_t* s = student.data_ptr<s_t>();
  const t_t* t = with_teacher ? teacher.data_ptr<t_t>() : nullptr;
  const int64_t s_row = student.stride(0), s_col = student.stride(1);
  const int64_t t_row = with_teacher ? teacher.stride(0) : 0, t_col = with_teacher ? teacher.stride(1) : 1;
  const bool vector = s_col == 1 && C % VEC == 0 && s_row % VEC == 0 && aligned16(s) &&
                      (!with_teacher || (t_col == 1 && t_row % VEC == 0 && aligned16(t)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
  auto go = [&](auto group_tag, auto vector_tag) {
    constexpr int GROUP = decltype(group_tag)::value;
    constexpr bool VECTOR = decltype(vector_tag)::value;
    constexpr int rows_per_block = kBlockThreads / GROUP;
    const int64_t blocks = std::min<int64_t>((B + rows_per_block - 1) / rows_per_block, max_blocks);
    instance_scores_kernel<s_t, t_t, acc_t, GROUP, VEC, VECTOR>
        <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
            s, s_row, s_col, t, t_row, t_col, labels.data_ptr<int64_t>(), B, C, static_cast<acc_t>(temperature),
            out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_row_layout(C, vector, go);
}

}  // namespace

void instance_scores_rows_cuda(const at::Tensor& student, const at::Tensor& labels, const at::Tensor& teacher,
                               double temperature, at::Tensor& out) {
  const auto t_type = teacher.defined() ? teacher.scalar_type() : student.scalar_type();
  if (student.scalar_type() == at::kDouble) {
    TORCH_CHECK(t_type == at::kDouble, "kdseq: float64 student needs a float64 teacher");
    launch<double, double, double>(student, labels, teacher, temperature, out);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "scores_cuda_s", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_type, "scores_cuda_t", [&] {
      using t_t = scalar_t;
      if constexpr (std::is_same_v<s_t, double> || std::is_same_v<t_t, double>) {
        TORCH_CHECK(false, "kdseq: float64 logits must be used for both student and teacher");
      } else {
        launch<s_t, t_t, float>(student, labels, teacher, temperature, out);
      }
    });
  });
}

}  // namespace kdseq
