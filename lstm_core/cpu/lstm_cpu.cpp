// The LSTM recurrence for CPUs in fp32, built on first use by kernel.py beside it, and the training loop's
// other per-batch work in torch ops too small to pay their way: batches of images (batch_images) and
// dropout masks (dropout_mask).
//
// torch's CPU LSTM (oneDNN) spreads each time step's small GEMM over all threads, which synchronises the
// threads T times per layer. Here the batch is split across threads once: each thread takes its own rows
// through every layer of a stack (every step with one small GEMM, [x_t, h_{t-1}, 1] [W_ih; W_hh; bias]^T,
// and one fused gate loop; the weight and bias gradients in a GEMM every few steps) without waiting for
// the others.
//
// The inputs and outputs are batch-major, as batch_first: x (B, T, F), hs (B, T, H). The buffers kept for
// the backward pass are in per-thread blocks, step by step (Blocks): gates (4P wide, torch's i, f, g, o
// order), cs, tcs = tanh(cs) (P wide) and xh (F + P + 1), the steps' GEMM inputs [x_t, h_{t-1}, 1], where P
// is the hidden size H padded for the GEMMs (padded). The initial state is zero.
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
#include <immintrin.h>
#endif

namespace {

// Vectors of floats for the gate loops and batch_images: AVX-512 (16 lanes), AVX2 with FMA (8 lanes) or
// plain floats, whichever the compiler targets (kernel.py builds with -march=native). Loads and stores
// take a mask for the last, partial vector of a row, so a hidden size that is not a multiple of the
// width (95 in the tutorial recipe) costs no scalar tail.
#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kWidth = 16;
  static Mask mask(int64_t left) { return left >= 16 ? Mask(0xFFFF) : left > 0 ? Mask((1u << left) - 1) : Mask(0); }
  static T load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, T v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
  static T set(float x) { return _mm512_set1_ps(x); }
  static T clamp(T x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, set(lo)), set(hi)); }
  static T round(T x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T ldexp(T p, T r) { return _mm512_scalef_ps(p, r); }  // p * 2^r
  static T floor(T x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static T gather(const float* base, T index) {  // base[index], index integral
    return _mm512_i32gather_ps(_mm512_cvttps_epi32(index), base, 4);
  }
  static T recip(T d) {  // 14-bit estimate, one Newton step: float precision
    const T r = _mm512_rcp14_ps(d);
    return r * (set(2.f) - d * r);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  using Mask = __m256i;
  static constexpr int64_t kWidth = 8;
  static Mask mask(int64_t left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(left, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, T v, Mask m) { _mm256_maskstore_ps(p, m, v); }
  static T set(float x) { return _mm256_set1_ps(x); }
  static T clamp(T x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, set(lo)), set(hi)); }
  static T round(T x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T ldexp(T p, T r) {  // p * 2^r for integral r in the normal range: add r to the exponent bits
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(r), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  static T floor(T x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static T gather(const float* base, T index) { return _mm256_i32gather_ps(base, _mm256_cvttps_epi32(index), 4); }
  static T recip(T d) {  // 12-bit estimate, one Newton step
    const T r = _mm256_rcp_ps(d);
    return r * (set(2.f) - d * r);
  }
};
#else
struct Vec {
  using T = float;
  using Mask = bool;
  static constexpr int64_t kWidth = 1;
  static Mask mask(int64_t left) { return left > 0; }
  static T load(const float* p, Mask m) { return m ? *p : 0.f; }
  static void store(float* p, T v, Mask m) { if (m) *p = v; }
  static T set(float x) { return x; }
  static T clamp(T x, float lo, float hi) { return std::min(std::max(x, lo), hi); }
  static T round(T x) { return std::nearbyint(x); }
  static T ldexp(T p, T r) { return std::ldexp(p, static_cast<int>(r)); }
  static T floor(T x) { return std::floor(x); }
  static T gather(const float* base, T index) { return base[static_cast<int64_t>(index)]; }
  static T recip(T d) { return 1.f / d; }
};
#define VEC_LOOP _Pragma("omp simd")  // a loop over plain floats: let the compiler vectorise it
#endif
#ifndef VEC_LOOP
#define VEC_LOOP
#endif
using V = Vec::T;

// exp as 2^round(t) * 2^f, f in [-1/2, 1/2], by a degree-6 polynomial (relative error ~2e-7).
inline V vexp(V x) {
  const V t = Vec::clamp(x, -87.f, 87.f) * Vec::set(1.44269504088896341f);
  const V r = Vec::round(t), f = t - r;
  V p = Vec::set(0.000154035304f);
  for (const float c : {0.00133335581f, 0.00961812911f, 0.0555041087f, 0.240226507f, 0.693147181f, 1.f})
    p = p * f + Vec::set(c);
  return Vec::ldexp(p, r);
}
inline V vsigmoid(V x) { return Vec::recip(Vec::set(1.f) + vexp(-x)); }
inline V vtanh(V x) { return Vec::set(2.f) * vsigmoid(Vec::set(2.f) * x) - Vec::set(1.f); }

// One step for n rows. pre (n, 4H): the gates before activation, [x_t, h_{t-1}, 1] [W_ih; W_hh; bias]^T.
// Writes the activated gates (row b at act + b * gstride), the new cell state and its tanh (row b at
// + b * cstride), the hidden state (row b at h + b * hstride), and the hidden state again into the next
// step's GEMM input (row b at h_next + b * kstride). c_prev is not read at the first step (the initial
// state is zero).
template <bool kFirst>
void cell_forward(const float* __restrict pre, float* __restrict act, int64_t gstride,
                  const float* __restrict c_prev, float* __restrict c, float* __restrict tc, int64_t cstride,
                  float* __restrict h, int64_t hstride, float* __restrict h_next, int64_t kstride, int64_t n,
                  int64_t H) {
  for (int64_t b = 0; b < n; ++b) {
    const float* p4 = pre + b * 4 * H;
    float* a4 = act + b * gstride;
    const float* cp = kFirst ? nullptr : c_prev + b * cstride;
    float *cb = c + b * cstride, *tb = tc + b * cstride, *hb = h + b * hstride, *hn = h_next + b * kstride;
    VEC_LOOP
    for (int64_t j = 0; j < H; j += Vec::kWidth) {
      const auto m = Vec::mask(H - j);
      const V i = vsigmoid(Vec::load(p4 + j, m)), f = vsigmoid(Vec::load(p4 + H + j, m));
      const V g = vtanh(Vec::load(p4 + 2 * H + j, m)), o = vsigmoid(Vec::load(p4 + 3 * H + j, m));
      const V cell = kFirst ? i * g : f * Vec::load(cp + j, m) + i * g;
      const V t = vtanh(cell), hv = o * t;
      Vec::store(a4 + j, i, m);
      Vec::store(a4 + H + j, f, m);
      Vec::store(a4 + 2 * H + j, g, m);
      Vec::store(a4 + 3 * H + j, o, m);
      Vec::store(cb + j, cell, m);
      Vec::store(tb + j, t, m);
      Vec::store(hb + j, hv, m);
      Vec::store(hn + j, hv, m);
    }
  }
}

// One step back for n rows of P units: the gates' gradients before activation into d_gates (row b at
// + b * gstride). dh (row b at + b * dh_stride, P units) holds the gradient reaching h from the next step;
// dh_out the gradient from outside the recurrence (read when kDhOut; row b at + b * ostride, H units,
// zero beyond); dc (n, P) the running gradient of the cell state. act has row b at + b * gstride, tc and
// c_prev at + b * stride; c_prev is null at the first step (the initial state is zero).
template <bool kDhOut>
void cell_backward(const float* __restrict act, float* __restrict d_gates, int64_t gstride,
                   const float* __restrict tc, const float* __restrict c_prev, int64_t stride,
                   const float* __restrict dh_out, int64_t ostride, int64_t H, const float* __restrict dh,
                   int64_t dh_stride, float* __restrict dc, int64_t n, int64_t P) {
  const V one = Vec::set(1.f);
  for (int64_t b = 0; b < n; ++b) {
    const float* a = act + b * gstride;
    float* d = d_gates + b * gstride;
    const float* tb = tc + b * stride;
    const float* cp = c_prev ? c_prev + b * stride : nullptr;
    const float* dho = kDhOut ? dh_out + b * ostride : nullptr;
    const float* dhb = dh + b * dh_stride;
    float* dcb = dc + b * P;
    VEC_LOOP
    for (int64_t j = 0; j < P; j += Vec::kWidth) {
      const auto m = Vec::mask(P - j);
      const V i = Vec::load(a + j, m), f = Vec::load(a + P + j, m), g = Vec::load(a + 2 * P + j, m);
      const V o = Vec::load(a + 3 * P + j, m), t = Vec::load(tb + j, m);
      V dht = Vec::load(dhb + j, m), dct = Vec::load(dcb + j, m);
      if (kDhOut) dht = dht + Vec::load(dho + j, Vec::mask(H - j));
      dct = dct + dht * o * (one - t * t);
      Vec::store(d + j, dct * g * i * (one - i), m);
      Vec::store(d + P + j, cp ? dct * Vec::load(cp + j, m) * f * (one - f) : Vec::set(0.f), m);
      Vec::store(d + 2 * P + j, dct * i * (one - g * g), m);
      Vec::store(d + 3 * P + j, dht * t * o * (one - o), m);
      Vec::store(dcb + j, dct * f, m);
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
// maps each block over 32 MB afresh and unmaps it when freed, so each batch of the pixel model faulted all
// its buffers in again, a large share of its training time. Blocks of 4 MB and more are kept here when
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

// dst (rows, cols; row stride dst_ld) = the sum of `parts` matrices (cols, rows; row stride src_ld, the
// next one part_stride further on), transposed. In 16 x 16 tiles that stay in L1, instead of torch's cat
// and a transposed copy of the weights per layer and batch.
void transpose_sum(const float* src, int64_t src_ld, int64_t parts, int64_t part_stride, float* dst,
                   int64_t dst_ld, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(r0 + kTile, rows), c1 = std::min(c0 + kTile, cols);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) {
          float sum = src[c * src_ld + r];
          for (int64_t p = 1; p < parts; ++p) sum += src[p * part_stride + c * src_ld + r];
          dst[r * dst_ld + c] = sum;
        }
    }
}

// Dropout from a counter-based hash of (seed, index): the "lowbias32" integer hash of a value's index in
// its tensor gives its uniform number, vectorised, so the same mask comes back in the backward pass
// without being kept. torch's bernoulli_ draws the numbers one by one and took a tenth of a training step
// of the tutorial model. p = 0 drops nothing.
class DropMask {
 public:
  DropMask(double p, int64_t seed)
      : key_(static_cast<uint32_t>(seed) ^ static_cast<uint32_t>(seed >> 32) * 0x9e3779b9u),
        threshold_(static_cast<uint32_t>(std::min(p, 1.0) * 4294967295.0)),
        keep_(p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f), on_(p > 0) {}
  bool on() const { return on_; }
  // m[i] = the mask at index0 + i: 0 or 1 / (1 - p)
  void fill(float* __restrict m, int64_t count, int64_t index0) const {
    const uint32_t key = key_ + static_cast<uint32_t>(index0) * kGolden, threshold = threshold_;
    const float keep = keep_;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) m[i] = hash(static_cast<uint32_t>(i) * kGolden + key) >= threshold ? keep : 0.f;
  }
  // dst[i] = src[i] * the mask at index0 + i
  void apply(float* __restrict dst, const float* __restrict src, int64_t count, int64_t index0) const {
    const uint32_t key = key_ + static_cast<uint32_t>(index0) * kGolden, threshold = threshold_;
    const float keep = keep_;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i)
      dst[i] = hash(static_cast<uint32_t>(i) * kGolden + key) >= threshold ? src[i] * keep : 0.f;
  }

 private:
  static constexpr uint32_t kGolden = 0x9e3779b9u;
  static uint32_t hash(uint32_t x) {  // (index * kGolden + key), then the "lowbias32" integer hash
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
  }
  uint32_t key_, threshold_;
  float keep_;
  bool on_;
};

// Rows per thread: the batch in as many equal parts as there are threads.
int64_t rows_per_thread(int64_t batch) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, (batch + threads - 1) / threads);
}

// C (m, n) = A (m, k) B (k, n), or C += A B when accumulate; row-major, each with its own row stride; A or
// B transposed when ta, tb (then given as (k, m), (n, k)). Straight into the BLAS that libtorch carries
// (MKL's sgemm_ on x86) where it exports one: at::mm_out's checks and tensor views cost 2-4 us a call,
// and a step's GEMM takes 20-50. BLAS is column-major, so it computes C^T = B^T A^T.
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate = false) {
  if (sgemm_ != nullptr) {
    const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
    const float one = 1.f, beta = accumulate ? 1.f : 0.f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &ni, &mi, &ki, &one, b, &lb, a, &la, &beta, c, &lc);
    return;
  }
  const auto view = [](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    return t ? torch::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, torch::kFloat)
             : torch::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, torch::kFloat);
  };
  auto out = torch::from_blob(c, {m, n}, {ldc, 1}, torch::kFloat);
  if (accumulate) at::addmm_out(out, out, view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
  else at::mm_out(out, view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
}

// The hidden size the kernel computes with: H rounded up to a multiple of 16 when that costs at most an
// eighth more work. MKL runs GEMMs whose widths (4H and H) are multiples of 16 up to a fifth faster per
// FLOP (the tutorial recipe's 95 units train faster as 96); the extra units have zero weights and bias,
// so they stay at zero, and no output shows them.
int64_t padded(int64_t H) {
  const int64_t P = (H + 15) / 16 * 16;
  return P - H <= H / 8 ? P : H;
}

// An entry point's argument as its error messages name it, "lstm_cpu.forward: weights[3]" (index: the
// place in a list argument, or -1).
struct Arg {
  const char* fn;
  const char* name;
  int64_t index = -1;
};

std::ostream& operator<<(std::ostream& os, const Arg& arg) {
  os << "lstm_cpu." << arg.fn << ": " << arg.name;
  return arg.index >= 0 ? os << '[' << arg.index << ']' : os;
}

// Sizes as the messages show them, * for a size that may be anything (-1).
struct Sizes {
  at::IntArrayRef sizes;
};

std::ostream& operator<<(std::ostream& os, const Sizes& s) {
  os << '[';
  for (size_t d = 0; d < s.sizes.size(); ++d) {
    if (d) os << ", ";
    if (s.sizes[d] < 0) os << '*';
    else os << s.sizes[d];
  }
  return os << ']';
}

// Every tensor argument passes through here before an entry point reads it: the loops take raw float
// pointers and trust the sizes, so a CUDA or meta tensor, another element type or a wrong size would
// have them read memory they do not own (a segfault or garbage) rather than raise. t must be a CPU
// tensor of element type dtype (any when nullopt: the entry point converts it), of the given sizes (-1:
// any; `shape` names them for the message, "(B, T, F)"), and contiguous where the entry point reads it
// as it is; arguments it makes contiguous itself may have any strides. The messages are built only when
// a check fails.
void check_arg(const Arg& arg, const torch::Tensor& t, std::optional<at::ScalarType> dtype, const char* shape,
               at::IntArrayRef sizes, bool contiguous = false) {
  TORCH_CHECK(t.defined(), arg, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), arg, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(!dtype || t.scalar_type() == *dtype, arg, " must be ", *dtype, ", got ", t.scalar_type());
  bool sized = t.dim() == static_cast<int64_t>(sizes.size());
  for (int64_t d = 0; sized && d < t.dim(); ++d) sized = sizes[d] < 0 || t.size(d) == sizes[d];
  TORCH_CHECK(sized, arg, " must have shape ", shape, " = ", Sizes{sizes}, ", got ", t.sizes());
  TORCH_CHECK(!contiguous || t.is_contiguous(), arg, " must be contiguous, got strides ", t.strides(), " for shape ",
              t.sizes());
}

// The weights of a stack, as lstm_forward and lstm_backward read them: w_ih (4H, F), w_hh (4H, H) and
// bias (4H) of each layer, where F is F0 in the first layer (-1: any) and H in the others. Returns H,
// which w_hh of the first layer sets.
int64_t check_weights(const char* fn, const std::vector<torch::Tensor>& weights, int64_t F0) {
  TORCH_CHECK(!weights.empty() && weights.size() % 3 == 0, "lstm_cpu.", fn,
              ": weights must be w_ih, w_hh and bias of each layer, a multiple of 3 tensors, got ", weights.size());
  check_arg({fn, "weights", 1}, weights[1], at::kFloat, "(4H, H)", {-1, -1});
  const int64_t H = weights[1].size(1);
  TORCH_CHECK(H > 0, "lstm_cpu.", fn, ": weights[1] must have at least one column (the hidden size), got shape ",
              weights[1].sizes());
  for (size_t i = 0; i < weights.size(); ++i) {
    const Arg arg{fn, "weights", static_cast<int64_t>(i)};
    if (i % 3 == 0) check_arg(arg, weights[i], at::kFloat, i == 0 ? "(4H, F)" : "(4H, H)", {4 * H, i == 0 ? F0 : H});
    else if (i % 3 == 1) check_arg(arg, weights[i], at::kFloat, "(4H, H)", {4 * H, H});
    else check_arg(arg, weights[i], at::kFloat, "(4H)", {4 * H});
  }
  return H;
}

}  // namespace

