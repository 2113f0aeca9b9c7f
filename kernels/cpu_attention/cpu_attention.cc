// Paged attention on the CPU as an XLA FFI custom call: the K/V pools read in place through the page table.
//
// Why a custom call: XLA:CPU runs attention over a paged pool as a gather of every row's pages, a widening of the
// gathered bfloat16 keys to float32 and a transpose into the batched dots' layout, three trips through memory for
// keys that are used once (~20% of a bench-100m batch-64 bfloat16 decode step; docs/benchmarks.md). Here each
// (row, KV head) is one task that reads its visible keys straight from the pool, widens them in registers and
// consumes them while they are in cache; keys past a row's length (pages padded to a power of two) are never read.
//
// The math is the reference's (kernels/paged_attention/reference.py, `paged_attention_reference`): logits and
// softmax in float32, the probabilities rounded to the compute dtype before the value product (as the model's
// reference attention casts them to the values' dtype), the value product accumulated in float32 and the output
// rounded to q's dtype; a query that sees no key gets 0. Two passes per query tile (logits of the visible keys into
// a scratch row, then softmax and the value product), so the normalised probabilities are rounded exactly as the
// reference rounds them. Masking by position: query t of row b sees key s when q_pos >= 0, key_pos >= 0 and
// (key_pos <= q_pos, or both carry the same vision block id >= 0), and, with a window W > 0, key_pos > q_pos - W.
//
// Operands (all row-major): q (B, T, N, H) f32 or bf16; k_pages, v_pages (num_pages, page_size, K, H) f32, bf16
// or u16 (bfloat16 bits); page_table (B, P) s32; key_pos (B, P * page_size) s32 (-1: empty); q_pos (B, T) s32;
// q_blocks (B, T) and key_blocks (B, P * page_size) s32, or both of shape (0,) when there are no vision blocks.
// Attribute window (0: none). Result (B, T, N, H) in q's dtype. Tasks run on XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../cpu_ffi_common.h"

namespace ffi = xla::ffi;

namespace {

using gemma4_cpu::f32_to_bf16;
using gemma4_cpu::parallel_for;
using gemma4_cpu::to_f32;
#if defined(__AVX512F__)
using gemma4_cpu::exp16_nonpositive;
using gemma4_cpu::first_bits16;
using gemma4_cpu::round_bf16;
#endif

inline void widen(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void widen(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(&dst[i], &u, sizeof u);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float p, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}

#if defined(__AVX512F__)
using gemma4_cpu::load16;
#endif

#if defined(__AVX512F__)
// The sums of four 16-lane vectors, [sum(a0), sum(a1), sum(a2), sum(a3)], in one tree (14 instructions; four
// separate horizontal sums take ~32 and end the key's logits in four serial chains).
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // [a0 q0+q2, a0 q1+q3, a1 q0+q2, a1 q1+q3] and the same of a2, a3 (q: 128-bit quarters)
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  // quarter i: four partial sums of a_i
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
  const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  // every lane of quarter i: sum(a_i)
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, w));
}

inline void store4(__m128 s, float* out, int64_t stride) {
  _mm_store_ss(out, s);
  _mm_store_ss(out + stride, _mm_permute_ps(s, 1));
  _mm_store_ss(out + 2 * stride, _mm_permute_ps(s, 2));
  _mm_store_ss(out + 3 * stride, _mm_permute_ps(s, 3));
}
#endif

// Logits of `rows` consecutive query rows (qf, rows x n, float32) against one pool row k (n elements): out[r *
// stride]. With AVX-512 (n a multiple of 16) four query rows at a time, each with its own accumulator, summed in
// one tree. Else widen, then a dot per row.
template <typename KT>
inline void key_logits(const float* qf, int64_t rows, const KT* k, int64_t n, float* kbuf, float* out,
                       int64_t stride) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    for (; r + 4 <= rows; r += 4) {
      const float* q0 = qf + r * n;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 kv = load16(k + i);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + i), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + n + i), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * n + i), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * n + i), kv, a3);
      }
      store4(sum4(a0, a1, a2, a3), out + r * stride, stride);
    }
    if (r == rows) return;
  }
#endif
  widen(k, kbuf, n);
  for (; r < rows; ++r) out[r * stride] = dot(qf + r * n, kbuf, n);
}

