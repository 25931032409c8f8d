// Per-row math shared by the CPU and CUDA kernels.
//
// Everything numeric that decides a result lives here, as __host__ __device__ functions, so the
// CPU tests exercise the formulas the GPU runs. Kernels only decide *how* a row is traversed
// (chunks on the CPU, registers of a warp / CTA / cluster on the GPU) and how partial states are
// combined. Each backend uses its fastest primitives for exp and log (kd_exp / kd_log: a
// vectorizable polynomial on the CPU, the SFU's ex2.approx / lg2.approx on the GPU); the
// fp64-reference tests of each backend bound what that costs in accuracy.
//
// Conventions
// - acc_t is float for fp32/fp16/bf16 inputs and double for fp64 inputs (used by gradcheck).
// - Softmax statistics are kept "online": a running maximum m and a sum z of exp(x - m) that is
//   rescaled whenever m grows, so one read of a row yields log-sum-exp without a separate max pass.
// - Logit values of -inf mean "masked class": they contribute exactly zero probability, and the
//   0 * (-inf) products that would otherwise appear are guarded explicitly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDSEQ_HD __host__ __device__ __forceinline__
#else
// always_inline: in a -fPIC shared object GCC otherwise may emit kd_exp as an out-of-line call
// (through the PLT), which keeps every loop around it scalar.
#define KDSEQ_HD inline __attribute__((always_inline))
#endif

namespace kdseq {
namespace rowmath {

KDSEQ_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  // __builtin_bit_cast, unlike memcpy, keeps loops calling kd_exp vectorizable (GCC 12).
  return __builtin_bit_cast(float, b);
#endif
}

KDSEQ_HD double bits_to_double(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  return __builtin_bit_cast(double, b);
#endif
}

// Infinities from bit patterns: std::numeric_limits<>::infinity() calls are folded too late for
// GCC's if-conversion and stop the kd_exp loops from vectorizing.
template <typename T>
KDSEQ_HD T neg_inf();
template <>
KDSEQ_HD float neg_inf<float>() { return bits_to_float(0xff800000u); }
template <>
KDSEQ_HD double neg_inf<double>() { return bits_to_double(0xfff0000000000000ull); }

// An element met while its row's running maximum is still -inf: the maximum skips NaN, so that
// element is a masked class (-inf) or a NaN, which must stay NaN (NaN in, NaN row out) rather than
// count as masked when the first chunk of a row holds only NaN and -inf.
template <typename T>
KDSEQ_HD T masked_or_nan(T x) {
  return (x != x) ? x : neg_inf<T>();
}

template <typename T>
KDSEQ_HD T quiet_nan();
template <>
KDSEQ_HD float quiet_nan<float>() { return bits_to_float(0x7fc00000u); }
template <>
KDSEQ_HD double quiet_nan<double>() { return bits_to_double(0x7ff8000000000000ull); }

// Labels are not range-checked on the device path (the check is a host read, done once per dataset
// by callers that validate): a label outside [0, C) that is not the ignore index makes the row's
// loss, gradient and scores NaN, and is never used as an index.
KDSEQ_HD bool label_out_of_range(int64_t y, int64_t cols) { return y < 0 || y >= cols; }

KDSEQ_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// exp(x) for float, x <= 88: Cephes-style range reduction x = n*ln2 + r and a degree-7 polynomial,
// with 2^n assembled from exponent bits. Max error 1.3 ulp over [-87.3, 0] (every third float against
// double exp); exp(-inf) == 0 exactly (masked classes),
// NaN propagates. Every caller passes x <= 0 (logits minus their running maximum, log-probabilities),
// so there is no overflow handling: above 88 the result is meaningless.
// Branch-free with a single select, so GCC vectorizes the loops that call it (AVX2+FMA here) and
// the GPU runs the same instruction sequence. Clamping x at -88 maps -inf to a finite value (no
// inf - inf below) and gives n = -127, whose 2^n assembled from exponent bits is exactly 0: inputs
// below about -87.9 give 0 instead of a denormal. (A second, upper clamp cost 30% of the loop.)
// The rounding of x*log2(e) to n is one add of 1.5*2^23 + 127, which also leaves the biased
// exponent n + 127 in the low mantissa bits (no float->int conversion). The polynomial is
// 1 + r + r^2 q(r) with q in Estrin's form: two operations more than one Horner chain of fmas
// but half its dependency depth, which is what bounds the score loop's three exponentials an
// element (measured 5% faster there; Horner's error was 0.9 ulp).
KDSEQ_HD float kd_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
#if defined(__CUDA_ARCH__)
  // The GPU's own exponential: ex2.approx (the SFU, ~2 ulp) on the pre-scaled argument, as
  // Triton does. ex2(-inf) = +0 (masked classes), NaN propagates; results below 2^-126 flush to 0.
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
#else
  const float kRoundBias = 12583039.0f;  // 1.5 * 2^23 + 127
  x = (-88.0f > x) ? -88.0f : x;  // NaN compares false and passes through
  const float nb = fmaf(x, kLog2e, kRoundBias);
  const float fx = nb - kRoundBias;  // n, exactly
  float r = fmaf(fx, -0.693359375f, x);
  r = fmaf(fx, 2.12194440e-4f, r);
  const float r2 = r * r;
  const float r4 = r2 * r2;
  const float c76 = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
  const float c54 = fmaf(8.3334519073e-3f, r, 4.1665795894e-2f);
  const float c32 = fmaf(1.6666665459e-1f, r, 5.0000001201e-1f);
  const float q = fmaf(c76, r4, fmaf(c54, r2, c32));
  const float p = fmaf(q, r2, r + 1.0f);
  return p * bits_to_float(float_to_bits(nb) << 23);
#endif
}

