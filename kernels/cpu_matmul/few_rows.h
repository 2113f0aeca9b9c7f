// Few-row weight products (1-4 activation rows: the decode steps of small batches), shared by the custom calls
// of cpu_matmul.cc: register blocks that stream each weight once, bound by memory bandwidth. `few_row_columns`
// computes columns [n0, n1) of y (M, N) = x (M, K) @ W; the calls split N into tasks of such column ranges.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu_ffi_common.h"

namespace gemma4_cpu {

#if defined(__AVX512F__)
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = gemma4_cpu::f32_to_bf16(tmp[i]);
}

// (K, N) weights: rows [m0, m0 + R) of y, columns [n0, n0 + 16 * C), accumulators in registers over all of K.
template <int R, int C, typename T>
void kn_block(const float* xf, int64_t k_dim, const T* w, int64_t n_dim, int64_t m0, int64_t n0, T* y) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const T* col = w + n0;
  for (int64_t k = 0; k < k_dim; ++k, col += n_dim) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load16(col + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(xf[(m0 + r) * k_dim + k]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xb, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store16(y + (m0 + r) * n_dim + n0 + 16 * c, acc[r][c]);
}

#if defined(__AVX512BF16__)
// (K, N) bfloat16 weights for 4 rows or more, where the widening and one FMA per weight make the float32 blocks above
// compute-bound (~90 GFLOP/s): vdpbf16ps multiplies bfloat16 pairs (weights of rows k and k + 1 interleaved with
// one unpack, the activations' (k, k + 1) pair broadcast) into float32 accumulators, half the instructions and no
// widening. Columns [n0, n0 + 64) of rows [m0, m0 + R); unpacking works within 128-bit lanes, so accumulator lo
// holds columns 8j..8j+3 and hi 8j+4..8j+7 of each lane j, put back in order at the end. The products of two
// bfloat16 numbers are exact in float32; the instruction adds each pair before accumulating (another order of the
// same sum) and treats float32 denormals as zero.
template <int R>
void kn_block_bf16_pairs(const uint16_t* x, int64_t k_dim, const uint16_t* w, int64_t n_dim, int64_t m0, int64_t n0,
                         uint16_t* y) {
  __m512 lo[R][2], hi[R][2];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) lo[r][c] = hi[r][c] = _mm512_setzero_ps();
  const uint16_t* row = w + n0;
  int64_t k = 0;
  for (; k + 2 <= k_dim; k += 2, row += 2 * n_dim) {
    __m512bh plo[2], phi[2];
    for (int c = 0; c < 2; ++c) {
      const __m512i a = _mm512_loadu_si512(row + 32 * c), b = _mm512_loadu_si512(row + n_dim + 32 * c);
      plo[c] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      phi[c] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + (m0 + r) * k_dim + k, sizeof pair);
      const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < 2; ++c) {
        lo[r][c] = _mm512_dpbf16_ps(lo[r][c], plo[c], xp);
        hi[r][c] = _mm512_dpbf16_ps(hi[r][c], phi[c], xp);
      }
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 2; ++c) {
      __m512 a = _mm512_permutex2var_ps(lo[r][c], first, hi[r][c]);
      __m512 b = _mm512_permutex2var_ps(lo[r][c], second, hi[r][c]);
      if (k < k_dim) {  // an odd K: the last weight row with plain FMAs
        const __m512 xb = _mm512_set1_ps(to_f32(x[(m0 + r) * k_dim + k]));
        a = _mm512_fmadd_ps(xb, load16(row + 32 * c), a);
        b = _mm512_fmadd_ps(xb, load16(row + 32 * c + 16), b);
      }
      store16(y + (m0 + r) * n_dim + n0 + 32 * c, a);
      store16(y + (m0 + r) * n_dim + n0 + 32 * c + 16, b);
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// (K, N) bfloat16 weights, one activation row, columns [n0, n0 + 32 * C) (C = 8: 256): each weight row's 32-column vectors go to
// vdpbf16ps twice as they are loaded, once against the pair (x_k, 0) (the even columns) and once against (0, x_k)
// (the odd ones): no widening, half the instructions of load16 + FMA per weight, which lets more weight loads be in
// flight. One of each pair's products is 0 * w, so every accumulation is acc + x_k * w_kn rounded once, as an FMA
// (denormals flushed, as in the pair blocks above).
template <int C>
void kn_row_bf16(const uint16_t* x, int64_t k_dim, const uint16_t* w, int64_t n_dim, int64_t n0, uint16_t* y) {
  __m512 even[C], odd[C];
  for (int c = 0; c < C; ++c) even[c] = odd[c] = _mm512_setzero_ps();
  const uint16_t* row = w + n0;
  for (int64_t k = 0; k < k_dim; ++k, row += n_dim) {
    const uint32_t bits = x[k];
    const __m512bh xe = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
    const __m512bh xo = (__m512bh)_mm512_set1_epi32(static_cast<int>(bits << 16));
    for (int c = 0; c < C; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(row + 32 * c);
      even[c] = _mm512_dpbf16_ps(even[c], wv, xe);
      odd[c] = _mm512_dpbf16_ps(odd[c], wv, xo);
    }
  }
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int c = 0; c < C; ++c) {
    store16(y + n0 + 32 * c, _mm512_permutex2var_ps(even[c], first, odd[c]));
    store16(y + n0 + 32 * c + 16, _mm512_permutex2var_ps(even[c], second, odd[c]));
  }
}
#endif

