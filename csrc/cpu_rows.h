// Chunk helpers shared by the CPU kernels: a row is walked in L1-sized chunks that are first
// converted to the accumulation type, so the row-math loops over them vectorize.
#pragma once

#include <cstdint>

#include "row_math.h"

namespace kdseq {
namespace cpu_rows {

constexpr int64_t kChunk = 256;

template <typename in_t, typename acc_t>
inline void load_chunk(const in_t* base, int64_t step, int64_t c0, int64_t n, acc_t* buf) {
  if (step == 1) {
    const in_t* p = base + c0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(base[(c0 + i) * step]);
  }
}

template <typename acc_t>
inline acc_t chunk_max(const acc_t* buf, int64_t n) {
  acc_t m = rowmath::neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

}  // namespace cpu_rows
}  // namespace kdseq