#if defined(__AVX512BF16__)
// key_logits for bfloat16 queries (qb, rows x n bfloat16 bits) and keys, n a multiple of 32: `vdpbf16ps` multiplies
// 32 pairs per instruction straight from the bits (no widening; bfloat16 products are exact in float32, summed in
// float32 as the reference's dot, in another order; inputs below float32's normal range count as 0).
inline void key_logits_bf16(const uint16_t* qb, int64_t rows, const uint16_t* k, int64_t n, float* out,
                            int64_t stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const uint16_t* q0 = qb + r * n;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < n; i += 32) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + i);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(q0 + i), kv);
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(q0 + n + i), kv);
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(q0 + 2 * n + i), kv);
      a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(q0 + 3 * n + i), kv);
    }
    store4(sum4(a0, a1, a2, a3), out + r * stride, stride);
  }
  for (; r < rows; ++r) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
      a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qb + r * n + i), (__m512bh)_mm512_loadu_si512(k + i));
    }
    out[r * stride] = _mm512_reduce_add_ps(a);
  }
}
#endif

// acc (rows x n) = probs (rows x n_seen, row stride `stride`) @ the seen value rows (v + offsets[j], n elements
// each). With AVX-512 (n a multiple of 64) the accumulators of up to 4 rows x 64 columns stay in registers across
// all keys (each value chunk is read once per 4 rows, from cache after the first); else one axpy per (key, row).
template <typename KT>
inline void value_product(const float* probs, int64_t rows, int64_t stride, const KT* v, const int64_t* offsets,
                          int64_t n_seen, int64_t n, float* kbuf, float* acc) {
#if defined(__AVX512F__)
  if (n % 64 == 0) {
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t nr = std::min<int64_t>(4, rows - r0);
      for (int64_t c = 0; c < n; c += 64) {
        __m512 a[4][4];
        for (int rr = 0; rr < 4; ++rr)
          for (int q = 0; q < 4; ++q) a[rr][q] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n_seen; ++j) {
          const KT* row = v + offsets[j] + c;
          if (j + 4 < n_seen) {  // value rows are scattered like the keys: fetch a few ahead
            __builtin_prefetch(reinterpret_cast<const char*>(v + offsets[j + 4] + c));
            __builtin_prefetch(reinterpret_cast<const char*>(v + offsets[j + 4] + c) + 64);
          }
          const __m512 v0 = load16(row), v1 = load16(row + 16), v2 = load16(row + 32), v3 = load16(row + 48);
          for (int rr = 0; rr < 4; ++rr) {
            if (rr >= nr) break;
            const __m512 p = _mm512_set1_ps(probs[(r0 + rr) * stride + j]);
            a[rr][0] = _mm512_fmadd_ps(p, v0, a[rr][0]);
            a[rr][1] = _mm512_fmadd_ps(p, v1, a[rr][1]);
            a[rr][2] = _mm512_fmadd_ps(p, v2, a[rr][2]);
            a[rr][3] = _mm512_fmadd_ps(p, v3, a[rr][3]);
          }
        }
        for (int64_t rr = 0; rr < nr; ++rr)
          for (int q = 0; q < 4; ++q) _mm512_storeu_ps(acc + (r0 + rr) * n + c + 16 * q, a[rr][q]);
      }
    }
    return;
  }
#endif
  std::fill(acc, acc + rows * n, 0.f);
  for (int64_t j = 0; j < n_seen; ++j) {
    widen(v + offsets[j], kbuf, n);
    for (int64_t r = 0; r < rows; ++r) {
      const float p = probs[r * stride + j];
      if (p != 0.f) axpy(p, kbuf, acc + r * n, n);
    }
  }
}

// One key row's logits against `rows` query rows: from the bfloat16 bits (qb) where `pairs` (bfloat16 queries
// and keys, see attend), else from the widened queries (qf).
template <typename KT>
inline void row_logits(bool pairs, const float* qf, const uint16_t* qb, int64_t rows, const KT* k, int64_t n,
                       float* kbuf, float* out, int64_t stride) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<KT, uint16_t>) {
    if (pairs) return key_logits_bf16(qb, rows, k, n, out, stride);
  }
#endif
  key_logits(qf, rows, k, n, kbuf, out, stride);
}

struct Shape {
  int64_t b, t, n, h, k, g;  // batch, query tokens, query heads, head dim, KV heads, query heads per KV head
  int64_t num_pages, page_size, pages_per_row, keys;  // keys = pages_per_row * page_size (the logical key axis S)
  int64_t window;                          // 0: none
  int64_t tile;                            // query tokens per task
  bool blocks, bf16_compute;
};

