// Few-row products of several weights that share one input, as one XLA FFI custom call each: a layer's q/k/v
// projections, its MLP's gate and up projections. A batch-1 decode step on CPU is its weight products one after
// another, each a parallel region that ends in a barrier, and its narrow products (K and V: 128-256 columns) ran
// as one task on one of the two threads. Here the products' columns are cut into one list of 256-column tasks, so
// that a layer's projections are one region, the threads taking the next task of whichever product is left.
//
// gemma4_cpu_matmul_multi: x (M, K), W_i (K, N_i) -> y_i (M, N_i), each y_i bit for bit what gemma4_cpu_matmul
// returns for (x, W_i) (the same blocks per column, few_rows.h).
// gemma4_cpu_matmul_gate_up: x (M, K), W_gate and W_up (K, N), bfloat16, and the activation's table -> y (M, N) =
// act(x @ W_gate) * (x @ W_up), each product rounded to bfloat16 first and act looked up in the table of its value
// at every bfloat16 that XLA computed (kernel.py): the bits of the MLP's separate products and elementwise graph.
// M <= 4 (the few-row regime: kernel.py MANY_ROWS), W in the model's (in, out) layout. Tasks run on XLA's intra-op
// thread pool. Reference: kernels/cpu_matmul/reference.py.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../cpu_ffi_common.h"
#include "few_rows.h"

namespace ffi = xla::ffi;

namespace {

using gemma4_cpu::few_row_columns;
using gemma4_cpu::kTaskColumns;
using gemma4_cpu::parallel_for;
using gemma4_cpu::to_f32;
using gemma4_cpu::widened;

constexpr int64_t kMaxRows = 4;

struct Product {
  const void* w;
  int64_t n;
  void* y;
};

// y_i = x @ W_i for every product, in one parallel region over all their column tasks.
template <typename T>
void multi(ffi::ThreadPool& pool, const T* x, int64_t m_dim, int64_t k_dim, const std::vector<Product>& products) {
  const int64_t width = kTaskColumns;
  // (product, first column) of every task, the products in order.
  std::vector<std::pair<int, int64_t>> tasks;
  for (size_t i = 0; i < products.size(); ++i)
    for (int64_t n0 = 0; n0 < products[i].n; n0 += width) tasks.emplace_back(static_cast<int>(i), n0);
  const std::vector<float> xf = widened(x, m_dim * k_dim);
  const float* xs = xf.data();
  const Product* parts = products.data();
  const std::pair<int, int64_t>* list = tasks.data();
  parallel_for(pool, static_cast<int64_t>(tasks.size()), [=](int64_t task) {
    const Product& p = parts[list[task].first];
    const int64_t n0 = list[task].second;
    few_row_columns(x, xs, m_dim, k_dim, static_cast<const T*>(p.w), p.n, false, n0, std::min(p.n, n0 + width),
                    static_cast<T*>(p.y));
  });
}

// Columns [n0, n1) of y = act(gate) * up, both (M, N) bfloat16 and already rounded: act(gate) looked up in the
// table, times up, rounded once more (the MLP's elementwise graph in bfloat16).
void gate_columns(const uint16_t* table, const uint16_t* gate, int64_t m_dim, int64_t n_dim, int64_t n0, int64_t n1,
                  uint16_t* y) {
  for (int64_t m = 0; m < m_dim; ++m) {
    int64_t n = n0;
#if defined(__AVX512F__)
    for (; n < n1; n += 16) {
      const __mmask16 keep = gemma4_cpu::first_bits16(n1 - n);
      const int64_t at = m * n_dim + n;
      const __m256i g = _mm256_maskz_loadu_epi16(keep, gate + at);
      const __m512 up = gemma4_cpu::widen_bf16(_mm256_maskz_loadu_epi16(keep, y + at));
      _mm256_mask_storeu_epi16(y + at, keep, gemma4_cpu::round_bf16(gemma4_cpu::gated_bf16(table, g, up)));
    }
#endif
    for (; n < n1; ++n) {
      const int64_t at = m * n_dim + n;
      y[at] = gemma4_cpu::f32_to_bf16(to_f32(table[gate[at]]) * to_f32(y[at]));
    }
  }
}

ffi::Error MatmulMulti(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs ws, ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be (M, K)");
  const int64_t m_dim = xd[0], k_dim = xd[1];
  if (m_dim < 1 || m_dim > kMaxRows) return ffi::Error::InvalidArgument("x must have 1 to 4 rows");
  if (ws.size() == 0 || ws.size() != ys.size()) {
    return ffi::Error::InvalidArgument("one result for each weight, at least one weight");
  }
  const auto t = x.element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("x and the weights must be float32 or bfloat16");
  }
  std::vector<Product> products;
  for (size_t i = 0; i < ws.size(); ++i) {
    auto w = ws.get<ffi::AnyBuffer>(i);
    auto y = ys.get<ffi::AnyBuffer>(i);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("weights and results must be buffers");
    const auto wd = w->dimensions(), yd = (*y)->dimensions();
    if (wd.size() != 2 || yd.size() != 2 || wd[0] != k_dim || yd[0] != m_dim || yd[1] != wd[1]) {
      return ffi::Error::InvalidArgument("x (M, K), each W (K, N) and its y (M, N) do not fit");
    }
    if (w->element_type() != t || (*y)->element_type() != t) {
      return ffi::Error::InvalidArgument("x, the weights and the results must share one dtype");
    }
    products.push_back({w->untyped_data(), wd[1], (*y)->untyped_data()});
  }
  if (t == ffi::DataType::F32) {
    multi(pool, static_cast<const float*>(x.untyped_data()), m_dim, k_dim, products);
  } else {
    multi(pool, static_cast<const uint16_t*>(x.untyped_data()), m_dim, k_dim, products);
  }
  return ffi::Error::Success();
}

