// Weight products on the CPU as an XLA FFI custom call: y (M, N) = x (M, K) @ W, in two regimes.
//
// Few rows (1-4, the decode steps of small batches): each weight is read once per step and the product is bound by
// how fast the weights stream from memory. XLA:CPU hands a one-row bfloat16 product to YNNPACK's GEMM padded to two
// rows, which streams the weights at 10-31 GB/s by shape, against the machine's ~55-76 GB/s. Here each task owns a
// block of output columns, keeps the block's accumulators for every row in registers and streams the weight rows
// of that block once; bfloat16 weights are widened in registers (or multiplied as pairs at 4 rows).
//
// More rows (gemm_packed: larger decode batches, prefill chunks, the LM head over a batch): bound by compute; weight
// panels packed once per task and 6 x 4 register blocks, where YNNPACK runs these shapes well below the machine's
// rate (docs/benchmarks.md, "Packed products").
//
// W is stored (K, N) row-major (attr transposed = 0: the model's Linear kernels, in-features first) or (N, K)
// (transposed = 1: the tied LM head, the embedding table (V, D)). x and W are float32 or bfloat16, the same; y is
// their dtype (the float32 sum of float32 products, rounded once: what XLA computes for a bfloat16 einsum asked
// for a float32 result and cast) or, in the packed regime, float32 (bfloat16 sums rounded, then widened), with
// attr softcap > 0 the LM head's tanh(y / softcap) * softcap. Tasks run on XLA's intra-op thread pool. Reference:
// kernels/cpu_matmul/reference.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu_ffi_common.h"
#include "few_rows.h"

namespace ffi = xla::ffi;