// exp(x) for x <= 0 as the reference needs it (x = logit - row max), written so that the compiler vectorizes the
// loop around it (std::exp is a scalar call, and a decode step evaluates ~B * N * context of them): 2^n * e^r with
// |r| <= ln2 / 2 and Cephes' degree-6 polynomial for e^r (relative error ~1e-7, XLA's own expf is an approximation
// of the same order). -inf (a masked key) and anything below float32's range give exactly 0.
inline float exp_nonpositive(float x) {
  const bool zero = !(x >= -87.33654f);  // also true for -inf and NaN-free masked entries
  const float xc = zero ? 0.f : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return zero ? 0.f : p * scale;
}

// Scratch of one thread, kept across tasks and calls (grown, never shrunk): no allocation per task.
struct Scratch {
  std::vector<float> qf, acc, kv, logits;
  std::vector<uint16_t> qb;  // bfloat16 queries as given (the `vdpbf16ps` logits)
  std::vector<int64_t> seen;  // pool offset of each seen key's row
};

Scratch& scratch(int64_t rows, int64_t h, int64_t keys) {
  thread_local Scratch sc;
  auto grow = [](auto& v, size_t n) {
    if (v.size() < n) v.resize(n);
  };
  grow(sc.qf, rows * h);
  grow(sc.qb, rows * h);
  grow(sc.acc, rows * h);
  grow(sc.kv, h);
  grow(sc.logits, rows * keys);
  grow(sc.seen, keys);
  return sc;
}

