// The sampler's row reductions on the CPU as an XLA FFI custom call: per row of (B, V) float32 logits, the max, the
// first index holding it and the sum of exp(x - max), from one read of the row and a second one from cache.
//
// Why a custom call: XLA:CPU runs the sampler's greedy pick (the row max, then the smallest index holding it) and
// the sampled token's log normaliser (the row max again, then the summed exponentials) as separate passes over the
// logits, one of them a reduce-window: ~1.8 ms of a ~30 ms batch-64 bfloat16 decode step at V = 32768. Here one
// task per row finds the max and its first index in one pass (16 lanes x 4 vectors, each lane keeping its running
// max and the index where that max first appeared), then sums the exponentials over the row while it is in cache.
//
// Semantics (serving/sampling.py, `first_argmax` and `token_log_softmax`; reference: kernels/cpu_sampler/
// reference.py): a row holding a NaN has max = its first NaN, argmax = that NaN's index and sum NaN. Else max is the
// row's max (-inf for a row of -inf), argmax the smallest index holding it (ties: the first; +0 and -0 compare
// equal) and the sum is sum(exp(x - max)) in float32, NaN where the max is +-inf (the reference's inf - inf).
//
// Operands: logits (B, V) f32, row-major. Results: row_max (B, 1) f32, argmax (B,) s32, sum_exp (B,) f32. Tasks run
// on XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../cpu_ffi_common.h"

namespace ffi = xla::ffi;

namespace {

using gemma4_cpu::parallel_for;
#if defined(__AVX512F__)
using gemma4_cpu::exp16_nonpositive;
using gemma4_cpu::first_bits16;
#endif

struct RowStats {
  float top;
  int32_t index;
  float sum;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A row that holds a NaN: its first NaN, at `index`.
inline RowStats nan_row(const float* x, int64_t index) {
  return {x[index], static_cast<int32_t>(index), std::numeric_limits<float>::quiet_NaN()};
}

#if defined(__AVX512F__)

// Pass 1: the max and its first index. Each of the 4 x 16 lanes sees every 64th element and keeps its running max
// and the index where it first rose to it (strictly greater replaces, so a tie keeps the earlier index); the row's
// first argmax is then the smallest index among the lanes that hold the row's max. Lanes start at -inf with the
// first vector's indices: a row of -inf ends at index 0. Four independent sets of lanes: the compare-and-select chain
// of one set would wait on itself.
inline RowStats max_and_index(const float* x, int64_t v) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i step = _mm512_set1_epi32(16);
  __m512 top[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i at[4] = {lane, lane, lane, lane};
  __m512i cursor = lane;  // the indices of the vector being read
  int64_t j = 0;
  for (; j + 64 <= v; j += 64) {
    __m512 a[4];
    __mmask16 nan = 0;
    for (int u = 0; u < 4; ++u) {
      a[u] = _mm512_loadu_ps(x + j + 16 * u);
      nan |= _mm512_cmp_ps_mask(a[u], a[u], _CMP_UNORD_Q);
    }
    if (nan) {
      for (int64_t i = j;; ++i) {
        if (std::isnan(x[i])) return nan_row(x, i);
      }
    }
    for (int u = 0; u < 4; ++u) {
      const __mmask16 up = _mm512_cmp_ps_mask(a[u], top[u], _CMP_GT_OQ);
      top[u] = _mm512_mask_mov_ps(top[u], up, a[u]);
      at[u] = _mm512_mask_mov_epi32(at[u], up, cursor);
      cursor = _mm512_add_epi32(cursor, step);
    }
  }
  for (int u = 0; j < v; j += 16, u = (u + 1) % 4) {  // the last < 64 elements; lanes past V read -inf
    const __mmask16 keep = first_bits16(v - j);
    const __m512 a = _mm512_mask_loadu_ps(neg_inf, keep, x + j);
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    if (nan) return nan_row(x, j + __builtin_ctz(nan));
    const __mmask16 up = _mm512_cmp_ps_mask(a, top[u], _CMP_GT_OQ);
    top[u] = _mm512_mask_mov_ps(top[u], up, a);
    at[u] = _mm512_mask_mov_epi32(at[u], up, cursor);
    cursor = _mm512_add_epi32(cursor, step);
  }
  const float row_top =
      _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(top[0], top[1]), _mm512_max_ps(top[2], top[3])));
  const __m512 wanted = _mm512_set1_ps(row_top);
  int32_t index = std::numeric_limits<int32_t>::max();
  for (int u = 0; u < 4; ++u) {
    const __mmask16 holds = _mm512_cmp_ps_mask(top[u], wanted, _CMP_EQ_OQ);
    if (holds) index = std::min(index, _mm512_mask_reduce_min_epi32(holds, at[u]));
  }
  return {row_top, index, 0.f};
}

