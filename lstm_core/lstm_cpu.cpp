// The LSTM recurrence for CPUs in fp32, built on first use by lstm_core/fused.py.
//
// torch's CPU LSTM (oneDNN) spreads each time step's small GEMM over all threads, which synchronises the
// threads T times per layer. Here the batch is split across threads once: each thread runs every step
// of its own rows (one small GEMM and one fused gate loop per step) without waiting for the others. The
// large GEMMs (input projection, weight gradients) stay in fused.py, one call for all time steps.
//
// Layouts are time-major: gates (T, B, 4H) in torch's i, f, g, o order; hs, cs (T + 1, B, H) with the
// zero initial state in row 0; tcs (T, B, H) = tanh(cs[1:]), kept for the backward pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace {

// exp as 2^round(t) * 2^f, f in [-1/2, 1/2], by a degree-6 polynomial (relative error ~2e-7): plain
// arithmetic the compiler turns into vector instructions, where a call to expf would not be.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 87.f);
  const float t = x * 1.44269504088896341f;
  const float r = std::nearbyint(t);
  const float f = t - r;
  const float p = 1.f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f + f * (0.00961812911f +
                  f * (0.00133335581f + f * 0.000154035304f)))));
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(r) * (1 << 23);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline float sigmoid(float x) { return 1.f / (1.f + fast_exp(-x)); }
inline float tanh_(float x) { return 2.f / (1.f + fast_exp(-2.f * x)) - 1.f; }

// One step for n rows. gates: the input projection x W_ih^T, replaced by the activated gates; rec: the
// recurrent part h W_hh^T; bias: b_ih + b_hh. Writes the new cell state, its tanh, and the hidden state.
void cell_forward(float* __restrict gates, const float* __restrict rec, const float* __restrict bias,
                  const float* __restrict c_prev, float* __restrict c, float* __restrict tc,
                  float* __restrict h, int64_t n, int64_t H) {
  for (int64_t b = 0; b < n; ++b) {
    float* __restrict g4 = gates + b * 4 * H;
    const float* __restrict r4 = rec + b * 4 * H;
    const int64_t k0 = b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid(g4[j] + r4[j] + bias[j]);
      const float f = sigmoid(g4[H + j] + r4[H + j] + bias[H + j]);
      const float g = tanh_(g4[2 * H + j] + r4[2 * H + j] + bias[2 * H + j]);
      const float o = sigmoid(g4[3 * H + j] + r4[3 * H + j] + bias[3 * H + j]);
      const float cell = f * c_prev[k0 + j] + i * g;
      const float t = tanh_(cell);
      g4[j] = i; g4[H + j] = f; g4[2 * H + j] = g; g4[3 * H + j] = o;
      c[k0 + j] = cell;
      tc[k0 + j] = t;
      h[k0 + j] = o * t;
    }
  }
}

// One step back for n rows: the gates' gradients before activation into d_gates (and summed into
// d_bias). dh holds the gradient reaching h from the next step; dh_out, dc_out (either may be null) the
// gradients from outside the recurrence; dc is the running gradient of the cell state.
template <bool kDhOut, bool kDcOut>
void cell_backward(const float* __restrict act, const float* __restrict tc, const float* __restrict c_prev,
                   const float* __restrict dh_out, const float* __restrict dc_out, const float* __restrict dh,
                   float* __restrict dc, float* __restrict d_gates, float* __restrict d_bias, int64_t n,
                   int64_t H) {
  for (int64_t b = 0; b < n; ++b) {
    const float* __restrict a = act + b * 4 * H;
    float* __restrict d = d_gates + b * 4 * H;
    const int64_t k0 = b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const int64_t k = k0 + j;
      const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j], t = tc[k];
      const float dht = (kDhOut ? dh_out[k] : 0.f) + dh[k];
      const float dct = (kDcOut ? dc_out[k] : 0.f) + dc[k] + dht * o * (1.f - t * t);
      const float di = dct * g * i * (1.f - i), df = dct * c_prev[k] * f * (1.f - f);
      const float dg = dct * i * (1.f - g * g), d_o = dht * t * o * (1.f - o);
      d[j] = di; d[H + j] = df; d[2 * H + j] = dg; d[3 * H + j] = d_o;
      d_bias[j] += di; d_bias[H + j] += df; d_bias[2 * H + j] += dg; d_bias[3 * H + j] += d_o;
      dc[k] = dct * f;
    }
  }
}

