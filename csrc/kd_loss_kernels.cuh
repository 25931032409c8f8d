// CUDA kernels of the fused KD loss: loss, mean divisor, reduction and student gradient from one read
// of each logit and one write of the gradient, with no host synchronization.
//
// How a row is processed (register rows): each thread loads its elements of the student and
// teacher rows into registers (E per thread, four at a time), the group finds the two row maxima
// (one reduction), then the sums of exponentials and the KL numerator relative to those maxima
// (a second reduction), and writes the gradient from the exponentials it still holds: HBM sees each
// logit once and each gradient element once. The group is a few lanes of a warp (short rows, several
// rows per CTA), a CTA (rows up to 256 * E elements), or a thread-block cluster on sm_90 whose CTAs
// exchange their partial results through distributed shared memory (rows up to 16 CTAs long).
// Longer rows, fp64 (gradcheck) and GPUs without clusters use the split path: a statistics kernel
// over (row, segment) tiles and a gradient kernel that merges a row's partial statistics and
// re-reads its segment. Two layouts are forced only, candidates for bench_kd_plans.py until a GPU
// measures them: the two-pass kernel does both passes of a row in one CTA (the re-read from L2),
// and staged rows copy a row (slice) into shared memory asynchronously and work from there.
//
// The mean divisor (the number of non-ignored rows) and the loss reduction are computed on the
// device: a small problem is one launch that counts and reduces itself (one CTA, or on sm_90 a
// cluster of up to 8 CTAs sharing the rows and adding through distributed shared memory); otherwise a
// one-CTA prologue counts the labels and zeroes a ticket counter, and the CTA that finishes last sums
// the row losses in a fixed order (deterministic).
//
// The math (statistics, merges, loss and gradient formulas, -inf and NaN semantics) is row_math.h's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_rows.cuh"
#include "row_math.h"

namespace kdseq {
namespace kd_kernels {

using namespace rowmath;
using namespace cuda_rows;

enum Reduce : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

// Per-call device workspace: the last-CTA ticket counter and the gradient/loss scale (1/n_valid for
// mean, 1 for sum), written by the prologue kernel.
struct Workspace {
  unsigned counter;
  unsigned pad;
  double scale;
};

template <typename acc_t>
struct KDArgs {
  const void* s;
  const void* t;
  const int64_t* labels;   // null: no labels (no CE term, no ignored rows)
  void* grad;              // null: no gradient wanted; else contiguous (B, C), student dtype
  acc_t* row_loss;         // (B)
  acc_t* loss;             // scalar output; null for reduction none
  Workspace* ws;           // multi-CTA reductions; null otherwise
  KDStats<acc_t>* partial; // split path: (B * segments)
  int64_t B, C;
  int64_t s_row, t_row;    // row strides, in elements (columns are contiguous)
  int s_dtype, t_dtype;
  acc_t T, kd_weight, ce_weight;
  int64_t ignore_index;
  int reduction;
  bool single_cta;         // one CTA does everything (counts, rows, reduction)
  int64_t segments, seg_len;  // split path
};

template <typename acc_t>
struct RowLabel {
  int64_t y;
  bool ignored, bad;
};

template <typename acc_t>
__device__ __forceinline__ RowLabel<acc_t> row_label(const KDArgs<acc_t>& a, int64_t row, bool active) {
  RowLabel<acc_t> l{-1, false, false};
  if (active && a.labels != nullptr) {
    l.y = a.labels[row];
    l.ignored = l.y == a.ignore_index;
    l.bad = !l.ignored && label_out_of_range(l.y, a.C);
  }
  return l;
}

// A row's loss from its final statistics: 0 for an ignored row, NaN for an out-of-range label.
template <bool WITH_CE, typename acc_t>
__device__ __forceinline__ acc_t row_loss_value(const KDArgs<acc_t>& a, const RowLabel<acc_t>& lab,
                                                const KDStats<acc_t>& st, const KDRowConsts<acc_t>& k,
                                                const char* srow) {
  if (lab.bad) return quiet_nan<acc_t>();
  if (lab.ignored) return acc_t(0);
  const acc_t s_label = WITH_CE ? load_one<acc_t>(srow, a.s_dtype, lab.y) : acc_t(0);
  return kd_row_loss(st, k, a.T, a.kd_weight, a.ce_weight, WITH_CE, s_label);
}

// The mean scale (1 / the number of non-ignored labels; 1 for other reductions), the same in every
// thread. The CTAs of the grid count their share of the labels: one CTA (the prologue, a single
// call off sm_90) counts them all; the CTAs of a single-call cluster add their counts through
// distributed shared memory (`slot` and `bcast` as for cluster_allreduce; unused for one CTA).
template <typename acc_t>
__device__ __forceinline__ acc_t mean_scale(const KDArgs<acc_t>& a, acc_t* red, acc_t* slot, acc_t* bcast) {
  if (a.reduction != kReduceMean) return acc_t(1);
  acc_t n[1] = {acc_t(0)};
  if (a.labels == nullptr) {
    n[0] = static_cast<acc_t>(a.B);
  } else {
    for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.B; r += int64_t(gridDim.x) * blockDim.x)
      n[0] += a.labels[r] != a.ignore_index ? acc_t(1) : acc_t(0);
    group_allreduce<kBlockThreads>(n, SumOp<acc_t>(), red);
#if KDSEQ_HAS_CLUSTERS
    if (gridDim.x > 1) cluster_allreduce(n, SumOp<acc_t>(), slot, bcast);
#endif
  }
  return n[0] > acc_t(0) ? acc_t(1) / n[0] : acc_t(0);
}

// One CTA: counts the non-ignored labels and prepares the workspace of a multi-CTA reduced call.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) kd_prologue_kernel(const KDArgs<acc_t> a) {
  KDSEQ_SHARED(acc_t, red, 32);
  const acc_t scale = mean_scale<acc_t>(a, red, nullptr, nullptr);  // a one-CTA launch
  if (threadIdx.x == 0) {
    a.ws->counter = 0u;
    a.ws->scale = static_cast<double>(scale);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t call_scale(const KDArgs<acc_t>& a) {
  return a.reduction == kReduceMean ? static_cast<acc_t>(a.ws->scale) : acc_t(1);
}

// v reduced over a row's group of threads and, when the row spans the CTAs of a cluster, over them.
template <int GROUP, int N, typename acc_t, typename Op>
__device__ __forceinline__ void row_allreduce(acc_t (&v)[N], Op op, acc_t* red, bool over_cluster, acc_t* slot,
                                              acc_t* bcast) {
  group_allreduce<GROUP>(v, op, red);
#if KDSEQ_HAS_CLUSTERS
  if (over_cluster) cluster_allreduce(v, op, slot, bcast);
#endif
}

// A row's statistics from its reduced maxima (student, teacher) and sums (zsT, zs1, ztT, u).
template <typename acc_t>
__device__ __forceinline__ KDStats<acc_t> row_stats(const acc_t (&m)[2], const acc_t (&sums)[4]) {
  KDStats<acc_t> st;
  st.ms = m[0];
  st.mt = m[1];
  st.zsT = sums[0];
  st.zs1 = sums[1];
  st.ztT = sums[2];
  st.u = sums[3];
  return st;
}

// ------------------------------------------------------------------------------------------------
// Register rows: a group of GROUP threads (8 or 32 lanes, or a CTA of kBlockThreads, or a cluster of
// such CTAs) holds a row in registers, E elements per thread.
// ------------------------------------------------------------------------------------------------
template <typename acc_t, int GROUP, int E, bool WITH_CE, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads, 2) kd_rows_kernel(const KDArgs<acc_t> a) {
  constexpr int NV = E / kVec;
  constexpr int kGroupsPerCta = kBlockThreads / GROUP;
  static_assert(E % kVec == 0 && kBlockThreads % GROUP == 0, "bad row layout");
  KDSEQ_SHARED(acc_t, red, 32 * 4);
  KDSEQ_SHARED(acc_t, slot_max, 2);
  KDSEQ_SHARED(acc_t, slot_sum, 4);
  KDSEQ_SHARED(acc_t, bcast, 4);
  KDSEQ_SHARED(unsigned, flag, 1);

  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const acc_t invT = acc_t(1) / a.T;
  // Cluster layout (GROUP == CTA only): CTA `rank` of the cluster holds columns
  // [rank * GROUP * E, (rank + 1) * GROUP * E) of row blockIdx.x / ctas.
  unsigned ctas = 1, rank = 0;
#if KDSEQ_HAS_CLUSTERS
  if constexpr (GROUP == kBlockThreads) {
    ctas = dev::cluster_size();
    rank = dev::cluster_rank();
  }
#endif
  const acc_t scale = a.single_cta ? mean_scale(a, red, slot_sum, bcast)
                                   : a.ws != nullptr ? call_scale(a) : acc_t(1);
  acc_t loss_part = acc_t(0);  // single-cluster calls: this lane's rows' losses, in row order

  const int64_t first = GROUP == kBlockThreads ? int64_t(blockIdx.x / ctas) : int64_t(blockIdx.x) * kGroupsPerCta;
  const int64_t step = GROUP == kBlockThreads ? int64_t(gridDim.x / ctas) : int64_t(gridDim.x) * kGroupsPerCta;
  // CTA-uniform trip count: every lane of a warp takes part in every shuffle, also lanes whose group
  // has no row left (they work on an empty row).
  for (int64_t base = first; base < a.B; base += step) {
    const int64_t row = base + (GROUP == kBlockThreads ? 0 : group);
    const bool active = row < a.B;
    const RowLabel<acc_t> lab = row_label(a, row, active);
    const int64_t cols = active ? a.C : 0;  // an inactive group reads nothing
    const char* srow = static_cast<const char*>(a.s) + (active ? row * a.s_row * dtype_size(a.s_dtype) : 0);
    const char* trow = static_cast<const char*>(a.t) + (active ? row * a.t_row * dtype_size(a.t_dtype) : 0);
    const int64_t slice0 = int64_t(rank) * GROUP * E;

    acc_t sv[E], tv[E];
    // Up to four vectors of each row in flight per thread at a time (more would only add registers).
    constexpr int KB = NV < 4 ? NV : 4;
#pragma unroll
    for (int k0 = 0; k0 < NV; k0 += KB) {
      int64_t j[KB];
      acc_t x[KB][kVec], z[KB][kVec];
#pragma unroll
      for (int k = 0; k < KB; ++k) j[k] = slice0 + (int64_t(k0 + k) * GROUP + lane) * kVec;
      load_pairs<KB, VECTOR>(srow, a.s_dtype, trow, a.t_dtype, j, cols, neg_inf<acc_t>(), x, z);
#pragma unroll
      for (int k = 0; k < KB; ++k) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          sv[(k0 + k) * kVec + i] = x[k][i];
          tv[(k0 + k) * kVec + i] = z[k][i];
        }
      }
    }

