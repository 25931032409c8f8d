// Operator schemas and their device implementations, registered with the PyTorch dispatcher.
// Argument validation with user-facing messages happens in Python (kdseq_fast/ops); the checks here
// are the last line of defence for direct torch.ops.kdseq calls.
#include <Python.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>

#include <sstream>
#include <string>
#include <type_traits>

#include "kdseq.h"

#ifdef KDSEQ_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#ifndef KDSEQ_CUDA_ARCHS
#define KDSEQ_CUDA_ARCHS ""
#endif
#ifndef KDSEQ_CUDA_TARGETS
#define KDSEQ_CUDA_TARGETS ""
#endif
#ifndef KDSEQ_CUDA_OFF  // setup.py's codes for why a build left the CUDA kernels out
#define KDSEQ_CUDA_OFF ""
#endif
#ifndef KDSEQ_CPU_ISA
#define KDSEQ_CPU_ISA "generic"
#endif

// The extension is a Python module only so that `import kdseq_fast._C` loads the registrations.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace kdseq {

namespace {

using KDRowsFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const KDLossArgs&, at::Tensor&, at::Tensor&);
using GradAllocFn = at::Tensor (*)(const at::Tensor&);
using ScoreRowsFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, at::Tensor&);

void check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "kdseq: ", name, " must be 2-D (batch, classes), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "kdseq: ", name, " must be floating point");
  TORCH_CHECK(x.size(1) >= 2, "kdseq: ", name, " needs at least 2 classes");
}

at::ScalarType acc_type_for(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by the devices; returns the labels as int64 contiguous (undefined when absent).
at::Tensor check_kd_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                         double temperature, double ce_weight, int64_t reduction) {
  check_logits(student, "student_logits");
  check_logits(teacher, "teacher_logits");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kdseq: student_logits and teacher_logits shapes differ");
  // The dispatcher picks the kernel from all arguments' devices; a kernel must never get a pointer
  // into another device's memory (the Python wrapper checks this too, direct op calls do not).
  TORCH_CHECK(teacher.device() == student.device(), "kdseq: teacher_logits is on ", teacher.device(),
              " but student_logits is on ", student.device());
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "kdseq: temperature must be finite and > 0");
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "kdseq: bad reduction code ", reduction);
  const bool has_labels = labels.has_value() && labels->defined();
  TORCH_CHECK(has_labels || ce_weight == 0.0, "kdseq: labels are required when ce_weight > 0");
  if (!has_labels) return at::Tensor();
  TORCH_CHECK(labels->dim() == 1 && labels->size(0) == student.size(0), "kdseq: labels must have shape (B,)");
  TORCH_CHECK(at::isIntegralType(labels->scalar_type(), /*includeBool=*/false),
              "kdseq: labels must be an integer tensor, got ", labels->scalar_type());
  TORCH_CHECK(labels->device() == student.device(), "kdseq: labels is on ", labels->device(),
              " but student_logits is on ", student.device());
  return labels->to(at::kLong).contiguous();
}

std::tuple<at::Tensor, at::Tensor> kd_loss_impl(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& labels, double temperature,
                                                double kd_weight, double ce_weight, int64_t reduction,
                                                int64_t ignore_index, bool compute_grad, KDRowsFn rows,
                                                GradAllocFn alloc_grad) {
  const at::Tensor y = check_kd_args(student, teacher, labels, temperature, ce_weight, reduction);
  const bool has_labels = y.defined();
  const int64_t B = student.size(0);
  const auto acc = acc_type_for(student);

  // The valid-row count and the reduction are plain loops: as ATen ops (ne, sum, clamp_min, to,
  // div) they cost more than the whole kernel for CIFAR-sized batches.
  at::Tensor n_valid;
  int64_t n_valid_host = B;
  if (has_labels) {
    n_valid_host = 0;
    const int64_t* yp = y.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r) n_valid_host += yp[r] != ignore_index;
  }
  n_valid = at::scalar_tensor(n_valid_host, student.options().dtype(at::kLong));
  at::Tensor row_loss = at::empty({B}, student.options().dtype(acc));
  at::Tensor grad = compute_grad ? alloc_grad(student) : at::Tensor();
  const KDLossArgs args{temperature, kd_weight, ce_weight, ignore_index, reduction == kMean};
  if (B > 0) rows(student, teacher, y, n_valid, args, row_loss, grad);

  at::Tensor loss;
  if (reduction == kNone) {
    loss = row_loss;
  } else {
    double total = 0.0;
    AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "kd_loss_reduce", [&] {
      const scalar_t* lp = row_loss.data_ptr<scalar_t>();
      for (int64_t r = 0; r < B; ++r) total += static_cast<double>(lp[r]);
    });
    // Mean over non-ignored rows; an all-ignored batch gives 0 (the sum is 0, the divisor 1).
    if (reduction == kMean) total /= static_cast<double>(std::max<int64_t>(n_valid_host, 1));
    loss = at::scalar_tensor(total, student.options().dtype(acc));
  }
  if (!grad.defined()) grad = at::empty({0}, student.options());
  return {loss, grad};
}

