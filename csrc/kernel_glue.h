// Tensors in, kernels planned and launched through a Launcher: the CUDA launcher of the extension
// (cuda_launch.cuh), or the CPU emulation of the test suite (tests/cuda_emulation), which runs these
// very functions on CPU tensors. Nothing here reads device memory on the host.
//
// A Launcher provides launch(LaunchDims, kernel, args...) and cluster_ok(kernel, ctas).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "instance_scores_kernels.cuh"
#include "kd_loss_kernels.cuh"
#include "kdseq.h"

namespace kdseq {
namespace glue {

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda_rows::kF32;
    case at::kHalf: return cuda_rows::kF16;
    case at::kBFloat16: return cuda_rows::kBF16;
    case at::kDouble: return cuda_rows::kF64;
    default: TORCH_CHECK(false, "kdseq: unsupported logits dtype ", t);
  }
  return cuda_rows::kF32;
}

// Row starts aligned for 4-element vector accesses, and rows a whole number of vectors long.
inline bool vector_ok(const at::Tensor& x, int64_t C) {
  return C % cuda_rows::kVec == 0 && x.stride(0) % cuda_rows::kVec == 0 &&
         aligned_to(x.data_ptr(), cuda_rows::kVec * x.element_size());
}

// Columns must be contiguous for the kernels; rows may be strided (a slice of a bigger tensor).
inline at::Tensor unit_columns(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

// Workspaces live as long as the call; on CUDA the caching allocator orders their reuse after the
// kernels of this stream.
template <typename acc_t>
struct TensorAlloc {
  at::TensorOptions bytes;
  std::vector<at::Tensor> keep;
  kd_kernels::Workspace* alloc_ws() {
    keep.push_back(at::empty({static_cast<int64_t>(sizeof(kd_kernels::Workspace))}, bytes));
    return reinterpret_cast<kd_kernels::Workspace*>(keep.back().data_ptr());
  }
  rowmath::KDStats<acc_t>* alloc_partials(int64_t n) {
    keep.push_back(at::empty({n * static_cast<int64_t>(sizeof(rowmath::KDStats<acc_t>))}, bytes));
    return reinterpret_cast<rowmath::KDStats<acc_t>*>(keep.back().data_ptr());
  }
};

// The whole KD-loss call: (loss, gradient, the plan that ran). labels: int64 contiguous or undefined.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, kd_kernels::Plan> kd_loss_launch(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels, const KDLossArgs& args,
    int64_t reduction, bool compute_grad, const kd_kernels::DeviceCaps& caps, const kd_kernels::PlanOverride& ov,
    Launcher& launch) {
  const at::Tensor s = unit_columns(student);
  const at::Tensor t = unit_columns(teacher);
  const int64_t B = s.size(0), C = s.size(1);
  const bool f64 = s.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (t.scalar_type() == at::kDouble), "kdseq: float64 logits must be used for both student and teacher");
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const bool has_labels = labels.defined();
  // Decided on the weight as the kernels hold it: a ce_weight that rounds to 0 in fp32 (below ~1e-45)
  // must not switch the CE term on here while the split statistics kernel, which reads the fp32
  // value, leaves it off (log Z of the CE term -inf, 0 * inf = NaN).
  const bool with_ce = has_labels && (f64 ? args.ce_weight != 0.0 : static_cast<float>(args.ce_weight) != 0.0f);
  at::Tensor row_loss = at::empty({B}, s.options().dtype(acc));
  at::Tensor grad = compute_grad ? fresh_grad_buffer(s) : at::empty({0}, s.options());
  at::Tensor loss = reduction == kNone ? row_loss : at::empty({}, s.options().dtype(acc));
  kd_kernels::Plan plan;
  if (B == 0) {
    if (reduction != kNone) loss.zero_();
    return {loss, grad, plan};
  }
  const bool vector = vector_ok(s, C) && vector_ok(t, C);
  plan = kd_kernels::plan_kd_loss(B, C, with_ce, f64, static_cast<int>(reduction), caps, ov);
  TORCH_CHECK(kd_kernels::plan_covers_row(plan, C) && (!with_ce || plan.e <= 16),
              "kdseq: the forced plan (torch.ops.kdseq._force_plan) cannot hold rows of ", C, " classes");
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    kd_kernels::KDArgs<acc_t> a{};
    a.s = s.data_ptr();
    a.t = t.data_ptr();
    a.labels = has_labels ? labels.data_ptr<int64_t>() : nullptr;
    a.grad = compute_grad ? grad.data_ptr() : nullptr;
    a.row_loss = row_loss.data_ptr<acc_t>();
    a.loss = reduction == kNone ? nullptr : loss.data_ptr<acc_t>();
    a.B = B;
    a.C = C;
    a.s_row = s.stride(0);
    a.t_row = t.stride(0);
    a.s_dtype = dtype_code(s.scalar_type());
    a.t_dtype = dtype_code(t.scalar_type());
    a.T = static_cast<acc_t>(args.temperature);
    a.kd_weight = static_cast<acc_t>(args.kd_weight);
    a.ce_weight = static_cast<acc_t>(args.ce_weight);
    a.ignore_index = args.ignore_index;
    a.reduction = static_cast<int>(reduction);
    TensorAlloc<acc_t> alloc{s.options().dtype(at::kByte), {}};
    plan = kd_kernels::run_kd_loss<acc_t>(plan, a, with_ce, vector, caps, launch, alloc);
  };
  if (f64) {
    run(double(0));
  } else {
    run(float(0));
  }
  return {loss, grad, plan};
}