    // Row maxima.
    acc_t m[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
#pragma unroll
    for (int i = 0; i < E; ++i) {
      m[0] = kd_max(m[0], sv[i]);
      m[1] = kd_max(m[1], tv[i]);
    }
    const bool over_cluster = GROUP == kBlockThreads && ctas > 1;
    row_allreduce<GROUP>(m, MaxOp<acc_t>(), red, over_cluster, slot_max, bcast);

    // Sums relative to the maxima; the exponentials stay in registers for the gradient.
    acc_t e1[WITH_CE ? E : 1];
    acc_t sums[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};  // zsT, zs1, ztT, u
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const KDTerms<acc_t> tm = kd_terms<WITH_CE>(sv[i], tv[i], m[0], m[1], invT);
      sv[i] = tm.esT;
      tv[i] = tm.etT;
      if constexpr (WITH_CE) e1[i] = tm.es1;
      sums[0] += tm.esT;
      sums[1] += tm.es1;
      sums[2] += tm.etT;
      sums[3] += tm.u;
    }
    row_allreduce<GROUP>(sums, SumOp<acc_t>(), red, over_cluster, slot_sum, bcast);
    const KDStats<acc_t> st = row_stats(m, sums);
    const KDRowConsts<acc_t> k = kd_row_consts(st, a.T, a.kd_weight, a.ce_weight, scale);

    if (active && lane == 0 && rank == 0) {
      const acc_t v = row_loss_value<WITH_CE>(a, lab, st, k, srow);
      a.row_loss[row] = v;
      loss_part += v;
    }