// In a worker thread: the caller's inference mode (tensors made under it may be updated in place only
// under it), without grad mode (the recurrence's own ops are not recorded).
class WorkerMode {
 public:
  explicit WorkerMode(bool inference) : previous_(c10::AutogradState::get_tls_state()) {
    c10::AutogradState::set_tls_state(c10::AutogradState(false, inference, false, false));
  }
  ~WorkerMode() { c10::AutogradState::set_tls_state(previous_); }

 private:
  c10::AutogradState previous_;
};

// Rows per thread: the batch in as many equal parts as there are threads.
int64_t rows_per_thread(int64_t batch) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, (batch + threads - 1) / threads);
}

const float* rows_or_null(const torch::Tensor& t, int64_t step, int64_t offset) {
  return t.defined() ? t[step].data_ptr<float>() + offset : nullptr;
}

}  // namespace

// gates (T, B, 4H): x W_ih^T, overwritten with the activated gates (kept for backward); bias (4H).
// Returns hs, cs (T + 1, B, H) and tcs (T, B, H).
std::vector<torch::Tensor> lstm_forward(torch::Tensor gates, torch::Tensor w_hh, torch::Tensor bias) {
  TORCH_CHECK(gates.dim() == 3 && gates.is_contiguous() && gates.scalar_type() == at::kFloat);
  const int64_t T = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  auto hs = torch::empty({T + 1, B, H}, gates.options());
  auto cs = torch::empty({T + 1, B, H}, gates.options());
  auto tcs = torch::empty({T, B, H}, gates.options());
  hs[0].zero_();
  cs[0].zero_();
  const auto w_t = w_hh.t().contiguous();  // (H, 4H)
  const auto b = bias.contiguous();
  const int64_t rows = rows_per_thread(B);
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, B, rows, [&](int64_t b0, int64_t b1) {
    WorkerMode mode(inference);
    const int64_t n = b1 - b0, o = b0 * H;
    auto rec = torch::empty({n, 4 * H}, gates.options());  // h[t] W_hh^T for these rows
    for (int64_t t = 0; t < T; ++t) {
      at::mm_out(rec, hs[t].narrow(0, b0, n), w_t);
      cell_forward(gates[t].data_ptr<float>() + b0 * 4 * H, rec.data_ptr<float>(), b.data_ptr<float>(),
                   cs[t].data_ptr<float>() + o, cs[t + 1].data_ptr<float>() + o, tcs[t].data_ptr<float>() + o,
                   hs[t + 1].data_ptr<float>() + o, n, H);
    }
  });
  return {hs, cs, tcs};
}

