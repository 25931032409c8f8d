// The CUDA entry points of kd_loss: device guard, current stream, and the shared tensor glue
// (kernel_glue.h) with the CUDA launcher. Nothing here reads device memory on the host, so a call
// never synchronizes and can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "cuda_launch.cuh"
#include "kernel_glue.h"
#include "kdseq.h"

namespace kdseq {

using cuda_glue::current_launcher;

namespace {
// The plan of the calling thread's last forward call (planning happens in the forward, on the
// caller's thread), for torch.ops.kdseq._last_plan.
thread_local std::string last_plan;
}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_cuda_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& labels, const KDLossArgs& args,
                                                        int64_t reduction, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  auto launch = current_launcher(student);
  auto [loss, grad, plan] = glue::kd_loss_launch(student, teacher, labels, args, reduction, compute_grad,
                                                 cuda_glue::device_caps(student.get_device()),
                                                 kd_kernels::plan_override, launch);
  last_plan = kd_kernels::describe_plan(plan);
  return {loss, grad};
}

void kd_grad_scale_cuda_(const at::Tensor& grad, const at::Tensor& factor, bool per_row) {
  const c10::cuda::CUDAGuard guard(grad.device());
  auto launch = current_launcher(grad);
  glue::kd_grad_scale_launch(grad, factor, per_row, cuda_glue::device_caps(grad.get_device()).sms, launch);
}

void set_cuda_plan_override(const std::string& spec) {
  kd_kernels::plan_override = kd_kernels::parse_plan_override(spec);
}

std::string cuda_last_plan() { return last_plan; }

}  // namespace kdseq