namespace {

using gemma4_cpu::parallel_for;
using gemma4_cpu::put;
using gemma4_cpu::to_f32;

#if defined(__AVX512F__)
using gemma4_cpu::load16;
using gemma4_cpu::exp16_in_range;
using gemma4_cpu::first_bits16;
using gemma4_cpu::round_bf16;
using gemma4_cpu::gated_bf16;
using gemma4_cpu::widen_bf16;
#endif
using gemma4_cpu::few_row_columns;
using gemma4_cpu::kTaskColumns;

#if defined(__AVX512F__)
// Many-row products (the decode steps of large batches, prefill chunks, the LM head over a batch): the weights of a
// panel of 64 output columns are packed once per task, 16 columns per vector in order (bfloat16: as pairs, element
// (k, k + 1) of each column side by side in 32 bits; float32: as they are), K * 128 or K * 256 bytes, L2-resident;
// every block of 6 activation rows then runs all of K with its 6 x 4 accumulators in registers, one vdpbf16ps per
// accumulator and pair of K (bfloat16) or one FMA per accumulator and K (float32). XLA's YNNPACK GEMM runs these
// shapes at 310-650 GFLOP/s in bfloat16 and ~300 in float32 on a machine whose rates are ~1,000 and ~490; this runs
// 600-900 and ~400 (docs/benchmarks.md). bfloat16: the products of bfloat16 numbers are exact in float32; the
// instruction adds each pair before accumulating (another order of the same sum) and treats denormals as zero.
constexpr int64_t kPanel = 64;
constexpr int kPanelVectors = 4;
constexpr int kPanelRows = 6;
// Steps of K (pairs in bfloat16) the packing prefetches ahead of its loads.
constexpr int64_t kPackAhead = 8;

// Steps along K of one accumulation: pairs of K for bfloat16, K for float32.
template <typename T>
constexpr int64_t k_steps(int64_t k_dim) {
  return std::is_same_v<T, uint16_t> ? k_dim / 2 : k_dim;
}

inline __mmask32 first_bits32(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : n <= 0 ? __mmask32{0} : static_cast<__mmask32>((uint64_t{1} << n) - 1);
}

// (K, N) weights, columns [n0, n0 + cols) -> packed[step * 4 + c] = columns n0 + 16c ... + 15 of that step (zeros
// past cols). bfloat16 (K even): the pairs (W[2kp, j], W[2kp + 1, j]); unpacklo/hi pair the two rows within 128-bit
// lanes (columns 8i..8i+3 and 8i+4..8i+7 of lane i), one permute per vector puts the columns back in order.
template <typename T>
void pack_kn(const T* w, int64_t k_dim, int64_t n_dim, int64_t n0, int64_t cols, __m512i* packed) {
  const int64_t steps = k_steps<T>(k_dim);
  constexpr int64_t rows_per_step = std::is_same_v<T, uint16_t> ? 2 : 1;
  for (int64_t st = 0; st < steps; ++st) {
    const T* a = w + rows_per_step * st * n_dim + n0;
    if (st + kPackAhead < steps) {  // a task's first panel was not prefetched: run ahead of the loads
      for (int64_t i = 0; i < rows_per_step; ++i) {
        const char* line = reinterpret_cast<const char*>(a + (rows_per_step * kPackAhead + i) * n_dim);
        for (int l = 0; l < 4 / rows_per_step; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T0);
      }
    }
    if constexpr (std::is_same_v<T, uint16_t>) {
#if defined(__AVX512BF16__)
      const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      for (int h = 0; h < 2; ++h) {  // 32 columns at a time
        const __mmask32 keep = first_bits32(cols - 32 * h);
        const __m512i ra = _mm512_maskz_loadu_epi16(keep, a + 32 * h);
        const __m512i rb = _mm512_maskz_loadu_epi16(keep, a + n_dim + 32 * h);
        const __m512i lo = _mm512_unpacklo_epi16(ra, rb), hi = _mm512_unpackhi_epi16(ra, rb);
        packed[st * kPanelVectors + 2 * h] = _mm512_permutex2var_epi32(lo, first, hi);
        packed[st * kPanelVectors + 2 * h + 1] = _mm512_permutex2var_epi32(lo, second, hi);
      }
#endif
    } else {
      for (int c = 0; c < kPanelVectors; ++c) {
        packed[st * kPanelVectors + c] =
            _mm512_castps_si512(_mm512_maskz_loadu_ps(first_bits16(cols - 16 * c), a + 16 * c));
      }
    }
  }
}

// 16 x 16 32-bit transpose in registers: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // u[4q + e] holds, in 128-bit block b, element 4b + e of rows 4q .. 4q + 3.
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xdd);
    r[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

// (N, K) weights (the tied LM head), rows [n0, n0 + cols) as the output columns -> the same packing as pack_kn:
// each weight row's steps (bfloat16 pairs, float32 values) are 32 bits side by side, so 16 x 16 blocks of them are
// transposed.
template <typename T>
void pack_nk(const T* w, int64_t k_dim, int64_t n0, int64_t cols, __m512i* packed) {
  const int64_t steps = k_steps<T>(k_dim);
  const int32_t* rows = reinterpret_cast<const int32_t*>(w);  // rows[n * steps + st]
  for (int c = 0; c < kPanelVectors; ++c) {
    for (int64_t st0 = 0; st0 < steps; st0 += 16) {
      const int64_t span = std::min<int64_t>(16, steps - st0);
      const __mmask16 keep = first_bits16(span);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = 16 * c + i;
        r[i] = n < cols ? _mm512_maskz_loadu_epi32(keep, rows + (n0 + n) * steps + st0) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int64_t j = 0; j < span; ++j) packed[(st0 + j) * kPanelVectors + c] = r[j];
    }
  }
}

// Cache lines of the panel a task packs next, prefetched a share at a time while the current panel computes (a
// prefetch past the weights does not fault): step st of K takes `rows` pieces of `lines` lines, piece i of step st
// at base + (st * rows + i) * stride; a block prefetches steps [begin, begin + count).
struct Prefetch {
  const char* base = nullptr;
  int64_t stride = 0;
  int rows = 1, lines = 4;
  int64_t begin = 0, count = 0;
};