// The kept buffers' layout: the batch in `parts` blocks of `rows` rows (the last may be shorter), one per
// thread, and within a block, step by step: row r of step t of the block that starts at batch row b0 is
// row b0 * T + t * n + r of a (B * T, .) buffer, n the block's rows. A step's rows are then adjacent (its
// GEMM reads one matrix, the gate loops stream), and so are a run of steps, whose weight gradients
// backward computes together while their gate gradients are still in cache.
struct Blocks {
  int64_t B, T, rows, parts;
  Blocks(int64_t B_, int64_t T_, int64_t rows_) : B(B_), T(T_), rows(rows_), parts((B_ + rows_ - 1) / rows_) {}
  int64_t begin(int64_t part) const { return part * rows; }
  int64_t size(int64_t part) const { return std::min(rows, B - part * rows); }
  int64_t step_row(int64_t part, int64_t t) const { return begin(part) * T + t * size(part); }
};

// One layer of a stack: its sizes (P: the padded hidden size), its weights as the forward GEMMs read
// them, and its buffers.
struct Layer {
  int64_t F, H, P, K;
  torch::Tensor w_t;                 // [W_ih; W_hh; bias]^T (F + P + 1, 4P), zero for the padding units
  torch::Tensor hs;                  // (B, T, P), the hidden states
  torch::Tensor cs, tcs, gates, xh;  // kept for backward (Blocks layout): (B * T, P), (B * T, P), (B * T, 4P), (B * T, K)
};

