// Chunk helpers shared by the CPU kernels: a row is walked in L1-sized chunks that are first
// converted to the accumulation type, so the row-math loops over them vectorize.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "row_math.h"

namespace kdseq {
namespace cpu_rows {

constexpr int64_t kChunk = 256;

template <typename in_t, typename acc_t>
inline void load_chunk(const in_t* base, int64_t step, int64_t c0, int64_t n, acc_t* buf) {
  if (step != 1) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(base[(c0 + i) * step]);
    return;
  }
  if constexpr (std::is_same_v<in_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // bf16 is the top half of an fp32: a shift, which vectorizes (c10's operator float() does not).
    const uint16_t* p = reinterpret_cast<const uint16_t*>(base + c0);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = rowmath::bits_to_float(static_cast<uint32_t>(p[i]) << 16);
  } else if constexpr (std::is_same_v<in_t, c10::Half> && std::is_same_v<acc_t, float>) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(base + c0);
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
    for (; i < n; ++i) buf[i] = static_cast<float>(base[c0 + i]);
  } else {
    const in_t* p = base + c0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
  }
}

// The chunk [c0, c0 + n) as acc_t values: the input itself when it already is contiguous acc_t
// (no copy: GCC turns a same-type copy loop into a memcpy call per chunk, which cost as much as
// the math), otherwise converted into `buf`.
template <typename in_t, typename acc_t>
inline const acc_t* chunk_view(const in_t* base, int64_t step, int64_t c0, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (step == 1) return base + c0;
  }
  load_chunk(base, step, c0, n, buf);
  return buf;
}

// Stores n acc_t values as out_t at out[0, n) (contiguous output: the gradient).
template <typename out_t, typename acc_t>
inline void store_chunk(const acc_t* buf, int64_t n, out_t* out) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // Round to nearest even on the bits (vectorizes); NaN stays a quiet NaN.
    uint16_t* p = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t b = rowmath::float_to_bits(buf[i]);
      const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
      p[i] = static_cast<uint16_t>(buf[i] != buf[i] ? 0x7fc0u : rounded);
    }
  } else if constexpr (std::is_same_v<out_t, c10::Half> && std::is_same_v<acc_t, float>) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    uint16_t* p = reinterpret_cast<uint16_t*>(out);
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(buf + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) out[i] = static_cast<out_t>(buf[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<out_t>(buf[i]);
  }
}

// Asks for the chunk kPrefetchChunks ahead of [c0, ...) in a contiguous run ending at `end` (a row
// segment, or several rows when they are packed and the caller's next; TaskRun) to be brought into
// cache. The hardware prefetcher alone left the first pass over each chunk (its max) waiting on
// memory for a third of the statistics loop's time at C = 32000; one or two chunks ahead measured
// 12-15% faster from a cold cache, four no better.
constexpr int64_t kPrefetchChunks = 2;

template <typename in_t>
inline void prefetch_ahead(const in_t* base, int64_t step, int64_t c0, int64_t end) {
  const int64_t p0 = c0 + kPrefetchChunks * kChunk;
  const int64_t n = std::min(kChunk, end - p0);
  if (step != 1 || n <= 0) return;
  const char* p = reinterpret_cast<const char*>(base + p0);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(in_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// A thread's tasks [lo, hi) of at::parallel_for over B * S tasks (S segments of seg_len columns a
// row, in row order). When rows are packed in memory (row stride C, column step 1) those tasks are
// one contiguous run, so the prefetch may reach past a task's end into the next task's data:
// stopping at each row's end left the first chunks of every row to the hardware prefetcher.
struct TaskRun {
  int64_t C, last_row, last_end;
  TaskRun(int64_t hi, int64_t S, int64_t seg_len, int64_t cols)
      : C(cols), last_row((hi - 1) / S), last_end(std::min(cols, ((hi - 1) % S) * seg_len + seg_len)) {}
  // Where the prefetch of a task of row r that ends at column `end` may run to, in columns from row
  // r's start.
  int64_t prefetch_end(int64_t r, int64_t end, int64_t col_step, int64_t row_stride) const {
    return (col_step == 1 && row_stride == C) ? (last_row - r) * C + last_end : end;
  }
};

template <typename acc_t>
inline acc_t chunk_max(const acc_t* buf, int64_t n) {
  acc_t m = rowmath::neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = buf[i] > m ? buf[i] : m;
  return m;
}

}  // namespace cpu_rows
}  // namespace kdseq