// grad *= factor in place (per row when per_row); the kernel returns at once for a factor of 1.
template <typename Launcher>
void kd_grad_scale_launch(const at::Tensor& grad, const at::Tensor& factor, bool per_row, int sms, Launcher& launch) {
  TORCH_CHECK(grad.is_contiguous() && grad.dim() == 2, "kdseq: the stored gradient must be a contiguous (B, C) tensor");
  const at::Tensor f = factor.to(grad.device(), grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat)
                           .contiguous();
  TORCH_CHECK(f.numel() == (per_row ? grad.size(0) : 1), "kdseq: grad_output has ", f.numel(), " elements");
  const int64_t B = grad.size(0), C = grad.size(1);
  const bool vector = C % cuda_rows::kVec == 0 && aligned_to(grad.data_ptr(), cuda_rows::kVec * grad.element_size());
  if (f.scalar_type() == at::kDouble) {
    kd_kernels::run_grad_scale<double>(grad.data_ptr(), dtype_code(grad.scalar_type()), f.data_ptr<double>(), per_row,
                                       B, C, vector, sms, launch);
  } else {
    kd_kernels::run_grad_scale<float>(grad.data_ptr(), dtype_code(grad.scalar_type()), f.data_ptr<float>(), per_row,
                                      B, C, vector, sms, launch);
  }
}

// The six scores of every row; labels int64 contiguous; teacher may be undefined.
template <typename Launcher>
at::Tensor instance_scores_launch(const at::Tensor& student, const at::Tensor& labels, const at::Tensor& teacher,
                                  double temperature, Launcher& launch) {
  const at::Tensor s = unit_columns(student);
  const bool with_teacher = teacher.defined();
  const at::Tensor t = with_teacher ? unit_columns(teacher) : teacher;
  const int64_t B = s.size(0), C = s.size(1);
  const bool f64 = s.scalar_type() == at::kDouble;
  TORCH_CHECK(!with_teacher || f64 == (t.scalar_type() == at::kDouble),
              "kdseq: float64 logits must be used for both student and teacher");
  at::Tensor out = at::empty({B, rowmath::kNumScoreFields}, s.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (B == 0) return out;
  const bool vector = vector_ok(s, C) && (!with_teacher || vector_ok(t, C));
  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    score_kernels::ScoreArgs<acc_t> a{};
    a.s = s.data_ptr();
    a.t = with_teacher ? t.data_ptr() : nullptr;
    a.labels = labels.data_ptr<int64_t>();
    a.out = out.data_ptr<acc_t>();
    a.B = B;
    a.C = C;
    a.s_row = s.stride(0);
    a.t_row = with_teacher ? t.stride(0) : 0;
    a.s_dtype = dtype_code(s.scalar_type());
    a.t_dtype = with_teacher ? dtype_code(t.scalar_type()) : a.s_dtype;
    a.T = static_cast<acc_t>(temperature);
    score_kernels::run_instance_scores<acc_t>(a, vector, score_kernels::score_group(C), launch);
  };
  if (f64) {
    run(double(0));
  } else {
    run(float(0));
  }
  return out;
}

}  // namespace glue
}  // namespace kdseq