// One layer forward for one block of rows. x0: the block's first input row, rows sx0 apart, steps sx1,
// dropped out by `drop` (indices of x's (B, T, F) layout) as they are copied into the steps' GEMM inputs.
// Writes the layer's hs (and, with keep, its kept buffers) and the block's last cell and hidden states.
template <bool kGemmsOnly>
void forward_block(Layer& layer, const float* x0, int64_t sx0, int64_t sx1, const DropMask& drop, const Blocks& blocks,
                   int64_t part, bool keep, float* c_last, float* h_last) {
  const int64_t F = layer.F, H = layer.H, P = layer.P, K = layer.K, T = blocks.T;
  const int64_t b0 = blocks.begin(part), n = blocks.size(part);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat);
  // each step is one GEMM, [x_t, h_{t-1}, 1] (n, K) @ [W_ih; W_hh; bias]^T, whose h columns the previous
  // step's gate loop wrote; a separate input projection of all steps would write and re-read (B, T, 4P).
  // Without keep, every step uses the same one-step buffers (the cell state alternates between two).
  auto pre = torch::empty({n, 4 * P}, opts);
  auto step_xh = torch::empty({n, K}, opts);  // without keep, every step's GEMM input; with, the last h
  auto step_gates = keep ? torch::Tensor() : torch::empty({n, 4 * P}, opts);
  auto step_cs = keep ? torch::Tensor() : torch::empty({2, n, P}, opts);
  auto step_tcs = keep ? torch::Tensor() : torch::empty({n, P}, opts);
  const auto at_step = [&](const torch::Tensor& kept, const torch::Tensor& step, int64_t t, int64_t width) {
    return keep ? kept.data_ptr<float>() + blocks.step_row(part, t) * width : step.data_ptr<float>();
  };
  const auto c_at = [&](int64_t t) {
    return keep ? layer.cs.data_ptr<float>() + blocks.step_row(part, t) * P : step_cs.data_ptr<float>() + (t % 2) * n * P;
  };
  float* p0 = pre.data_ptr<float>();
  float* h0 = layer.hs.data_ptr<float>() + b0 * T * P;
  const float* wt = layer.w_t.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* xh_t = at_step(layer.xh, step_xh, t, K);
    for (int64_t r = 0; r < n; ++r) {
      const float* x_rt = x0 + r * sx0 + t * sx1;
      if (drop.on()) drop.apply(xh_t + r * K, x_rt, F, ((b0 + r) * T + t) * F);
      else std::memcpy(xh_t + r * K, x_rt, F * sizeof(float));
      if (t == 0) std::memset(xh_t + r * K + F, 0, P * sizeof(float));  // h_{-1} = 0
      xh_t[r * K + F + P] = 1.f;
    }
    gemm(false, false, n, 4 * P, K, xh_t, K, wt, 4 * P, p0, 4 * P);
    if constexpr (kGemmsOnly) continue;
    // the new h also goes into the next step's GEMM input (without keep, into this one's, now read)
    float* h_next = (!keep ? xh_t : t + 1 < T ? at_step(layer.xh, step_xh, t + 1, K) : step_xh.data_ptr<float>()) + F;
    float* act = at_step(layer.gates, step_gates, t, 4 * P);
    float* tc = at_step(layer.tcs, step_tcs, t, P);
    if (t == 0)
      cell_forward<true>(p0, act, 4 * P, nullptr, c_at(0), tc, P, h0, T * P, h_next, K, n, P);
    else
      cell_forward<false>(p0, act, 4 * P, c_at(t - 1), c_at(t), tc, P, h0 + t * P, T * P, h_next, K, n, P);
  }
  for (int64_t r = 0; r < n; ++r) {  // the last states
    std::memcpy(c_last + (b0 + r) * H, c_at(T - 1) + r * P, H * sizeof(float));
    std::memcpy(h_last + (b0 + r) * H, h0 + r * T * P + (T - 1) * P, H * sizeof(float));
  }
}