// tanh in 16 lanes for the LM head's logit soft-cap, cap * tanh(logit / cap): Cephes' tanhf (an odd polynomial
// below 0.625, 1 - 2 / (e^2|x| + 1) above), within a few ulp of XLA's own approximation, and like
// it exactly +-1 from |x| ~= 7.99881 on (the true tanh rounds to 1 from ~9.01), so that saturated logits tie as
// they do there. NaN stays NaN, +-inf gives +-1.
inline __m512 tanh16(__m512 x) {
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
  const __m512 a = _mm512_andnot_ps(sign, x);
  const __m512 one = _mm512_set1_ps(1.f);
  // e^t, t = 2|x| (kept below float32's overflow; tanh is 1 long before)
  const __m512 t = _mm512_mul_ps(_mm512_set1_ps(2.f), _mm512_min_ps(a, _mm512_set1_ps(44.f)));
  const __m512 e = exp16_in_range(t);
  const __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  const __m512 z = _mm512_mul_ps(a, a);
  __m512 q = _mm512_set1_ps(-5.70498872745e-3f);
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(2.06390887954e-2f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(-5.37397155531e-2f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(1.33314422036e-1f));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(q, z), a, a);
  __m512 m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ), big, small);
  m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(7.9988117f), _CMP_GE_OQ), m, one);
  const __m512 signed_m = _mm512_or_ps(m, _mm512_and_ps(sign, x));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), signed_m, x);
}

// Where a packed product writes: y in the operands' dtype, or float32 y holding, for bfloat16, the rounded values
// widened (what the model's `logits.astype(float32)` sees), soft-capped when cap > 0 (the LM head: tanh(y / cap) *
// cap); or, given a gate (M, N) in the operands' dtype, gelu_tanh(gate) * y (the MLP's up projection).
struct Out {
  uint16_t* bf16 = nullptr;
  float* f32 = nullptr;
  float cap = 0.f;
  bool round = false;  // float32 y of bfloat16 operands
  const uint16_t* gate = nullptr;   // bfloat16 (M, N)
  const uint16_t* table = nullptr;  // the activation of every bfloat16 value, by bits (65536 + 1 entries)
};

inline void store_out(const Out& out, int64_t offset, __mmask16 keep, __m512 acc) {
  if (out.gate != nullptr) {
    const __m256i gate = _mm256_maskz_loadu_epi16(keep, out.gate + offset);
    const __m512 up = widen_bf16(round_bf16(acc));  // the up projection as XLA would have stored it
    _mm256_mask_storeu_epi16(out.bf16 + offset, keep, round_bf16(gated_bf16(out.table, gate, up)));
    return;
  }
  if (out.bf16 != nullptr) {
    _mm256_mask_storeu_epi16(out.bf16 + offset, keep, round_bf16(acc));
    return;
  }
  __m512 v = acc;
  if (out.round) v = widen_bf16(round_bf16(acc));
  if (out.cap > 0.f) {
    const __m512 cap = _mm512_set1_ps(out.cap);
    v = _mm512_mul_ps(tanh16(_mm512_div_ps(v, cap)), cap);
  }
  _mm512_mask_storeu_ps(out.f32 + offset, keep, v);
}