    if (a.grad != nullptr && active) {
      const KDChunkCoefs<acc_t> cf = kd_chunk_coefs(m[0], m[1], k, WITH_CE);
      char* grow = static_cast<char*>(a.grad) + row * a.C * dtype_size(a.s_dtype);
#pragma unroll
      for (int kk = 0; kk < NV; ++kk) {
        const int64_t j = slice0 + (int64_t(kk) * GROUP + lane) * kVec;
        acc_t g[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const int idx = kk * kVec + i;
          acc_t v = kd_grad_from_terms(sv[idx], tv[idx], WITH_CE ? e1[WITH_CE ? idx : 0] : acc_t(0), cf);
          if (WITH_CE && j + i == lab.y) v -= k.ce_coef;
          g[i] = lab.ignored ? acc_t(0) : lab.bad ? quiet_nan<acc_t>() : v;
        }
        store4<VECTOR>(grow, a.s_dtype, j, a.C, g);
      }
    }
  }
#if KDSEQ_HAS_CLUSTERS
  // Other CTAs of the cluster may still read this CTA's slots.
  if (GROUP == kBlockThreads && ctas > 1) dev::cluster_sync();
#endif

  if (a.loss == nullptr) return;
  if (a.single_cta) {
    // Each CTA adds what its lanes summed, then the cluster adds the CTAs: a fixed order, and no
    // second launch or ticket counter (the rows never leave the CTA that computed them).
    acc_t part[1] = {loss_part};
    group_allreduce<kBlockThreads>(part, SumOp<acc_t>(), red);
#if KDSEQ_HAS_CLUSTERS
    if (gridDim.x > 1) cluster_allreduce(part, SumOp<acc_t>(), slot_max, bcast);
#endif
    if (blockIdx.x == 0 && threadIdx.x == 0) *a.loss = part[0] * scale;
#if KDSEQ_HAS_CLUSTERS
    if (gridDim.x > 1) dev::cluster_sync();  // the other CTAs may still read this CTA's slot
#endif
  } else {
    last_cta_reduce(a.row_loss, a.B, &a.ws->counter, call_scale(a), a.loss, red, flag);
  }
}

// ------------------------------------------------------------------------------------------------
// Split path: (row, segment) tiles. Statistics first, then the gradient from the merged statistics.
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
struct KDStatsShfl {
  __device__ __forceinline__ KDStats<acc_t> operator()(const KDStats<acc_t>& s, int off) const {
    KDStats<acc_t> o;
    o.ms = dev::shfl_xor(s.ms, off);
    o.zsT = dev::shfl_xor(s.zsT, off);
    o.zs1 = dev::shfl_xor(s.zs1, off);
    o.mt = dev::shfl_xor(s.mt, off);
    o.ztT = dev::shfl_xor(s.ztT, off);
    o.u = dev::shfl_xor(s.u, off);
    return o;
  }
};

template <typename acc_t>
struct KDStatsMerge {
  acc_t invT;
  bool with_ce;
  __device__ __forceinline__ KDStats<acc_t> operator()(const KDStats<acc_t>& x, const KDStats<acc_t>& y) const {
    return kd_stats_merge(x, y, invT, with_ce);
  }
};

// Statistics of columns [begin, end) of a row, merged over the CTA (every thread gets the same bits).
template <typename acc_t, bool VECTOR>
__device__ __forceinline__ KDStats<acc_t> segment_stats(const KDArgs<acc_t>& a, int64_t row, int64_t begin,
                                                        int64_t end, bool with_ce, acc_t invT,
                                                        KDStats<acc_t>* smem /* 32 */) {
  const char* srow = static_cast<const char*>(a.s) + row * a.s_row * dtype_size(a.s_dtype);
  const char* trow = static_cast<const char*>(a.t) + row * a.t_row * dtype_size(a.t_dtype);
  KDStats<acc_t> st = kd_stats_init<acc_t>();
  // Two vectors a thread per step: one re-basing of the running state per eight elements.
  for (int64_t j0 = begin + int64_t(threadIdx.x) * kChunk; j0 < end; j0 += int64_t(kBlockThreads) * kChunk) {
    acc_t sv[kChunk], tv[kChunk];
    load_chunk<VECTOR>(srow, a.s_dtype, trow, a.t_dtype, j0, end, sv, tv);
    acc_t cms = neg_inf<acc_t>(), cmt = neg_inf<acc_t>();
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      cms = kd_max(cms, sv[i]);
      cmt = kd_max(cmt, tv[i]);
    }
    kd_stats_raise(st, cms, cmt, invT, with_ce);
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      kd_stats_add(st, with_ce ? kd_terms<true>(sv[i], tv[i], st.ms, st.mt, invT)
                               : kd_terms<false>(sv[i], tv[i], st.ms, st.mt, invT));
  }
  return group_allmerge<kBlockThreads>(st, smem, KDStatsShfl<acc_t>(), KDStatsMerge<acc_t>{invT, with_ce});
}

// From a row's final statistics: its loss (when `write_loss`) and the gradient of columns
// [begin, end), re-reading them (from L2 when they were read recently).
template <typename acc_t, bool WITH_CE, bool VECTOR>
__device__ __forceinline__ void segment_grad(const KDArgs<acc_t>& a, int64_t row, const KDStats<acc_t>& st,
                                             int64_t begin, int64_t end, bool write_loss, acc_t scale) {
  const RowLabel<acc_t> lab = row_label(a, row, true);
  const KDRowConsts<acc_t> k = kd_row_consts(st, a.T, a.kd_weight, a.ce_weight, scale);
  const char* srow = static_cast<const char*>(a.s) + row * a.s_row * dtype_size(a.s_dtype);
  const char* trow = static_cast<const char*>(a.t) + row * a.t_row * dtype_size(a.t_dtype);
  if (write_loss && threadIdx.x == 0) a.row_loss[row] = row_loss_value<WITH_CE>(a, lab, st, k, srow);
  if (a.grad == nullptr) return;
  char* grow = static_cast<char*>(a.grad) + row * a.C * dtype_size(a.s_dtype);
  // Two vectors a thread per step, a CTA-width apart (coalesced), both rows' loads in flight.
  constexpr int64_t kSpan = int64_t(kBlockThreads) * kVec;
  for (int64_t j0 = begin + int64_t(threadIdx.x) * kVec; j0 < end; j0 += 2 * kSpan) {
    const int64_t j[2] = {j0, j0 + kSpan};
    acc_t x[2][kVec], z[2][kVec];
    load_pairs<2, VECTOR>(srow, a.s_dtype, trow, a.t_dtype, j, end, neg_inf<acc_t>(), x, z);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      acc_t g[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        acc_t v = kd_grad_elem_t<WITH_CE>(x[h][i], z[h][i], k);
        if (WITH_CE && j[h] + i == lab.y) v -= k.ce_coef;
        g[i] = lab.ignored ? acc_t(0) : lab.bad ? quiet_nan<acc_t>() : v;
      }
      store4<VECTOR>(grow, a.s_dtype, j[h], end, g);
    }
  }
}

