// The LSTM recurrence for CPUs in fp32, built on first use by lstm_core/fused.py.
//
// torch's CPU LSTM (oneDNN) spreads each time step's small GEMM over all threads, which synchronises the
// threads T times per layer. Here the batch is split across threads once: each thread takes its own rows
// through everything (every step with one small GEMM, [x_t, h_{t-1}] [W_ih; W_hh]^T, and one fused gate
// loop; both weight gradients in one GEMM) without waiting for the others.
//
// Layouts are batch-major, as batch_first: x (B, T, F), gates (B, T, 4H) in torch's i, f, g, o order,
// hs, cs (B, T, H), tcs = tanh(cs) and xh (B, T, F + H), the steps' GEMM inputs [x_t, h_{t-1}], kept for
// the backward pass. The initial state is zero.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
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

// One step for n rows. pre (n, 4H): the gates before activation, [x_t, h_{t-1}] [W_ih; W_hh]^T; bias:
// b_ih + b_hh. Writes the activated gates (row b at act + b * gstride), the new cell state and its tanh
// (row b at + b * cstride), the hidden state (row b at h + b * hstride), and the hidden state again into
// the next step's GEMM input (row b at h_next + b * kstride). c_prev is not read at the first step (the
// initial state is zero).
template <bool kFirst>
void cell_forward(const float* __restrict pre, const float* __restrict bias, float* __restrict act,
                  int64_t gstride, const float* __restrict c_prev, float* __restrict c, float* __restrict tc,
                  int64_t cstride, float* __restrict h, int64_t hstride, float* __restrict h_next,
                  int64_t kstride, int64_t n, int64_t H) {
  for (int64_t b = 0; b < n; ++b) {
    const float* __restrict p4 = pre + b * 4 * H;
    float* __restrict a4 = act + b * gstride;
    const float* __restrict cp = kFirst ? nullptr : c_prev + b * cstride;
    float* __restrict cb = c + b * cstride;
    float* __restrict tb = tc + b * cstride;
    float* __restrict hb = h + b * hstride;
    float* __restrict hn = h_next + b * kstride;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid(p4[j] + bias[j]);
      const float f = sigmoid(p4[H + j] + bias[H + j]);
      const float g = tanh_(p4[2 * H + j] + bias[2 * H + j]);
      const float o = sigmoid(p4[3 * H + j] + bias[3 * H + j]);
      const float cell = (kFirst ? 0.f : f * cp[j]) + i * g;
      const float t = tanh_(cell);
      a4[j] = i; a4[H + j] = f; a4[2 * H + j] = g; a4[3 * H + j] = o;
      cb[j] = cell;
      tb[j] = t;
      hb[j] = hn[j] = o * t;
    }
  }
}

// One step back for n rows: the gates' gradients before activation into d_gates (row b at + b * gstride;
// also summed into d_bias). dh (n, H) holds the gradient reaching h from the next step; dh_out, dc_out
// (either may be null) the gradients from outside the recurrence; dc (n, H) the running gradient of the
// cell state. c_prev is null at the first step (the initial state is zero).
template <bool kDhOut, bool kDcOut>
void cell_backward(const float* __restrict act, float* __restrict d_gates, int64_t gstride,
                   const float* __restrict tc, const float* __restrict c_prev, const float* __restrict dh_out,
                   const float* __restrict dc_out, int64_t stride, const float* __restrict dh,
                   float* __restrict dc, float* __restrict d_bias, int64_t n, int64_t H) {
  for (int64_t b = 0; b < n; ++b) {
    const float* __restrict a = act + b * gstride;
    float* __restrict d = d_gates + b * gstride;
    const float* __restrict tb = tc + b * stride;
    const float* __restrict cp = c_prev ? c_prev + b * stride : nullptr;
    const float* __restrict dho = kDhOut ? dh_out + b * stride : nullptr;
    const float* __restrict dco = kDcOut ? dc_out + b * stride : nullptr;
    const float* __restrict dhb = dh + b * H;
    float* __restrict dcb = dc + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j], t = tb[j];
      const float dht = (kDhOut ? dho[j] : 0.f) + dhb[j];
      const float dct = (kDcOut ? dco[j] : 0.f) + dcb[j] + dht * o * (1.f - t * t);
      const float di = dct * g * i * (1.f - i), df = cp ? dct * cp[j] * f * (1.f - f) : 0.f;
      const float dg = dct * i * (1.f - g * g), d_o = dht * t * o * (1.f - o);
      d[j] = di; d[H + j] = df; d[2 * H + j] = dg; d[3 * H + j] = d_o;
      d_bias[j] += di; d_bias[H + j] += df; d_bias[2 * H + j] += dg; d_bias[3 * H + j] += d_o;
      dcb[j] = dct * f;
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

// The steps' buffers (gates, states, their gradients) come back with the same shapes every batch. glibc
// maps each block over 32 MB afresh and unmaps it when freed, so each batch of the pixel model faulted its
// ~0.5 GB of buffers in again (half its training time). Blocks of 4 MB and more are kept here when
// freed, by size, for the next batch: up to 2 GB, beyond which a freed block goes back to the system.
class BufferPool {
 public:
  torch::Tensor empty(at::IntArrayRef sizes) {
    const size_t bytes = c10::multiply_integers(sizes) * sizeof(float);
    if (bytes < (4u << 20)) return torch::empty(sizes, torch::kFloat);
    void* data = take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    return at::from_blob(data, sizes, [this, bytes](void* p) { give(p, bytes); }, torch::kFloat);
  }

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* data = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return data;
  }
  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= (size_t{2} << 30)) {
        free_.emplace(bytes, data);
        cached_ += bytes;
        return;
      }
    }
    c10::free_cpu(data);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