// A unidirectional stack of L layers: x (B, T, F), rows of F contiguous; weights: w_ih, w_hh and bias
// (b_ih + b_hh) of each layer; each layer's output is dropped out with probability `dropout` (DropMask of
// seeds[l]) as layer l + 1 reads it. Returns hs (B, T, H): the last layer's hidden state after every step
// (a view of a (B, T, P) buffer when P > H), and c_n, h_n (L, B, H), every layer's last cell and hidden
// states. With keep (for backward) also layout = [B, rows] (Blocks) and each layer's kept buffers: cs,
// tcs = tanh(cs), gates and xh, the steps' GEMM inputs [x_t, h_{t-1}, 1], which give backward both weight
// gradients and the bias gradient. Without keep (inference), each thread reuses one step's buffers, and
// evaluating the pixel model on 1,000 images needs ~0.4 GB, not ~3 GB.
//
// Each thread takes its block of rows through every layer in turn (a block's next layer needs only its
// own rows), so the threads meet once per stack, not once per layer, and a layer reads its input while
// it is still in cache. kGemmsOnly skips the gate loops, for gemm_seconds.
template <bool kGemmsOnly = false>
std::vector<torch::Tensor> lstm_forward(torch::Tensor x, std::vector<torch::Tensor> weights, bool keep,
                                        double dropout = 0.0, std::vector<int64_t> seeds = {}) {
  check_arg({"forward", "x"}, x, at::kFloat, "(B, T, F)", {-1, -1, -1});  // read through its strides
  TORCH_CHECK(x.size(1) > 0, "lstm_cpu.forward: x must have at least one step, got shape ", x.sizes());
  const int64_t H = check_weights("forward", weights, x.size(2));
  if (x.stride(2) != 1) x = x.contiguous();
  const int64_t L = weights.size() / 3, B = x.size(0), T = x.size(1);
  TORCH_CHECK(dropout == 0.0 || static_cast<int64_t>(seeds.size()) == L - 1,
              "lstm_cpu.forward: one dropout seed per layer but the last");
  const auto opts = x.options();
  const Blocks blocks(B, T, rows_per_thread(B));
  std::vector<Layer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    Layer& layer = layers[l];
    layer.F = l ? H : x.size(2), layer.H = H, layer.P = padded(H), layer.K = layer.F + layer.P + 1;
    const int64_t P = layer.P;
    layer.w_t = P > H ? torch::zeros({layer.K, 4 * P}, opts) : torch::empty({layer.K, 4 * P}, opts);
    layer.hs = pooled_empty({B, T, P});
    if (keep) {
      layer.cs = pooled_empty({B * T, P}), layer.tcs = pooled_empty({B * T, P});
      layer.gates = pooled_empty({B * T, 4 * P}), layer.xh = pooled_empty({B * T, layer.K});
    }
  }
  std::vector<torch::Tensor> w(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) w[i] = weights[i].contiguous();
  at::parallel_for(0, 4 * L, 1, [&](int64_t i0, int64_t i1) {  // the weights transposed, gate by gate
    for (int64_t i = i0; i < i1; ++i) {
      const Layer& layer = layers[i / 4];
      const int64_t g = i % 4, F = layer.F, P = layer.P;
      const float *w_i = w[i / 4 * 3].data_ptr<float>(), *w_h = w[i / 4 * 3 + 1].data_ptr<float>();
      float* wt = layer.w_t.data_ptr<float>();
      transpose_sum(w_i + g * H * F, F, 1, 0, wt + g * P, 4 * P, F, H);
      transpose_sum(w_h + g * H * H, H, 1, 0, wt + F * 4 * P + g * P, 4 * P, H, H);
      std::memcpy(wt + (F + P) * 4 * P + g * P, w[i / 4 * 3 + 2].data_ptr<float>() + g * H, H * sizeof(float));
    }
  });
  auto c_n = torch::empty({L, B, H}, opts), h_n = torch::empty({L, B, H}, opts);
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, blocks.parts, 1, [&](int64_t part0, int64_t part1) {
    WorkerMode mode(inference);
    for (int64_t part = part0; part < part1; ++part)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t b0 = blocks.begin(part);
        const DropMask drop(l ? dropout : 0.0, l && dropout > 0 ? seeds.at(l - 1) : 0);
        const float* x0 = l ? layers[l - 1].hs.data_ptr<float>() + b0 * T * layers[l - 1].P : x.data_ptr<float>() + b0 * x.stride(0);
        const int64_t sx0 = l ? T * layers[l - 1].P : x.stride(0), sx1 = l ? layers[l - 1].P : x.stride(1);
        forward_block<kGemmsOnly>(layers[l], x0, sx0, sx1, drop, blocks, part, keep, c_n[l].data_ptr<float>(),
                                  h_n[l].data_ptr<float>());
      }
  });
  const Layer& last = layers.back();
  std::vector<torch::Tensor> out{last.P > H ? last.hs.narrow(2, 0, H) : last.hs, c_n, h_n};
  if (!keep) return out;
  out.push_back(torch::tensor({B, blocks.rows}, torch::kLong));
  for (const Layer& layer : layers) out.insert(out.end(), {layer.cs, layer.tcs, layer.gates, layer.xh});
  return out;
}