KDSEQ_HD double kd_exp(double x) { return exp(x); }
KDSEQ_HD float kd_log(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);  // lg2.approx * ln 2: the callers take logs of sums of exponentials, >= 1 mostly
#else
  return logf(x);
#endif
}
KDSEQ_HD double kd_log(double x) { return log(x); }
KDSEQ_HD float kd_max(float a, float b) { return fmaxf(a, b); }
KDSEQ_HD double kd_max(double a, double b) { return fmax(a, b); }

// exp((m_old - m_new) * scale): the factor that re-bases a sum of exp(x - m_old) onto m_new.
// A running max of -inf means "nothing accumulated yet" (the sum is 0): factor 1 avoids inf - inf.
template <typename acc_t>
KDSEQ_HD acc_t rebase(acc_t m_old, acc_t m_new, acc_t scale) {
  return (m_old == m_new || m_old == neg_inf<acc_t>()) ? acc_t(1) : kd_exp((m_old - m_new) * scale);
}

// ------------------------------------------------------------------------------------------------
// KD loss: per row, kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, y).
//
// One read of the row gathers KDStats online: the maxima, the three sums of exponentials and the
// KL numerator u. With xs = (s - ms)/T, xt = (t - mt)/T the log-probabilities are
// xs - log zsT and xt - log ztT, so
//     KL = sum pt (lpt - lps) = u / ztT - log ztT + log zsT,   u = sum exp(xt) (xt - xs),
// and u follows a change of maxima exactly (kd_stats_raise). No second pass is needed for the loss;
// the gradient kd_coef * (ps - pt) + ce_coef * (softmax(s) - onehot) either re-reads the row
// (kd_grad_elem: the GPU, and CPU rows split across threads) or reuses the exponentials of the
// first read, rescaled per chunk (kd_chunk_coefs: the CPU).
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
struct KDStats {
  acc_t ms;   // running max of the student logits (raw, before /T)
  acc_t zsT;  // sum exp((s - ms) / T)
  acc_t zs1;  // sum exp(s - ms)            (only when the CE term is on)
  acc_t mt;   // running max of the teacher logits
  acc_t ztT;  // sum exp((t - mt) / T)
  acc_t u;    // sum exp((t - mt) / T) * ((t - mt) / T - (s - ms) / T): the KL numerator
};