template <typename acc_t, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) kd_split_stats_kernel(const KDArgs<acc_t> a) {
  KDSEQ_SHARED(KDStats<acc_t>, smem, 32);
  const int64_t row = blockIdx.x / a.segments, seg = blockIdx.x % a.segments;
  const bool with_ce = a.labels != nullptr && a.ce_weight != acc_t(0);
  const int64_t begin = seg * a.seg_len, end = std::min(a.C, begin + a.seg_len);
  const KDStats<acc_t> st = segment_stats<acc_t, VECTOR>(a, row, begin, end, with_ce, acc_t(1) / a.T, smem);
  if (threadIdx.x == 0) a.partial[blockIdx.x] = st;
}

template <typename acc_t, bool WITH_CE, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) kd_split_grad_kernel(const KDArgs<acc_t> a) {
  KDSEQ_SHARED(acc_t, red, 32);
  KDSEQ_SHARED(unsigned, flag, 1);
  const int64_t row = blockIdx.x / a.segments, seg = blockIdx.x % a.segments;
  const acc_t invT = acc_t(1) / a.T;
  // Every thread merges the row's partial statistics in the same order (same bits everywhere).
  KDStats<acc_t> st = a.partial[row * a.segments];
  for (int64_t g = 1; g < a.segments; ++g) st = kd_stats_merge(st, a.partial[row * a.segments + g], invT, WITH_CE);
  const int64_t begin = seg * a.seg_len, end = std::min(a.C, begin + a.seg_len);
  segment_grad<acc_t, WITH_CE, VECTOR>(a, row, st, begin, end, seg == 0, a.ws != nullptr ? call_scale(a) : acc_t(1));
  if (a.loss != nullptr) last_cta_reduce(a.row_loss, a.B, &a.ws->counter, call_scale(a), a.loss, red, flag);
}

// Two passes over a row in one CTA: the statistics, then at once the gradient, so the second read
// of the row finds it in L2 when few enough rows are in flight (the split path's second kernel
// comes after every row's statistics and re-reads from HBM once B x C outgrows L2). An experiment
// for bench_kd_plans.py: the planner takes it only when forced ("mode=twopass").
template <typename acc_t, bool WITH_CE, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) kd_twopass_kernel(const KDArgs<acc_t> a) {
  KDSEQ_SHARED(KDStats<acc_t>, smem, 32);
  KDSEQ_SHARED(acc_t, red, 32);
  KDSEQ_SHARED(unsigned, flag, 1);
  const acc_t invT = acc_t(1) / a.T;
  const acc_t scale = a.ws != nullptr ? call_scale(a) : acc_t(1);
  for (int64_t row = blockIdx.x; row < a.B; row += gridDim.x) {
    const KDStats<acc_t> st = segment_stats<acc_t, VECTOR>(a, row, 0, a.C, WITH_CE, invT, smem);
    segment_grad<acc_t, WITH_CE, VECTOR>(a, row, st, 0, a.C, true, scale);
  }
  if (a.loss != nullptr) last_cta_reduce(a.row_loss, a.B, &a.ws->counter, call_scale(a), a.loss, red, flag);
}

// ------------------------------------------------------------------------------------------------
// Staged rows (forced only, "mode=staged,cluster=K"; a candidate for bench_kd_plans.py): a CTA --
// or each CTA of a cluster of K, for a slice of C / K columns -- copies its student and teacher
// slice into shared memory with asynchronous copies, all issued at once, then takes the maxima,
// the sums and the gradient from shared memory. HBM sees each logit once, as in register rows, but
// a CTA holds no registers for the bytes in flight (register rows: at most 8 vectors a thread), and
// 16-bit slices take half the space (they stay in their own dtype). Rows and slices must start on 16
// bytes (staged_rows_ok); other calls take the split path.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kStagedUnit = 8;  // slice boundaries: 16 bytes of a 16-bit row, 32 of an fp32 one

inline bool staged_rows_ok(const void* p, int64_t row_stride, int dtype, int64_t C) {
  const int64_t es = dtype_size(dtype);
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (row_stride * es) % 16 == 0 && (C * es) % 16 == 0;
}