// One layer back for one block of rows. dho: the gradient reaching the layer's hs from outside (row r at
// + r * T * H) or null; dh_last, dc_last: the block's gradients of the last states, or null. Writes the
// block's d_x rows (when dx0, row r step t at dx0 + (r * T + t) * F, through the forward pass's `drop`
// of x) and the block's share of [x, h_prev, 1]^T dG (K, 4P) into dw. w: [W_hh | W_ih] (4P, N) with the
// padding units' zero rows and columns, N = P, or P + F when dx0 is given.
template <bool kGemmsOnly>
void backward_block(const Layer& layer, const float* w, int64_t N, const float* dho, const float* dh_last,
                    const float* dc_last, float* dx0, const DropMask& drop, const Blocks& blocks, int64_t part,
                    float* dw) {
  const int64_t F = layer.F, H = layer.H, P = layer.P, K = layer.K, T = blocks.T;
  const int64_t b0 = blocks.begin(part), n = blocks.size(part);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat);
  // steps whose gate gradients (~0.5-1 MB) stay in cache until their weight-gradient GEMM
  const int64_t chunk = std::clamp<int64_t>(512 / n, 1, T);
  auto d_gates = torch::empty({chunk * n, 4 * P}, opts);
  auto back = torch::zeros({n, N}, opts);  // a step's [dh_{t-1} | dx_t]
  auto dc = torch::zeros({n, P}, opts);
  float* bk = back.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    if (dh_last) std::memcpy(bk + r * N, dh_last + r * H, H * sizeof(float));
    if (dc_last) std::memcpy(dc.data_ptr<float>() + r * P, dc_last + r * H, H * sizeof(float));
  }
  const auto step = dho ? cell_backward<true> : cell_backward<false>;
  const float *gates = layer.gates.data_ptr<float>(), *tcs = layer.tcs.data_ptr<float>(), *cs = layer.cs.data_ptr<float>();
  for (int64_t hi = T; hi > 0; hi -= chunk) {
    const int64_t lo = std::max<int64_t>(0, hi - chunk);
    for (int64_t t = hi - 1; t >= lo; --t) {
      const int64_t row = blocks.step_row(part, t);
      float* dg = d_gates.data_ptr<float>() + (t - lo) * n * 4 * P;
      if constexpr (!kGemmsOnly)
        step(gates + row * 4 * P, dg, 4 * P, tcs + row * P, t > 0 ? cs + blocks.step_row(part, t - 1) * P : nullptr, P,
             dho ? dho + t * H : nullptr, T * H, H, bk, N, dc.data_ptr<float>(), n, P);
      if (t == 0 && !dx0) continue;
      gemm(false, false, n, N, 4 * P, dg, 4 * P, w, N, bk, N);
      if (dx0)  // this step's d_x rows, through the forward pass's dropout of x
        for (int64_t r = 0; r < n; ++r) {
          float* dx = dx0 + (r * T + t) * F;
          if (drop.on()) drop.apply(dx, bk + r * N + P, F, ((b0 + r) * T + t) * F);
          else std::memcpy(dx, bk + r * N + P, F * sizeof(float));
        }
    }
    // these steps' gradients of both matrices and the bias, [x, h_prev, 1]^T dG (K, 4P), added up
    gemm(true, false, K, 4 * P, (hi - lo) * n, layer.xh.data_ptr<float>() + blocks.step_row(part, lo) * K, K,
         d_gates.data_ptr<float>(), 4 * P, dw, 4 * P, hi < T);
  }
}

