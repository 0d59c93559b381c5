// CPU fused linear cross-entropy: per-token log-sum-exp and loss from hidden @ weight^T without the
// [N, V] logits, and the matching backward (d_hidden, optional d_weight / d_bias).
//
// The logits are computed one L2-sized tile at a time (BLAS GEMM through ATen on tile views into a
// thread-local buffer) and consumed while the tile is still in cache: the forward updates an online
// max / sum-exp / target logit per row, the backward turns the tile into softmax - onehot in place and
// feeds it straight into the second GEMM. Threads split token blocks (at::parallel_for, i.e. OpenMP in
// PyTorch's build); the weight-gradient path splits vocabulary blocks instead so no two threads write the
// same d_weight rows.
//
// Math per non-ignored row i (z = h_i W^T + b, smoothing eps, V classes), identical to the PyTorch path:
//   lse_i  = log sum_c exp(z_c)
//   loss_i = lse_i - (1 - eps) z_{t_i} - eps/V sum_c z_c
//   dz_c   = g_i * (exp(z_c - lse_i) - (1 - eps)[c == t_i] - eps/V)
// lce_forward_grad (frozen weight) does the forward and the d_hidden of a unit upstream gradient at once:
// per token block, the [rows, V] logits in one GEMM, lse / loss / dlogits in place, d_hidden in a second
// GEMM (two products instead of the three of forward + recomputing backward). With a z-loss weight zeta,
// loss_i += zeta lse_i^2 and the softmax term of dz is scaled by c_i = 1 + 2 zeta lse_i.
// Registered as torch.ops.sonar_native.lce_forward / lce_backward / lce_forward_grad (TORCH_LIBRARY).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace sonar_native {
namespace {

// exp for float on 8 lanes with GCC/Clang vector extensions (the compiler maps them onto AVX2, or onto
// pairs of SSE registers): x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 Taylor polynomial
// (relative error < 1e-7 measured against double exp), 2^n assembled in the exponent bits. Inputs are
// clamped to [-87, 88]: below -87 the result is about 1e-38 instead of a denormal or 0, far below what
// a float softmax can resolve. Plain scalar code with the same clamps does not vectorise (GCC 12 turns
// the clamps into branches), hence the explicit vector types.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f exp8(v8f x) {
  x = x < -87.0f ? v8f{} - 87.0f : x;
  x = x > 88.0f ? v8f{} + 88.0f : x;
  const v8f n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v8f r = x - n * 0.693145751953125f;  // ln2 in two parts: n * ln2_hi is exact
  r = r - n * 1.428606765330187045e-06f;
  v8f p = v8f{} + 1.98412698412698413e-04f;  // 1/7!
  p = p * r + 1.38888888888888889e-03f;
  p = p * r + 8.33333333333333333e-03f;
  p = p * r + 4.16666666666666667e-02f;
  p = p * r + 1.66666666666666667e-01f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * reinterpret_cast<const v8f&>(bits);
}

inline float exp1(float x) { return exp8(v8f{} + x)[0]; }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// max and sum of one row of a tile
template <typename T>
inline void row_max_sum(const T* z, int64_t n, T& mx, T& sum) {
  T m = z[0], s = 0;
#pragma omp simd reduction(max : m) reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    m = z[j] > m ? z[j] : m;
    s += z[j];
  }
  mx = m;
  sum = s;
}

// sum_j exp(z_j - shift)
inline double row_sum_exp(const double* z, int64_t n, double shift) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(z[j] - shift);
  return s;
}

inline float row_sum_exp(const float* z, int64_t n, float shift) {
  v8f acc{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc += exp8(load8(z + j) - shift);
  float s = 0;
  for (; j < n; ++j) s += exp1(z[j] - shift);
  for (int k = 0; k < 8; ++k) s += acc[k];
  return s;
}

// z <- g * (c * exp(z - lse) - off) in place (c = 1 + 2 zeta lse with a z-loss, else 1)
inline void row_softmax_grad(double* z, int64_t n, double lse, double off, double g, double c = 1.0) {
  const double gc = g * c;
  for (int64_t j = 0; j < n; ++j) z[j] = gc * std::exp(z[j] - lse) - g * off;
}

inline void row_softmax_grad(float* z, int64_t n, float lse, float off, float g, float c = 1.0f) {
  const float gc = g * c, goff = g * off;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) store8(z + j, gc * exp8(load8(z + j) - lse) - goff);
  for (; j < n; ++j) z[j] = gc * exp1(z[j] - lse) - goff;
}

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp1(x); }

