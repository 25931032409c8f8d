// CUDA kernel of the fused KD loss: forward loss and student gradient in one launch.
//
// Why the gradient is produced in the forward pass (as Liger-Kernel does) instead of recomputed in
// backward: backward would have to read student and teacher again (2 reads + 1 write per element,
// plus the forward's 2 reads), while producing it here costs one extra write only; a training step
// always needs the gradient, and the caller skips it (compute_grad=false) under no_grad/eval.
// The memory cost is the gradient itself, which autograd would allocate anyway.
//
// Per row: pass 1 streams the row once for the online softmax statistics of s/T, s (CE) and t/T and
// the KL numerator, which give the row loss (row_math.h); pass 2, only when the gradient is wanted,
// streams it again (served from L2 for the row sizes that matter) and writes the gradient.
// Small C: a warp per row, several rows per block. Large C: a block per row.
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
struct KDShfl {
  __device__ __forceinline__ KDStats<acc_t> operator()(const KDStats<acc_t>& s, int off) const {
    KDStats<acc_t> o;
    o.ms = __shfl_xor_sync(kFullMask, s.ms, off);
    o.zsT = __shfl_xor_sync(kFullMask, s.zsT, off);
    o.zs1 = __shfl_xor_sync(kFullMask, s.zs1, off);
    o.mt = __shfl_xor_sync(kFullMask, s.mt, off);
    o.ztT = __shfl_xor_sync(kFullMask, s.ztT, off);
    o.u = __shfl_xor_sync(kFullMask, s.u, off);
    return o;
  }
};

template <typename acc_t>
struct KDMerge {
  acc_t invT;
  bool with_ce;
  __device__ __forceinline__ KDStats<acc_t> operator()(const KDStats<acc_t>& a, const KDStats<acc_t>& b) const {
    return kd_stats_merge(a, b, invT, with_ce);
  }
};

template <typename s_t, typename t_t, typename acc_t, int GROUP, int VEC, bool VECTOR>
__global__ void __launch_bounds__(kBlockThreads) kd_loss_kernel(
    const s_t* __restrict__ s, int64_t s_row, int64_t s_col, const t_t* __restrict__ t, int64_t t_row,
    int64_t t_col, const int64_t* __restrict__ labels, const int64_t* __restrict__ n_valid, int64_t B,
    int64_t C, acc_t T, acc_t kd_weight, acc_t ce_weight, int64_t ignore_index, bool mean,
    acc_t* __restrict__ row_loss, s_t* __restrict__ grad) {
  constexpr int kRowsPerBlock = kBlockThreads / GROUP;
  __shared__ KDStats<acc_t> smem_stats[32];

  const bool with_ce = labels != nullptr && ce_weight != acc_t(0);
  const acc_t invT = acc_t(1) / T;
  acc_t scale = acc_t(1);
  if (mean) {
    const int64_t nv = *n_valid;
    scale = nv > 0 ? acc_t(1) / static_cast<acc_t>(nv) : acc_t(0);
  }
  const int lane = threadIdx.x % GROUP;
  const int64_t group_in_block = threadIdx.x / GROUP;
  const KDMerge<acc_t> merge{invT, with_ce};

  for (int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + group_in_block; r < B;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const s_t* srow = s + r * s_row;
    const t_t* trow = t + r * t_row;
    s_t* grow = grad != nullptr ? grad + r * C : nullptr;
    const int64_t y = labels != nullptr ? labels[r] : -1;
    // Ignored rows: uniform across the group, so the early exit keeps block syncs balanced.
    if (labels != nullptr && y == ignore_index) {
      if (grow != nullptr) {
        acc_t zero[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) zero[i] = acc_t(0);
        for (int64_t j = int64_t(lane) * VEC; j < C; j += int64_t(GROUP) * VEC) store_row<VECTOR, VEC>(grow, j, C, zero);
      }
      if (lane == 0) row_loss[r] = acc_t(0);
      continue;
    }

    KDStats<acc_t> st = kd_stats_init<acc_t>();
    for (int64_t j = int64_t(lane) * VEC; j < C; j += int64_t(GROUP) * VEC) {
      acc_t sv[VEC], tv[VEC];
      load_row<VECTOR, VEC>(srow, s_col, j, C, neg_inf<acc_t>(), sv);
      load_row<VECTOR, VEC>(trow, t_col, j, C, neg_inf<acc_t>(), tv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) kd_stats_push(st, sv[i], tv[i], invT, with_ce);
    }
    st = group_allmerge<GROUP>(st, kd_stats_init<acc_t>(), smem_stats, KDShfl<acc_t>(), merge);
    const KDRowConsts<acc_t> k = kd_row_consts(st, T, kd_weight, ce_weight, scale);
    if (lane == 0) {
      const acc_t s_label = with_ce ? static_cast<acc_t>(srow[y * s_col]) : acc_t(0);
      row_loss[r] = kd_row_loss(st, k, T, kd_weight, ce_weight, with_ce, s_label);
    }
    if (grow == nullptr) continue;

    for (int64_t j = int64_t(lane) * VEC; j < C; j += int64_t(GROUP) * VEC) {
      acc_t sv[VEC], tv[VEC], gv[VEC];
      load_row<VECTOR, VEC>(srow, s_col, j, C, neg_inf<acc_t>(), sv);
      load_row<VECTOR, VEC>(trow, t_col, j, C, neg_inf<acc_t>(), tv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        // Padding lanes past C carry -inf in both rows and are not stored.
        gv[i] = kd_grad_elem(sv[i], tv[i], k, with_ce);
        if (with_ce && j + i == y) gv[i] -= k.ce_coef;
      }
      store_row<VECTOR, VEC>(grow, j, C, gv);
    }
  }
}