// Rows [m0, m0 + R) of y, columns [n0, n0 + cols) from a packed panel.
template <int R, typename T>
void panel_rows(const T* x, int64_t k_dim, const __m512i* packed, int64_t m0, const Out& y, int64_t n_dim,
                int64_t n0, int64_t cols, const Prefetch& pre) {
  __m512 acc[R][kPanelVectors];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kPanelVectors; ++c) acc[r][c] = _mm512_setzero_ps();
  const T* xr = x + m0 * k_dim;
  const int64_t steps = k_steps<T>(k_dim);
  if (y.gate != nullptr) {
    // The epilogue's gate tile, fetched while the block computes: a gather whose indices wait on a load from
    // memory stalls the core (prefill-sized products, whose gates are megabytes, ran ~1.7x the plain product).
    for (int r = 0; r < R; ++r) {
      const char* line = reinterpret_cast<const char*>(y.gate + (m0 + r) * n_dim + n0);
      for (int64_t l = 0; l < cols * 2; l += 64) _mm_prefetch(line + l, _MM_HINT_T0);
    }
  }
  for (int64_t st = 0; st < steps; ++st) {
    __m512i wv[kPanelVectors];
    for (int c = 0; c < kPanelVectors; ++c) wv[c] = _mm512_load_si512(packed + st * kPanelVectors + c);
    if (st < pre.count) {
      for (int i = 0; i < pre.rows; ++i) {
        const char* line = pre.base + ((pre.begin + st) * pre.rows + i) * pre.stride;
        for (int l = 0; l < pre.lines; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T0);
      }
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (std::is_same_v<T, uint16_t>) {
#if defined(__AVX512BF16__)
        int32_t pair;
        std::memcpy(&pair, xr + r * k_dim + 2 * st, sizeof pair);
        const __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
        for (int c = 0; c < kPanelVectors; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)wv[c], xp);
#endif
      } else {
        const __m512 xb = _mm512_set1_ps(xr[r * k_dim + st]);
        for (int c = 0; c < kPanelVectors; ++c) acc[r][c] = _mm512_fmadd_ps(xb, _mm512_castsi512_ps(wv[c]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < kPanelVectors; ++c) {
      if (cols <= 16 * c) break;
      store_out(y, (m0 + r) * n_dim + n0 + 16 * c, first_bits16(cols - 16 * c), acc[r][c]);
    }
  }
}

template <typename T>
void panel_rows_any(int64_t rows, const T* x, int64_t k_dim, const __m512i* packed, int64_t m0, const Out& y,
                    int64_t n_dim, int64_t n0, int64_t cols, const Prefetch& pre) {
  switch (rows) {
    case 6: return panel_rows<6>(x, k_dim, packed, m0, y, n_dim, n0, cols, pre);
    case 5: return panel_rows<5>(x, k_dim, packed, m0, y, n_dim, n0, cols, pre);
    case 4: return panel_rows<4>(x, k_dim, packed, m0, y, n_dim, n0, cols, pre);
    case 3: return panel_rows<3>(x, k_dim, packed, m0, y, n_dim, n0, cols, pre);
    case 2: return panel_rows<2>(x, k_dim, packed, m0, y, n_dim, n0, cols, pre);
    default: return panel_rows<1>(x, k_dim, packed, m0, y, n_dim, n0, cols, pre);
  }
}

// Rows per task: enough that packing is paid back many times (a task packs each of its panels once for all its
// rows), few enough that the task's rows of x stay in L2 across its panels (~512 KB) and that a prefill chunk
// still splits into several tasks per run of panels. 96 rows everywhere left a 2048-row product at ~450-510
// GFLOP/s where 384 rows reach ~560 (K = 512, bfloat16).
constexpr int64_t kTaskBytes = 512 * 1024;
inline int64_t task_rows(int64_t row_bytes) {
  return kPanelRows * std::clamp<int64_t>(kTaskBytes / (kPanelRows * std::max<int64_t>(row_bytes, 1)), 16, 64);
}

// y (M, N) = x (M, K) @ W, W (K, N) or, transposed, (N, K); bfloat16: K even.
template <typename T>
void gemm_packed(ffi::ThreadPool& pool, const T* x, int64_t m_dim, int64_t k_dim, const T* w, int64_t n_dim,
                 bool transposed, Out y) {
  const int64_t task_m = task_rows(k_dim * static_cast<int64_t>(sizeof(T)));
  const int64_t panels = (n_dim + kPanel - 1) / kPanel, chunks = (m_dim + task_m - 1) / task_m;
  // A task owns a run of up to 4 panels, so that it knows which panel comes next and can prefetch it, while
  // leaving at least two tasks per thread; products with hundreds of panels (the LM head) take runs of up to 16,
  // each run's first panel being packed from memory without a prefetch (the head's cold (N, K) weight: 7.6-8.1
  // -> 6.4-6.7 ms at 64 rows; runs of 16 everywhere left too few tasks per thread for the layers' products).
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t per_task = std::max(std::clamp<int64_t>(panels * chunks / (2 * threads), 1, 4),
                                    std::min<int64_t>(16, panels / (16 * threads)));
  const int64_t runs = (panels + per_task - 1) / per_task;
  const int64_t steps = k_steps<T>(k_dim);
  constexpr int kn_rows = std::is_same_v<T, uint16_t> ? 2 : 1;  // weight rows per step of a (K, N) weight
  parallel_for(pool, runs * chunks, [=](int64_t task) {
    thread_local std::vector<__m512i> buffer;
    if (static_cast<int64_t>(buffer.size()) < steps * kPanelVectors) buffer.resize(steps * kPanelVectors);
    const int64_t p_begin = task / chunks * per_task, p_end = std::min(panels, p_begin + per_task);
    const int64_t m_begin = task % chunks * task_m, m_end = std::min(m_dim, m_begin + task_m);
    const int64_t blocks = (m_end - m_begin + kPanelRows - 1) / kPanelRows;
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, n_dim - n0);
      if (transposed) {
        pack_nk(w, k_dim, n0, cols, buffer.data());
      } else {
        pack_kn(w, k_dim, n_dim, n0, cols, buffer.data());
      }
      // The next panel, 256 bytes per step of K: its columns' run of each weight row, or a slice of its contiguous
      // (64, K) block of the transposed weight; a share of the steps in each row block.
      Prefetch pre;
      int64_t share = 0;
      if (p + 1 < p_end) {
        pre.base = reinterpret_cast<const char*>(transposed ? w + (n0 + kPanel) * k_dim : w + n0 + kPanel);
        pre.stride = transposed ? 256 : n_dim * static_cast<int64_t>(sizeof(T));
        pre.rows = transposed ? 1 : kn_rows;
        pre.lines = 4 / pre.rows;
        share = (steps + blocks - 1) / blocks;
      }
      for (int64_t m = m_begin; m < m_end; m += kPanelRows) {
        pre.count = std::clamp<int64_t>(steps - pre.begin, 0, share);
        panel_rows_any(std::min<int64_t>(kPanelRows, m_end - m), x, k_dim, buffer.data(), m, y, n_dim, n0, cols,
                       pre);
        pre.begin += pre.count;
      }
    }
  });
}
#endif

