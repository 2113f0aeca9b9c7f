// Shared by the CPU custom calls (cpu_attention/cpu_attention.cc, cpu_matmul/cpu_matmul.cc): bfloat16 bits <->
// float32 as XLA converts them, 16-lane loads that widen bfloat16 in registers, and the task loop over XLA's
// intra-op thread pool. kernels/cpu_build.py hashes this header with each source.
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
// 16 elements as float32: bfloat16 bits widened in registers.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
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