torch::Tensor pooled_empty(at::IntArrayRef sizes) {
  static BufferPool* pool = new BufferPool;  // never destroyed: tensors may be freed at interpreter exit
  return pool->empty(sizes);
}

// Rows per thread: the batch in as many equal parts as there are threads.
int64_t rows_per_thread(int64_t batch) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, (batch + threads - 1) / threads);
}

}  // namespace

// x (B, T, F). With keep (for backward), returns hs, cs, tcs (B, T, H): the hidden state, cell state
// and tanh(cell) after every step, gates (B, T, 4H): the activated gates, and xh (B, T, F + H): each
// step's GEMM input [x_t, h_{t-1}], which gives backward both weight gradients in one GEMM. Without keep
// (inference), returns hs and the last cell state (B, H): each thread then reuses one step's buffers, and
// evaluating the pixel model on 1,000 images needs ~0.4 GB, not ~3 GB. kGemmsOnly skips the gate loops,
// for gemm_seconds.
template <bool kGemmsOnly = false>
std::vector<torch::Tensor> lstm_forward(torch::Tensor x, torch::Tensor w_ih, torch::Tensor w_hh,
                                        torch::Tensor bias, bool keep) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat);
  x = x.contiguous();
  const int64_t B = x.size(0), T = x.size(1), F = x.size(2), H = w_hh.size(1), K = F + H;
  const auto opts = x.options();
  auto hs = pooled_empty({B, T, H});
  auto cs = keep ? pooled_empty({B, T, H}) : torch::empty({B, H}, opts);
  auto tcs = keep ? pooled_empty({B, T, H}) : torch::Tensor();
  auto gates = keep ? pooled_empty({B, T, 4 * H}) : torch::Tensor();
  auto xh = keep ? pooled_empty({B, T, K}) : torch::Tensor();
  const auto w_t = torch::cat({w_ih, w_hh}, 1).t().contiguous();  // (F + H, 4H)
  const auto b = bias.contiguous();
  const float* bp = b.data_ptr<float>();
  const int64_t rows = rows_per_thread(B);
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, B, rows, [&](int64_t b0, int64_t b1) {
    WorkerMode mode(inference);
    const int64_t n = b1 - b0;
    // each step is one GEMM, [x_t, h_{t-1}] (n, F + H) @ [W_ih; W_hh]^T, whose rows the previous step's
    // gate loop wrote; a separate input projection of all steps would write and re-read (B, T, 4H).
    // Row r of step t is at base + r * stride + t * step: in the kept (B, T, .) tensors, or in this
    // thread's one-step buffers (step 0; the cell state alternates between two).
    auto pre = torch::empty({n, 4 * H}, opts);
    auto xh_step = torch::empty({n, K}, opts);  // without keep, each step's GEMM input; with, the last h
    auto gates_step = keep ? torch::Tensor() : torch::empty({n, 4 * H}, opts);
    auto cs_step = keep ? torch::Tensor() : torch::empty({2, n, H}, opts);
    auto tcs_step = keep ? torch::Tensor() : torch::empty({n, H}, opts);
    float* xh0 = keep ? xh[b0].data_ptr<float>() : xh_step.data_ptr<float>();
    float* g0 = keep ? gates[b0].data_ptr<float>() : gates_step.data_ptr<float>();
    float* c0 = keep ? cs[b0].data_ptr<float>() : cs_step.data_ptr<float>();
    float* t0 = keep ? tcs[b0].data_ptr<float>() : tcs_step.data_ptr<float>();
    float* h0 = hs[b0].data_ptr<float>();
    const int64_t kstride = keep ? T * K : K, gstride = keep ? T * 4 * H : 4 * H, cstride = keep ? T * H : H;
    const int64_t kstep = keep ? K : 0, gstep = keep ? 4 * H : 0, tstep = keep ? H : 0;
    auto c_at = [&](int64_t t) { return keep ? c0 + t * H : c0 + (t % 2) * n * H; };
    const float* x0 = x[b0].data_ptr<float>();
    for (int64_t r = 0; r < n; ++r) std::memset(xh0 + r * kstride + F, 0, H * sizeof(float));  // h_{-1} = 0
    for (int64_t t = 0; t < T; ++t) {
      float* xh_t = xh0 + t * kstep;
      for (int64_t r = 0; r < n; ++r) std::memcpy(xh_t + r * kstride, x0 + (r * T + t) * F, F * sizeof(float));
      at::mm_out(pre, keep ? xh.narrow(0, b0, n).select(1, t) : xh_step, w_t);
      const bool to_step = !keep || t + 1 == T;  // the new h goes into xh_step, not into xh's next step
      float* h_next = to_step ? xh_step.data_ptr<float>() + F : xh_t + kstep + F;
      const int64_t hn_stride = to_step ? K : kstride;
      if constexpr (kGemmsOnly) continue;
      if (t == 0)
        cell_forward<true>(pre.data_ptr<float>(), bp, g0, gstride, nullptr, c_at(0), t0, cstride, h0, T * H, h_next,
                           hn_stride, n, H);
      else
        cell_forward<false>(pre.data_ptr<float>(), bp, g0 + t * gstep, gstride, c_at(t - 1), c_at(t),
                            t0 + t * tstep, cstride, h0 + t * H, T * H, h_next, hn_stride, n, H);
    }
    if (!keep) std::memcpy(cs[b0].data_ptr<float>(), c_at(T - 1), n * H * sizeof(float));  // the last cell state
  });
  if (!keep) return {hs, cs};
  return {hs, cs, tcs, gates, xh};
}