// Checks shared by the devices; returns the teacher (undefined when absent).
at::Tensor check_score_args(const at::Tensor& student, const at::Tensor& labels,
                            const std::optional<at::Tensor>& teacher, double temperature) {
  check_logits(student, "student_logits");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == student.size(0), "kdseq: labels must have shape (B,)");
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
              "kdseq: labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == student.device(), "kdseq: labels is on ", labels.device(),
              " but student_logits is on ", student.device());
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "kdseq: temperature must be finite and > 0");
  if (!teacher.has_value() || !teacher->defined()) return at::Tensor();
  check_logits(*teacher, "teacher_logits");
  TORCH_CHECK(teacher->sizes() == student.sizes(), "kdseq: student_logits and teacher_logits shapes differ");
  TORCH_CHECK(teacher->device() == student.device(), "kdseq: teacher_logits is on ", teacher->device(),
              " but student_logits is on ", student.device());
  return *teacher;
}

at::Tensor instance_scores_impl(const at::Tensor& student, const at::Tensor& labels,
                                const std::optional<at::Tensor>& teacher, double temperature, ScoreRowsFn rows) {
  const at::Tensor t = check_score_args(student, labels, teacher, temperature);
  const at::Tensor y = labels.to(at::kLong).contiguous();
  at::Tensor out = at::empty({student.size(0), 6}, student.options().dtype(acc_type_for(student)));
  if (student.size(0) > 0) rows(student, y, t, temperature, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& labels, double temperature,
                                               double kd_weight, double ce_weight, int64_t reduction,
                                               int64_t ignore_index, bool compute_grad) {
  return kd_loss_impl(student, teacher, labels, temperature, kd_weight, ce_weight, reduction, ignore_index,
                      compute_grad, &kd_loss_rows_cpu, &cpu_grad_buffer);
}

at::Tensor instance_scores_cpu(const at::Tensor& student, const at::Tensor& labels,
                               const std::optional<at::Tensor>& teacher, double temperature) {
  return instance_scores_impl(student, labels, teacher, temperature, &instance_scores_rows_cpu);
}

#ifdef KDSEQ_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> kd_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& labels, double temperature,
                                                double kd_weight, double ce_weight, int64_t reduction,
                                                int64_t ignore_index, bool compute_grad) {
  const at::Tensor y = check_kd_args(student, teacher, labels, temperature, ce_weight, reduction);
  const KDLossArgs args{temperature, kd_weight, ce_weight, ignore_index, reduction == kMean};
  return kd_loss_cuda_forward(student, teacher, y, args, reduction, compute_grad);
}

at::Tensor instance_scores_cuda(const at::Tensor& student, const at::Tensor& labels,
                                const std::optional<at::Tensor>& teacher, double temperature) {
  const at::Tensor t = check_score_args(student, labels, teacher, temperature);
  return instance_scores_cuda_forward(student, labels.to(at::kLong).contiguous(), t, temperature);
}
#endif

void force_plan(const std::string& spec) {
#ifdef KDSEQ_WITH_CUDA
  try {
    set_cuda_plan_override(spec);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
#else
  (void)spec;  // only the CUDA kernels have layouts to force
#endif
}

std::string last_plan() {
#ifdef KDSEQ_WITH_CUDA
  return cuda_last_plan();
#else
  return "";
#endif
}

// ------------------------------------------------------------------------------------------------
// Autograd for kd_loss. The forward kernel already wrote d loss / d student; backward only scales it
// by grad_output. Written in C++ (not torch.library.register_autograd) because the Python autograd
// wrapper cost ~0.15 ms a training step on this 2-core CPU: more than the whole kernel at CIFAR sizes.
// torch.compile traces through it like any C++ autograd kernel (the fake kernel is in Python).
// ------------------------------------------------------------------------------------------------
using KDLossSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, double, double, double,
                                                     int64_t, int64_t, bool);
constexpr size_t kKDLossNumArgs = 9;

// Whether g is an ordinary tensor: not fake, functional or functorch-wrapped, and no dispatch mode or
// functorch transform active (torch.compile, vmap/grad transforms). Only then may its value be read
// (CPU) or used by a raw kernel (CUDA) without escaping a trace or a higher-order graph.
bool is_untraced(const at::Tensor& g) {
  if (!g.defined()) return false;
  const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                     c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper});
  if (g.key_set().has_any(wrapped)) return false;
  // An active functorch transform shows as its dynamic-layer mode key in the thread's included set
  // (what torch._C._are_functorch_transforms_active() reads).
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return !(c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
           included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
           included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode));
}