template <typename acc_t>
KDSEQ_HD KDStats<acc_t> kd_stats_init() {
  KDStats<acc_t> st;
  st.ms = neg_inf<acc_t>();
  st.zsT = acc_t(0);
  st.zs1 = acc_t(0);
  st.mt = neg_inf<acc_t>();
  st.ztT = acc_t(0);
  st.u = acc_t(0);
  return st;
}

// Raise the running maxima to at least (cms, cmt), rescaling the sums. Called once per chunk with
// the chunk's maxima (CPU) or per element (GPU lanes), so the per-element work is a plain sum.
// u: every accumulated term's weight exp(xt) scales by exp(da) and its (xt - xs) shifts by da - db,
// with da, db the (non-positive) changes of the scaled maxima.
template <typename acc_t>
KDSEQ_HD void kd_stats_raise(KDStats<acc_t>& st, acc_t cms, acc_t cmt, acc_t invT, bool with_ce) {
  const acc_t ms_new = kd_max(st.ms, cms);
  const acc_t mt_new = kd_max(st.mt, cmt);
  if (st.ztT > acc_t(0) && (ms_new > st.ms || mt_new > st.mt)) {
    const acc_t da = (st.mt - mt_new) * invT;
    // A student max still at -inf with teacher mass accumulated: those classes have ps = 0 < pt,
    // the KL is +inf, and db = -inf carries that through.
    const acc_t db = ms_new > st.ms ? (st.ms - ms_new) * invT : acc_t(0);
    st.u = rebase(st.mt, mt_new, invT) * (st.u + st.ztT * (da - db));
  }
  if (ms_new > st.ms) {
    st.zsT *= rebase(st.ms, ms_new, invT);
    if (with_ce) st.zs1 *= rebase(st.ms, ms_new, acc_t(1));
    st.ms = ms_new;
  }
  if (mt_new > st.mt) {
    st.ztT *= rebase(st.mt, mt_new, invT);
    st.mt = mt_new;
  }
}

// One element's exponentials relative to maxima (ms, mt) that already cover it.
template <typename acc_t>
struct KDTerms {
  acc_t esT;  // exp((s - ms) / T)
  acc_t es1;  // exp(s - ms)     (WITH_CE only)
  acc_t etT;  // exp((t - mt) / T)
  acc_t u;    // etT * ((t - mt) / T - (s - ms) / T), 0 where the teacher class is masked
};

// Element terms from the scaled, max-relative logits xs = (s - ms) / T, xt = (t - mt) / T
// (ds = s - ms for the CE sum).
template <bool WITH_CE, typename acc_t>
KDSEQ_HD KDTerms<acc_t> kd_terms_scaled(acc_t xs, acc_t xt, acc_t ds) {
  KDTerms<acc_t> r;
  r.esT = kd_exp(xs);
  r.etT = kd_exp(xt);
  // etT == 0: masked teacher class (or underflow) contributes nothing; avoids 0 * inf.
  r.u = (r.etT > acc_t(0)) ? r.etT * (xt - xs) : acc_t(0);
  r.es1 = WITH_CE ? kd_exp(ds) : acc_t(0);
  return r;
}

// Finite maxima (the common case; the CPU checks once per chunk and keeps the loop select-free).
template <bool WITH_CE, typename acc_t>
KDSEQ_HD KDTerms<acc_t> kd_terms_finite(acc_t s, acc_t t, acc_t ms, acc_t mt, acc_t invT) {
  return kd_terms_scaled<WITH_CE>((s - ms) * invT, (t - mt) * invT, s - ms);
}

template <bool WITH_CE, typename acc_t>
KDSEQ_HD KDTerms<acc_t> kd_terms(acc_t s, acc_t t, acc_t ms, acc_t mt, acc_t invT) {
  // A maximum of -inf means every value so far was -inf (masked) or NaN: so is the element.
  const acc_t ds = (ms == neg_inf<acc_t>()) ? masked_or_nan(s) : s - ms;
  const acc_t xt = (mt == neg_inf<acc_t>()) ? masked_or_nan(t) : (t - mt) * invT;
  return kd_terms_scaled<WITH_CE>(ds * invT, xt, ds);
}