// dhs, dcs (B, T, H) or None: the loss's gradients with respect to hs and cs; dh_last (B, H) or None:
// with respect to the final hidden state. Returns d_x (B, T, F) (undefined unless need_dx), d_w_ih,
// d_w_hh and d_bias. Each thread takes its rows through every step back and then computes its share of
// the weight gradients with one single-threaded GEMM, dG^T xh; the shares are summed at the end.
template <bool kGemmsOnly = false>
std::vector<torch::Tensor> lstm_backward(std::optional<torch::Tensor> dhs_or_none,
                                         std::optional<torch::Tensor> dcs_or_none,
                                         std::optional<torch::Tensor> dh_last, torch::Tensor xh,
                                         torch::Tensor w_ih, torch::Tensor w_hh, torch::Tensor gates,
                                         torch::Tensor cs, torch::Tensor tcs, bool need_dx) {
  const auto dhs = dhs_or_none.has_value() ? dhs_or_none->contiguous() : torch::Tensor();
  const auto dcs = dcs_or_none.has_value() ? dcs_or_none->contiguous() : torch::Tensor();
  const int64_t B = xh.size(0), T = xh.size(1), H = w_hh.size(1), F = xh.size(2) - H, K = F + H;
  const auto w = w_hh.contiguous(), w_in = w_ih.contiguous();
  const auto opts = xh.options();
  const int64_t rows = rows_per_thread(B), parts = (B + rows - 1) / rows;
  auto d_gates = pooled_empty({B, T, 4 * H});
  auto d_x = need_dx ? pooled_empty({B, T, F}) : torch::Tensor();
  auto dh = dh_last.has_value() ? dh_last->contiguous().clone() : torch::zeros({B, H}, opts);
  auto dc = torch::zeros({B, H}, opts);
  auto d_bias = torch::zeros({parts, 4 * H}, opts);
  auto d_w = torch::empty({parts, 4 * H, K}, opts);
  const bool inference = c10::InferenceMode::is_enabled();
  const auto step = dhs.defined() ? (dcs.defined() ? cell_backward<true, true> : cell_backward<true, false>)
                                  : (dcs.defined() ? cell_backward<false, true> : cell_backward<false, false>);
  at::parallel_for(0, B, rows, [&](int64_t b0, int64_t b1) {
    WorkerMode mode(inference);
    const int64_t n = b1 - b0, part = b0 / rows;
    auto dh_rows = dh.narrow(0, b0, n);
    const float* a0 = gates[b0].data_ptr<float>();
    float* d0 = d_gates[b0].data_ptr<float>();
    const float *c0 = cs[b0].data_ptr<float>(), *t0 = tcs[b0].data_ptr<float>();
    const float* dh0 = dhs.defined() ? dhs[b0].data_ptr<float>() : nullptr;
    const float* dc0 = dcs.defined() ? dcs[b0].data_ptr<float>() : nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      if constexpr (!kGemmsOnly)
        step(a0 + t * 4 * H, d0 + t * 4 * H, T * 4 * H, t0 + t * H, t > 0 ? c0 + (t - 1) * H : nullptr,
             dh0 ? dh0 + t * H : nullptr, dc0 ? dc0 + t * H : nullptr, T * H, dh_rows.data_ptr<float>(),
             dc.data_ptr<float>() + b0 * H, d_bias[part].data_ptr<float>(), n, H);
      if (t > 0) at::mm_out(dh_rows, d_gates.narrow(0, b0, n).select(1, t), w);  // (n, 4H) @ (4H, H)
    }
    // weight gradients of these rows, all steps at once, both matrices in one GEMM: dG^T [x, h_prev]
    const auto dg = d_gates.narrow(0, b0, n).view({n * T, 4 * H});
    auto dw = d_w[part];
    at::mm_out(dw, dg.t(), xh.narrow(0, b0, n).view({n * T, K}));
    if (need_dx) {
      auto dx_rows = d_x.narrow(0, b0, n).view({n * T, F});
      at::mm_out(dx_rows, dg, w_in);
    }
  });
  const auto d_w_sum = d_w.sum(0);
  return {d_x, d_w_sum.narrow(1, 0, F).contiguous(), d_w_sum.narrow(1, F, H).contiguous(), d_bias.sum(0)};
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