// d_hs (B, T, H) or None: the loss's gradient with respect to the last layer's hs; d_c_n, d_h_n
// (L, B, H) or None: with respect to the last cell and hidden states; layout and kept (cs, tcs, gates, xh
// of each layer): lstm_forward's; weights, dropout and seeds: lstm_forward's. Returns d_x (B, T, F)
// (undefined unless need_dx), then d_w_ih, d_w_hh and d_bias of each layer. Each thread takes its block
// back through every step of every layer (the gradient of a layer's input, for its own rows, is what the
// layer below needs), and every few steps computes those steps' share of the weight and bias gradients
// with one GEMM, xh^T dG, while their gate gradients are still in cache; the threads' shares are summed
// at the end.
template <bool kGemmsOnly = false>
std::vector<torch::Tensor> lstm_backward(std::optional<torch::Tensor> d_hs_or_none,
                                         std::optional<torch::Tensor> d_c_n, std::optional<torch::Tensor> d_h_n,
                                         torch::Tensor layout, std::vector<torch::Tensor> kept,
                                         std::vector<torch::Tensor> weights, bool need_dx, double dropout = 0.0,
                                         std::vector<int64_t> seeds = {}) {
  const int64_t H = check_weights("backward", weights, -1);
  const int64_t L = weights.size() / 3, F0 = weights[0].size(1), P0 = padded(H);
  check_arg({"backward", "layout"}, layout, at::kLong, "(2)", {2});
  const int64_t B = layout[0].item<int64_t>(), rows = layout[1].item<int64_t>();
  TORCH_CHECK(B > 0 && rows > 0, "lstm_cpu.backward: layout must be forward's [B, rows], both positive, got [", B, ", ",
              rows, "]");
  TORCH_CHECK(static_cast<int64_t>(kept.size()) == 4 * L, "lstm_cpu.backward: kept must hold 4 tensors per layer, ",
              4 * L, " for these weights, got ", kept.size());
  // the steps T come from the first layer's xh (B * T, F0 + P + 1); every kept buffer is read as it is
  check_arg({"backward", "kept", 3}, kept[3], at::kFloat, "(B * T, F + P + 1)", {-1, F0 + P0 + 1});
  const int64_t T = kept[3].size(0) / B;
  TORCH_CHECK(T > 0 && kept[3].size(0) == B * T, "lstm_cpu.backward: kept[3] must have B * T rows for some T > 0 (B = ",
              B, " from layout), got shape ", kept[3].sizes());
  for (int64_t i = 0; i < 4 * L; ++i) {
    const int64_t F = i < 4 ? F0 : H, width = i % 4 == 2 ? 4 * P0 : i % 4 == 3 ? F + P0 + 1 : P0;
    const char* shape = i % 4 == 2 ? "(B * T, 4P)" : i % 4 == 3 ? "(B * T, F + P + 1)" : "(B * T, P)";
    check_arg({"backward", "kept", i}, kept[i], at::kFloat, shape, {B * T, width}, true);
  }
  if (d_hs_or_none) check_arg({"backward", "d_hs"}, *d_hs_or_none, at::kFloat, "(B, T, H)", {B, T, H});
  if (d_c_n) check_arg({"backward", "d_c_n"}, *d_c_n, at::kFloat, "(L, B, H)", {L, B, H});
  if (d_h_n) check_arg({"backward", "d_h_n"}, *d_h_n, at::kFloat, "(L, B, H)", {L, B, H});
  TORCH_CHECK(dropout == 0.0 || static_cast<int64_t>(seeds.size()) == L - 1,
              "lstm_cpu.backward: one dropout seed per layer but the last");
  const Blocks blocks(B, T, rows);
  const auto d_hs = d_hs_or_none.has_value() ? d_hs_or_none->contiguous() : torch::Tensor();
  const auto dcn = d_c_n.has_value() ? d_c_n->contiguous() : torch::Tensor();
  const auto dhn = d_h_n.has_value() ? d_h_n->contiguous() : torch::Tensor();
  const auto opts = kept[0].options();
  std::vector<Layer> layers(L);
  std::vector<torch::Tensor> w_back(L), d_w(L), d_in(L);  // [W_hh | W_ih] of each layer; its weight-gradient shares; d hs
  for (int64_t l = 0; l < L; ++l) {
    Layer& layer = layers[l];
    layer.cs = kept[4 * l], layer.tcs = kept[4 * l + 1], layer.gates = kept[4 * l + 2], layer.xh = kept[4 * l + 3];
    layer.H = H, layer.P = layer.gates.size(1) / 4, layer.K = layer.xh.size(1), layer.F = layer.K - layer.P - 1;
    const int64_t P = layer.P, F = layer.F, N = P + (l > 0 || need_dx ? F : 0);
    const auto w_h = weights[3 * l + 1].contiguous(), w_i = weights[3 * l].contiguous();
    auto wb = torch::zeros({4 * P, N}, opts);
    for (int64_t r = 0; r < 4 * P; ++r) {
      if (r % P >= H) continue;
      float* row = wb.data_ptr<float>() + r * N;
      std::memcpy(row, w_h.data_ptr<float>() + (r / P * H + r % P) * H, H * sizeof(float));
      if (N > P) std::memcpy(row + P, w_i.data_ptr<float>() + (r / P * H + r % P) * F, F * sizeof(float));
    }
    w_back[l] = wb;
    d_w[l] = torch::empty({blocks.parts, layer.K, 4 * P}, opts);
    if (l > 0) d_in[l - 1] = pooled_empty({B, T, H});
  }
  auto d_x = need_dx ? pooled_empty({B, T, layers[0].F}) : torch::Tensor();
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, blocks.parts, 1, [&](int64_t part0, int64_t part1) {
    WorkerMode mode(inference);
    for (int64_t part = part0; part < part1; ++part)
      for (int64_t l = L - 1; l >= 0; --l) {
        const Layer& layer = layers[l];
        const int64_t b0 = blocks.begin(part);
        const torch::Tensor& outside = l == L - 1 ? d_hs : d_in[l];
        const torch::Tensor& dx = l > 0 ? d_in[l - 1] : d_x;
        const DropMask drop(l ? dropout : 0.0, l && dropout > 0 ? seeds.at(l - 1) : 0);
        backward_block<kGemmsOnly>(layer, w_back[l].data_ptr<float>(), w_back[l].size(1),
                                   outside.defined() ? outside.data_ptr<float>() + b0 * T * H : nullptr,
                                   dhn.defined() ? dhn[l].data_ptr<float>() + b0 * H : nullptr,
                                   dcn.defined() ? dcn[l].data_ptr<float>() + b0 * H : nullptr,
                                   dx.defined() ? dx.data_ptr<float>() + b0 * T * layer.F : nullptr, drop, blocks, part,
                                   d_w[l][part].data_ptr<float>());
      }
  });
  // the threads' shares summed and transposed, gate by gate: rows k < F of [x, h_prev, 1]^T dG are
  // d_w_ih's columns, the next H d_w_hh's, and row F + P the bias gradient
  std::vector<torch::Tensor> out{d_x};
  for (const Layer& layer : layers)
    out.insert(out.end(), {torch::empty({4 * H, layer.F}, opts), torch::empty({4 * H, H}, opts), torch::empty({4 * H}, opts)});
  const int64_t parts = blocks.parts;
  at::parallel_for(0, 4 * L, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Layer& layer = layers[i / 4];
      const int64_t l = i / 4, g = i % 4, F = layer.F, P = layer.P, K = layer.K;
      const float* dw0 = d_w[l].data_ptr<float>();
      transpose_sum(dw0 + g * P, 4 * P, parts, K * 4 * P, out[1 + 3 * l].data_ptr<float>() + g * H * F, F, H, F);
      transpose_sum(dw0 + F * 4 * P + g * P, 4 * P, parts, K * 4 * P, out[2 + 3 * l].data_ptr<float>() + g * H * H, H, H, H);
      transpose_sum(dw0 + (F + P) * 4 * P + g * P, 1, parts, K * 4 * P, out[3 + 3 * l].data_ptr<float>() + g * H, 1, H, 1);
    }
  });
  return out;
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
  TORCH_CHECK(B > 0 && T > 0 && F > 0 && H > 0 && repeats > 0, "lstm_cpu.gemm_seconds: B, T, F, H and repeats must be ",
              "positive, got ", B, ", ", T, ", ", F, ", ", H, ", ", repeats);
  flush_denormals();
  const auto x = torch::zeros({B, T, F});
  const std::vector<torch::Tensor> weights{torch::zeros({4 * H, F}), torch::zeros({4 * H, H}), torch::zeros({4 * H})};
  const auto dh_n = torch::zeros({1, B, H});
  auto pass = [&] {
    const auto out = lstm_forward<true>(x, weights, true);
    lstm_backward<true>(std::nullopt, std::nullopt, dh_n, out[3], {out.begin() + 4, out.end()}, weights, need_dx);
  };
  pass();  // warm-up
  const auto started = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < repeats; ++i) pass();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() / repeats;
}

