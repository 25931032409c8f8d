// The CUDA entry point of instance_scores (kernel in instance_scores_kernels.cuh, tensor glue in
// kernel_glue.h): one launch on the current stream, no host synchronization. A separate file from
// kd_loss_cuda.cu so the two compile in parallel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"
#include "kernel_glue.h"
#include "kdseq.h"

namespace kdseq {

at::Tensor instance_scores_cuda_forward(const at::Tensor& student, const at::Tensor& labels, const at::Tensor& teacher,
                                        double temperature) {
  const c10::cuda::CUDAGuard guard(student.device());
  auto launch = cuda_glue::current_launcher(student);
  return glue::instance_scores_launch(student, labels, teacher, temperature, launch);
}

}  // namespace kdseq