// For `make bench`: seconds per forward + backward of one layer (batch B, T steps, F inputs, H units) in
// its GEMMs alone: the calls lstm_forward and lstm_backward make, on the same shapes and threads, without
// the gate loops (on uninitialised buffers: denormals are flushed, and NaNs cost x86 nothing). No kernel
// built on these GEMMs trains faster than B samples in this time.
double gemm_seconds(int64_t B, int64_t T, int64_t F, int64_t H, bool need_dx, int64_t repeats) {
  flush_denormals();
  const auto x = torch::zeros({B, T, F}), w_ih = torch::zeros({4 * H, F}), w_hh = torch::zeros({4 * H, H});
  const auto bias = torch::zeros({4 * H}), dh_last = torch::zeros({B, H});
  auto pass = [&] {
    const auto out = lstm_forward<true>(x, w_ih, w_hh, bias, true);
    lstm_backward<true>(std::nullopt, std::nullopt, dh_last, out[4], w_ih, w_hh, out[3], out[1], out[2], need_dx);
  };
  pass();  // warm-up
  const auto started = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < repeats; ++i) pass();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() / repeats;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lstm_forward<>, "LSTM layer forward, CPU fp32");
  m.def("backward", &lstm_backward<>, "LSTM layer backward, CPU fp32");
  m.def("gemm_seconds", &gemm_seconds, "seconds per forward + backward of one layer in its GEMMs alone");
  m.def("dropout_mask", &dropout_mask, "dropout mask, CPU fp32");
  m.def("flush_denormals", &flush_denormals, "FTZ and DAZ on all of torch's CPU threads");
}
