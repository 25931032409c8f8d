// CPU kernel of the fused KD loss: rows in parallel (at::parallel_for, OpenMP), each row walked in
// L1-sized chunks whose inner loops vectorize (AVX2+FMA on a native build) through the shared
// row math. Pass 1 gathers the online softmax statistics, pass 2 re-reads the row (still in L2
// for C up to a few 10^4) to compute the KL terms and write the gradient.
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
using cpu_rows::load_chunk;

template <typename s_t, typename t_t, typename acc_t>
KDStats<acc_t> stats_segment(const s_t* s, int64_t s_step, const t_t* t, int64_t t_step,
                             int64_t begin, int64_t end, acc_t invT, bool with_ce) {
  KDStats<acc_t> st = kd_stats_init<acc_t>();
  alignas(64) acc_t bs[kChunk];
  alignas(64) acc_t bt[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    load_chunk(s, s_step, c0, n, bs);
    load_chunk(t, t_step, c0, n, bt);
    kd_stats_raise(st, chunk_max(bs, n), chunk_max(bt, n), invT, with_ce);
    // A max of -inf means the whole chunk (and everything before) is masked: nothing to add.
    if (st.ms != neg_inf<acc_t>()) {
      const acc_t ms = st.ms;
      acc_t zsT = 0, zs1 = 0;
#pragma omp simd reduction(+ : zsT)
      for (int64_t i = 0; i < n; ++i) zsT += kd_student_term_T(bs[i], ms, invT);
      if (with_ce) {
#pragma omp simd reduction(+ : zs1)
        for (int64_t i = 0; i < n; ++i) zs1 += kd_student_term_1(bs[i], ms);
      }
      st.zsT += zsT;
      st.zs1 += zs1;
    }
    if (st.mt != neg_inf<acc_t>()) {
      const acc_t mt = st.mt;
      acc_t ztT = 0;
#pragma omp simd reduction(+ : ztT)
      for (int64_t i = 0; i < n; ++i) ztT += kd_teacher_term_T(bt[i], mt, invT);
      st.ztT += ztT;
    }
  }
  return st;
}

// Pass 2 over [begin, end): returns the segment's KL sum and writes the gradient if g != nullptr.
template <typename s_t, typename t_t, typename acc_t>
acc_t grad_segment(const s_t* s, int64_t s_step, const t_t* t, int64_t t_step, int64_t begin,
                   int64_t end, const KDRowConsts<acc_t>& k, bool with_ce, int64_t label, s_t* g) {
  alignas(64) acc_t bs[kChunk];
  alignas(64) acc_t bt[kChunk];
  alignas(64) acc_t bg[kChunk];
  acc_t kl_total = 0;
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    load_chunk(s, s_step, c0, n, bs);
    load_chunk(t, t_step, c0, n, bt);
    acc_t kl = 0;
    if (with_ce) {
#pragma omp simd reduction(+ : kl)
      for (int64_t i = 0; i < n; ++i) bg[i] = kd_elem_t<true>(bs[i], bt[i], k, kl);
    } else {
#pragma omp simd reduction(+ : kl)
      for (int64_t i = 0; i < n; ++i) bg[i] = kd_elem_t<false>(bs[i], bt[i], k, kl);
    }
    kl_total += kl;
    if (g != nullptr) {
      if (with_ce && label >= c0 && label < c0 + n) bg[label - c0] -= k.ce_coef;
      s_t* gp = g + c0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gp[i] = static_cast<s_t>(bg[i]);
    }
  }
  return kl_total;
}