// Above this many rows, products take the packed panels (gemm_packed; both layouts; bfloat16 with an even K and
// AVX512-BF16, float32 with AVX-512): at 5-8 rows they stream as fast as the blocks above, and the (N, K) blocks
// lose to XLA there.
constexpr int64_t kManyRows = 4;

template <typename T>
bool takes_packed(int64_t m_dim, int64_t k_dim) {
  if (m_dim <= kManyRows) return false;
  if constexpr (std::is_same_v<T, uint16_t>) {
#if defined(__AVX512BF16__)
    return k_dim % 2 == 0;
#else
    return false;
#endif
  } else {
#if defined(__AVX512F__)
    return true;
#else
    return false;
#endif
  }
}

template <typename T>
void matmul(ffi::ThreadPool& pool, const T* x, int64_t m_dim, int64_t k_dim, const T* w, int64_t n_dim,
            bool transposed, T* y) {
  if (takes_packed<T>(m_dim, k_dim)) {
#if defined(__AVX512F__)
    Out out;
    if constexpr (std::is_same_v<T, uint16_t>) {
      out.bf16 = y;
    } else {
      out.f32 = y;
    }
    return gemm_packed(pool, x, m_dim, k_dim, w, n_dim, transposed, out);
#endif
  }
  const std::vector<float> xf = gemma4_cpu::widened(x, m_dim * k_dim);
  const float* xs = xf.data();
  parallel_for(pool, (n_dim + kTaskColumns - 1) / kTaskColumns, [=](int64_t task) {
    const int64_t n0 = task * kTaskColumns;
    few_row_columns(x, xs, m_dim, k_dim, w, n_dim, transposed, n0, std::min(n_dim, n0 + kTaskColumns), y);
  });
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, int64_t transposed, float softcap,
                  ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) return ffi::Error::InvalidArgument("operands must be 2-D");
  const int64_t m_dim = xd[0], k_dim = xd[1];
  const int64_t n_dim = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != k_dim || yd[0] != m_dim || yd[1] != n_dim) {
    return ffi::Error::InvalidArgument("x (M, K), W (K, N) or (N, K) and y (M, N) do not fit");
  }
  const auto t = x.element_type();
  if (w.element_type() != t) return ffi::Error::InvalidArgument("x and W must share one dtype");
  if (y->element_type() != t || softcap != 0.f) {
    // A float32 y of bfloat16 operands and the soft-cap: the packed panels' epilogue only.
#if defined(__AVX512F__)  // (without it there are no packed panels: refused below)
    if (softcap >= 0.f && y->element_type() == ffi::DataType::F32) {
      Out out{nullptr, static_cast<float*>(y->untyped_data()), softcap, t == ffi::DataType::BF16};
      if (t == ffi::DataType::BF16 && takes_packed<uint16_t>(m_dim, k_dim)) {
        gemm_packed(pool, static_cast<const uint16_t*>(x.untyped_data()), m_dim, k_dim,
                    static_cast<const uint16_t*>(w.untyped_data()), n_dim, transposed != 0, out);
        return ffi::Error::Success();
      }
      if (t == ffi::DataType::F32 && takes_packed<float>(m_dim, k_dim)) {
        gemm_packed(pool, static_cast<const float*>(x.untyped_data()), m_dim, k_dim,
                    static_cast<const float*>(w.untyped_data()), n_dim, transposed != 0, out);
        return ffi::Error::Success();
      }
    }
#endif
    return ffi::Error::InvalidArgument(
        "a float32 result of bfloat16 operands or a soft-cap needs more than 4 rows (bfloat16: an even K and "
        "AVX512-BF16; float32: AVX-512) and a float32 y");
  }
  if (t == ffi::DataType::F32) {
    matmul(pool, static_cast<const float*>(x.untyped_data()), m_dim, k_dim,
           static_cast<const float*>(w.untyped_data()), n_dim, transposed != 0, static_cast<float*>(y->untyped_data()));
  } else if (t == ffi::DataType::BF16) {
    matmul(pool, static_cast<const uint16_t*>(x.untyped_data()), m_dim, k_dim,
           static_cast<const uint16_t*>(w.untyped_data()), n_dim, transposed != 0,
           static_cast<uint16_t*>(y->untyped_data()));
  } else {
    return ffi::Error::InvalidArgument("x, W and y must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

// act(gate) * (x @ W) in bfloat16: the MLP's up projection with its gate's activation in the epilogue, act given
// as the table of its value at every bfloat16 (65537 entries, the last a pad); packed panels only (more than 4
// rows, an even K, AVX512-BF16).
ffi::Error MatmulGated(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer gate,
                       ffi::AnyBuffer table, int64_t transposed, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), gd = gate.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || gd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("operands must be 2-D");
  }
  const int64_t m_dim = xd[0], k_dim = xd[1];
  const int64_t n_dim = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != k_dim || yd[0] != m_dim || yd[1] != n_dim || gd[0] != m_dim || gd[1] != n_dim) {
    return ffi::Error::InvalidArgument("x (M, K), W (K, N) or (N, K), gate and y (M, N) do not fit");
  }
  if (table.dimensions().size() != 1 || table.dimensions()[0] != 65537 ||
      (table.element_type() != ffi::DataType::U16 && table.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("the activation table must be (65537,) 16-bit");
  }
  const auto t = x.element_type();
  if (t != ffi::DataType::BF16 || w.element_type() != t || gate.element_type() != t || y->element_type() != t) {
    return ffi::Error::InvalidArgument("x, W, gate and y must be bfloat16");
  }
#if defined(__AVX512F__)
  if (takes_packed<uint16_t>(m_dim, k_dim)) {
    Out out;
    out.bf16 = static_cast<uint16_t*>(y->untyped_data());
    out.gate = static_cast<const uint16_t*>(gate.untyped_data());
    out.table = static_cast<const uint16_t*>(table.untyped_data());
    gemm_packed(pool, static_cast<const uint16_t*>(x.untyped_data()), m_dim, k_dim,
                static_cast<const uint16_t*>(w.untyped_data()), n_dim, transposed != 0, out);
    return ffi::Error::Success();
  }
#endif
  return ffi::Error::InvalidArgument("a gated product needs more than 4 rows, an even K and AVX512-BF16");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma4CpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K)
                                  .Arg<ffi::AnyBuffer>()  // W (K, N) or (N, K)
                                  .Attr<int64_t>("transposed")
                                  .Attr<float>("softcap")  // 0: none
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma4CpuMatmulGated, MatmulGated,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K)
                                  .Arg<ffi::AnyBuffer>()  // W (K, N) or (N, K)
                                  .Arg<ffi::AnyBuffer>()  // gate (M, N)
                                  .Arg<ffi::AnyBuffer>()  // the activation's table (65537,)
                                  .Attr<int64_t>("transposed")
                                  .Ret<ffi::AnyBuffer>());