template <typename acc_t>
KDSEQ_HD void kd_stats_add(KDStats<acc_t>& st, const KDTerms<acc_t>& tm) {
  st.zsT += tm.esT;
  st.zs1 += tm.es1;
  st.ztT += tm.etT;
  st.u += tm.u;
}

// Single-element online update (GPU lanes).
template <typename acc_t>
KDSEQ_HD void kd_stats_push(KDStats<acc_t>& st, acc_t s, acc_t t, acc_t invT, bool with_ce) {
  kd_stats_raise(st, s, t, invT, with_ce);
  kd_stats_add(st, with_ce ? kd_terms<true>(s, t, st.ms, st.mt, invT)
                           : kd_terms<false>(s, t, st.ms, st.mt, invT));
}

// Combine two partial states (threads of a warp, warps of a block, segments of a long row).
template <typename acc_t>
KDSEQ_HD KDStats<acc_t> kd_stats_merge(KDStats<acc_t> a, KDStats<acc_t> b, acc_t invT, bool with_ce) {
  kd_stats_raise(a, b.ms, b.mt, invT, with_ce);
  kd_stats_raise(b, a.ms, a.mt, invT, with_ce);
  a.zsT += b.zsT;
  a.zs1 += b.zs1;
  a.ztT += b.ztT;
  a.u += b.u;
  return a;
}

// Everything the gradient needs about a row, derived once from its final KDStats.
template <typename acc_t>
struct KDRowConsts {
  acc_t ms, log_zsT, log_zs1, mt, log_ztT;
  acc_t invT;
  acc_t kd_coef;  // d loss / d s from the KD term: kd_coef * (p_s - p_t); = kd_weight * T * scale
  acc_t ce_coef;  // d loss / d s from the CE term: ce_coef * (softmax(s) - onehot); = ce_weight * scale
};

template <typename acc_t>
KDSEQ_HD KDRowConsts<acc_t> kd_row_consts(const KDStats<acc_t>& st, acc_t T, acc_t kd_weight,
                                          acc_t ce_weight, acc_t grad_scale) {
  KDRowConsts<acc_t> k;
  k.ms = st.ms;
  k.log_zsT = kd_log(st.zsT);
  k.log_zs1 = kd_log(st.zs1);
  k.mt = st.mt;
  k.log_ztT = kd_log(st.ztT);
  k.invT = acc_t(1) / T;
  k.kd_coef = kd_weight * T * grad_scale;
  k.ce_coef = ce_weight * grad_scale;
  return k;
}

// d loss / d s of one element, recomputed from the logits. The label's -1 in the CE gradient is
// added by the caller (one element per row). WITH_CE is a template parameter so the CPU loops have
// no branch inside (vectorization).
template <bool WITH_CE, typename acc_t>
KDSEQ_HD acc_t kd_grad_elem_t(acc_t s, acc_t t, const KDRowConsts<acc_t>& k) {
  const acc_t ps = kd_exp((s - k.ms) * k.invT - k.log_zsT);
  const acc_t pt = kd_exp((t - k.mt) * k.invT - k.log_ztT);
  acc_t g = k.kd_coef * (ps - pt);
  if constexpr (WITH_CE) g += k.ce_coef * kd_exp((s - k.ms) - k.log_zs1);
  return g;
}

template <typename acc_t>
KDSEQ_HD acc_t kd_grad_elem(acc_t s, acc_t t, const KDRowConsts<acc_t>& k, bool with_ce) {
  return with_ce ? kd_grad_elem_t<true>(s, t, k) : kd_grad_elem_t<false>(s, t, k);
}

// Gradient from exponentials kept from the stats read, taken relative to that chunk's running
// maxima (cms, cmt): g = a * esT - b * etT + c * es1.
template <typename acc_t>
struct KDChunkCoefs {
  acc_t a, b, c;
};