template <typename s_t, typename t_t, typename acc_t>
void kd_loss_rows_typed(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                        const at::Tensor& n_valid, const KDLossArgs& args, at::Tensor& row_loss,
                        at::Tensor& grad) {
  const int64_t B = student.size(0);
  const int64_t C = student.size(1);
  const s_t* s = student.data_ptr<s_t>();
  const t_t* t = teacher.data_ptr<t_t>();
  const int64_t s_row = student.stride(0), s_col = student.stride(1);
  const int64_t t_row = teacher.stride(0), t_col = teacher.stride(1);
  const int64_t* y = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  acc_t* loss = row_loss.data_ptr<acc_t>();
  s_t* g = grad.defined() ? grad.data_ptr<s_t>() : nullptr;

  const bool with_ce = y != nullptr && args.ce_weight != 0.0;
  const acc_t T = static_cast<acc_t>(args.temperature);
  const acc_t invT = acc_t(1) / T;
  const acc_t kdw = static_cast<acc_t>(args.kd_weight);
  const acc_t cew = static_cast<acc_t>(args.ce_weight);
  acc_t scale = 1;
  if (args.mean) {
    const int64_t nv = n_valid.item<int64_t>();
    scale = nv > 0 ? acc_t(1) / static_cast<acc_t>(nv) : acc_t(0);
  }

  const RowSplit split = plan_row_split(B, C, kChunk);
  const int64_t S = split.segments;
  std::vector<KDStats<acc_t>> partial(B * S);
  std::vector<acc_t> kl_part(B * S, acc_t(0));
  auto ignored = [&](int64_t r) { return y != nullptr && y[r] == args.ignore_index; };

  at::parallel_for(0, B * S, task_grain(split.seg_len), [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / S, seg = task % S;
      if (ignored(r)) continue;
      const int64_t b = seg * split.seg_len, e = std::min(C, b + split.seg_len);
      partial[task] = stats_segment<s_t, t_t, acc_t>(s + r * s_row, s_col, t + r * t_row, t_col, b,
                                                       std::max(b, e), invT, with_ce);
    }
  });

  std::vector<KDRowConsts<acc_t>> consts(B);
  for (int64_t r = 0; r < B; ++r) {
    if (ignored(r)) continue;
    KDStats<acc_t> st = partial[r * S];
    for (int64_t seg = 1; seg < S; ++seg) st = kd_stats_merge(st, partial[r * S + seg], invT, with_ce);
    consts[r] = kd_row_consts(st, T, kdw, cew, scale);
  }

  at::parallel_for(0, B * S, task_grain(split.seg_len), [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / S, seg = task % S;
      const int64_t b = seg * split.seg_len, e = std::max(b, std::min(C, b + split.seg_len));
      s_t* gr = g != nullptr ? g + r * C : nullptr;
      if (ignored(r)) {
        if (gr != nullptr) std::fill(gr + b, gr + e, s_t(0));
        continue;
      }
      const int64_t label = y != nullptr ? y[r] : -1;
      kl_part[task] = grad_segment<s_t, t_t, acc_t>(s + r * s_row, s_col, t + r * t_row, t_col, b, e,
                                                    consts[r], with_ce, label, gr);
    }
  });

  for (int64_t r = 0; r < B; ++r) {
    if (ignored(r)) {
      loss[r] = 0;
      continue;
    }
    acc_t kl = 0;
    for (int64_t seg = 0; seg < S; ++seg) kl += kl_part[r * S + seg];
    const acc_t s_label = with_ce ? static_cast<acc_t>(s[r * s_row + y[r] * s_col]) : acc_t(0);
    loss[r] = kd_row_loss(kl, consts[r], T, kdw, cew, with_ce, s_label);
  }
}

}  // namespace

RowSplit plan_row_split(int64_t rows, int64_t cols, int64_t chunk) {
  constexpr int64_t kMinSegment = 8192;  // below this a segment's merge costs more than it saves
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t segments = 1;
  if (rows < threads && cols >= 2 * kMinSegment) {
    segments = std::min((threads + rows - 1) / rows, cols / kMinSegment);
    segments = std::max<int64_t>(1, segments);
  }
  int64_t seg_len = (cols + segments - 1) / segments;
  seg_len = ((seg_len + chunk - 1) / chunk) * chunk;
  return {segments, seg_len};
}

void kd_loss_rows_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                      const at::Tensor& n_valid, const KDLossArgs& args, at::Tensor& row_loss,
                      at::Tensor& grad) {
  if (student.scalar_type() == at::kDouble) {
    TORCH_CHECK(teacher.scalar_type() == at::kDouble, "kdseq: float64 student needs a float64 teacher");
    kd_loss_rows_typed<double, double, double>(student, teacher, labels, n_valid, args, row_loss, grad);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu_s", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cpu_t", [&] {
      using t_t = scalar_t;
      if constexpr (std::is_same_v<s_t, double> || std::is_same_v<t_t, double>) {
        TORCH_CHECK(false, "kdseq: float64 logits must be used for both student and teacher");
      } else {
        kd_loss_rows_typed<s_t, t_t, float>(student, teacher, labels, n_valid, args, row_loss, grad);
      }
    });
  });
}

}  // namespace kdseq
