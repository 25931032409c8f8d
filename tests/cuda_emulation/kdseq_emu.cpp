// The CUDA kernels of csrc/, compiled as host C++ against emu_runtime.h and run on CPU tensors:
// torch.ops.kdseq_emu.{kd_loss, grad_scale_, instance_scores}. Built on the fly by
// tests/test_cuda_emulation.py. The tensor glue (kernel_glue.h) is the one the CUDA extension uses;
// only the launcher differs.
#include <torch/library.h>

#include <string>

#include "kernel_glue.h"

namespace {

using namespace kdseq;

// A launcher with an emulated device: its SM count (planning) and whether clusters may launch.
struct EmuLauncher {
  bool clusters = true;
  template <typename... KArgs, typename... Args>
  void operator()(const cuda_rows::LaunchDims& d, void (*kernel)(KArgs...), Args... args) {
    kdseq_emu::launch(kdseq_emu::LaunchDims{d.grid, d.block, d.cluster, d.smem}, kernel, args...);
  }
  template <typename... KArgs>
  bool cluster_ok(void (*)(KArgs...), int ctas, int64_t /* smem: smem_ok decides */ = 0) {
    return clusters && ctas <= 16;
  }
  // An H100/H200's opt-in limit of dynamic shared memory a CTA (227 KiB), less the static arrays.
  int64_t smem_limit = 227 * 1024 - 1024;
  template <typename... KArgs>
  bool smem_ok(void (*)(KArgs...), int64_t bytes) {
    return bytes <= smem_limit;
  }
};

// plan: a _force_plan spec, plus "sms=N" (the emulated device) and "nocluster" (clusters refused at
// launch time, as on a device where the size does not fit: the call must fall back to split) and
// "smem=N" (the dynamic shared memory a CTA may have; staged slices beyond it fall back to split).
std::tuple<at::Tensor, at::Tensor, std::string> kd_loss(const at::Tensor& s, const at::Tensor& t,
                                                        const std::optional<at::Tensor>& labels, double T, double kdw,
                                                        double cew, int64_t reduction, int64_t ignore_index,
                                                        bool compute_grad, const std::string& plan_spec) {
  TORCH_CHECK(s.is_cpu() && t.is_cpu(), "kdseq_emu: CPU tensors only");
  kd_kernels::DeviceCaps caps;
  caps.sms = 4;
  caps.max_cluster = 16;
  EmuLauncher launch;
  std::string forced;
  size_t pos = 0;
  while (pos <= plan_spec.size()) {
    const size_t end = std::min(plan_spec.find(',', pos), plan_spec.size());
    const std::string item = plan_spec.substr(pos, end - pos);
    pos = end + 1;
    if (item.rfind("sms=", 0) == 0) {
      caps.sms = std::stoi(item.substr(4));
    } else if (item == "nocluster") {
      launch.clusters = false;
    } else if (item.rfind("smem=", 0) == 0) {
      launch.smem_limit = std::stoll(item.substr(5));
    } else if (!item.empty()) {
      forced += (forced.empty() ? "" : ",") + item;
    }
  }
  at::Tensor y;
  if (labels.has_value() && labels->defined()) y = labels->to(at::kLong).contiguous();
  const KDLossArgs args{T, kdw, cew, ignore_index, reduction == kMean};
  auto [loss, grad, plan] = glue::kd_loss_launch(s, t, y, args, reduction, compute_grad, caps,
                                                 kd_kernels::parse_plan_override(forced), launch);
  return {loss, grad, kd_kernels::describe_plan(plan)};
}

void grad_scale_(const at::Tensor& grad, const at::Tensor& factor, bool per_row) {
  EmuLauncher launch;
  glue::kd_grad_scale_launch(grad, factor, per_row, 4, launch);
}

at::Tensor instance_scores(const at::Tensor& s, const at::Tensor& labels, const std::optional<at::Tensor>& t,
                           double T) {
  EmuLauncher launch;
  return glue::instance_scores_launch(s, labels.to(at::kLong).contiguous(),
                                      t.has_value() ? *t : at::Tensor(), T, launch);
}

}  // namespace

TORCH_LIBRARY(kdseq_emu, m) {
  m.def("kd_loss(Tensor s, Tensor t, Tensor? labels, float T, float kd_weight, float ce_weight, int reduction, "
        "int ignore_index, bool compute_grad, str plan) -> (Tensor, Tensor, str)", &kd_loss);
  m.def("grad_scale_(Tensor grad, Tensor factor, bool per_row) -> ()", &grad_scale_);
  m.def("instance_scores(Tensor s, Tensor labels, Tensor? t, float T) -> Tensor", &instance_scores);
}