// One task: row b, KV head kh, query tokens [t0, t0 + tile). QT: q/out element (float or uint16_t bits of
// bfloat16); KT: pool element. Logits are kept row-major (query row r, seen key j) so that the softmax runs over
// contiguous memory.
template <typename QT, typename KT>
void attend(const Shape& s, int64_t b, int64_t kh, int64_t t0, const QT* q, const KT* kp, const KT* vp,
            const int32_t* table, const int32_t* key_pos, const int32_t* q_pos, const int32_t* q_blk,
            const int32_t* key_blk, QT* out) {
  const int64_t tt = std::min(s.tile, s.t - t0), rows = tt * s.g, h = s.h, stride = s.keys;
  Scratch& sc = scratch(rows, h, s.keys);
  float *qf = sc.qf.data(), *acc = sc.acc.data(), *kv = sc.kv.data(), *logits = sc.logits.data();
  int64_t* seen = sc.seen.data();
  uint16_t* qb = sc.qb.data();
  // bfloat16 queries and keys: logits by `vdpbf16ps` from the bits (key_logits_bf16)
#if defined(__AVX512BF16__)
  const bool pairs = std::is_same_v<QT, uint16_t> && std::is_same_v<KT, uint16_t> && h % 32 == 0;
#else
  const bool pairs = false;
#endif
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = -1;  // the tile's first and last query positions
  for (int64_t t = 0; t < tt; ++t) {
    const int32_t p = q_pos[b * s.t + t0 + t];
    if (p < 0) continue;
    lo = std::min(lo, p);
    hi = std::max(hi, p);
    for (int64_t g = 0; g < s.g; ++g) {
      const QT* src = q + ((b * s.t + t0 + t) * s.n + kh * s.g + g) * h;
      if constexpr (std::is_same_v<QT, uint16_t>) {
        if (pairs) {
          std::memcpy(qb + (t * s.g + g) * h, src, h * sizeof(uint16_t));
          continue;
        }
      }
      widen(src, qf + (t * s.g + g) * h, h);
    }
  }
  auto store = [&](int64_t r) {
    QT* dst = out + ((b * s.t + t0 + r / s.g) * s.n + kh * s.g + r % s.g) * h;
    const float* row = acc + r * h;
    if constexpr (std::is_same_v<QT, float>) {
      std::memcpy(dst, row, h * sizeof(float));
    } else {
      for (int64_t i = 0; i < h; ++i) dst[i] = f32_to_bf16(row[i]);
    }
  };
  if (hi < 0) {  // padding queries only
    std::fill(acc, acc + rows * h, 0.f);
    for (int64_t r = 0; r < rows; ++r) store(r);
    return;
  }
  // Pass 1: logits of every key some query of the tile sees (-inf for the queries that do not).
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t row_stride = s.h * s.k;
  int64_t n_seen = 0;
  for (int64_t pi = 0; pi < s.pages_per_row; ++pi) {
    // Clamped as XLA clamps a gather's indices (the reference gathers), so no table entry reads outside the pool.
    const int64_t page = std::clamp<int64_t>(table[b * s.pages_per_row + pi], 0, s.num_pages - 1);
    const int64_t page_base = page * s.page_size;
    // The next page is anywhere in the pool: its key rows of this head are fetched while this page computes, one
    // row per key here (the loads of each key row were the call's largest stall; fetching a whole page at once
    // stalled on the full miss queue). Not when it starts empty (past the row's length).
    const char* next_keys = nullptr;
    if (pi + 1 < s.pages_per_row && key_pos[b * s.keys + (pi + 1) * s.page_size] >= 0) {
      const int64_t next = std::clamp<int64_t>(table[b * s.pages_per_row + pi + 1], 0, s.num_pages - 1);
      next_keys = reinterpret_cast<const char*>(kp + next * s.page_size * row_stride + kh * h);
    }
    const int64_t row_bytes = h * sizeof(KT);
    for (int64_t o = 0; o < s.page_size; ++o) {
      if (next_keys != nullptr) {
        const char* line = next_keys + o * row_stride * sizeof(KT);
        for (int64_t l = 0; l < row_bytes; l += 64) __builtin_prefetch(line + l);
      }
      const int64_t i = pi * s.page_size + o;
      const int32_t kpos = key_pos[b * s.keys + i];
      if (kpos < 0) continue;
      const int32_t kblk = s.blocks ? key_blk[b * s.keys + i] : -1;
      if (kpos > hi && kblk < 0) continue;                   // after every query, and no block to see it through
      if (s.window > 0 && kpos <= lo - s.window) continue;  // before the window of every query
      const int64_t offset = (page_base + o) * row_stride + kh * h;
      bool any = false;
      for (int64_t t = 0; t < tt; ++t) {
        const int32_t qp = q_pos[b * s.t + t0 + t];
        bool sees = qp >= 0 && kpos <= qp;
        if (s.blocks && qp >= 0) {
          const int32_t qb = q_blk[b * s.t + t0 + t];
          sees = sees || (qb >= 0 && qb == kblk);
        }
        if (s.window > 0) sees = sees && kpos > qp - s.window;
        float* dst = logits + t * s.g * stride + n_seen;
        if (sees) {
          row_logits(pairs, qf + t * s.g * h, qb + t * s.g * h, s.g, kp + offset, h, kv, dst, stride);
        } else {
          for (int64_t g = 0; g < s.g; ++g) dst[g * stride] = neg_inf;
        }
        any = any || sees;
      }
      if (any) {
        // Its value row, read in pass 2: fetched now, a softmax and the rest of this pass ahead of its use.
        const char* vline = reinterpret_cast<const char*>(vp + offset);
        for (int64_t l = 0; l < row_bytes; l += 64) __builtin_prefetch(vline + l);
        seen[n_seen++] = offset;
      }
    }
  }
  // Softmax per query row over the seen keys; the probabilities rounded to the compute dtype as the reference's.
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * stride;
    float peak = neg_inf;
#if defined(__AVX512F__)
    // max_ps(x, m) returns m when x is NaN: as std::max(peak, x) below, a NaN logit does not become the peak.
    __m512 pk = _mm512_set1_ps(neg_inf);
    for (int64_t j = 0; j < n_seen; j += 16) {
      const __mmask16 keep = first_bits16(n_seen - j);
      pk = _mm512_mask_max_ps(pk, keep, _mm512_maskz_loadu_ps(keep, row + j), pk);
    }
    peak = _mm512_reduce_max_ps(pk);
#else
    for (int64_t j = 0; j < n_seen; ++j) peak = std::max(peak, row[j]);
#endif
    if (peak == neg_inf) {  // this query sees nothing (a padding query beside real ones)
      std::fill(row, row + n_seen, 0.f);
      continue;
    }
#if defined(__AVX512F__)
    // 16 lanes at a time (the compiler left the scalar loops below scalar: ~25% of a decode call's time)
    const __m512 top = _mm512_set1_ps(peak);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n_seen; j += 16) {
      const __mmask16 keep = first_bits16(n_seen - j);
      const __m512 shifted = _mm512_sub_ps(_mm512_maskz_loadu_ps(keep, row + j), top);
      const __m512 w = _mm512_maskz_mov_ps(keep, exp16_nonpositive(shifted));  // lanes past n_seen: 0
      _mm512_mask_storeu_ps(row + j, keep, w);
      sum = _mm512_add_ps(sum, w);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n_seen; j += 16) {
      const __mmask16 keep = first_bits16(n_seen - j);
      __m512 p = _mm512_div_ps(_mm512_maskz_loadu_ps(keep, row + j), total);
      if (s.bf16_compute) p = gemma4_cpu::widen_bf16(round_bf16(p));
      _mm512_mask_storeu_ps(row + j, keep, p);
    }
