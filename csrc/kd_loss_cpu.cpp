// CPU kernel of the fused KD loss: rows in parallel (at::parallel_for, OpenMP), each row walked in
// L1-sized chunks whose inner loops vectorize (AVX2+FMA on a native build) through the shared
// row math.
//
// One read of a row gives its statistics and loss (row_math.h). For the gradient the exponentials
// of that read are kept together with the running maxima they are relative to, and the gradient is
// one multiply-add per element per chunk factor: two exponentials per element instead of four
// (measured 2x faster than recomputing them in a second read at (512, 32000)). The teacher's go to
// a per-thread row buffer; the student's go straight into the gradient row when it is fp32, which
// halves the buffer (L2-resident up to C ~ 6e4) and moves the gradient's write-allocate reads into
// the compute-bound statistics loop, where they overlap with the math (measured 12-15% faster at
// C = 32000 than keeping both in the buffer). Rows split across threads (fewer rows than threads)
// recompute the exponentials instead, because the buffers of different segments live on different
// threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_rows.h"
#include "kdseq.h"
#include "row_math.h"

namespace kdseq {
using namespace rowmath;

namespace {

using cpu_rows::chunk_max;
using cpu_rows::chunk_view;
using cpu_rows::kChunk;
using cpu_rows::prefetch_ahead;
using cpu_rows::store_chunk;

// One row's exponentials from the statistics read, and per chunk the maxima they are relative to.
// esT stays empty when the student's exponentials are written into the fp32 gradient row instead.
template <typename acc_t>
struct RowStash {
  std::vector<acc_t> esT, etT, es1, cms, cmt;
  void fit(int64_t cols, bool with_ce, bool es_in_grad) {
    const size_t n = static_cast<size_t>(cols), chunks = static_cast<size_t>((cols + kChunk - 1) / kChunk);
    if (!es_in_grad && esT.size() < n) esT.resize(n);
    if (etT.size() < n) etT.resize(n);
    if (with_ce && es1.size() < n) es1.resize(n);
    if (cms.size() < chunks) {
      cms.resize(chunks);
      cmt.resize(chunks);
    }
  }
};

template <typename acc_t>
RowStash<acc_t>& thread_stash() {
  static thread_local RowStash<acc_t> stash;
  return stash;
}

// Statistics of columns [begin, end) in one read. With a stash, every exponential and the running
// maxima of each chunk are kept for the gradient: the student's at es_row (the stash's esT or the
// fp32 gradient row), the others in the stash. The prefetch runs to s_pf_end / t_pf_end (columns
// from this row's start; cpu_rows::TaskRun).
template <bool WITH_CE, typename s_t, typename t_t, typename acc_t>
KDStats<acc_t> stats_segment(const s_t* s, int64_t s_step, const t_t* t, int64_t t_step, int64_t begin,
                             int64_t end, int64_t s_pf_end, int64_t t_pf_end, acc_t invT,
                             RowStash<acc_t>* stash, acc_t* es_row) {
  KDStats<acc_t> st = kd_stats_init<acc_t>();
  alignas(64) acc_t bs[kChunk];
  alignas(64) acc_t bt[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    prefetch_ahead(s, s_step, c0, s_pf_end);
    prefetch_ahead(t, t_step, c0, t_pf_end);
    const acc_t* vs = chunk_view(s, s_step, c0, n, bs);
    const acc_t* vt = chunk_view(t, t_step, c0, n, bt);
    kd_stats_raise(st, chunk_max(vs, n), chunk_max(vt, n), invT, WITH_CE);
    const acc_t ms = st.ms, mt = st.mt;
    acc_t zsT = 0, zs1 = 0, ztT = 0, u = 0;
    acc_t* es = stash != nullptr ? es_row + (c0 - begin) : nullptr;
    acc_t* et = stash != nullptr ? stash->etT.data() + (c0 - begin) : nullptr;
    acc_t* e1 = stash != nullptr && WITH_CE ? stash->es1.data() + (c0 - begin) : nullptr;
    // Four copies of one loop so that none has a branch or a select it does not need.
#define KDSEQ_STATS_LOOP(TERMS, STORE)                                   \
  _Pragma("omp simd reduction(+ : zsT, zs1, ztT, u)")                     \
  for (int64_t i = 0; i < n; ++i) {                                      \
    const KDTerms<acc_t> tm = TERMS<WITH_CE>(vs[i], vt[i], ms, mt, invT); \
    if (STORE) {                                                         \
      es[i] = tm.esT;                                                    \
      et[i] = tm.etT;                                                    \
      if constexpr (WITH_CE) e1[i] = tm.es1;                             \
    }                                                                    \
    zsT += tm.esT;                                                       \
    zs1 += tm.es1;                                                       \
    ztT += tm.etT;                                                       \
    u += tm.u;                                                           \
  }
    const bool finite = ms != neg_inf<acc_t>() && mt != neg_inf<acc_t>();
    if (stash != nullptr) {
      if (finite) {
        KDSEQ_STATS_LOOP(kd_terms_finite, true)
      } else {
        KDSEQ_STATS_LOOP(kd_terms, true)
      }
      const int64_t ci = (c0 - begin) / kChunk;
      stash->cms[ci] = ms;
      stash->cmt[ci] = mt;
    } else {
      if (finite) {
        KDSEQ_STATS_LOOP(kd_terms_finite, false)
      } else {
        KDSEQ_STATS_LOOP(kd_terms, false)
      }
    }
#undef KDSEQ_STATS_LOOP
    kd_stats_add(st, KDTerms<acc_t>{zsT, zs1, ztT, u});
  }
  return st;
}

// Gradient of a whole row from its stash and the student's exponentials at es_row (which may be g
// itself, overwritten in place).
template <bool WITH_CE, typename s_t, typename acc_t>
void grad_from_stash(const RowStash<acc_t>& stash, const acc_t* es_row, int64_t C, const KDRowConsts<acc_t>& k,
                     int64_t label, s_t* g) {
  alignas(64) acc_t bg[kChunk];
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const KDChunkCoefs<acc_t> cf = kd_chunk_coefs(stash.cms[c0 / kChunk], stash.cmt[c0 / kChunk], k, WITH_CE);
    const acc_t* es = es_row + c0;
    const acc_t* et = stash.etT.data() + c0;
    const acc_t* e1 = WITH_CE ? stash.es1.data() + c0 : nullptr;
    // Same-type output is written in place; others go through bg and one rounding.
    acc_t* out = std::is_same_v<s_t, acc_t> ? reinterpret_cast<acc_t*>(g + c0) : bg;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = kd_grad_from_terms(es[i], et[i], WITH_CE ? e1[i] : acc_t(0), cf);
    if (WITH_CE && label >= c0 && label < c0 + n) out[label - c0] -= k.ce_coef;
    if constexpr (!std::is_same_v<s_t, acc_t>) store_chunk(bg, n, g + c0);
  }
}

// Gradient of columns [begin, end), recomputed from the logits.
template <bool WITH_CE, typename s_t, typename t_t, typename acc_t>
void grad_segment(const s_t* s, int64_t s_step, const t_t* t, int64_t t_step, int64_t begin, int64_t end,
                  const KDRowConsts<acc_t>& k, int64_t label, s_t* g) {
  alignas(64) acc_t bs[kChunk];
  alignas(64) acc_t bt[kChunk];
  alignas(64) acc_t bg[kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    const acc_t* vs = chunk_view(s, s_step, c0, n, bs);
    const acc_t* vt = chunk_view(t, t_step, c0, n, bt);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) bg[i] = kd_grad_elem_t<WITH_CE>(vs[i], vt[i], k);
    if (WITH_CE && label >= c0 && label < c0 + n) bg[label - c0] -= k.ce_coef;
    store_chunk(bg, n, g + c0);
  }
}