// Dropout's mask for `numel` values (DropMask): 0 with probability p, else 1 / (1 - p).
torch::Tensor dropout_mask(int64_t numel, double p, int64_t seed) {
  auto mask = torch::empty({numel}, torch::kFloat);
  float* m = mask.data_ptr<float>();
  const DropMask drop(p, seed);
  at::parallel_for(0, numel, 1 << 16, [&](int64_t begin, int64_t end) { drop.fill(m + begin, end - begin, begin); });
  return mask;
}

// A training or evaluation batch as the model reads it, in one pass: images[idx] (uint8, (N, 28, 28)) as
// floats in [0, 1], each moved by its own random affine map when u (B, 5) is given, then normalised,
// (x - mean) / std. The map is data.warp's: u in [-1, 1] scaled by spans (rotation and shear in
// radians, zoom, x and y shift in grid units) gives the inverse map (output pixel -> input pixel) that
// F.grid_sample(align_corners=False, padding_mode="zeros") would sample bilinearly. torch's version
// takes about twenty small ops and a generic grid_sample; this is one pass (README: what stays in cpu/).
torch::Tensor batch_images(torch::Tensor images, torch::Tensor idx, std::optional<torch::Tensor> u_or_none,
                           std::vector<double> spans, double mean, double std) {
  constexpr int64_t kSide = 28, kPixels = kSide * kSide, kPad = 32;  // the source, zero-bordered, at (1, 1)
  static_assert(kPixels % Vec::kWidth == 0);
  check_arg({"batch_images", "images"}, images, at::kByte, "(N, 28, 28)", {-1, kSide, kSide});
  check_arg({"batch_images", "idx"}, idx, at::kLong, "(B)", {-1});
  if (u_or_none) check_arg({"batch_images", "u"}, *u_or_none, std::nullopt, "(B, 5)", {idx.size(0), 5});
  TORCH_CHECK(!u_or_none || spans.size() == 5, "lstm_cpu.batch_images: spans must hold 5 values with u, got ",
              spans.size());
  images = images.contiguous();
  const auto index = idx.contiguous();
  const auto u = u_or_none.has_value() ? u_or_none->to(torch::kFloat).contiguous() : torch::Tensor();
  const int64_t B = index.numel(), N = images.size(0);
  auto out = torch::empty({B, kSide, kSide}, torch::kFloat);
  const uint8_t* src0 = images.data_ptr<uint8_t>();
  const int64_t* ix0 = index.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(ix0[b] >= 0 && ix0[b] < N, "image index out of range");
  const float m_ = static_cast<float>(mean), inv_std_ = static_cast<float>(1.0 / std);
  const V m = Vec::set(m_), inv_std = Vec::set(inv_std_);
  const auto all = Vec::mask(Vec::kWidth);
  static const auto grid = [] {  // pixel centres, x and y in [-1, 1]
    std::vector<float> xy(2 * kPixels);
    for (int64_t p = 0; p < kPixels; ++p) {
      xy[p] = (2 * (p % kSide) + 1) / float(kSide) - 1;
      xy[kPixels + p] = (2 * (p / kSide) + 1) / float(kSide) - 1;
    }
    return xy;
  }();
  const float *grid_x = grid.data(), *grid_y = grid.data() + kPixels;
  float* out0 = out.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    float pad[kPad * kPad];
    std::fill(pad, pad + kPad * kPad, 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* src = src0 + ix0[b] * kPixels;
      float* dst = out0 + b * kPixels;
      if (!u.defined()) {
#pragma omp simd
        for (int64_t p = 0; p < kPixels; ++p) dst[p] = (static_cast<float>(src[p]) / 255.f - m_) * inv_std_;
        continue;
      }
      for (int64_t r = 0; r < kSide; ++r)
        for (int64_t c = 0; c < kSide; ++c) pad[(r + 1) * kPad + c + 1] = static_cast<float>(src[r * kSide + c]) / 255.f;
      const float* ub = u.data_ptr<float>() + b * 5;
      const float angle = ub[0] * static_cast<float>(spans[0]), shear = ub[1] * static_cast<float>(spans[1]);
      const float scale = 1.f + ub[2] * static_cast<float>(spans[2]);
      const float cos = std::cos(angle), sin = std::sin(angle), tan = std::tan(shear);
      // the map in source pixels (align_corners=False: s = ((g + 1) * 28 - 1) / 2) of grid coordinates
      const V a = Vec::set(cos / scale * 14), bx = Vec::set((tan * cos - sin) / scale * 14);
      const V d = Vec::set(sin / scale * 14), e = Vec::set((cos + tan * sin) / scale * 14);
      const V tx = Vec::set((ub[3] * static_cast<float>(spans[3]) + 1) * 14 - 0.5f);
      const V ty = Vec::set((ub[4] * static_cast<float>(spans[4]) + 1) * 14 - 0.5f);
      for (int64_t p = 0; p < kPixels; p += Vec::kWidth) {
        // the output pixel's centre in [-1, 1], mapped to the source, clamped to [-1, 28] (where every
        // corner outside the image reads the zero border) and sampled bilinearly
        const V xn = Vec::load(grid_x + p, all), yn = Vec::load(grid_y + p, all);
        const V sx = Vec::clamp(a * xn + bx * yn + tx, -1.f, float(kSide));
        const V sy = Vec::clamp(d * xn + e * yn + ty, -1.f, float(kSide));
        const V fx = Vec::floor(sx), fy = Vec::floor(sy), wx = sx - fx, wy = sy - fy;
        const V at = fy * Vec::set(float(kPad)) + fx + Vec::set(float(kPad + 1));
        const V tl = Vec::gather(pad, at), tr = Vec::gather(pad + 1, at);
        const V bl = Vec::gather(pad + kPad, at), br = Vec::gather(pad + kPad + 1, at);
        const V top = tl + wx * (tr - tl), bottom = bl + wx * (br - bl);
        Vec::store(dst + p, (top + wy * (bottom - top) - m) * inv_std, all);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &lstm_forward<>, "LSTM stack forward, CPU fp32", py::arg("x"), py::arg("weights"), py::arg("keep"),
        py::arg("dropout") = 0.0, py::arg("seeds") = std::vector<int64_t>{});
  m.def("backward", &lstm_backward<>, "LSTM stack backward, CPU fp32", py::arg("d_hs"), py::arg("d_c_n"),
        py::arg("d_h_n"), py::arg("layout"), py::arg("kept"), py::arg("weights"), py::arg("need_dx"),
        py::arg("dropout") = 0.0, py::arg("seeds") = std::vector<int64_t>{});
  m.def("gemm_seconds", &gemm_seconds, "seconds per forward + backward of one layer in its GEMMs alone");
  m.def("batch_images", &batch_images, "uint8 images[idx] -> normalised floats, augmented when u is given");
  m.def("dropout_mask", &dropout_mask, "dropout mask, CPU fp32");
  m.def("flush_denormals", &flush_denormals, "FTZ and DAZ on all of torch's CPU threads");
}