// Pass 2 (the row is in cache now): sum(exp(x - top)) for a finite top, so every x - top <= 0 (-inf entries give 0).
// Four compensated (Kahan) accumulators: the exponentials are independent, one sum would wait on itself; and the
// lane that holds the max term (1) would otherwise lose up to half an ulp of 1 on each of its 500 small additions,
// ~1e-6 of the row's sum where a few terms carry the mass (XLA's tree-shaped reduction stays within ~1e-7).
inline void add_compensated(__m512& sum, __m512& lost, __m512 term) {
  const __m512 y = _mm512_sub_ps(term, lost);
  const __m512 t = _mm512_add_ps(sum, y);
  lost = _mm512_sub_ps(_mm512_sub_ps(t, sum), y);
  sum = t;
}

inline float sum_exp(const float* x, int64_t v, float top) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 acc[4], lost[4];
  for (int u = 0; u < 4; ++u) acc[u] = lost[u] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= v; j += 64) {
    for (int u = 0; u < 4; ++u) {
      add_compensated(acc[u], lost[u], exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16 * u), shift)));
    }
  }
  for (int u = 0; j < v; j += 16, ++u) {
    const __mmask16 keep = first_bits16(v - j);
    const __m512 a = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), keep, x + j);
    add_compensated(acc[u], lost[u], exp16_nonpositive(_mm512_sub_ps(a, shift)));
  }
  // The 64 partial sums and their lost parts, in double: exact enough that the one rounding to float32 is the last.
  alignas(64) float sums[64], losts[64];
  for (int u = 0; u < 4; ++u) {
    _mm512_store_ps(sums + 16 * u, acc[u]);
    _mm512_store_ps(losts + 16 * u, lost[u]);
  }
  double total = 0.0;
  for (int i = 0; i < 64; ++i) total += static_cast<double>(sums[i]) - static_cast<double>(losts[i]);
  return static_cast<float>(total);
}
#else
inline RowStats max_and_index(const float* x, int64_t v) {
  float top = kNegInf;
  int64_t index = 0;
  for (int64_t j = 0; j < v; ++j) {
    if (std::isnan(x[j])) return nan_row(x, j);
    if (x[j] > top) top = x[j], index = j;
  }
  return {top, static_cast<int32_t>(index), 0.f};
}

inline float sum_exp(const float* x, int64_t v, float top) {
  double total = 0.0;  // in double: within float32 rounding of the exact sum, as XLA's tree-shaped reduction
  for (int64_t j = 0; j < v; ++j) total += std::exp(x[j] - top);
  return static_cast<float>(total);
}
#endif

inline RowStats row_stats(const float* x, int64_t v) {
  RowStats s = max_and_index(x, v);
  if (std::isnan(s.top)) return s;
  s.sum = std::isfinite(s.top) ? sum_exp(x, v, s.top) : std::numeric_limits<float>::quiet_NaN();
  return s;
}

ffi::Error LogitsStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Result<ffi::Buffer<ffi::F32>> row_max,
                       ffi::Result<ffi::Buffer<ffi::S32>> argmax, ffi::Result<ffi::Buffer<ffi::F32>> sum_exp_out) {
  const auto d = logits.dimensions();
  // The lanes' int32 indices run up to V + 63.
  if (d.size() != 2 || d[1] < 1 || d[1] > std::numeric_limits<int32_t>::max() - 64) {
    return ffi::Error::InvalidArgument("logits must be (B, V) with 1 <= V <= 2**31 - 65");
  }
  const int64_t b = d[0], v = d[1];
  if (static_cast<int64_t>(row_max->element_count()) != b || static_cast<int64_t>(argmax->element_count()) != b ||
      static_cast<int64_t>(sum_exp_out->element_count()) != b) {
    return ffi::Error::InvalidArgument("row_max (B, 1), argmax (B,) and sum_exp (B,) must have B entries");
  }
  const float* x = logits.typed_data();
  float* top = row_max->typed_data();
  int32_t* index = argmax->typed_data();
  float* total = sum_exp_out->typed_data();
  parallel_for(pool, b, [=](int64_t r) {
    const RowStats s = row_stats(x + r * v, v);
    top[r] = s.top, index[r] = s.index, total[r] = s.sum;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma4CpuLogitsStats, LogitsStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits (B, V)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row_max (B, 1)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // argmax (B,)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // sum_exp (B,)