template <bool WITH_CE, typename s_t, typename t_t, typename acc_t>
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

  const acc_t T = static_cast<acc_t>(args.temperature);
  const acc_t invT = acc_t(1) / T;
  const acc_t kdw = static_cast<acc_t>(args.kd_weight);
  const acc_t cew = static_cast<acc_t>(args.ce_weight);
  acc_t scale = 1;
  if (args.mean) {
    const int64_t nv = n_valid.item<int64_t>();
    scale = nv > 0 ? acc_t(1) / static_cast<acc_t>(nv) : acc_t(0);
  }
  auto ignored = [&](int64_t r) { return y != nullptr && y[r] == args.ignore_index; };
  // Not ignored and outside [0, C): NaN loss and gradient row (row_math.h, label_out_of_range).
  auto bad_label = [&](int64_t r) { return y != nullptr && !ignored(r) && label_out_of_range(y[r], C); };
  auto label_of = [&](int64_t r) { return WITH_CE ? y[r] : int64_t(-1); };
  auto finish_row = [&](int64_t r, const KDStats<acc_t>& st, const KDRowConsts<acc_t>& k) {
    if (bad_label(r)) {
      loss[r] = quiet_nan<acc_t>();
      return;
    }
    const acc_t s_label = WITH_CE ? static_cast<acc_t>(s[r * s_row + y[r] * s_col]) : acc_t(0);
    loss[r] = kd_row_loss(st, k, T, kdw, cew, WITH_CE, s_label);
  };
  auto poison_grad = [&](int64_t r, int64_t b, int64_t e) {
    if (g != nullptr && bad_label(r)) std::fill(g + r * C + b, g + r * C + e, static_cast<s_t>(quiet_nan<acc_t>()));
  };

  const RowSplit split = plan_row_split(B, C, kChunk);
  if (split.segments == 1) {
    constexpr bool kEsInGrad = std::is_same_v<s_t, acc_t>;
    at::parallel_for(0, B, task_grain(C), [&](int64_t lo, int64_t hi) {
      const cpu_rows::TaskRun run(hi, 1, C, C);
      RowStash<acc_t>* stash = nullptr;
      if (g != nullptr) {
        stash = &thread_stash<acc_t>();
        stash->fit(C, WITH_CE, kEsInGrad);
      }
      for (int64_t r = lo; r < hi; ++r) {
        if (ignored(r)) {
          loss[r] = 0;
          if (g != nullptr) std::fill(g + r * C, g + (r + 1) * C, s_t(0));
          continue;
        }
        acc_t* es_row = nullptr;
        if (g != nullptr) {
          if constexpr (kEsInGrad) {
            es_row = g + r * C;
          } else {
            es_row = stash->esT.data();
          }
        }
        const KDStats<acc_t> st = stats_segment<WITH_CE>(
            s + r * s_row, s_col, t + r * t_row, t_col, int64_t(0), C, run.prefetch_end(r, C, s_col, s_row),
            run.prefetch_end(r, C, t_col, t_row), invT, stash, es_row);
        const KDRowConsts<acc_t> k = kd_row_consts(st, T, kdw, cew, scale);
        finish_row(r, st, k);
        if (g != nullptr) grad_from_stash<WITH_CE>(*stash, es_row, C, k, label_of(r), g + r * C);
        poison_grad(r, 0, C);
      }
    });
    return;
  }

  // Few long rows: segments of a row on different threads, merged, then a second read.
  const int64_t S = split.segments;
  std::vector<KDStats<acc_t>> partial(B * S);
  auto seg_range = [&](int64_t seg) {
    const int64_t b = seg * split.seg_len;
    return std::make_pair(b, std::max(b, std::min(C, b + split.seg_len)));
  };
  at::parallel_for(0, B * S, task_grain(split.seg_len), [&](int64_t lo, int64_t hi) {
    const cpu_rows::TaskRun run(hi, S, split.seg_len, C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / S;
      if (ignored(r)) continue;
      const auto [b, e] = seg_range(task % S);
      partial[task] = stats_segment<WITH_CE>(s + r * s_row, s_col, t + r * t_row, t_col, b, e,
                                             run.prefetch_end(r, e, s_col, s_row), run.prefetch_end(r, e, t_col, t_row),
                                             invT, static_cast<RowStash<acc_t>*>(nullptr), static_cast<acc_t*>(nullptr));
    }
  });
  std::vector<KDRowConsts<acc_t>> consts(B);
  for (int64_t r = 0; r < B; ++r) {
    if (ignored(r)) {
      loss[r] = 0;
      continue;
    }
    KDStats<acc_t> st = partial[r * S];
    for (int64_t seg = 1; seg < S; ++seg) st = kd_stats_merge(st, partial[r * S + seg], invT, WITH_CE);
    consts[r] = kd_row_consts(st, T, kdw, cew, scale);
    finish_row(r, st, consts[r]);
  }
  if (g == nullptr) return;
  at::parallel_for(0, B * S, task_grain(split.seg_len), [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t r = task / S;
      const auto [b, e] = seg_range(task % S);
      if (ignored(r)) {
        std::fill(g + r * C + b, g + r * C + e, s_t(0));
        continue;
      }
      grad_segment<WITH_CE>(s + r * s_row, s_col, t + r * t_row, t_col, b, e, consts[r], label_of(r), g + r * C);
      poison_grad(r, b, e);
    }
  });
}