// Each worker thread runs its tile GEMMs single-threaded. MKL (PyTorch's x86 BLAS) would otherwise
// start its own threads inside every small GEMM of every worker: measured 4-15x slower with 2 threads on
// a 2-core machine. MKL_Set_Num_Threads_Local (the C entry point; the lower-case symbol is the Fortran one
// that takes a pointer) is looked up at run time, so a torch built on another
// BLAS (OpenBLAS on ARM, ...) simply skips this.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
    if (set_local_ != nullptr) previous_ = set_local_(1);
  }
  ~SingleThreadedBlas() {
    if (set_local_ != nullptr) set_local_(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  using SetLocal = int (*)(int);
  static inline const SetLocal set_local_ =
      reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  int previous_ = 0;
};

struct Blocks {
  int64_t rows;
  int64_t vocab;
};

// Default tiles: up to 256 token rows x 512 vocabulary columns (a 512 KiB fp32 tile: fits a 1 MiB L2
// beside the GEMM's packed panels; measured best of 64-256 x 512-2048 on the tiny-SONAR and SONAR-like
// shapes, see docs/native.md). With few tokens the row block shrinks (not below 16) so that every
// thread gets a token block.
Blocks pick_blocks(int64_t block_rows, int64_t block_vocab, int64_t n, int64_t v) {
  TORCH_CHECK(block_rows >= 0 && block_vocab >= 0, "block_rows and block_vocab must be >= 0 (0 = default), got ",
              block_rows, " and ", block_vocab);
  Blocks b{block_rows, block_vocab ? block_vocab : 512};
  if (!b.rows) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t per_thread = (n + threads - 1) / threads;
    b.rows = std::min<int64_t>(256, std::max<int64_t>(16, (per_thread + 15) / 16 * 16));
  }
  b.rows = std::max<int64_t>(1, std::min(b.rows, n));
  b.vocab = std::max<int64_t>(1, std::min(b.vocab, v));
  return b;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && target.device().is_cpu(),
              "sonar_native linear cross-entropy runs on CPU tensors only");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [N, D] and weight [V, D], got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden ", hidden.sizes(), " and weight ", weight.sizes(),
              " disagree on D");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), "target must be [N] = [", hidden.size(0),
              "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden dtype ", hidden.scalar_type(),
              " must match weight dtype ", weight.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be [V] = [", weight.size(0),
                "], got ", bias->sizes());
  }
}

// Compute dtype: float64 stays float64, everything else runs in float32.
at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// logits of a tile: out[br, bc] = h_blk @ w_blk^T (+ b_blk)
inline void tile_logits(at::Tensor& out, const at::Tensor& h_blk, const at::Tensor& w_blk,
                        const at::Tensor& b_blk) {
  if (b_blk.defined()) {
    at::addmm_out(out, b_blk, h_blk, w_blk.t());
  } else {
    at::mm_out(out, h_blk, w_blk.t());
  }
}

template <typename T>
void forward_kernel(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, const int64_t* tgt,
                    int64_t ignore_index, double eps, Blocks blk, T* loss, T* lse) {
  const int64_t n = h.size(0), v = w.size(0);
  const int64_t nblocks = (n + blk.rows - 1) / blk.rows;
  const T ls = static_cast<T>(eps);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    SingleThreadedBlas one_thread;
    at::Tensor buf = at::empty({blk.rows, blk.vocab}, h.options());
    std::vector<T> m(blk.rows), s(blk.rows), zt(blk.rows), zs(blk.rows);
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * blk.rows, br = std::min(blk.rows, n - r0);
      const at::Tensor hb = h.narrow(0, r0, br);
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(s.begin(), s.end(), T(0));
      std::fill(zt.begin(), zt.end(), T(0));
      std::fill(zs.begin(), zs.end(), T(0));
      for (int64_t c0 = 0; c0 < v; c0 += blk.vocab) {
        const int64_t bc = std::min(blk.vocab, v - c0);
        at::Tensor tile = buf.narrow(0, 0, br).narrow(1, 0, bc);
        tile_logits(tile, hb, w.narrow(0, c0, bc), b.defined() ? b.narrow(0, c0, bc) : b);
        const T* base = tile.data_ptr<T>();
        const int64_t ld = tile.stride(0);
        for (int64_t i = 0; i < br; ++i) {
          const T* z = base + i * ld;
          T mx, sum;
          row_max_sum(z, bc, mx, sum);
          zs[i] += sum;
          if (mx > m[i]) {
            s[i] = s[i] * exp_any(m[i] - mx);  // exp(-inf) = 0 on the first block
            m[i] = mx;
          }
          s[i] += row_sum_exp(z, bc, m[i]);
          const int64_t t = tgt[r0 + i];
          if (t >= c0 && t < c0 + bc) zt[i] = z[t - c0];
        }
      }
      for (int64_t i = 0; i < br; ++i) {
        const T l = m[i] + std::log(s[i]);
        lse[r0 + i] = l;
        const bool valid = tgt[r0 + i] != ignore_index;
        loss[r0 + i] = valid ? l - (T(1) - ls) * zt[i] - (ls / static_cast<T>(v)) * zs[i] : T(0);
      }
    }
  });
}

