// Declarations shared by the op registration (ops.cpp) and the per-device row kernels.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace kdseq {

// Reduction codes, in the order of the Python-side names ("none", "mean", "sum").
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Per-row KD loss (+ optional gradient) for every row of student/teacher logits (the CPU rows
// interface; the CUDA call computes everything on the device, see kd_loss_cuda_forward).
//   labels:   int64 (B) or undefined (no CE term, no ignore rows)
//   n_valid:  int64 CPU scalar tensor with the number of non-ignored rows (the mean's divisor)
//   row_loss: (B) acc dtype, written for every row (0 for ignored rows)
//   grad:     student-shaped, contiguous, student dtype; undefined when no gradient is wanted.
//             Holds d(reduced loss)/d(student) for mean/sum and d(row loss)/d(student) for none.
struct KDLossArgs {
  double temperature;
  double kd_weight;
  double ce_weight;
  int64_t ignore_index;
  bool mean;
};

// A new contiguous student-shaped gradient. CUDA uses it as it is: the caching allocator already
// recycles the previous step's gradient.
inline at::Tensor fresh_grad_buffer(const at::Tensor& student) {
  return at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
}

// The CPU gradient buffer: reuses the calling thread's previous gradient storage when nothing else
// references it any more (see kd_loss_cpu.cpp), else a fresh contiguous tensor.
at::Tensor cpu_grad_buffer(const at::Tensor& student);

void kd_loss_rows_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                      const at::Tensor& n_valid, const KDLossArgs& args, at::Tensor& row_loss,
                      at::Tensor& grad);
void instance_scores_rows_cpu(const at::Tensor& student, const at::Tensor& labels,
                              const at::Tensor& teacher, double temperature, at::Tensor& out);

#ifdef KDSEQ_WITH_CUDA
// The whole CUDA call (kd_loss_cuda.cu): loss (scalar or (B) for reduction none) and gradient
// (undefined when compute_grad is false), computed on the device without a host synchronization.
// labels: int64 contiguous or undefined.
std::tuple<at::Tensor, at::Tensor> kd_loss_cuda_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& labels, const KDLossArgs& args,
                                                        int64_t reduction, bool compute_grad);
// grad *= factor in place (per row when per_row); blocks return at once where the factor is 1.
void kd_grad_scale_cuda_(const at::Tensor& grad, const at::Tensor& factor, bool per_row);
at::Tensor instance_scores_cuda_forward(const at::Tensor& student, const at::Tensor& labels, const at::Tensor& teacher,
                                        double temperature);
// Test hook behind torch.ops.kdseq._force_plan: forces the CUDA kernel layout ("" = choose).
void set_cuda_plan_override(const std::string& spec);
// Test hook behind torch.ops.kdseq._last_plan: the layout the calling thread's last call ran.
std::string cuda_last_plan();
#endif

// Splits rows into segments when there are fewer rows than threads and the rows are long, so a
// batch of a few LLM-vocabulary rows still uses every core.
struct RowSplit {
  int64_t segments;  // per row
  int64_t seg_len;   // columns per segment (a multiple of the chunk size)
};
RowSplit plan_row_split(int64_t rows, int64_t cols, int64_t chunk);

// Tasks per thread chunk so that each parallel chunk streams at least ~32K elements: small
// batches run on one thread instead of paying OpenMP wake-up (or spinning on a loaded machine).
inline int64_t task_grain(int64_t elements_per_task) {
  constexpr int64_t kMinElementsPerChunk = 32768;
  return elements_per_task >= kMinElementsPerChunk ? 1 : kMinElementsPerChunk / (elements_per_task > 0 ? elements_per_task : 1);
}

}  // namespace kdseq