#if defined(__AVX512BF16__)
// (N, K) bfloat16 weights (the tied LM head), one activation row, k_dim a multiple of 32: V weight rows at a time,
// each 32-element run of a weight row multiplied as pairs against the same run of x by one vdpbf16ps (no widening,
// no broadcast), horizontal sums at the end. As in the pair blocks, each pair is added before accumulating.
template <int V>
void nk_row_bf16(const uint16_t* x, int64_t k_dim, const uint16_t* w, int64_t n0, uint16_t* y) {
  __m512 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  const uint16_t* w0 = w + n0 * k_dim;
  for (int64_t k = 0; k < k_dim; k += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int v = 0; v < V; ++v)
      acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_loadu_si512(w0 + v * k_dim + k), xv);
  }
  for (int v = 0; v < V; ++v) put(y + n0 + v, _mm512_reduce_add_ps(acc[v]));
}
#endif

// (N, K) weights: rows [m0, m0 + R) of y against V weight rows n0..n0+V-1 (k_dim a multiple of 16): R x V
// accumulators, horizontal sums at the end.
template <int R, int V, typename T>
void nk_block(const float* xf, int64_t k_dim, const T* w, int64_t n_dim, int64_t m0, int64_t n0, T* y) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const T* w0 = w + n0 * k_dim;
  for (int64_t k = 0; k < k_dim; k += 16) {
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load16(w0 + v * k_dim + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(xf + (m0 + r) * k_dim + k);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) put(y + (m0 + r) * n_dim + n0 + v, _mm512_reduce_add_ps(acc[r][v]));
}
#endif

// Plain loops for what the blocks above do not cover (no AVX-512, ragged edges): y[m, n] for n in [n0, n1).
template <typename T>
void plain_columns(const float* xf, int64_t m_dim, int64_t k_dim, const T* w, int64_t n_dim, bool transposed,
                   int64_t n0, int64_t n1, T* y) {
  for (int64_t m = 0; m < m_dim; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      if (transposed) {
        for (int64_t k = 0; k < k_dim; ++k) s += xf[m * k_dim + k] * to_f32(w[n * k_dim + k]);
      } else {
        for (int64_t k = 0; k < k_dim; ++k) s += xf[m * k_dim + k] * to_f32(w[k * n_dim + n]);
      }
      put(y + m * n_dim + n, s);
    }
  }
}

// Column blocks per task: wide enough that a task streams long contiguous runs of each weight row (512 bytes in
// bfloat16), narrow enough that every thread gets several on most products. Narrower tasks where a call has few
// (128 or 64 columns, so that a 128-column K or V product would not leave a thread idle) ran a bench-100m batch-1
// bfloat16 step slower in every interleaved pair (6.1-7.4 ms against 5.5-6.9, docs/benchmarks.md).
constexpr int64_t kTaskColumns = 256;

#if defined(__AVX512F__)
// act(gate) * u for bfloat16: the activation of a bfloat16 value is a bfloat16 value, so it is looked up (a table
// of all 65536 that XLA itself computed, kernel.py) with one 16-lane gather, then multiplied by u, the product's
// rounded value, and rounded once more, as XLA's elementwise graph does. The table has one entry past the end so
// that the 32-bit gather of the last one stays inside it.
inline __m512 gated_bf16(const uint16_t* table, __m256i gate_bits, __m512 u) {
  const __m512i index = _mm512_cvtepu16_epi32(gate_bits);
  const __m512i words = _mm512_i32gather_epi32(index, reinterpret_cast<const int*>(table), 2);
  const __m512 act = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));  // the low half, moved up
  return _mm512_mul_ps(act, u);
}
#endif