template <typename s_t, typename t_t, typename acc_t>
void kd_loss_rows_dispatch_ce(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                              const at::Tensor& n_valid, const KDLossArgs& args, at::Tensor& row_loss,
                              at::Tensor& grad) {
  if (labels.defined() && args.ce_weight != 0.0) {
    kd_loss_rows_typed<true, s_t, t_t, acc_t>(student, teacher, labels, n_valid, args, row_loss, grad);
  } else {
    kd_loss_rows_typed<false, s_t, t_t, acc_t>(student, teacher, labels, n_valid, args, row_loss, grad);
  }
}

// A fresh multi-MB gradient is first touched by the kernel's writes: one page fault per 4 KiB
// page, which on a VM cost as much as the loss math itself (~45 ms for the 64 MB gradient of
// (512, 32000) fp32 here). Where transparent huge pages are in "madvise" mode, asking for them on
// the 2 MiB-aligned interior cuts the faults 512-fold. Only a hint: errors (no THP, not Linux)
// change nothing.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (begin + t.nbytes()) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

// PyTorch's CPU allocator does not cache: every training step's gradient is a new mapping that
// is zeroed and faulted in page by page, even with huge pages a third of the kernel's time. So the
// last large gradient of each thread is kept and handed out again once nothing but this cache
// references its storage (the caller dropped the previous step's gradient, autograd released the
// graph). The caller always gets a new tensor object (an alias of the buffer), never one that is
// still visible elsewhere. Small gradients come from malloc's warm heap anyway and are not cached;
// very large ones are not kept alive between steps.
at::Tensor cpu_grad_buffer(const at::Tensor& student) {
  constexpr size_t kMinCachedBytes = size_t(1) << 20;
  constexpr size_t kMaxCachedBytes = size_t(1) << 30;
  static thread_local at::Tensor cached;
  const size_t bytes = static_cast<size_t>(student.numel()) * student.element_size();
  if (bytes < kMinCachedBytes || bytes > kMaxCachedBytes) {
    if (cached.defined()) cached = at::Tensor();
    return fresh_grad_buffer(student);
  }
  const bool reusable = cached.defined() && cached.use_count() == 1 && cached.storage().use_count() == 1 &&
                        cached.sizes() == student.sizes() && cached.scalar_type() == student.scalar_type() &&
                        cached.is_inference() == c10::InferenceMode::is_enabled();
  if (!reusable) {
    cached = fresh_grad_buffer(student);
    advise_huge_pages(cached);
  }
  // A new TensorImpl on the same storage: no autograd or view metadata carried over from the
  // previous step's tensor.
  at::Tensor out = at::empty({0}, cached.options());
  out.set_(cached.storage(), 0, cached.sizes(), cached.strides());
  return out;
}

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
    kd_loss_rows_dispatch_ce<double, double, double>(student, teacher, labels, n_valid, args, row_loss, grad);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu_s", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cpu_t", [&] {
      using t_t = scalar_t;
      if constexpr (std::is_same_v<s_t, double> || std::is_same_v<t_t, double>) {
        TORCH_CHECK(false, "kdseq: float64 logits must be used for both student and teacher");
      } else {
        kd_loss_rows_dispatch_ce<s_t, t_t, float>(student, teacher, labels, n_valid, args, row_loss, grad);
      }
    });
  });
}

}  // namespace kdseq