template <typename acc_t, bool WITH_CE>
__global__ void __launch_bounds__(kBlockThreads) kd_staged_kernel(const KDArgs<acc_t> a) {
  KDSEQ_DYN_SHARED(stage);
  KDSEQ_SHARED(acc_t, red, 32 * 4);
  KDSEQ_SHARED(acc_t, slot_max, 2);
  KDSEQ_SHARED(acc_t, slot_sum, 4);
  KDSEQ_SHARED(acc_t, bcast, 4);
  KDSEQ_SHARED(unsigned, flag, 1);
  unsigned ctas = 1, rank = 0;
#if KDSEQ_HAS_CLUSTERS
  ctas = dev::cluster_size();
  rank = dev::cluster_rank();
#endif
  const acc_t invT = acc_t(1) / a.T;
  const int64_t row = blockIdx.x / ctas;
  const int64_t begin = std::min<int64_t>(a.C, int64_t(rank) * a.seg_len);
  const int64_t n = std::min(a.C, begin + a.seg_len) - begin;  // this CTA's columns (0 for a spare CTA)
  const int ss = dtype_size(a.s_dtype), ts = dtype_size(a.t_dtype);
  const char* srow = static_cast<const char*>(a.s) + row * a.s_row * ss;
  const char* trow = static_cast<const char*>(a.t) + row * a.t_row * ts;
  unsigned char* s_stage = stage;
  unsigned char* t_stage = stage + a.seg_len * ss;  // seg_len is a multiple of kStagedUnit: 16-byte aligned
  {
    const int64_t s_units = n * ss / 16, t_units = n * ts / 16;
    for (int64_t u = threadIdx.x; u < s_units; u += kBlockThreads) dev::cp_async16(s_stage + 16 * u, srow + begin * ss + 16 * u);
    for (int64_t u = threadIdx.x; u < t_units; u += kBlockThreads) dev::cp_async16(t_stage + 16 * u, trow + begin * ts + 16 * u);
    dev::cp_async_wait_all();
  }
  __syncthreads();
  const RowLabel<acc_t> lab = row_label(a, row, true);
  // f(j, x, z): student and teacher values of slice columns [j, j + 4), a vector a thread
  // (consecutive threads read consecutive vectors: no shared-memory bank conflicts).
  const auto each_vector = [&](auto&& f) {
    for (int64_t j = int64_t(threadIdx.x) * kVec; j < n; j += int64_t(kBlockThreads) * kVec) {
      acc_t x[kVec], z[kVec];
      load4<true>(s_stage, a.s_dtype, j, n, neg_inf<acc_t>(), x);
      load4<true>(t_stage, a.t_dtype, j, n, neg_inf<acc_t>(), z);
      f(j, x, z);
    }
  };

  acc_t m[2] = {neg_inf<acc_t>(), neg_inf<acc_t>()};
  each_vector([&](int64_t, const acc_t (&x)[kVec], const acc_t (&z)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      m[0] = kd_max(m[0], x[i]);
      m[1] = kd_max(m[1], z[i]);
    }
  });
  row_allreduce<kBlockThreads>(m, MaxOp<acc_t>(), red, ctas > 1, slot_max, bcast);

  acc_t sums[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};  // zsT, zs1, ztT, u
  each_vector([&](int64_t, const acc_t (&x)[kVec], const acc_t (&z)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const KDTerms<acc_t> tm = kd_terms<WITH_CE>(x[i], z[i], m[0], m[1], invT);
      sums[0] += tm.esT;
      sums[1] += tm.es1;
      sums[2] += tm.etT;
      sums[3] += tm.u;
    }
  });
  row_allreduce<kBlockThreads>(sums, SumOp<acc_t>(), red, ctas > 1, slot_sum, bcast);
  const KDStats<acc_t> st = row_stats(m, sums);
  const acc_t scale = a.ws != nullptr ? call_scale(a) : acc_t(1);
  const KDRowConsts<acc_t> k = kd_row_consts(st, a.T, a.kd_weight, a.ce_weight, scale);
  if (rank == 0 && threadIdx.x == 0) a.row_loss[row] = row_loss_value<WITH_CE>(a, lab, st, k, srow);

  if (a.grad != nullptr) {
    char* grow = static_cast<char*>(a.grad) + row * a.C * ss;
    each_vector([&](int64_t j, const acc_t (&x)[kVec], const acc_t (&z)[kVec]) {
      acc_t g[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        acc_t v = kd_grad_elem_t<WITH_CE>(x[i], z[i], k);
        if (WITH_CE && begin + j + i == lab.y) v -= k.ce_coef;
        g[i] = lab.ignored ? acc_t(0) : lab.bad ? quiet_nan<acc_t>() : v;
      }
      store4<true>(grow, a.s_dtype, begin + j, a.C, g);
    });
  }
#if KDSEQ_HAS_CLUSTERS
  // Other CTAs of the cluster may still read this CTA's slots.
  if (ctas > 1) dev::cluster_sync();
#endif
  if (a.loss != nullptr) last_cta_reduce(a.row_loss, a.B, &a.ws->counter, call_scale(a), a.loss, red, flag);
}