// dhs, dcs (T, B, H) or None: the loss's gradients with respect to hs[1:] and cs[1:]; dh_last (B, H) or
// None: with respect to the final hidden state. Returns d_gates (T, B, 4H) before activation, d_bias (4H).
std::vector<torch::Tensor> lstm_backward(std::optional<torch::Tensor> dhs_or_none,
                                         std::optional<torch::Tensor> dcs_or_none,
                                         std::optional<torch::Tensor> dh_last, torch::Tensor gates,
                                         torch::Tensor cs, torch::Tensor tcs, torch::Tensor w_hh) {
  const auto dhs = dhs_or_none.value_or(torch::Tensor()), dcs = dcs_or_none.value_or(torch::Tensor());
  TORCH_CHECK((!dhs.defined() || dhs.is_contiguous()) && (!dcs.defined() || dcs.is_contiguous()));
  const int64_t T = gates.size(0), B = gates.size(1), H = w_hh.size(1);
  auto d_gates = torch::empty_like(gates);
  auto dh = dh_last.has_value() ? dh_last->contiguous().clone() : torch::zeros({B, H}, gates.options());
  auto dc = torch::zeros({B, H}, gates.options());
  const auto w = w_hh.contiguous();
  const int64_t rows = rows_per_thread(B);
  auto d_bias = torch::zeros({(B + rows - 1) / rows, 4 * H}, gates.options());  // a row per thread
  const bool inference = c10::InferenceMode::is_enabled();
  const auto step = dhs.defined() ? (dcs.defined() ? cell_backward<true, true> : cell_backward<true, false>)
                                  : (dcs.defined() ? cell_backward<false, true> : cell_backward<false, false>);
  at::parallel_for(0, B, rows, [&](int64_t b0, int64_t b1) {
    WorkerMode mode(inference);
    const int64_t n = b1 - b0, o = b0 * H;
    auto dh_rows = dh.narrow(0, b0, n);
    float* bias_part = d_bias[b0 / rows].data_ptr<float>();
    for (int64_t t = T - 1; t >= 0; --t) {
      auto dg = d_gates[t].narrow(0, b0, n);
      step(gates[t].data_ptr<float>() + b0 * 4 * H, tcs[t].data_ptr<float>() + o, cs[t].data_ptr<float>() + o,
           rows_or_null(dhs, t, o), rows_or_null(dcs, t, o), dh_rows.data_ptr<float>(), dc.data_ptr<float>() + o,
           dg.data_ptr<float>(), bias_part, n, H);
      if (t > 0) at::mm_out(dh_rows, dg, w);  // (n, 4H) @ (4H, H): the gradient reaching h[t - 1]
    }
  });
  return {d_gates, d_bias.sum(0)};
}

// Dropout's mask for `numel` values: 0 with probability p, else 1 / (1 - p). A counter-based hash of
// (seed, index) gives the uniform numbers, vectorised; torch's bernoulli_ draws them one by one and took
// a tenth of a training step for the tutorial model.
namespace {

void fill_mask(float* __restrict m, int64_t begin, int64_t end, uint32_t key, uint32_t threshold, float keep) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    uint32_t x = static_cast<uint32_t>(i) * 0x9e3779b9u + key;  // the "lowbias32" integer hash
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    m[i] = x >= threshold ? keep : 0.f;
  }
}

}  // namespace

torch::Tensor dropout_mask(int64_t numel, double p, int64_t seed) {
  auto mask = torch::empty({numel}, torch::kFloat);
  float* m = mask.data_ptr<float>();
  const uint32_t key = static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(seed >> 32) * 0x9e3779b9u;
  const uint32_t threshold = static_cast<uint32_t>(std::min(p, 1.0) * 4294967295.0);
  const float keep = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f;
  at::parallel_for(0, numel, 1 << 16, [&](int64_t begin, int64_t end) {
    fill_mask(m, begin, end, key, threshold, keep);
  });
  return mask;
}

// Flush denormal floats to zero (FTZ and DAZ) on every thread of torch's pool, as TensorFlow does by
// default. A long sequence's vanishing gradients are denormal, and x86 computes on those ~100x slower:
// the pixel model's backward pass took 30x longer than its forward pass.
bool flush_denormals() {
#if defined(__x86_64__) || defined(_M_X64)
  at::parallel_for(0, at::get_num_threads(), 1, [](int64_t, int64_t) { _mm_setcsr(_mm_getcsr() | 0x8040); });
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lstm_forward, "LSTM layer forward, CPU fp32");
  m.def("backward", &lstm_backward, "LSTM layer backward, CPU fp32");
  m.def("dropout_mask", &dropout_mask, "dropout mask, CPU fp32");
  m.def("flush_denormals", &flush_denormals, "FTZ and DAZ on all of torch's CPU threads");
}