template <typename s_t, typename t_t, typename acc_t>
void launch(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
            const at::Tensor& n_valid, const KDLossArgs& args, at::Tensor& row_loss, at::Tensor& grad) {
  constexpr int VEC = vec_width<s_t, t_t>();
  const int64_t B = student.size(0), C = student.size(1);
  const s_t* s = student.data_ptr<s_t>();
  const t_t* t = teacher.data_ptr<t_t>();
  s_t* g = grad.defined() ? grad.data_ptr<s_t>() : nullptr;
  const int64_t s_row = student.stride(0), s_col = student.stride(1);
  const int64_t t_row = teacher.stride(0), t_col = teacher.stride(1);
  // 128-bit path: unit column stride, every row start aligned (C and row strides multiples of VEC).
  const bool vector = s_col == 1 && t_col == 1 && C % VEC == 0 && s_row % VEC == 0 && t_row % VEC == 0 &&
                      aligned16(s) && aligned16(t) && (g == nullptr || aligned16(g));
  const int64_t* y = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const int64_t* nv = n_valid.data_ptr<int64_t>();
  acc_t* loss = row_loss.data_ptr<acc_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;

  auto go = [&](auto group_tag, auto vector_tag) {
    constexpr int GROUP = decltype(group_tag)::value;
    constexpr bool VECTOR = decltype(vector_tag)::value;
    constexpr int rows_per_block = kBlockThreads / GROUP;
    const int64_t blocks = std::min<int64_t>((B + rows_per_block - 1) / rows_per_block, max_blocks);
    kd_loss_kernel<s_t, t_t, acc_t, GROUP, VEC, VECTOR><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
        s, s_row, s_col, t, t_row, t_col, y, nv, B, C, static_cast<acc_t>(args.temperature),
        static_cast<acc_t>(args.kd_weight), static_cast<acc_t>(args.ce_weight), args.ignore_index, args.mean,
        loss, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_row_layout(C, vector, go);
}

}  // namespace

void kd_loss_rows_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                       const at::Tensor& n_valid, const KDLossArgs& args, at::Tensor& row_loss,
                       at::Tensor& grad) {
  if (student.scalar_type() == at::kDouble) {
    TORCH_CHECK(teacher.scalar_type() == at::kDouble, "kdseq: float64 student needs a float64 teacher");
    launch<double, double, double>(student, teacher, labels, n_valid, args, row_loss, grad);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cuda_s", [&] {
    using s_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cuda_t", [&] {
      using t_t = scalar_t;
      if constexpr (std::is_same_v<s_t, double> || std::is_same_v<t_t, double>) {
        TORCH_CHECK(false, "kdseq: float64 logits must be used for both student and teacher");
      } else {
        launch<s_t, t_t, float>(student, teacher, labels, n_valid, args, row_loss, grad);
      }
    });
  });
}

}  // namespace kdseq
