// CPU kernel of the per-instance scores: one read of each (student, teacher) row produces all six
// measures. Rows in parallel; long rows of small batches are split into segments whose partial
// states are merged with the same rule the GPU uses across threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_rows.h"
#include "kdseq.h"
#include "row_math.h"

namespace kdseq {
using namespace rowmath;

namespace {

using cpu_rows::chunk_max;
using cpu_rows::kChunk;
using cpu_rows::chunk_view;
using cpu_rows::prefetch_ahead;

// Statistics of columns [begin, end) of one row. The prefetch runs to s_pf_end / t_pf_end (columns
// from this row's start), past `end` when the rows that follow are contiguous and this thread's next.
template <int kLog2T, typename s_t, typename t_t, typename acc_t>
ScoreStats<acc_t> score_segment(const s_t* s, int64_t s_step, const t_t* t, int64_t t_step,
                                int64_t begin, int64_t end, int64_t y, acc_t invT, bool with_teacher,
                                int64_t s_pf_end, int64_t t_pf_end) {
  ScoreStats<acc_t> st = score_stats_init<acc_t>();
  alignas(64) acc_t bs[kChunk];
  alignas(64) acc_t bt[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    prefetch_ahead(s, s_step, c0, s_pf_end);
    if (with_teacher) prefetch_ahead(t, t_step, c0, t_pf_end);
    const acc_t* vs = chunk_view(s, s_step, c0, n, bs);
    const acc_t* vt = with_teacher ? chunk_view(t, t_step, c0, n, bt) : nullptr;
    const acc_t cms = chunk_max(vs, n);
    const acc_t cmt = with_teacher ? kd_max(st.mt, chunk_max(vt, n)) : st.mt;
    // First maximum wins: earlier chunks keep ties, inside a chunk the first equal index wins.
    if (cms > st.ms || st.amax == INT64_MAX) {
      // First index equal to the chunk max, as a vectorized min-reduction (a scalar search with
      // an early exit was 8% of the kernel). No match (an all-NaN chunk) leaves amax as it was.
      int32_t first = static_cast<int32_t>(n);
#pragma omp simd reduction(min : first)
      for (int32_t i = 0; i < static_cast<int32_t>(n); ++i) first = (vs[i] == cms && i < first) ? i : first;
      if (first < n) st.amax = c0 + first;
    }
    if (y >= c0 && y < c0 + n) {
      // Select form, not kd_max: fmaxf is a libm call per element here. Both skip NaN.
      const int64_t yi = y - c0;
      acc_t m = st.m_noty;
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < n; ++i) m = (i != yi && vs[i] > m) ? vs[i] : m;
      st.m_noty = m;
    } else {
      st.m_noty = kd_max(st.m_noty, cms);
    }
    score_stats_rebase(st, kd_max(st.ms, cms), cmt, invT, with_teacher);
    const acc_t ms = st.ms, mt = st.mt;
    acc_t z1 = 0, w1 = 0, zsT = 0, ztT = 0, u = 0;
    // Four copies of one loop so that none has a select it does not need. Without a teacher there
    // is no exp(xs / T) to take exp(xs) from: those loops ignore kLog2T.
#define KDSEQ_SCORE_LOOP(TERMS, K, TEACHER, TV)                                \
  _Pragma("omp simd reduction(+ : z1, w1, zsT, ztT, u)")                        \
  for (int64_t i = 0; i < n; ++i) {                                            \
    const ScoreTerms<acc_t> tm = TERMS<K>(vs[i], TV, ms, mt, invT, TEACHER);   \
    z1 += tm.z1;                                                               \
    w1 += tm.w1;                                                               \
    zsT += tm.zsT;                                                             \
    ztT += tm.ztT;                                                             \
    u += tm.u;                                                                 \
  }
    const bool finite = ms != neg_inf<acc_t>() && (!with_teacher || mt != neg_inf<acc_t>());
    if (with_teacher) {
      if (finite) {
        KDSEQ_SCORE_LOOP(score_terms_finite, kLog2T, true, vt[i])
      } else {
        KDSEQ_SCORE_LOOP(score_terms, kLog2T, true, vt[i])
      }
    } else {
      if (finite) {
        KDSEQ_SCORE_LOOP(score_terms_finite, -1, false, acc_t(0))
      } else {
        KDSEQ_SCORE_LOOP(score_terms, -1, false, acc_t(0))
      }
    }
#undef KDSEQ_SCORE_LOOP
    st.z1 += z1;
    st.w1 += w1;
    st.zsT += zsT;
    st.ztT += ztT;
    st.u += u;
  }
  return st;
}

template <typename s_t, typename t_t, typename acc_t>
void scores_typed(const at::Tensor& student, const at::Tensor& labels, const at::Tensor& teacher,
                  double temperature, at::Tensor& out) {
  const int64_t B = student.size(0);
  const int64_t C = student.size(1);
  const bool with_teacher = teacher.defined();
  const s_t* s = student.data_ptr<s_t>();
  const t_t* t = with_teacher ? teacher.data_ptr<t_t>() : nullptr;
  const int64_t s_row = student.stride(0), s_col = student.stride(1);
  const int64_t t_row = with_teacher ? teacher.stride(0) : 0;
  const int64_t t_col = with_teacher ? teacher.stride(1) : 0;
  const int64_t* y = labels.data_ptr<int64_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const acc_t T = static_cast<acc_t>(temperature);
  const acc_t invT = acc_t(1) / T;

  const RowSplit split = plan_row_split(B, C, kChunk);
  const int64_t S = split.segments;
  std::vector<ScoreStats<acc_t>> partial(B * S);
  // At T = 1, 2, 4 with a teacher (fp32 accumulation) the loop takes exp(xs) from exp(xs / T)
  // (row_math.h, exp_from_tempered): two exponentials an element instead of three, measured
  // 13-16% faster at (1024, 1000), T = 4.
  auto segment = &score_segment<-1, s_t, t_t, acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    static_assert(kMaxTemperedLog2 == 2, "one loop per power of two");
    constexpr decltype(segment) kTempered[] = {&score_segment<0, s_t, t_t, acc_t>,
                                               &score_segment<1, s_t, t_t, acc_t>,
                                               &score_segment<2, s_t, t_t, acc_t>};
    const int k = with_teacher ? tempered_log2(temperature) : -1;
    if (k >= 0) segment = kTempered[k];
  }
  at::parallel_for(0, B * S, task_grain(split.seg_len), [&](int64_t lo, int64_t hi) {
    const cpu_rows::TaskRun run(hi, S, split.seg_len, C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / S, seg = task % S;
      const int64_t b = seg * split.seg_len, e = std::max(b, std::min(C, b + split.seg_len));
      partial[task] = segment(s + r * s_row, s_col, with_teacher ? t + r * t_row : nullptr, t_col, b, e, y[r],
                              invT, with_teacher, run.prefetch_end(r, e, s_col, s_row),
                              run.prefetch_end(r, e, t_col, t_row));
    }
  });
  at::parallel_for(0, B, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      ScoreStats<acc_t> st = partial[r * S];
      for (int64_t seg = 1; seg < S; ++seg) st = score_stats_merge(st, partial[r * S + seg], invT, with_teacher);
      if (label_out_of_range(y[r], C)) {
        std::fill(o + r * kNumScoreFields, o + (r + 1) * kNumScoreFields, quiet_nan<acc_t>());
        continue;
      }
      const acc_t s_y = static_cast<acc_t>(s[r * s_row + y[r] * s_col]);
      score_finalize(st, s_y, y[r], T, with_teacher, o + r * kNumScoreFields);
    }
  });
}

}  // namespace

void instance_scores_rows_cpu(const at::Tensor& student, const at::Tensor& labels,
                              const at::Tensor& teacher, double temperature, at::Tensor& out) {
  const auto t_type = teacher.defined() ? teacher.scalar_type() : student.scalar_type();
  if (student.scalar_type() == at::kDouble) {
    TORCH_CHECK(t_type == at::kDouble, "kdseq: float64 student needs a float64 teacher");
    scores_typed<double, double, double>(student, labels, teacher, temperature, out);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "scores_cpu_s", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_type, "scores_cpu_t", [&] {
      using t_t = scalar_t;
      if constexpr (std::is_same_v<s_t, double> || std::is_same_v<t_t, double>) {
        TORCH_CHECK(false, "kdseq: float64 logits must be used for both student and teacher");
      } else {
        scores_typed<s_t, t_t, float>(student, labels, teacher, temperature, out);
      }
    });
  });
}

}  // namespace kdseq
