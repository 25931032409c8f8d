// CUDA kernel of the per-instance scores: one read of each (student, teacher) row gives the six
// measures of row_math.h. No gradient, so no second read either way: a group of threads (8 or 32
// lanes, or a CTA for long rows) streams the row, each thread keeping running statistics that it
// re-bases once per eight elements (not per element), and the group merges them with row_math's
// merge rule. One launch, no host synchronization; a label outside [0, C) gives a NaN row.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda_rows.cuh"
#include "row_math.h"

namespace kdseq {
namespace score_kernels {

using namespace rowmath;
using namespace cuda_rows;

template <typename acc_t>
struct ScoreArgs {
  const void* s;
  const void* t;  // null: no teacher (kd column 0)
  const int64_t* labels;
  acc_t* out;     // (B, 6)
  int64_t B, C, s_row, t_row;
  int s_dtype, t_dtype;
  acc_t T;
};

template <typename acc_t>
struct ScoreShfl {
  __device__ __forceinline__ ScoreStats<acc_t> operator()(const ScoreStats<acc_t>& s, int off) const {
    ScoreStats<acc_t> o;
    o.ms = dev::shfl_xor(s.ms, off);
    o.z1 = dev::shfl_xor(s.z1, off);
    o.w1 = dev::shfl_xor(s.w1, off);
    o.m_noty = dev::shfl_xor(s.m_noty, off);
    o.amax = static_cast<int64_t>(dev::shfl_xor(static_cast<long long>(s.amax), off));
    o.zsT = dev::shfl_xor(s.zsT, off);
    o.mt = dev::shfl_xor(s.mt, off);
    o.ztT = dev::shfl_xor(s.ztT, off);
    o.u = dev::shfl_xor(s.u, off);
    return o;
  }
};

template <typename acc_t>
struct ScoreMerge {
  acc_t invT;
  bool with_teacher;
  __device__ __forceinline__ ScoreStats<acc_t> operator()(const ScoreStats<acc_t>& x, const ScoreStats<acc_t>& y) const {
    return score_stats_merge(x, y, invT, with_teacher);
  }
};

template <typename acc_t, int GROUP, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) instance_scores_kernel(const ScoreArgs<acc_t> a) {
  constexpr int kGroupsPerCta = kBlockThreads / GROUP;
  KDSEQ_SHARED(ScoreStats<acc_t>, smem, 32);
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const bool with_teacher = a.t != nullptr;
  const acc_t invT = acc_t(1) / a.T;
  const ScoreMerge<acc_t> merge{invT, with_teacher};

  // CTA-uniform trip count: every lane takes part in every shuffle.
  for (int64_t base = int64_t(blockIdx.x) * kGroupsPerCta; base < a.B; base += int64_t(gridDim.x) * kGroupsPerCta) {
    const int64_t row = base + group;
    const bool active = row < a.B;
    const int64_t cols = active ? a.C : 0;
    const int64_t y = active ? a.labels[row] : -1;
    const char* srow = static_cast<const char*>(a.s) + (active ? row * a.s_row * dtype_size(a.s_dtype) : 0);
    const char* trow = with_teacher && active ? static_cast<const char*>(a.t) + row * a.t_row * dtype_size(a.t_dtype)
                                              : nullptr;
    ScoreStats<acc_t> st = score_stats_init<acc_t>();
    for (int64_t j0 = int64_t(lane) * kChunk; j0 < cols; j0 += int64_t(GROUP) * kChunk) {
      acc_t sv[kChunk], tv[kChunk];
      load_chunk<VECTOR>(srow, a.s_dtype, trow, a.t_dtype, j0, cols, sv, tv);
      // Chunk maxima, the chunk's first maximum and its runner-up excluding the label.
      acc_t cms = neg_inf<acc_t>(), cmt = neg_inf<acc_t>();
      int64_t cfirst = -1;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int64_t j = j0 + i;
        if (j < cols) {
          // The first non-NaN value starts it, only a strictly larger one moves it: NaN is never
          // the argmax (as on the CPU, where the chunk's first index equal to its NaN-skipping
          // maximum is taken; an all-NaN chunk leaves it unset).
          if (cfirst < 0 ? sv[i] == sv[i] : sv[i] > cms) cfirst = j;
          cms = kd_max(cms, sv[i]);
          if (j != y) st.m_noty = kd_max(st.m_noty, sv[i]);
          if (with_teacher) cmt = kd_max(cmt, tv[i]);
        }
      }
      if (cfirst >= 0 && (st.amax == INT64_MAX || cms > st.ms)) st.amax = cfirst;
      score_stats_rebase(st, kd_max(st.ms, cms), with_teacher ? kd_max(st.mt, cmt) : st.mt, invT, with_teacher);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) score_add_terms(st, score_terms(sv[i], tv[i], st.ms, st.mt, invT, with_teacher));
    }
    st = group_allmerge<GROUP>(st, smem, ScoreShfl<acc_t>(), merge);
    if (active && lane == 0) {
      acc_t* o = a.out + row * kNumScoreFields;
      if (label_out_of_range(y, a.C)) {
#pragma unroll
        for (int f = 0; f < kNumScoreFields; ++f) o[f] = quiet_nan<acc_t>();
      } else {
        score_finalize(st, load_one<acc_t>(srow, a.s_dtype, y), y, a.T, with_teacher, o);
      }
    }
  }
}

inline int score_group(int64_t C) { return C <= 128 ? 8 : C <= 4096 ? 32 : kBlockThreads; }

template <typename acc_t, typename Launcher>
void run_instance_scores(const ScoreArgs<acc_t>& a, bool vector, int group, Launcher& launch) {
  if (a.B == 0) return;
  const int64_t rows_per_cta = kBlockThreads / group;
  const int64_t grid = std::min<int64_t>((a.B + rows_per_cta - 1) / rows_per_cta, int64_t(1) << 30);
  const LaunchDims d{static_cast<unsigned>(grid), kBlockThreads, 1};
  auto go = [&](auto kernel) { launch(d, kernel, a); };
  switch (group) {
    case 8: vector ? go(instance_scores_kernel<acc_t, 8, true>) : go(instance_scores_kernel<acc_t, 8, false>); break;
    case 32: vector ? go(instance_scores_kernel<acc_t, 32, true>) : go(instance_scores_kernel<acc_t, 32, false>); break;
    default:
      vector ? go(instance_scores_kernel<acc_t, kBlockThreads, true>)
             : go(instance_scores_kernel<acc_t, kBlockThreads, false>);
  }
}

}  // namespace score_kernels
}  // namespace kdseq