ffi::Error MatmulGateUp(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w_gate, ffi::AnyBuffer w_up,
                        ffi::AnyBuffer table, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), gd = w_gate.dimensions(), ud = w_up.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || gd.size() != 2 || ud.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("operands must be 2-D");
  }
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = gd[1];
  if (m_dim < 1 || m_dim > kMaxRows) return ffi::Error::InvalidArgument("x must have 1 to 4 rows");
  if (gd[0] != k_dim || ud[0] != k_dim || ud[1] != n_dim || yd[0] != m_dim || yd[1] != n_dim) {
    return ffi::Error::InvalidArgument("x (M, K), W_gate and W_up (K, N) and y (M, N) do not fit");
  }
  if (table.dimensions().size() != 1 || table.dimensions()[0] != 65537 ||
      (table.element_type() != ffi::DataType::U16 && table.element_type() != ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("the activation table must be (65537,) 16-bit");
  }
  const auto t = ffi::DataType::BF16;
  if (x.element_type() != t || w_gate.element_type() != t || w_up.element_type() != t || y->element_type() != t) {
    return ffi::Error::InvalidArgument("x, the weights and y must be bfloat16");
  }
  const uint16_t* xb = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* wg = static_cast<const uint16_t*>(w_gate.untyped_data());
  const uint16_t* wu = static_cast<const uint16_t*>(w_up.untyped_data());
  const uint16_t* lut = static_cast<const uint16_t*>(table.untyped_data());
  uint16_t* out = static_cast<uint16_t*>(y->untyped_data());
  const int64_t width = kTaskColumns;
  std::vector<uint16_t> gate(m_dim * n_dim);  // the gate's product, column range by column range
  uint16_t* gs = gate.data();
  const std::vector<float> xf = widened(xb, m_dim * k_dim);
  const float* xs = xf.data();
  // A task owns the same columns of both products, so it combines them as soon as it has them.
  parallel_for(pool, (n_dim + width - 1) / width, [=](int64_t task) {
    const int64_t n0 = task * width, n1 = std::min(n_dim, n0 + width);
    few_row_columns(xb, xs, m_dim, k_dim, wg, n_dim, false, n0, n1, gs);
    few_row_columns(xb, xs, m_dim, k_dim, wu, n_dim, false, n0, n1, out);
    gate_columns(lut, gs, m_dim, n_dim, n0, n1, out);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma4CpuMatmulMulti, MatmulMulti,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K)
                                  .RemainingArgs()        // W_i (K, N_i)
                                  .RemainingRets());      // y_i (M, N_i)

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma4CpuMatmulGateUp, MatmulGateUp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K)
                                  .Arg<ffi::AnyBuffer>()  // W_gate (K, N)
                                  .Arg<ffi::AnyBuffer>()  // W_up (K, N)
                                  .Arg<ffi::AnyBuffer>()  // the activation's table (65537,)
                                  .Ret<ffi::AnyBuffer>());