// ------------------------------------------------------------------------------------------------
// Backward: the forward kernel already wrote d loss / d student; backward multiplies it by
// grad_output in place, and returns at once when that is 1 (the usual `loss.backward()`): no second
// pass over B x C. For reduction "none" each row has its own factor.
// ------------------------------------------------------------------------------------------------
template <typename acc_t, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) kd_grad_scale_kernel(void* grad, int dtype, const acc_t* factor,
                                                                     bool per_row, int64_t B, int64_t C) {
  if (!per_row) {
    const acc_t f = *factor;
    if (f == acc_t(1)) return;
    const int64_t n = B * C;
    for (int64_t j = (int64_t(blockIdx.x) * kBlockThreads + threadIdx.x) * kVec; j < n;
         j += int64_t(gridDim.x) * kBlockThreads * kVec) {
      acc_t v[kVec];
      load4<VECTOR>(grad, dtype, j, n, acc_t(0), v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] *= f;
      store4<VECTOR>(grad, dtype, j, n, v);
    }
    return;
  }
  for (int64_t r = blockIdx.x; r < B; r += gridDim.x) {
    const acc_t f = factor[r];
    if (f == acc_t(1)) continue;
    char* row = static_cast<char*>(grad) + r * C * dtype_size(dtype);
    for (int64_t j = int64_t(threadIdx.x) * kVec; j < C; j += int64_t(kBlockThreads) * kVec) {
      acc_t v[kVec];
      load4<VECTOR>(row, dtype, j, C, acc_t(0), v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] *= f;
      store4<VECTOR>(row, dtype, j, C, v);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Planning (host): which kernel, layout and grid for a (B, C) problem.
// ------------------------------------------------------------------------------------------------
enum class Mode : int { kSingleCta = 0, kWarpRows = 1, kCtaRows = 2, kCluster = 3, kSplit = 4, kTwoPass = 5, kStaged = 6 };
// The modes' names in _force_plan specs and plan descriptions, in Mode order.
constexpr const char* kModeNames[] = {"single", "warp", "cta", "cluster", "split", "twopass", "staged"};
constexpr int kNumModes = sizeof(kModeNames) / sizeof(kModeNames[0]);

struct DeviceCaps {
  int sms = 132;
  int max_cluster = 0;  // 0: no clusters (before sm_90)
};

// Test and benchmark hook (torch.ops.kdseq._force_plan): force a layout, or let the planner choose
// but take a candidate layout wherever it would otherwise hold long rows in a register cluster or
// the split path ("prefer=staged", "prefer=twopass"). 0 / -1 fields mean "choose".
struct PlanOverride {
  int mode = -1;
  int prefer = -1;
  int group = 0, e = 0, cluster = 0;
  int64_t segments = 0;
};

// The override of the calling thread (planning happens in the forward call, on the caller's thread).
inline thread_local PlanOverride plan_override;

// "mode=cluster,e=8,cluster=3" -> PlanOverride; "" resets. Throws std::invalid_argument.
inline PlanOverride parse_plan_override(const std::string& spec) {
  PlanOverride ov;
  size_t pos = 0;
  while (pos <= spec.size()) {
    const size_t end = std::min(spec.find(',', pos), spec.size());
    const std::string item = spec.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("kdseq._force_plan: expected key=value, got '" + item + "'");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "mode") {
      ov.mode = -1;
      for (int i = 0; i < kNumModes; ++i)
        if (value == kModeNames[i]) ov.mode = i;
      if (ov.mode < 0)
        throw std::invalid_argument(
            "kdseq._force_plan: mode must be single, warp, cta, cluster, split, twopass or staged");
    } else if (key == "prefer") {
      if (value == kModeNames[static_cast<int>(Mode::kStaged)]) {
        ov.prefer = static_cast<int>(Mode::kStaged);
      } else if (value == kModeNames[static_cast<int>(Mode::kTwoPass)]) {
        ov.prefer = static_cast<int>(Mode::kTwoPass);
      } else {
        throw std::invalid_argument("kdseq._force_plan: prefer must be staged or twopass");
      }
    } else if (key == "group") {
      ov.group = std::stoi(value);
      if (ov.group != 8 && ov.group != 32) throw std::invalid_argument("kdseq._force_plan: group must be 8 or 32");
    } else if (key == "e") {
      ov.e = std::stoi(value);
      if (ov.e != 8 && ov.e != 16 && ov.e != 32) throw std::invalid_argument("kdseq._force_plan: e must be 8, 16 or 32");
    } else if (key == "cluster") {
      ov.cluster = std::stoi(value);
      if (ov.cluster < 1 || ov.cluster > 16) throw std::invalid_argument("kdseq._force_plan: cluster must be in [1, 16]");
    } else if (key == "segments") {
      ov.segments = std::stoll(value);
      if (ov.segments < 1) throw std::invalid_argument("kdseq._force_plan: segments must be >= 1");
    } else {
      throw std::invalid_argument("kdseq._force_plan: unknown key '" + key + "'");
    }
  }
  if (ov.mode >= 0 && ov.prefer >= 0)
    throw std::invalid_argument("kdseq._force_plan: prefer= adjusts the planner's own choice; it cannot be combined with mode=");
  return ov;
}

struct Plan {
  Mode mode = Mode::kSplit;
  int group = 32, e = 8, cluster = 1;
  int64_t segments = 1, seg_len = 0;
  int64_t grid = 1;
  int64_t smem = 0;  // dynamic shared memory per CTA (staged rows), set when launched
  bool prologue = false;
};

constexpr int64_t kSingleCtaMaxElements = int64_t(1) << 17;
constexpr int64_t kSingleClusterMaxCtas = 8;

inline int round_e(int64_t per_thread) {
  return per_thread <= 8 ? 8 : per_thread <= 16 ? 16 : 32;
}

inline Plan plan_split(int64_t B, int64_t C, const DeviceCaps& caps, int64_t forced_segments) {
  Plan p;
  p.mode = Mode::kSplit;
  constexpr int64_t kGranule = int64_t(kBlockThreads) * kVec;  // 1024 elements
  // Whole rows per CTA unless there are too few rows to give every SM two CTAs: measured on an
  // H200 (benchmarks/bench_kd_plans.py), 4096 rows of 32K or 131K classes run fastest with one
  // segment a row and 15-45% slower with the ~8K-element tiles used before; 16 rows need them.
  const int64_t want = (2 * int64_t(caps.sms) + B - 1) / std::max<int64_t>(B, 1);
  int64_t segs = std::max<int64_t>(1, std::min(want, (C + kGranule - 1) / kGranule));
  if (forced_segments > 0) segs = forced_segments;
  segs = std::max<int64_t>(1, std::min(segs, (C + kVec - 1) / kVec));
  int64_t len = (C + segs - 1) / segs;
  len = (len + kVec - 1) / kVec * kVec;  // segments start on vector boundaries
  p.seg_len = len;
  p.segments = (C + len - 1) / len;
  p.grid = B * p.segments;
  return p;
}

// Rows too long for one CTA's registers: a cluster holds each row on chip (one HBM read) but runs
// one resident cluster per few SMs; the split path reads the row twice (the second read mostly
// from L2) with full occupancy. Measured on an H200 (bench_kd_plans.py, fwd+bwd): with many rows
// the split path wins -- 4096 x 32000 with the CE term 697 vs 994 us (fp32), 699 vs 1368 us (bf16);
// without it bf16 658 vs 978 us, fp32 678 vs 645 us (the one 5% loss); 4096 x 131072 15-45%
// faster in every case -- while at 512 rows clusters stay ahead without the CE term.
inline bool split_beats_clusters(int64_t B, bool with_ce, const DeviceCaps& caps) {
  const int64_t sms = std::max<int64_t>(caps.sms, 1);
  return B >= 8 * sms || (with_ce && B >= 2 * sms);
}

inline Plan plan_twopass(int64_t B, int64_t C) {
  Plan p;
  p.mode = Mode::kTwoPass;
  p.seg_len = C;
  p.grid = B;
  return p;
}

// Staged rows: a row's slices over a cluster of `cluster` CTAs (0: slices of at most ~48 KiB of an
// fp32 student and teacher, 3-4 CTAs an SM, in as many CTAs as the device's clusters allow).
inline Plan plan_staged(int64_t B, int64_t C, const DeviceCaps& caps, int cluster) {
  constexpr int64_t kSliceElements = 6144;
  Plan p;
  p.mode = Mode::kStaged;
  p.group = kBlockThreads;
  const int64_t want = std::min<int64_t>((C + kSliceElements - 1) / kSliceElements, std::max(caps.max_cluster, 1));
  p.cluster = cluster > 0 ? cluster : static_cast<int>(want);
  const int64_t per = (C + p.cluster - 1) / p.cluster;
  p.seg_len = (per + kStagedUnit - 1) / kStagedUnit * kStagedUnit;
  p.grid = B * p.cluster;
  return p;
}

// The planner's choice under a "prefer=" hook: the candidate layout replaces the register clusters
// and the split path (long rows) -- twopass only where the split path gives each row one CTA, since
// it cannot spread a row over CTAs. Everything else (short rows, fp64) keeps the planner's choice.
inline Plan apply_preference(Plan p, int64_t B, int64_t C, bool fp64, const DeviceCaps& caps, int prefer) {
  if (fp64 || (p.mode != Mode::kCluster && p.mode != Mode::kSplit)) return p;
  if (prefer == static_cast<int>(Mode::kStaged)) return plan_staged(B, C, caps, 0);
  if (prefer == static_cast<int>(Mode::kTwoPass) && p.mode == Mode::kSplit && p.segments == 1)
    return plan_twopass(B, C);
  return p;
}

inline Plan plan_kd_loss(int64_t B, int64_t C, bool with_ce, bool fp64, int reduction, const DeviceCaps& caps,
                         const PlanOverride& ov = PlanOverride()) {
  Plan p;
  const int emax = with_ce ? 16 : 32;  // 3 (CE) or 2 register arrays of E values a thread
  const Mode forced = static_cast<Mode>(ov.mode);
  if (forced == Mode::kTwoPass) {
    p = plan_twopass(B, C);
  } else if (forced == Mode::kStaged && !fp64) {
    p = plan_staged(B, C, caps, ov.cluster);
  } else if (fp64 || forced == Mode::kSplit) {
    p = plan_split(B, C, caps, ov.segments);
  } else if ((ov.mode < 0 && C <= 32 * emax) || forced == Mode::kSingleCta || forced == Mode::kWarpRows) {
    p.group = ov.group > 0 ? ov.group : C <= 8 * 16 ? 8 : 32;
    p.e = ov.e > 0 ? ov.e : round_e((C + p.group - 1) / p.group);
    const int64_t rows_per_cta = kBlockThreads / p.group;
    const bool single = forced == Mode::kSingleCta || (ov.mode < 0 && B * C <= kSingleCtaMaxElements);
    p.mode = single ? Mode::kSingleCta : Mode::kWarpRows;
    p.grid = single ? 1 : (B + rows_per_cta - 1) / rows_per_cta;
    if (single) {
      // On sm_90 the small call is still one launch but spread over a cluster of CTAs (up to the
      // portable 8) that share the rows and reduce through distributed shared memory: (256, 100)
      // takes 8 CTAs of one pass each instead of one CTA looping 8 times.
      const int64_t want = (B + rows_per_cta - 1) / rows_per_cta;
      const int64_t cap = std::min<int64_t>(caps.max_cluster, kSingleClusterMaxCtas);
      p.cluster = ov.cluster > 0 ? ov.cluster : static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
      p.grid = p.cluster;
    }
  } else if ((ov.mode < 0 && C <= int64_t(kBlockThreads) * emax) || forced == Mode::kCtaRows) {
    p.mode = Mode::kCtaRows;
    p.group = kBlockThreads;
    p.e = ov.e > 0 ? ov.e : round_e((C + kBlockThreads - 1) / kBlockThreads);
    p.grid = B;
  } else if ((ov.mode < 0 && caps.max_cluster >= 2 && !split_beats_clusters(B, with_ce, caps) &&
              C <= int64_t(kBlockThreads) * emax * caps.max_cluster) || forced == Mode::kCluster) {
    p.mode = Mode::kCluster;
    p.group = kBlockThreads;
    const int64_t cta_cap = int64_t(kBlockThreads) * emax;
    p.cluster = ov.cluster > 0 ? ov.cluster : static_cast<int>((C + cta_cap - 1) / cta_cap);
    p.e = ov.e > 0 ? ov.e : round_e((C + int64_t(kBlockThreads) * p.cluster - 1) / (int64_t(kBlockThreads) * p.cluster));
    p.grid = B * p.cluster;
  } else {
    p = plan_split(B, C, caps, ov.segments);
  }
  if (ov.mode < 0 && ov.prefer >= 0) p = apply_preference(p, B, C, fp64, caps, ov.prefer);
  p.prologue = p.mode != Mode::kSingleCta && reduction != kReduceNone;
  return p;
}

// "cluster,group=256,e=8,cluster=3,segments=1,prologue": what ran (torch.ops.kdseq._last_plan, the
// emulation's reports).
inline std::string describe_plan(const Plan& p) {
  const int m = static_cast<int>(p.mode);
  return std::string(m >= 0 && m < kNumModes ? kModeNames[m] : "?") + ",group=" + std::to_string(p.group) +
         ",e=" + std::to_string(p.e) + ",cluster=" + std::to_string(p.cluster) +
         ",segments=" + std::to_string(p.segments) + (p.smem > 0 ? ",smem=" + std::to_string(p.smem) : "") +
         (p.prologue ? ",prologue" : "");
}

// Whether a planned register layout holds the whole row (forced plans may not).
inline bool plan_covers_row(const Plan& p, int64_t C) {
  if (p.mode == Mode::kSplit || p.mode == Mode::kTwoPass || p.mode == Mode::kStaged) return true;
  // Only the column-split cluster spreads a row over CTAs; a single-call cluster shares rows.
  return int64_t(p.group) * p.e * (p.mode == Mode::kCluster ? p.cluster : 1) >= C;
}

// ------------------------------------------------------------------------------------------------
// Launching through a Launcher: a CUDA launcher (kd_loss_cuda.cu) or the CPU emulation (tests).
// launch(dims, kernel, args...) runs the kernel; launch.cluster_ok(kernel, ctas[, smem]) says whether a
// cluster of that size (with that much dynamic shared memory a CTA) can be launched on this device;
// launch.smem_ok(kernel, bytes) whether a CTA of the kernel can have that much dynamic shared memory.
// ------------------------------------------------------------------------------------------------
template <typename acc_t, int GROUP, bool WITH_CE, bool VECTOR, typename Launcher>
bool launch_rows_e(Plan& p, const KDArgs<acc_t>& a, Launcher& launch) {
  auto go = [&](auto kernel) {
    if (p.cluster > 1 && !launch.cluster_ok(kernel, p.cluster)) {
      if (p.mode != Mode::kSingleCta) return false;  // a row needs the cluster: the split path
      p.cluster = 1;  // a single call runs in one CTA as well
      p.grid = 1;
    }
    launch(LaunchDims{static_cast<unsigned>(p.grid), kBlockThreads, static_cast<unsigned>(p.cluster)}, kernel, a);
    return true;
  };
  switch (p.e) {
    case 8: return go(kd_rows_kernel<acc_t, GROUP, 8, WITH_CE, VECTOR>);
    case 16: return go(kd_rows_kernel<acc_t, GROUP, 16, WITH_CE, VECTOR>);
    default:
      if constexpr (!WITH_CE) return go(kd_rows_kernel<acc_t, GROUP, 32, WITH_CE, VECTOR>);
      return go(kd_rows_kernel<acc_t, GROUP, 16, WITH_CE, VECTOR>);  // unreachable: CE plans use E <= 16
  }
}

template <typename acc_t, bool WITH_CE, bool VECTOR, typename Launcher>
bool launch_rows(Plan& p, const KDArgs<acc_t>& a, Launcher& launch) {
  switch (p.group) {
    case 8: return launch_rows_e<acc_t, 8, WITH_CE, VECTOR>(p, a, launch);
    case 32: return launch_rows_e<acc_t, 32, WITH_CE, VECTOR>(p, a, launch);
    default: return launch_rows_e<acc_t, kBlockThreads, WITH_CE, VECTOR>(p, a, launch);
  }
}

// Staged rows: false (nothing launched) when the slice does not fit the CTA's shared memory or the
// cluster cannot be scheduled; the caller then takes the split path.
template <typename acc_t, bool WITH_CE, typename Launcher>
bool launch_staged(Plan& p, const KDArgs<acc_t>& a, Launcher& launch) {
  const auto kernel = kd_staged_kernel<acc_t, WITH_CE>;
  const int64_t smem = p.seg_len * (dtype_size(a.s_dtype) + dtype_size(a.t_dtype));
  if (!launch.smem_ok(kernel, smem)) return false;
  if (p.cluster > 1 && !launch.cluster_ok(kernel, p.cluster, smem)) return false;
  p.smem = smem;
  launch(LaunchDims{static_cast<unsigned>(p.grid), kBlockThreads, static_cast<unsigned>(p.cluster),
                    static_cast<unsigned>(smem)},
         kernel, a);
  return true;
}

template <typename acc_t, bool WITH_CE, bool VECTOR, typename Launcher>
void launch_split(const Plan& p, const KDArgs<acc_t>& a, Launcher& launch) {
  const LaunchDims d{static_cast<unsigned>(p.grid), kBlockThreads, 1};
  launch(d, kd_split_stats_kernel<acc_t, VECTOR>, a);
  launch(d, kd_split_grad_kernel<acc_t, WITH_CE, VECTOR>, a);
}

// f(std::bool_constant<WITH_CE>{}, std::bool_constant<VECTOR>{}) for the runtime flags: the one
// place the four kernel instantiations of a layout are chosen.
template <typename F>
decltype(auto) with_flags(bool with_ce, bool vector, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (with_ce) return vector ? f(T{}, T{}) : f(T{}, N{});
  return vector ? f(N{}, T{}) : f(N{}, N{});
}

// Runs a planned call. `a` has every pointer set except the workspace ones, which `alloc` provides:
// alloc_ws() -> Workspace*, alloc_partials(n) -> KDStats<acc_t>*. Returns the plan that ran (a cluster
// plan the device cannot launch falls back to the split path).
template <typename acc_t, typename Launcher, typename Alloc>
Plan run_kd_loss(Plan p, KDArgs<acc_t> a, bool with_ce, bool vector, const DeviceCaps& caps, Launcher& launch,
                 Alloc& alloc) {
  // gridDim.x holds at most 2^31 - 1 CTAs, and the split and two-pass kernels take one (row,
  // segment) tile a CTA with no grid-stride loop: say so rather than fail the launch (it takes
  // 2^31 rows, over 100 GiB of fp64 logits, to get there).
  if (p.grid > 2147483647)
    throw std::length_error("kdseq: kd_loss on CUDA takes at most 2^31 - 1 row tiles in one call (this one needs " +
                            std::to_string(p.grid) + "); split the batch");
  a.single_cta = p.mode == Mode::kSingleCta;
  a.ws = p.prologue ? alloc.alloc_ws() : nullptr;
  if (p.prologue) launch(LaunchDims{1, kBlockThreads, 1}, kd_prologue_kernel<acc_t>, a);
  if (p.mode == Mode::kTwoPass) {
    a.segments = 1;
    a.seg_len = a.C;
    const LaunchDims d{static_cast<unsigned>(p.grid), kBlockThreads, 1};
    with_flags(with_ce, vector, [&](auto ce, auto vec) {
      launch(d, kd_twopass_kernel<acc_t, decltype(ce)::value, decltype(vec)::value>, a);
    });
    return p;
  }
  if (p.mode == Mode::kStaged) {
    if constexpr (std::is_same_v<acc_t, float>) {
      a.seg_len = p.seg_len;
      const bool aligned = staged_rows_ok(a.s, a.s_row, a.s_dtype, a.C) &&
                           staged_rows_ok(a.t, a.t_row, a.t_dtype, a.C);
      if (aligned && (with_ce ? launch_staged<acc_t, true>(p, a, launch) : launch_staged<acc_t, false>(p, a, launch)))
        return p;
    }
  } else if (p.mode != Mode::kSplit) {
    if constexpr (std::is_same_v<acc_t, float>) {
      a.segments = 1;
      const bool ran = with_flags(with_ce, vector, [&](auto ce, auto vec) {
        return launch_rows<acc_t, decltype(ce)::value, decltype(vec)::value>(p, a, launch);
      });
      if (ran) return p;
    }
  }
  if (p.mode != Mode::kSplit) {
    // fp64, a cluster the device cannot launch, or staged rows that are not aligned or do not fit:
    // the split path (the prologue already ran).
    const Plan s = plan_split(a.B, a.C, caps, 0);
    p.mode = s.mode;
    p.segments = s.segments;
    p.seg_len = s.seg_len;
    p.grid = s.grid;
    p.cluster = 1;
  }
  a.segments = p.segments;
  a.seg_len = p.seg_len;
  a.partial = alloc.alloc_partials(a.B * p.segments);
  with_flags(with_ce, vector, [&](auto ce, auto vec) {
    launch_split<acc_t, decltype(ce)::value, decltype(vec)::value>(p, a, launch);
  });
  return p;
}

template <typename acc_t, typename Launcher>
void run_grad_scale(void* grad, int dtype, const acc_t* factor, bool per_row, int64_t B, int64_t C, bool vector,
                    int sms, Launcher& launch) {
  if (B * C == 0) return;
  const int64_t blocks = per_row ? std::min<int64_t>(B, int64_t(sms) * 8)
                                 : std::min<int64_t>((B * C + kBlockThreads * kVec - 1) / (kBlockThreads * kVec),
                                                     int64_t(sms) * 8);
  const LaunchDims d{static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kBlockThreads, 1};
  if (vector) {
    launch(d, kd_grad_scale_kernel<acc_t, true>, grad, dtype, factor, per_row, B, C);
  } else {
    launch(d, kd_grad_scale_kernel<acc_t, false>, grad, dtype, factor, per_row, B, C);
  }
}

}  // namespace kd_kernels
}  // namespace kdseq