// An ordinary tensor outside create_graph (under create_graph the multiply is kept so the graph stays
// whole). is_plain_cpu_one: a CPU scalar holding exactly 1 (what `loss.backward()` passes), so the
// stored gradient can be handed back as it is.
bool is_plain(const at::Tensor& g) { return !at::GradMode::is_enabled() && is_untraced(g); }

bool is_plain_cpu_one(const at::Tensor& g) {
  return is_plain(g) && g.device().is_cpu() && g.numel() == 1 && g.item<double>() == 1.0;
}

// Where the student's gradient goes (its grad_fn or accumulator), kept for create_graph backward.
struct StudentEdge : torch::CustomClassHolder {
  explicit StudentEdge(torch::autograd::Edge e) : edge(std::move(e)) {}
  torch::autograd::Edge edge;
};

// g's values with an Error node as grad_fn, its one edge leading to `to`: a backward that reaches
// it raises `msg`. Autograd nodes are held by std::shared_ptr in older torch releases (2.11 among
// them) and by c10::intrusive_ptr in newer ones (2.14); the template picks the one Edge holds.
template <typename ErrorNode = torch::autograd::Error, typename EdgeT = torch::autograd::Edge>
at::Tensor with_error_history(const at::Tensor& g, std::string msg, const EdgeT& to) {
  using NodePtr = decltype(EdgeT::function);
  NodePtr node;
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    node = std::make_shared<ErrorNode>(std::move(msg), torch::autograd::edge_list{to});
  } else {
    node = c10::make_intrusive<ErrorNode>(std::move(msg), torch::autograd::edge_list{to});
  }
  at::Tensor out = g.detach();
  torch::autograd::set_history(out, node);
  return out;
}

class KDLossFunction : public torch::autograd::Function<KDLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& student,
                                                const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                                                double temperature, double kd_weight, double ce_weight,
                                                int64_t reduction, int64_t ignore_index, bool compute_grad) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("kdseq::kd_loss", "").typed<KDLossSig>();
    at::Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, grad) =
          op.call(student, teacher, labels, temperature, kd_weight, ce_weight, reduction, ignore_index, compute_grad);
    }
    // Nothing flows back through the gradient output; without this autograd would materialize a
    // zero B x C tensor for it on every backward (measured: as long as the whole fused kernel).
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({grad});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["student_edge"] =
        c10::IValue::make_capsule(c10::make_intrusive<StudentEdge>(torch::autograd::impl::gradient_edge(student)));
    ctx->save_for_backward({grad});
    return {loss, grad};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(kKDLossNumArgs);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;  // only the gradient output was used
    const at::Tensor grad = ctx->get_saved_variables()[0];
    TORCH_CHECK(!(grad.dim() == 1 && grad.numel() == 0),
                "kdseq.kd_loss: backward called but the gradient was not computed in forward (the op was "
                "called with compute_grad=False)");
    // Autograd neither steals nor mutates the returned tensor while ctx holds it, so repeated
    // backward passes (retain_graph=True) stay correct.
    const bool per_row = ctx->saved_data["reduction"].toInt() == kNone;
    if (is_plain_cpu_one(grad_loss)) {
      grads[0] = grad;
      return grads;
    }
#ifdef KDSEQ_WITH_CUDA
    // On CUDA the value of grad_output cannot be read without a device sync. The first backward
    // scales the stored gradient in place on the device (its blocks return at once for a factor of
    // 1: no second pass over B x C, no second gradient in memory) and hands it out; it was never
    // visible before. A later backward of a retained graph multiplies out of place by the ratio to
    // the factor already applied (an applied factor of 0 then gives NaN: the values are gone). The
    // applied factor is the caller's tensor, not a copy (a copy would be a second launch): its
    // version counter tells when the caller has changed it in place since (gradcheck's reused
    // grad_output does). The old factor is then gone, and so is every later backward of this
    // graph: an error rather than a silently wrong ratio.
    if (grad.is_cuda() && !ctx->saved_data.count("applied")) {
      if (is_plain(grad_loss)) {
        kd_grad_scale_cuda_(grad, grad_loss, per_row);
        ctx->saved_data["applied"] = grad_loss;
        ctx->saved_data["applied_version"] = static_cast<int64_t>(grad_loss._version());
        grads[0] = grad;
        return grads;
      }
    }
#endif
    at::Tensor scale = grad_loss;