template <typename acc_t>
KDSEQ_HD KDChunkCoefs<acc_t> kd_chunk_coefs(acc_t cms, acc_t cmt, const KDRowConsts<acc_t>& k, bool with_ce) {
  KDChunkCoefs<acc_t> r;
  // A chunk maximum of -inf: the chunk's exponentials are all 0, any finite factor will do.
  r.a = cms == neg_inf<acc_t>() ? acc_t(0) : k.kd_coef * kd_exp((cms - k.ms) * k.invT - k.log_zsT);
  r.b = cmt == neg_inf<acc_t>() ? acc_t(0) : k.kd_coef * kd_exp((cmt - k.mt) * k.invT - k.log_ztT);
  r.c = (!with_ce || cms == neg_inf<acc_t>()) ? acc_t(0) : k.ce_coef * kd_exp((cms - k.ms) - k.log_zs1);
  return r;
}

template <typename acc_t>
KDSEQ_HD acc_t kd_grad_from_terms(acc_t esT, acc_t etT, acc_t es1, const KDChunkCoefs<acc_t>& c) {
  return c.a * esT - c.b * etT + c.c * es1;
}

// Row loss from the final statistics and the label logit.
template <typename acc_t>
KDSEQ_HD acc_t kd_row_loss(const KDStats<acc_t>& st, const KDRowConsts<acc_t>& k, acc_t T, acc_t kd_weight,
                           acc_t ce_weight, bool with_ce, acc_t s_label) {
  const acc_t kl = st.u / st.ztT - k.log_ztT + k.log_zsT;
  acc_t loss = kd_weight * T * T * kl;
  if (with_ce) loss += ce_weight * (k.log_zs1 - (s_label - k.ms));
  return loss;
}

// ------------------------------------------------------------------------------------------------
// Instance scores: one read of a row gives ce, kd, p_true, margin, entropy, correct.
// ------------------------------------------------------------------------------------------------
constexpr int kNumScoreFields = 6;
enum ScoreField { kCE = 0, kKD = 1, kPTrue = 2, kMargin = 3, kEntropy = 4, kCorrect = 5 };

template <typename acc_t>
struct ScoreStats {
  acc_t ms;      // running max of s
  acc_t z1;      // sum exp(s - ms)
  acc_t w1;      // sum exp(s - ms) * (s - ms)          -> entropy
  acc_t m_noty;  // max over j != y of s_j              -> margin
  int64_t amax;  // index of the first maximum          -> correct
  // teacher part (temperature T), only with a teacher
  acc_t zsT;     // sum exp((s - ms) / T)
  acc_t mt;      // running max of t
  acc_t ztT;     // sum exp((t - mt) / T)
  acc_t u;       // sum exp((t - mt)/T) * ((t - mt)/T - (s - ms)/T)  -> KL numerator
};

template <typename acc_t>
KDSEQ_HD ScoreStats<acc_t> score_stats_init() {
  ScoreStats<acc_t> st;
  st.ms = neg_inf<acc_t>();
  st.z1 = acc_t(0);
  st.w1 = acc_t(0);
  st.m_noty = neg_inf<acc_t>();
  st.amax = INT64_MAX;
  st.zsT = acc_t(0);
  st.mt = neg_inf<acc_t>();
  st.ztT = acc_t(0);
  st.u = acc_t(0);
  return st;
}

// Re-base the accumulated sums onto larger maxima (ms_new >= ms, mt_new >= mt).
// With d = m_old - m_new (<= 0), sum e^(x - m_new) (x - m_new) = e^d (w + d z); the KL numerator
// shifts by (da - db) per unit of teacher mass.
template <typename acc_t>
KDSEQ_HD void score_stats_rebase(ScoreStats<acc_t>& st, acc_t ms_new, acc_t mt_new, acc_t invT,
                                 bool with_teacher) {
  if (ms_new > st.ms) {
    if (st.ms != neg_inf<acc_t>()) {
      const acc_t d = st.ms - ms_new;
      const acc_t e = kd_exp(d);
      st.w1 = e * (st.w1 + d * st.z1);
      st.z1 = e * st.z1;
    }
  }
  if (with_teacher) {
    const acc_t db = (ms_new > st.ms && st.ms != neg_inf<acc_t>()) ? (st.ms - ms_new) * invT : acc_t(0);
    const acc_t da = (mt_new > st.mt && st.mt != neg_inf<acc_t>()) ? (st.mt - mt_new) * invT : acc_t(0);
    if (ms_new > st.ms) st.zsT *= rebase(st.ms, ms_new, invT);
    if (mt_new > st.mt) {
      const acc_t ea = rebase(st.mt, mt_new, invT);
      st.u = ea * (st.u + st.ztT * (da - db));
      st.ztT *= ea;
    } else {
      st.u = st.u - st.ztT * db;
    }
    if (mt_new > st.mt) st.mt = mt_new;
  }
  if (ms_new > st.ms) st.ms = ms_new;
}