// The few activation rows widened to float32 once per call (the float32 blocks' operand).
template <typename T>
std::vector<float> widened(const T* x, int64_t count) {
  std::vector<float> xf(count);
  for (int64_t i = 0; i < count; ++i) xf[i] = to_f32(x[i]);
  return xf;
}

// Columns [n0, n1) of y (M, N) = x (M, K) @ W for M <= 4: W (K, N), or transposed (N, K); xs: x widened to
// float32. Every column is the same sum in the same order whichever range it falls in (the blocks differ in how
// many columns they keep in registers, not in the arithmetic), so any split of N gives the same bits.
template <typename T>
void few_row_columns(const T* x, const float* xs, int64_t m_dim, int64_t k_dim, const T* w, int64_t n_dim,
                     bool transposed, int64_t n0, int64_t n1, T* y) {
  int64_t n = n0;
#if defined(__AVX512F__)
  if (!transposed) {
    // Register blocks of 16 accumulators (rows x 16-column vectors): one row over 256 columns (each weight row
    // read as one 512-byte run in bfloat16), two over 128, four over 64; then narrower edges (one row: 128 and 64
    // wide first: a 128-column K or V product).
    if (m_dim == 1) {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, uint16_t>) {
        for (; n + 256 <= n1; n += 256) kn_row_bf16<8>(x, k_dim, w, n_dim, n, y);
        for (; n + 128 <= n1; n += 128) kn_row_bf16<4>(x, k_dim, w, n_dim, n, y);
        for (; n + 64 <= n1; n += 64) kn_row_bf16<2>(x, k_dim, w, n_dim, n, y);
      }
#endif
      for (; n + 256 <= n1; n += 256) kn_block<1, 16>(xs, k_dim, w, n_dim, 0, n, y);
      for (; n + 128 <= n1; n += 128) kn_block<1, 8>(xs, k_dim, w, n_dim, 0, n, y);
    } else if (m_dim < 4) {
      for (; n + 128 <= n1; n += 128) {
        int64_t m = 0;
        for (; m + 2 <= m_dim; m += 2) kn_block<2, 8>(xs, k_dim, w, n_dim, m, n, y);
        for (; m < m_dim; ++m) kn_block<1, 8>(xs, k_dim, w, n_dim, m, n, y);
      }
    }
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (m_dim >= 4) {  // at 2-3 rows the float32 blocks over 128 columns stream faster
        for (; n + 64 <= n1; n += 64) {
          int64_t m = 0;
          for (; m + 4 <= m_dim; m += 4) kn_block_bf16_pairs<4>(x, k_dim, w, n_dim, m, n, y);
          for (; m + 2 <= m_dim; m += 2) kn_block_bf16_pairs<2>(x, k_dim, w, n_dim, m, n, y);
          for (; m < m_dim; ++m) kn_block_bf16_pairs<1>(x, k_dim, w, n_dim, m, n, y);
        }
      }
    }
#endif
    for (; n + 64 <= n1; n += 64) {
      int64_t m = 0;
      for (; m + 4 <= m_dim; m += 4) kn_block<4, 4>(xs, k_dim, w, n_dim, m, n, y);
      for (; m + 2 <= m_dim; m += 2) kn_block<2, 4>(xs, k_dim, w, n_dim, m, n, y);
      for (; m < m_dim; ++m) kn_block<1, 4>(xs, k_dim, w, n_dim, m, n, y);
    }
    for (; n + 16 <= n1; n += 16)
      for (int64_t m = 0; m < m_dim; ++m) kn_block<1, 1>(xs, k_dim, w, n_dim, m, n, y);
  } else if (k_dim % 16 == 0) {
    // 8 weight rows per block for one activation row, 4 for more (R x V accumulators <= 16).
    if (m_dim == 1) {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (k_dim % 32 == 0)
          for (; n + 8 <= n1; n += 8) nk_row_bf16<8>(x, k_dim, w, n, y);
      }
#endif
      for (; n + 8 <= n1; n += 8) nk_block<1, 8>(xs, k_dim, w, n_dim, 0, n, y);
    }
    for (; n + 4 <= n1; n += 4) {
      int64_t m = 0;
      for (; m + 4 <= m_dim; m += 4) nk_block<4, 4>(xs, k_dim, w, n_dim, m, n, y);
      for (; m + 2 <= m_dim; m += 2) nk_block<2, 4>(xs, k_dim, w, n_dim, m, n, y);
      for (; m < m_dim; ++m) nk_block<1, 4>(xs, k_dim, w, n_dim, m, n, y);
    }
  }
#endif
  if (n < n1) plain_columns(xs, m_dim, k_dim, w, n_dim, transposed, n, n1, y);
}

}  // namespace gemma4_cpu