#ifdef KDSEQ_WITH_CUDA
    if (grad.is_cuda() && ctx->saved_data.count("applied")) {
      const at::Tensor applied = ctx->saved_data["applied"].toTensor();
      TORCH_CHECK(static_cast<int64_t>(applied._version()) == ctx->saved_data["applied_version"].toInt(),
                  "kdseq.kd_loss: the grad_output of the first backward through this graph was modified in "
                  "place afterwards. On CUDA the first backward scales the stored gradient by it in place, so "
                  "with its old value gone this graph cannot be backpropagated again. Give each backward of a "
                  "retained graph a tensor of its own (torch.autograd.gradcheck reuses one: check kd_loss's "
                  "gradient on the CPU).");
      scale = grad_loss / applied;
    }
#endif
    grads[0] = grad * (per_row ? scale.unsqueeze(1) : scale).to(grad.scalar_type());
    if (at::GradMode::is_enabled() && is_untraced(grad_loss)) grads[0] = once_differentiable(grads[0], ctx);
    return grads;
  }

 private:
  // Under create_graph=True the stored gradient has no graph back to the student: as it is, a
  // gradient penalty built on it would silently add nothing. Instead its grad_fn is an Error node
  // whose edge leads to the student, so any backward that reaches the student through it raises
  // (Python's @once_differentiable points at a detached leaf instead, which autograd.grad(..., s)
  // prunes without a word). Taking the gradient itself with create_graph=True still works; traced
  // calls (torch.compile) keep the plain multiply.
  static at::Tensor once_differentiable(const at::Tensor& g, torch::autograd::AutogradContext* ctx) {
    const auto student = ctx->saved_data["student_edge"].toCapsule();
    return with_error_history(g,
                              "kdseq.kd_loss has no double backward: the gradient it returned under "
                              "create_graph=True cannot be differentiated again",
                              static_cast<const StudentEdge*>(student.get())->edge);
  }
};

std::tuple<at::Tensor, at::Tensor> kd_loss_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    double kd_weight, double ce_weight, int64_t reduction,
                                                    int64_t ignore_index, bool compute_grad) {
  auto out = KDLossFunction::apply(student, teacher, labels, temperature, kd_weight, ce_weight, reduction,
                                   ignore_index, compute_grad);
  return {out[0], out[1]};
}

// The compiler's name with its version (GCC's __VERSION__ alone is just "12.2.0").
#if defined(__clang__)
constexpr const char* kCompiler = "clang " __clang_version__;
#elif defined(__GNUC__)
constexpr const char* kCompiler = "gcc " __VERSION__;
#else
constexpr const char* kCompiler = "unknown";
#endif

std::string build_info_json() {
  std::ostringstream os;
#ifdef KDSEQ_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
  os << "{\"cuda_compiled\": " << (cuda ? "true" : "false") << ", \"cuda_archs\": \"" << KDSEQ_CUDA_ARCHS
     << "\", \"cuda_targets\": \"" << KDSEQ_CUDA_TARGETS << "\", \"openmp\": " << (openmp ? "true" : "false")
     << ", \"cuda_off\": \"" << KDSEQ_CUDA_OFF << "\", \"cpu_isa\": \"" << KDSEQ_CPU_ISA << "\", \"compiler\": \"" << kCompiler << "\"}";
  return os.str();
}

}  // namespace

TORCH_LIBRARY(kdseq, m) {
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, float kd_weight, "
      "float ce_weight, int reduction, int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  m.def("instance_scores(Tensor student, Tensor labels, Tensor? teacher, float temperature) -> Tensor");
  m.def("build_info() -> str", &build_info_json);
  // Test hook: force the CUDA kernel layout of the calling thread's next calls ("" = choose), e.g.
  // "mode=cluster,cluster=3,e=8" or "mode=split,segments=4". No effect on the CPU kernels.
  m.def("_force_plan(str spec) -> ()", &force_plan);
  // The layout the calling thread's last CUDA kd_loss forward ran ("" before any), e.g.
  // "split,group=32,e=8,cluster=1,segments=1,prologue": a forced layout that cannot run falls back.
  m.def("_last_plan() -> str", &last_plan);
}

TORCH_LIBRARY_IMPL(kdseq, CPU, m) {
  m.impl("kd_loss", &kd_loss_cpu);
  m.impl("instance_scores", &instance_scores_cpu);
}

TORCH_LIBRARY_IMPL(kdseq, Autograd, m) { m.impl("kd_loss", &kd_loss_autograd); }

#ifdef KDSEQ_WITH_CUDA
TORCH_LIBRARY_IMPL(kdseq, CUDA, m) {
  m.impl("kd_loss", &kd_loss_cuda);
  m.impl("instance_scores", &instance_scores_cuda);
}
#endif

}  // namespace kdseq