// Per-element contributions, relative to maxima (ms, mt) that already cover s and t.
// A maximum of -inf means every value so far was -inf: the element is -inf too and adds nothing.
template <typename acc_t>
struct ScoreTerms {
  acc_t z1, w1, zsT, ztT, u;
};

// exp(x) from q = exp(x / T) where T = 2^kLog2T (kLog2T in 0..2, fp32): q^T by squaring, one
// exponential fewer where both are needed (the score loop needs exp(x) and exp(x / T)). 1/T scales
// exactly, so the extra error is the T-fold growth of q's (~6 ulp at T = 4). Results that would be
// subnormal (x < -87; slow on some CPUs) are 0, as kd_exp's are below -87.9. NaN x keeps q's NaN.
constexpr int kMaxTemperedLog2 = 2;

template <int kLog2T>
KDSEQ_HD float exp_from_tempered(float q, float x) {
  static_assert(kLog2T >= 0 && kLog2T <= kMaxTemperedLog2, "T = 1, 2 or 4");
  float e = (x < -87.0f) ? 0.0f : q;
  for (int k = 0; k < kLog2T; ++k) e *= e;
  return e;
}

// k when T = 2^k for k in 0..kMaxTemperedLog2 (exp_from_tempered applies), else -1. Only exact
// powers of two: 1/T is then exact.
inline int tempered_log2(double temperature) {
  for (int k = 0; k <= kMaxTemperedLog2; ++k)
    if (temperature == static_cast<double>(1 << k)) return k;
  return -1;
}

// From xs = s - ms and a = (t - mt) / T (either may be -inf). kLog2T >= 0 (with a teacher and fp32
// only) says T = 2^kLog2T: exp(xs) then comes from exp(xs / T) (exp_from_tempered).
template <int kLog2T = -1, typename acc_t>
KDSEQ_HD ScoreTerms<acc_t> score_terms_shifted(acc_t xs, acc_t a, acc_t invT, bool with_teacher) {
  ScoreTerms<acc_t> r;
  acc_t e;
  if constexpr (kLog2T >= 0) {
    static_assert(std::is_same_v<acc_t, float>, "the tempered exponential is an fp32 shortcut");
    r.zsT = kd_exp(xs * invT);
    e = exp_from_tempered<kLog2T>(r.zsT, xs);
  } else {
    e = kd_exp(xs);
  }
  r.z1 = e;
  r.w1 = (e > acc_t(0)) ? e * xs : acc_t(0);
  if (with_teacher) {
    if constexpr (kLog2T < 0) r.zsT = kd_exp(xs * invT);
    const acc_t ea = kd_exp(a);
    r.ztT = ea;
    r.u = (ea > acc_t(0)) ? ea * (a - xs * invT) : acc_t(0);
  } else {
    r.zsT = r.ztT = r.u = acc_t(0);
  }
  return r;
}

template <int kLog2T = -1, typename acc_t>
KDSEQ_HD ScoreTerms<acc_t> score_terms(acc_t s, acc_t t, acc_t ms, acc_t mt, acc_t invT,
                                       bool with_teacher) {
  const acc_t xs = (ms == neg_inf<acc_t>()) ? masked_or_nan(s) : s - ms;
  const acc_t a = !with_teacher ? neg_inf<acc_t>() : (mt == neg_inf<acc_t>()) ? masked_or_nan(t) : (t - mt) * invT;
  return score_terms_shifted<kLog2T>(xs, a, invT, with_teacher);
}