template <typename T>
void dz_tile(at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* tgt, const T* lse, const T* g,
             int64_t ignore_index, T ls_over_v, T hit) {
  const int64_t br = tile.size(0), bc = tile.size(1), ld = tile.stride(0);
  T* base = tile.data_ptr<T>();
  for (int64_t i = 0; i < br; ++i) {
    T* z = base + i * ld;
    const int64_t t = tgt[r0 + i];
    const T gi = t == ignore_index ? T(0) : g[r0 + i];
    if (gi == T(0)) {
      std::fill(z, z + bc, T(0));
      continue;
    }
    row_softmax_grad(z, bc, lse[r0 + i], ls_over_v, gi);
    if (t >= c0 && t < c0 + bc) z[t - c0] -= gi * hit;
  }
}

// The gradient in the forward (frozen weight): token blocks in parallel; each block's logits against the
// whole vocabulary [br, V] go to a per-thread buffer with one GEMM, every row gets its lse and loss and is
// turned into the unit dlogits c softmax - (1-eps) onehot - eps/V in place, and a second GEMM writes
// d_hidden = dlogits @ W. Two products in all; the caller scales d_hidden rows by the upstream gradient.
template <typename T>
void forward_grad_kernel(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, const int64_t* tgt,
                         int64_t ignore_index, double eps, double zeta, int64_t rows, T* loss, T* lse,
                         at::Tensor& dh) {
  const int64_t n = h.size(0), v = w.size(0);
  const int64_t nblocks = (n + rows - 1) / rows;
  const T ls = static_cast<T>(eps), ls_over_v = static_cast<T>(eps / static_cast<double>(v));
  const T hit = static_cast<T>(1.0 - eps), zl = static_cast<T>(zeta);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    SingleThreadedBlas one_thread;
    at::Tensor buf = at::empty({rows, v}, h.options());
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * rows, br = std::min(rows, n - r0);
      at::Tensor tile = buf.narrow(0, 0, br);
      tile_logits(tile, h.narrow(0, r0, br), w, b);
      T* base = tile.data_ptr<T>();
      for (int64_t i = 0; i < br; ++i) {
        T* z = base + i * v;
        const int64_t t = tgt[r0 + i];
        T mx, sum;
        row_max_sum(z, v, mx, sum);
        const T l = mx + std::log(row_sum_exp(z, v, mx));
        lse[r0 + i] = l;
        if (t == ignore_index) {
          loss[r0 + i] = T(0);
          std::fill(z, z + v, T(0));
          continue;
        }
        const T zt = (t >= 0 && t < v) ? z[t] : T(0);
        loss[r0 + i] = l - hit * zt - (ls / static_cast<T>(v)) * sum + zl * l * l;
        row_softmax_grad(z, v, l, ls_over_v, T(1), T(1) + T(2) * zl * l);
        if (t >= 0 && t < v) z[t] -= hit;
      }
      at::Tensor dhb = dh.narrow(0, r0, br);
      at::mm_out(dhb, tile, w);
    }
  });
}

// d_hidden only (frozen weight): token blocks in parallel, each accumulating its own d_hidden rows.
template <typename T>
void backward_hidden_kernel(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, const int64_t* tgt,
                            const T* lse, const T* g, int64_t ignore_index, double eps, Blocks blk,
                            at::Tensor& dh) {
  const int64_t n = h.size(0), v = w.size(0);
  const int64_t nblocks = (n + blk.rows - 1) / blk.rows;
  const T ls_over_v = static_cast<T>(eps / static_cast<double>(v)), hit = static_cast<T>(1.0 - eps);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    SingleThreadedBlas one_thread;
    at::Tensor buf = at::empty({blk.rows, blk.vocab}, h.options());
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * blk.rows, br = std::min(blk.rows, n - r0);
      at::Tensor dhb = dh.narrow(0, r0, br);
      bool any = false;
      for (int64_t i = 0; i < br && !any; ++i) any = tgt[r0 + i] != ignore_index && g[r0 + i] != T(0);
      if (!any) {
        dhb.zero_();
        continue;
      }
      const at::Tensor hb = h.narrow(0, r0, br);
      for (int64_t c0 = 0; c0 < v; c0 += blk.vocab) {
        const int64_t bc = std::min(blk.vocab, v - c0);
        at::Tensor tile = buf.narrow(0, 0, br).narrow(1, 0, bc);
        const at::Tensor wb = w.narrow(0, c0, bc);
        tile_logits(tile, hb, wb, b.defined() ? b.narrow(0, c0, bc) : b);
        dz_tile<T>(tile, r0, c0, tgt, lse, g, ignore_index, ls_over_v, hit);
        if (c0 == 0) {
          at::mm_out(dhb, tile, wb);
        } else {
          dhb.addmm_(tile, wb);
        }
      }
    }
  });
}

