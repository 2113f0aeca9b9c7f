// Shared by the CPU custom calls (cpu_attention/cpu_attention.cc, cpu_matmul/cpu_matmul.cc): bfloat16 bits <->
// float32 as XLA converts them (one value or 16 lanes), 16-lane loads that widen bfloat16 in registers, a 16-lane
// exp for softmax weights, and the task loop over XLA's intra-op thread pool. kernels/cpu_build.py hashes this
// header with each source.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace gemma4_cpu {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as XLA's float32 -> bfloat16 conversion (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void put(float* y, float v) { *y = v; }
inline void put(uint16_t* y, float v) { *y = f32_to_bf16(v); }

#if defined(__AVX512F__)
// The first n of 16 lanes (none for n <= 0, all from 16 on): the mask of a vector loop's tail.
inline __mmask16 first_bits16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << n) - 1);
}

// 16 elements as float32: bfloat16 bits widened in registers.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
// 16 bfloat16 bits as float32 lanes.
inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const uint16_t* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 float32 lanes rounded to bfloat16 bits (f32_to_bf16 in 16 lanes: round to nearest even, NaN kept quiet).
inline __m256i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

// e^x in 16 lanes for x within float32's exponent range (about -87.3 .. 88.7; not checked): 2^n * e^r with
// |r| <= ln2 / 2 and Cephes' degree-6 polynomial for e^r (relative error ~1e-7, XLA's own expf is an approximation
// of the same order).
inline __m512 exp16_in_range(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// exp(x) in 16 lanes for x <= 0 (a logit minus its row max); lanes below float32's range (-inf: a masked key) and
// NaN give exactly 0.
inline __m512 exp16_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(live, exp16_in_range(_mm512_maskz_mov_ps(live, x)));
}
#endif

struct Pending {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// fn(task) for task in [0, total) on the caller and on up to threads - 1 pool threads. The caller claims tasks
// too, so it never waits on a helper that has not started; helpers that start after every task is claimed return
// without touching anything but the shared counters they hold a reference to (fn is copied into each of them).
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, F fn) {
  auto pending = std::make_shared<Pending>();
  auto run = [pending, total, fn]() {
    for (int64_t task; (task = pending->next.fetch_add(1)) < total;) {
      fn(task);
      pending->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (pending->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace gemma4_cpu