#else
    float total = 0.f;
    for (int64_t j = 0; j < n_seen; ++j) {
      const float w = exp_nonpositive(row[j] - peak);
      row[j] = w;
      total += w;
    }
    if (s.bf16_compute) {
      for (int64_t j = 0; j < n_seen; ++j) row[j] = to_f32(f32_to_bf16(row[j] / total));
    } else {
      for (int64_t j = 0; j < n_seen; ++j) row[j] = row[j] / total;
    }
#endif
  }
  // Pass 2: the value product.
  value_product(logits, rows, stride, vp, seen, n_seen, h, kv, acc);
  for (int64_t r = 0; r < rows; ++r) store(r);
}

bool is_16bit(ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; }

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                          ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> key_pos,
                          ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> q_blocks,
                          ffi::Buffer<ffi::S32> key_blocks, int64_t window, int64_t tile,
                          ffi::Result<ffi::AnyBuffer> out) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2) return ffi::Error::InvalidArgument("bad operand ranks");
  Shape s;
  s.b = qd[0], s.t = qd[1], s.n = qd[2], s.h = qd[3];
  s.num_pages = kd[0], s.page_size = kd[1], s.k = kd[2], s.pages_per_row = td[1];
  s.keys = s.pages_per_row * s.page_size;
  s.g = s.k > 0 ? s.n / s.k : 0;
  s.window = window;
  s.tile = std::max<int64_t>(tile, 1);
  s.blocks = q_blocks.element_count() > 0;
  auto count = [](const auto& buf) { return static_cast<int64_t>(buf.element_count()); };
  if (kd[3] != s.h || s.k == 0 || s.num_pages == 0 || s.n % s.k || td[0] != s.b || count(key_pos) != s.b * s.keys ||
      count(q_pos) != s.b * s.t || v_pages.dimensions().size() != 4 || count(v_pages) != count(k_pages) ||
      (s.blocks && (count(q_blocks) != s.b * s.t || count(key_blocks) != s.b * s.keys))) {
    return ffi::Error::InvalidArgument("operand shapes do not fit q (B, T, N, H) and pools (pages, size, K, H)");
  }
  const bool q16 = q.element_type() == ffi::DataType::BF16, q32 = q.element_type() == ffi::DataType::F32;
  const auto kt = k_pages.element_type();
  if (kt != v_pages.element_type() || out->element_type() != q.element_type() ||
      !((q16 && is_16bit(kt)) || (q32 && kt == ffi::DataType::F32))) {
    return ffi::Error::InvalidArgument("q, pools and result must be float32 throughout or bfloat16 throughout");
  }
  s.bf16_compute = q16;
  const int64_t tiles = (s.t + s.tile - 1) / s.tile, total = s.b * s.k * tiles;
  const int32_t *table = page_table.typed_data(), *kpos = key_pos.typed_data(), *qpos = q_pos.typed_data();
  const int32_t *qblk = s.blocks ? q_blocks.typed_data() : nullptr;
  const int32_t *kblk = s.blocks ? key_blocks.typed_data() : nullptr;
  auto run = [&](auto* q_data, auto* kp, auto* vp, auto* o) {
    parallel_for(pool, total, [=](int64_t task) {
      const int64_t tile_i = task % tiles, bk = task / tiles;
      attend(s, bk / s.k, bk % s.k, tile_i * s.tile, q_data, kp, vp, table, kpos, qpos, qblk, kblk, o);
    });
  };
  if (q16) {
    run(static_cast<const uint16_t*>(q.untyped_data()), static_cast<const uint16_t*>(k_pages.untyped_data()),
        static_cast<const uint16_t*>(v_pages.untyped_data()), static_cast<uint16_t*>(out->untyped_data()));
  } else {
    run(static_cast<const float*>(q.untyped_data()), static_cast<const float*>(k_pages.untyped_data()),
        static_cast<const float*>(v_pages.untyped_data()), static_cast<float*>(out->untyped_data()));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma4CpuPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()        // q
                                  .Arg<ffi::AnyBuffer>()        // k_pages
                                  .Arg<ffi::AnyBuffer>()        // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_blocks
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key_blocks
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("tile")
                                  .Ret<ffi::AnyBuffer>());