// d_weight / d_bias (and d_hidden when asked): vocabulary blocks in parallel so each thread owns its
// d_weight rows; d_hidden goes to per-thread partial sums, added up at the end.
template <typename T>
void backward_weight_kernel(const at::Tensor& h, const at::Tensor& w, const at::Tensor& b, const int64_t* tgt,
                            const T* lse, const T* g, int64_t ignore_index, double eps, Blocks blk,
                            at::Tensor& dh, at::Tensor& dw, at::Tensor& db) {
  const int64_t n = h.size(0), v = w.size(0);
  const int64_t nvb = (v + blk.vocab - 1) / blk.vocab;
  const T ls_over_v = static_cast<T>(eps / static_cast<double>(v)), hit = static_cast<T>(1.0 - eps);
  const bool need_h = dh.defined(), need_b = db.defined();
  const int nthreads = at::get_num_threads();
  std::vector<at::Tensor> partial(nthreads);
  at::parallel_for(0, nvb, 1, [&](int64_t v0, int64_t v1) {
    SingleThreadedBlas one_thread;
    const int tid = at::get_thread_num();
    at::Tensor buf = at::empty({blk.rows, blk.vocab}, h.options());
    TORCH_CHECK(tid >= 0 && tid < nthreads, "thread id ", tid, " outside [0, ", nthreads, ")");
    at::Tensor dh_local;
    if (need_h) {  // a backend may hand one thread several chunks: keep adding into its partial sum
      if (!partial[tid].defined()) partial[tid] = at::zeros_like(dh);
      dh_local = partial[tid];
    }
    for (int64_t vb = v0; vb < v1; ++vb) {
      const int64_t c0 = vb * blk.vocab, bc = std::min(blk.vocab, v - c0);
      const at::Tensor wb = w.narrow(0, c0, bc);
      at::Tensor dwb = dw.narrow(0, c0, bc);
      const at::Tensor bb = b.defined() ? b.narrow(0, c0, bc) : b;
      for (int64_t r0 = 0; r0 < n; r0 += blk.rows) {
        const int64_t br = std::min(blk.rows, n - r0);
        const at::Tensor hb = h.narrow(0, r0, br);
        at::Tensor tile = buf.narrow(0, 0, br).narrow(1, 0, bc);
        tile_logits(tile, hb, wb, bb);
        dz_tile<T>(tile, r0, c0, tgt, lse, g, ignore_index, ls_over_v, hit);
        dwb.addmm_(tile.t(), hb);
        if (need_b) db.narrow(0, c0, bc).add_(tile.sum(0));
        if (need_h) dh_local.narrow(0, r0, br).addmm_(tile, wb);
      }
    }
  });
  if (need_h) {
    dh.zero_();
    for (const auto& p : partial)
      if (p.defined()) dh.add_(p);
  }
}