// Finite maxima (the CPU checks once per chunk and keeps the loop select-free).
template <int kLog2T = -1, typename acc_t>
KDSEQ_HD ScoreTerms<acc_t> score_terms_finite(acc_t s, acc_t t, acc_t ms, acc_t mt, acc_t invT,
                                              bool with_teacher) {
  return score_terms_shifted<kLog2T>(s - ms, with_teacher ? (t - mt) * invT : acc_t(0), invT, with_teacher);
}

template <typename acc_t>
KDSEQ_HD void score_add_terms(ScoreStats<acc_t>& st, const ScoreTerms<acc_t>& tm) {
  st.z1 += tm.z1;
  st.w1 += tm.w1;
  st.zsT += tm.zsT;
  st.ztT += tm.ztT;
  st.u += tm.u;
}

// Single-element online update; j is the class index (increasing within one lane), y the label.
template <typename acc_t>
KDSEQ_HD void score_stats_push(ScoreStats<acc_t>& st, acc_t s, acc_t t, int64_t j, int64_t y,
                               acc_t invT, bool with_teacher) {
  // First maximum wins: within a lane indices increase, so only a strictly larger value moves it.
  if (st.amax == INT64_MAX || s > st.ms) st.amax = j;
  if (j != y) st.m_noty = kd_max(st.m_noty, s);
  const acc_t ms_new = kd_max(st.ms, s);
  const acc_t mt_new = with_teacher ? kd_max(st.mt, t) : st.mt;
  score_stats_rebase(st, ms_new, mt_new, invT, with_teacher);
  score_add_terms(st, score_terms(s, t, st.ms, st.mt, invT, with_teacher));
}

// Combine partial states; argmax ties go to the smaller index (torch.argmax semantics).
template <typename acc_t>
KDSEQ_HD ScoreStats<acc_t> score_stats_merge(ScoreStats<acc_t> a, ScoreStats<acc_t> b, acc_t invT,
                                             bool with_teacher) {
  int64_t amax;
  if (a.ms > b.ms) amax = a.amax;
  else if (b.ms > a.ms) amax = b.amax;
  else amax = a.amax < b.amax ? a.amax : b.amax;
  const acc_t ms = kd_max(a.ms, b.ms);
  const acc_t mt = with_teacher ? kd_max(a.mt, b.mt) : a.mt;
  score_stats_rebase(a, ms, mt, invT, with_teacher);
  score_stats_rebase(b, ms, mt, invT, with_teacher);
  ScoreStats<acc_t> r = a;
  r.amax = amax;
  r.m_noty = kd_max(a.m_noty, b.m_noty);
  r.z1 = a.z1 + b.z1;
  r.w1 = a.w1 + b.w1;
  r.zsT = a.zsT + b.zsT;
  r.ztT = a.ztT + b.ztT;
  r.u = a.u + b.u;
  return r;
}

// Final six numbers of a row. s_y is the label logit.
template <typename acc_t>
KDSEQ_HD void score_finalize(const ScoreStats<acc_t>& st, acc_t s_y, int64_t y, acc_t T,
                             bool with_teacher, acc_t* out) {
  const acc_t log_z1 = kd_log(st.z1);
  const acc_t ce = log_z1 - (s_y - st.ms);
  out[kCE] = ce;
  out[kPTrue] = kd_exp(-ce);
  out[kMargin] = s_y - st.m_noty;
  out[kEntropy] = log_z1 - st.w1 / st.z1;
  out[kCorrect] = (st.amax == y) ? acc_t(1) : acc_t(0);
  if (with_teacher) {
    const acc_t kl = st.u / st.ztT - kd_log(st.ztT) + kd_log(st.zsT);
    out[kKD] = T * T * kl;
  } else {
    out[kKD] = acc_t(0);
  }
}

}  // namespace rowmath
}  // namespace kdseq