std::tuple<at::Tensor, at::Tensor> lce_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& target, const std::optional<at::Tensor>& bias,
                                               int64_t ignore_index, double label_smoothing, int64_t block_rows,
                                               int64_t block_vocab) {
  check_inputs(hidden, weight, target, bias);
  const auto acc = acc_type(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0);
  at::Tensor loss = at::empty({n}, hidden.options().dtype(acc));
  at::Tensor lse = at::empty({n}, hidden.options().dtype(acc));
  if (n == 0) return {loss, lse};
  const at::Tensor h = hidden.to(acc).contiguous();
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor t = target.contiguous();
  const Blocks blk = pick_blocks(block_rows, block_vocab, n, v);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "sonar_native_lce_forward", [&] {
    forward_kernel<scalar_t>(h, w, b, t.data_ptr<int64_t>(), ignore_index, label_smoothing, blk,
                             loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {loss, lse};
}

// Tokens per block of lce_forward_grad: the threads' [rows, V] buffers together within `budget_bytes`
// (the caller's bound), at most 64 rows (a GEMM of 64 x D x V is already efficient), at least 1.
int64_t forward_grad_rows(int64_t requested, int64_t n, int64_t v, int64_t elem, int64_t budget_bytes) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(n, 1));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t rows = budget_bytes / std::max<int64_t>(1, threads * v * elem);
  rows = std::min<int64_t>(rows, 64);
  rows = std::min<int64_t>(rows, (n + threads - 1) / threads);
  return std::max<int64_t>(1, rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_forward_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double z_loss,
    int64_t block_rows, int64_t budget_bytes) {
  check_inputs(hidden, weight, target, bias);
  const auto acc = acc_type(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0), d = hidden.size(1);
  at::Tensor loss = at::empty({n}, hidden.options().dtype(acc));
  at::Tensor lse = at::empty({n}, hidden.options().dtype(acc));
  at::Tensor dh = at::empty({n, d}, hidden.options().dtype(acc));
  if (n > 0) {
    const at::Tensor h = hidden.to(acc).contiguous();
    const at::Tensor w = weight.to(acc).contiguous();
    const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->to(acc).contiguous() : at::Tensor();
    const at::Tensor t = target.contiguous();
    const int64_t rows = forward_grad_rows(block_rows, n, v, at::elementSize(acc), budget_bytes);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "sonar_native_lce_forward_grad", [&] {
      forward_grad_kernel<scalar_t>(h, w, b, t.data_ptr<int64_t>(), ignore_index, label_smoothing, z_loss, rows,
                                    loss.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), dh);
    });
  }
  return {loss, lse, dh.to(hidden.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lce_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& grad_rows,
    int64_t ignore_index, double label_smoothing, bool need_hidden, bool need_weight, bool need_bias,
    int64_t block_rows, int64_t block_vocab) {
  check_inputs(hidden, weight, target, bias);
  const auto acc = acc_type(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0), d = hidden.size(1);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must be [N] = [", n, "], got ", lse.sizes());
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == n, "grad_rows must be [N] = [", n, "], got ",
              grad_rows.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!need_bias || has_bias, "need_bias=True but no bias was given");
  at::Tensor dh, dw, db;
  if (need_hidden) dh = at::empty({n, d}, hidden.options().dtype(acc));
  if (need_weight) dw = at::zeros({v, d}, hidden.options().dtype(acc));
  if (need_bias) db = at::zeros({v}, hidden.options().dtype(acc));
  if (n > 0 && (need_hidden || need_weight || need_bias)) {
    const at::Tensor h = hidden.to(acc).contiguous();
    const at::Tensor w = weight.to(acc).contiguous();
    const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
    const at::Tensor t = target.contiguous();
    const at::Tensor l = lse.to(acc).contiguous();
    const at::Tensor g = grad_rows.to(acc).contiguous();
    const Blocks blk = pick_blocks(block_rows, block_vocab, n, v);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "sonar_native_lce_backward", [&] {
      if (need_weight || need_bias) {
        at::Tensor dw_work = need_weight ? dw : at::zeros({v, d}, h.options());
        backward_weight_kernel<scalar_t>(h, w, b, t.data_ptr<int64_t>(), l.data_ptr<scalar_t>(),
                                         g.data_ptr<scalar_t>(), ignore_index, label_smoothing, blk, dh, dw_work,
                                         db);
      } else {
        backward_hidden_kernel<scalar_t>(h, w, b, t.data_ptr<int64_t>(), l.data_ptr<scalar_t>(),
                                         g.data_ptr<scalar_t>(), ignore_index, label_smoothing, blk, dh);
      }
    });
  } else if (need_hidden) {
    dh.zero_();
  }
  // undefined tensors cannot cross the op boundary: return empty ones for gradients not asked for
  const auto empty = at::empty({0}, hidden.options().dtype(acc));
  return {need_hidden ? dh.to(hidden.scalar_type()) : empty, need_weight ? dw.to(weight.scalar_type()) : empty,
          need_bias ? db.to(bias->scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY(sonar_native, m) {
  m.def(
      "lce_forward(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float label_smoothing, int block_rows=0, int block_vocab=0) -> (Tensor, Tensor)");
  m.def(
      "lce_backward(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor lse, Tensor grad_rows, "
      "int ignore_index, float label_smoothing, bool need_hidden, bool need_weight, bool need_bias, "
      "int block_rows=0, int block_vocab=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lce_forward_grad(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float label_smoothing, float z_loss, int block_rows, int budget_bytes) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sonar_native, CPU, m) {
  m.impl("lce_forward", &lce_forward);
  m.impl("lce_backward", &lce_backward);
  m.impl("lce_forward_grad", &lce_forward_grad);
}

}  // namespace sonar_native
