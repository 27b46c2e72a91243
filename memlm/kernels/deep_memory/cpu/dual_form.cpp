// pytorch/dual_form.py's DualFormChunks chunk loop (the Titans dual form, docs/design.md §3) as one CPU kernel.
//
// Same equations, same order of operations as pytorch/dual_form.py, whose docstrings state them; here every
// sequence-head runs its whole chunk loop on raw row-major blocks: the products go straight to BLAS
// (sgemm_/dgemm_, b = 16 rows each), the elementwise parts (GELU and its derivatives, the affine-free
// LayerNorm, the row scalings) are plain loops, erf and exp are vectorised (MKL VML). No tensor is
// allocated inside the loop, and the heads run in parallel (at::parallel_for, OpenMP).
//
// Layout (chunk-major, as DualFormChunks): q, k, v, o [C, NH, b, D]; β, d, G_b, n_b [C, NH, b];
// G [C, NH, b, b]; β_b, d_b, m_b [C, NH]; a layer's state P_l = [W_l ; S_l] [NH, 2 d_{l-1}, d_l].
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*);
void vsErf(int, const float*, float*);
void vdErf(int, const double*, double*);
void vsExp(int, const float*, float*);
void vdExp(int, const double*, double*);
int MKL_Set_Num_Threads_Local(int);
}

namespace {

// The tapes (about 100 MB per call at T = 1024) come from a pool of freed blocks, keyed by size: fresh memory from
// the system would be page-faulted in on every call, which costs more than the forward's arithmetic. The pool keeps
// its blocks (like a caching GPU allocator), so the resident memory is the peak of tapes alive at once.
struct Pool {
  std::mutex lock;
  std::unordered_map<size_t, std::vector<void*>> free;
};
Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may outlive static destruction at exit
  return *p;
}

torch::Tensor pooled(at::IntArrayRef shape, const torch::TensorOptions& options) {
  int64_t numel = 1;
  for (auto n : shape) numel *= n;
  const size_t bytes = (size_t(numel) * options.dtype().itemsize() + 63) / 64 * 64;
  void* block = nullptr;
  {
    std::lock_guard<std::mutex> guard(pool().lock);
    auto& blocks = pool().free[bytes];
    if (!blocks.empty()) {
      block = blocks.back();
      blocks.pop_back();
    }
  }
  if (!block) block = std::aligned_alloc(64, bytes);
  TORCH_CHECK(block, "memlm dual-form kernel: out of memory for a ", bytes, "-byte tape");
  auto give_back = [bytes](void* b) {
    std::lock_guard<std::mutex> guard(pool().lock);
    pool().free[bytes].push_back(b);
  };
  return torch::from_blob(block, shape, give_back, options);
}

constexpr double LN_EPS = 1e-5;  // mlp.LN_EPS

// C[M, N] = alpha op(A) op(B) + beta C, all row-major (op(A) [M, K]): column-major BLAS on the transposes.
void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
          float beta, float* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  sgemm_(&b, &a, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void gemm(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda, const double* B, int ldb,
          double beta, double* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  dgemm_(&b, &a, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}
void verf(int n, const float* x, float* y) { vsErf(n, x, y); }
void verf(int n, const double* x, double* y) { vdErf(n, x, y); }
void vexp(int n, const float* x, float* y) { vsExp(n, x, y); }
void vexp(int n, const double* x, double* y) { vdExp(n, x, y); }

template <typename T>
T dot(const T* a, const T* b, int n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Exact GELU of z [n]: h = z Φ(z), slope = φ'(z) = Φ(z) + z ϕ(z), second = φ''(z) = ϕ(z) (2 − z²) (may be null).
template <typename T>
void gelu(const T* z, int n, T* h, T* slope, T* second, T* erf_buf, T* exp_buf) {
  const T rsqrt2 = T(M_SQRT1_2), rsqrt2pi = T(0.5 * M_2_SQRTPI * M_SQRT1_2);
  for (int i = 0; i < n; ++i) {
    erf_buf[i] = z[i] * rsqrt2;
    exp_buf[i] = T(-0.5) * z[i] * z[i];
  }
  verf(n, erf_buf, erf_buf);
  vexp(n, exp_buf, exp_buf);
  for (int i = 0; i < n; ++i) {
    const T cdf = T(0.5) * (T(1) + erf_buf[i]), pdf = exp_buf[i] * rsqrt2pi;
    h[i] = z[i] * cdf;
    slope[i] = cdf + z[i] * pdf;
    if (second) second[i] = pdf * (T(2) - z[i] * z[i]);
  }
}

// Affine-free LayerNorm of the rows of z [rows, n]: y = (z − mean) rstd, rstd = 1 / sqrt(var + eps).
template <typename T>
void layer_norm(const T* z, int rows, int n, T* y, T* rstd) {
  for (int r = 0; r < rows; ++r) {
    const T* zr = z + r * n;
    T mean = 0, var = 0;
    for (int i = 0; i < n; ++i) mean += zr[i];
    mean /= n;
    for (int i = 0; i < n; ++i) var += (zr[i] - mean) * (zr[i] - mean);
    rstd[r] = T(1) / std::sqrt(var / n + T(LN_EPS));
    for (int i = 0; i < n; ++i) y[r * n + i] = (zr[i] - mean) * rstd[r];
  }
}

// Its vector-Jacobian product: dz = rstd (g − mean(g) − y mean(g ⊙ y)), row by row.
template <typename T>
void layer_norm_vjp(const T* g, const T* y, const T* rstd, int rows, int n, T* dz) {
  for (int r = 0; r < rows; ++r) {
    const T *gr = g + r * n, *yr = y + r * n;
    T mg = 0, mgy = 0;
    for (int i = 0; i < n; ++i) {
      mg += gr[i];
      mgy += gr[i] * yr[i];
    }
    mg /= n;
    mgy /= n;
    for (int i = 0; i < n; ++i) dz[r * n + i] = rstd[r] * (gr[i] - mg - yr[i] * mgy);
  }
}

// [c1 ⊙ h | c2 ⊙ h] [rows, 2n]: the read's [β ⊙ H | d ⊙ H] and the update's L = [G_b ⊙ X | n_b ⊙ X].
template <typename T>
void scaled(const T* h, const T* c1, const T* c2, int rows, int n, T* out) {
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < n; ++i) {
      out[r * 2 * n + i] = c1[r] * h[r * n + i];
      out[r * 2 * n + n + i] = c2[r] * h[r * n + i];
    }
}

// Offsets of one chunk-head's tape inside the [C, NH, size] tape: the start state P_l and what the backward needs.
struct Tape {
  int b, L, D, widest = 0;  // widest: the largest d_l
  std::vector<int> dims;  // d_0 … d_L
  std::vector<int64_t> P, X, slope_k, second_k, back, err, H, slope_q, hx;  // per layer index (unused ones −1)
  int64_t psi, y_k, rstd_k, y_q, rstd_q, size = 0;

  Tape(int b_, const std::vector<int>& dims_, bool norm) : b(b_), L(int(dims_.size()) - 1), D(dims_[0]), dims(dims_) {
    auto take = [&](int64_t n) { int64_t at = size; size += n; return at; };
    for (int d : dims) widest = std::max(widest, d);
    for (auto* v : {&P, &X, &slope_k, &second_k, &back, &err, &H, &slope_q, &hx}) v->assign(L + 1, -1);
    for (int l = 1; l <= L; ++l) {
      P[l] = take(2 * int64_t(dims[l - 1]) * dims[l]);
      err[l] = take(int64_t(b) * dims[l]);
      hx[l] = take(int64_t(b) * b);
      if (l < L)
        for (auto* v : {&X, &slope_k, &second_k, &back, &H, &slope_q}) (*v)[l] = take(int64_t(b) * dims[l]);
    }
    psi = take(int64_t(b) * D);
    y_k = norm ? take(int64_t(b) * D) : -1;
    rstd_k = norm ? take(b) : -1;
    y_q = norm ? take(int64_t(b) * D) : -1;
    rstd_q = norm ? take(b) : -1;
  }
};

struct Options {
  bool residual, norm;
};

// Per-thread scratch, sized for the widest layer.
template <typename T>
struct Scratch {
  std::vector<T> z, erf_buf, exp_buf, wide, A;
  explicit Scratch(const Tape& t) {
    const int64_t n = int64_t(t.b) * t.widest;
    z.resize(n), erf_buf.resize(n), exp_buf.resize(n), wide.resize(2 * n), A.resize(t.b * t.b);
  }
};

template <typename T>
struct ChunkInputs {  // one chunk-head's rows and coefficients
  const T *q, *k, *v, *beta, *d, *G, *G_e, *n_e;
  T beta_e, d_e, m_e;
};

template <typename T>
ChunkInputs<T> chunk_inputs(const std::vector<torch::Tensor>& in, int64_t c, int64_t n, int64_t NH, int b, int D) {
  const int64_t row = (c * NH + n) * b;
  auto p = [&](int i) { return in[i].data_ptr<T>(); };
  return {p(0) + row * D, p(1) + row * D, p(2) + row * D, p(3) + row,    p(4) + row,
          p(5) + row * b, p(9) + row,     p(10) + row,    p(6)[c * NH + n], p(7)[c * NH + n], p(8)[c * NH + n]};
}

// Runs body(lo, hi) over the heads [0, NH) in parallel, each thread with single-threaded BLAS: the products have 16
// rows, too small to split further.
template <typename F>
void over_heads(int64_t NH, const F& body) {
  at::parallel_for(0, NH, 1, [&](int64_t lo, int64_t hi) {
    const int before = MKL_Set_Num_Threads_Local(1);
    body(lo, hi);
    MKL_Set_Num_Threads_Local(before);
  });
}

// One chunk of one head: key pass at the start state P, dual-form read into o, chunk-end update into P_next.
template <typename T>
void forward_chunk(const Tape& t, const Options& opt, const ChunkInputs<T>& x, const std::vector<const T*>& P,
                   const std::vector<T*>& P_next, T* tape, T* o, Scratch<T>& s) {
  const int b = t.b, L = t.L, D = t.D;
  const auto& dims = t.dims;
  auto X = [&](int l) -> const T* { return l == 0 ? x.k : tape + t.X[l]; };
  auto Hq = [&](int l) -> const T* { return l == 0 ? x.q : tape + t.H[l]; };
  // keys: M_{W_0}(k), ψ = 2 (M(k) − v), Δ_L = LNᵀ ψ, Δ_l = (Δ_{l+1} W_{l+1}ᵀ) ⊙ φ'(z_l)
  for (int l = 1; l <= L; ++l) {
    gemm(false, false, b, dims[l], dims[l - 1], T(1), X(l - 1), dims[l - 1], P[l - 1], dims[l], T(0), s.z.data(), dims[l]);
    if (l < L)
      gelu(s.z.data(), b * dims[l], tape + t.X[l], tape + t.slope_k[l], tape + t.second_k[l], s.erf_buf.data(),
           s.exp_buf.data());
  }
  T* psi = tape + t.psi;
  const T* out = s.z.data();
  if (opt.norm) {
    layer_norm(s.z.data(), b, D, tape + t.y_k, tape + t.rstd_k);
    out = tape + t.y_k;
  }
  for (int i = 0; i < b * D; ++i) psi[i] = T(2) * (out[i] + (opt.residual ? x.k[i] : T(0)) - x.v[i]);
  T* err_L = tape + t.err[L];
  if (opt.norm)
    layer_norm_vjp(psi, tape + t.y_k, tape + t.rstd_k, b, D, err_L);
  else
    std::copy(psi, psi + b * D, err_L);
  for (int l = L - 1; l >= 1; --l) {
    T *back = tape + t.back[l], *err = tape + t.err[l];
    gemm(false, true, b, dims[l], dims[l + 1], T(1), tape + t.err[l + 1], dims[l + 1], P[l], dims[l + 1], T(0), back,
         dims[l]);
    const T* slope = tape + t.slope_k[l];
    for (int i = 0; i < b * dims[l]; ++i) err[i] = back[i] * slope[i];
  }
  // read: Z_l = [β ⊙ H | d ⊙ H] P_l − (G ⊙ H X_lᵀ) Δ_l
  for (int l = 1; l <= L; ++l) {
    const int din = dims[l - 1], dout = dims[l];
    T* hx = tape + t.hx[l];
    gemm(false, true, b, b, din, T(1), Hq(l - 1), din, X(l - 1), din, T(0), hx, b);
    for (int i = 0; i < b * b; ++i) s.A[i] = x.G[i] * hx[i];
    scaled(Hq(l - 1), x.beta, x.d, b, din, s.wide.data());
    gemm(false, false, b, dout, 2 * din, T(1), s.wide.data(), 2 * din, P[l - 1], dout, T(0), s.z.data(), dout);
    gemm(false, false, b, dout, b, T(-1), s.A.data(), b, tape + t.err[l], dout, T(1), s.z.data(), dout);
    if (l < L)
      gelu(s.z.data(), b * dout, tape + t.H[l], tape + t.slope_q[l], (T*)nullptr, s.erf_buf.data(), s.exp_buf.data());
  }
  const T* y = s.z.data();
  if (opt.norm) {
    layer_norm(s.z.data(), b, D, tape + t.y_q, tape + t.rstd_q);
    y = tape + t.y_q;
  }
  for (int i = 0; i < b * D; ++i) o[i] = y[i] + (opt.residual ? x.q[i] : T(0));
  // update: [W' ; S'] = [β_b W + d_b S ; m_b S] − Lᵀ Δ
  for (int l = 1; l <= L; ++l) {
    const int din = dims[l - 1], dout = dims[l];
    const int64_t n = int64_t(din) * dout;
    const T *W = P[l - 1], *S = P[l - 1] + n;
    T *Wn = P_next[l - 1], *Sn = P_next[l - 1] + n;
    for (int64_t i = 0; i < n; ++i) {
      Wn[i] = x.beta_e * W[i] + x.d_e * S[i];
      Sn[i] = x.m_e * S[i];
    }
    scaled(X(l - 1), x.G_e, x.n_e, b, din, s.wide.data());
    gemm(true, false, 2 * din, dout, b, T(-1), s.wide.data(), 2 * din, tape + t.err[l], dout, T(1), P_next[l - 1], dout);
  }
}

// Backward scratch of one thread: per layer l (index l, 1 … L) the carry ∂P_l and its next value, ∂Z_l, A_lᵀ ∂Z_l,
// a_l = ∂L/∂Δ_l and e_l = −∂L/∂X_{l−1}; the rest sized for the widest layer.
template <typename T>
struct BackScratch {
  std::vector<std::vector<T>> carry, spare, dZ, AdZ, a, e, GE;
  std::vector<T> dz, dh, d_err, dy, wide, wide2, E, A, d_back;
  explicit BackScratch(const Tape& t) {
    const int b = t.b, L = t.L;
    for (auto* v : {&carry, &spare, &dZ, &AdZ, &a, &e, &GE}) v->resize(L + 1);
    for (int l = 1; l <= L; ++l) {
      const int din = t.dims[l - 1], dout = t.dims[l];
      carry[l].resize(2 * int64_t(din) * dout), spare[l].resize(2 * int64_t(din) * dout);
      dZ[l].resize(b * dout), AdZ[l].resize(b * dout), a[l].resize(b * dout), e[l].resize(b * din), GE[l].resize(b * b);
    }
    const int64_t n = int64_t(b) * t.widest;
    dz.resize(n), dh.resize(n), d_err.resize(n), dy.resize(n), wide.resize(2 * n), wide2.resize(2 * n), d_back.resize(n);
    E.resize(b * b), A.resize(b * b);
  }
};

template <typename T>
struct ChunkGrads {  // one chunk-head's gradient rows (written, not accumulated)
  T *dq, *dk, *dv, *beta, *d, *G, *beta_e, *d_e, *m_e, *G_e, *n_e;
};

// Backward of forward_chunk: from ∂o and the carry s.carry = ∂P_end, the chunk's input gradients and, in s.spare,
// ∂P_start. The equations are pytorch/dual_form.py's _read_vjp, _update_vjp, _keys_vjp and _state_vjp.
template <typename T>
void backward_chunk(const Tape& t, const Options& opt, const ChunkInputs<T>& x, const std::vector<const T*>& P,
                    const T* tape, const T* d_o, const ChunkGrads<T>& g, BackScratch<T>& s) {
  const int b = t.b, L = t.L, D = t.D;
  const auto& dims = t.dims;
  auto X = [&](int l) -> const T* { return l == 0 ? x.k : tape + t.X[l]; };
  auto Hq = [&](int l) -> const T* { return l == 0 ? x.q : tape + t.H[l]; };
  // read: ∂Z_l layer by layer from the top; ∂(β, d), ∂G = −Σ_l H X_lᵀ ⊙ E_l with E_l = ∂Z_l Δ_lᵀ
  T* dz = s.dz.data();
  if (opt.norm)
    layer_norm_vjp(d_o, tape + t.y_q, tape + t.rstd_q, b, D, dz);
  else
    std::copy(d_o, d_o + b * D, dz);
  std::fill(g.beta, g.beta + b, T(0));
  std::fill(g.d, g.d + b, T(0));
  std::fill(g.G, g.G + b * b, T(0));
  T* dh = s.dh.data();
  for (int l = L; l >= 1; --l) {
    const int din = dims[l - 1], dout = dims[l];
    const T *h = Hq(l - 1), *hx = tape + t.hx[l], *err = tape + t.err[l];
    T *ds = s.wide.data(), *E = s.E.data(), *GE = s.GE[l].data(), *A = s.A.data();
    gemm(false, true, b, 2 * din, dout, T(1), dz, dout, P[l - 1], dout, T(0), ds, 2 * din);
    gemm(false, true, b, b, dout, T(1), dz, dout, err, dout, T(0), E, b);
    for (int i = 0; i < b * b; ++i) {
      GE[i] = x.G[i] * E[i];
      g.G[i] -= hx[i] * E[i];
      A[i] = x.G[i] * hx[i];
    }
    for (int r = 0; r < b; ++r) {
      g.beta[r] += dot(ds + r * 2 * din, h + r * din, din);
      g.d[r] += dot(ds + r * 2 * din + din, h + r * din, din);
      for (int i = 0; i < din; ++i) dh[r * din + i] = x.beta[r] * ds[r * 2 * din + i] + x.d[r] * ds[r * 2 * din + din + i];
    }
    std::copy(dz, dz + b * dout, s.dZ[l].data());
    gemm(true, false, b, dout, b, T(1), A, b, dz, dout, T(0), s.AdZ[l].data(), dout);
    gemm(false, false, b, din, b, T(-1), GE, b, X(l - 1), din, T(1), dh, din);
    if (l > 1) {
      const T* slope = tape + t.slope_q[l - 1];
      for (int i = 0; i < b * din; ++i) dz[i] = dh[i] * slope[i];
    }
  }
  for (int i = 0; i < b * D; ++i) g.dq[i] = dh[i] + (opt.residual ? d_o[i] : T(0));
  // update: ∂(β_b, d_b, m_b) = ⟨∂P_end, P⟩ blocks; a_l = ∂Δ_l = −A_lᵀ ∂Z_l − L_l ∂P_l;
  // e_l = −∂X_{l−1} = (G ⊙ E_l)ᵀ H_{l−1} + [G_b | n_b] ⊙ Δ_l ∂P_lᵀ; ∂(G_b, n_b) = −⟨Δ_l ∂P_lᵀ, X_{l−1}⟩
  T inner_ww = 0, inner_ws = 0, inner_ss = 0;
  std::fill(g.G_e, g.G_e + b, T(0));
  std::fill(g.n_e, g.n_e + b, T(0));
  for (int l = 1; l <= L; ++l) {
    const int din = dims[l - 1], dout = dims[l];
    const int64_t n = int64_t(din) * dout;
    const T *W = P[l - 1], *S = W + n, *dW = s.carry[l].data(), *dS = dW + n, *xl = X(l - 1);
    inner_ww += dot(dW, W, int(n));
    inner_ws += dot(dW, S, int(n));
    inner_ss += dot(dS, S, int(n));
    T *left = s.wide.data(), *dl = s.wide2.data(), *a = s.a[l].data(), *e = s.e[l].data();
    scaled(xl, x.G_e, x.n_e, b, din, left);
    for (int i = 0; i < b * dout; ++i) a[i] = -s.AdZ[l][i];
    gemm(false, false, b, dout, 2 * din, T(-1), left, 2 * din, dW, dout, T(1), a, dout);
    gemm(false, true, b, 2 * din, dout, T(1), tape + t.err[l], dout, dW, dout, T(0), dl, 2 * din);
    for (int r = 0; r < b; ++r) {
      g.G_e[r] -= dot(dl + r * 2 * din, xl + r * din, din);
      g.n_e[r] -= dot(dl + r * 2 * din + din, xl + r * din, din);
      for (int i = 0; i < din; ++i) e[r * din + i] = x.G_e[r] * dl[r * 2 * din + i] + x.n_e[r] * dl[r * 2 * din + din + i];
    }
    gemm(true, false, b, din, b, T(1), s.GE[l].data(), b, Hq(l - 1), din, T(1), e, din);
  }
  *g.beta_e = inner_ww, *g.d_e = inner_ws, *g.m_e = inner_ss;
  // ∂P_start = [β_b ∂W' ; m_b ∂S' + d_b ∂W'] + [β ⊙ H | d ⊙ H]ᵀ ∂Z, then the key pass's weight terms below
  for (int l = 1; l <= L; ++l) {
    const int din = dims[l - 1], dout = dims[l];
    const int64_t n = int64_t(din) * dout;
    const T *dW = s.carry[l].data(), *dS = dW + n;
    T *nW = s.spare[l].data(), *nS = nW + n;
    for (int64_t i = 0; i < n; ++i) {
      nW[i] = x.beta_e * dW[i];
      nS[i] = x.m_e * dS[i] + x.d_e * dW[i];
    }
    scaled(Hq(l - 1), x.beta, x.d, b, din, s.wide.data());
    gemm(true, false, 2 * din, dout, b, T(1), s.wide.data(), 2 * din, s.dZ[l].data(), dout, T(1), nW, dout);
  }
  // key pass (second order in W_0): Δ_l = (Δ_{l+1} W_{l+1}ᵀ) ⊙ φ'(z_l)
  for (int l = 1; l < L; ++l) {
    const T* slope = tape + t.slope_k[l];
    T* d_back = s.d_back.data();
    for (int i = 0; i < b * dims[l]; ++i) d_back[i] = s.a[l][i] * slope[i];
    gemm(false, false, b, dims[l + 1], dims[l], T(1), d_back, dims[l], P[l], dims[l + 1], T(1), s.a[l + 1].data(),
         dims[l + 1]);
    gemm(true, false, dims[l], dims[l + 1], b, T(1), d_back, dims[l], tape + t.err[l + 1], dims[l + 1], T(1),
         s.spare[l + 1].data(), dims[l + 1]);
  }
  // Δ_L = LN_zᵀ ψ with ψ = 2 (M(k) − v): through ψ, through y = LN(z_L) and through rstd(z_L)
  const T* last = s.a[L].data();
  T* d_err = s.d_err.data();
  if (!opt.norm) {
    for (int i = 0; i < b * D; ++i) dz[i] = d_err[i] = T(2) * last[i];
  } else {
    const T *y = tape + t.y_k, *r = tape + t.rstd_k, *psi = tape + t.psi, *err_L = tape + t.err[L];
    layer_norm_vjp(last, y, r, b, D, d_err);
    for (int i = 0; i < b * D; ++i) d_err[i] *= T(2);
    T* dy = s.dy.data();
    for (int row = 0; row < b; ++row) {
      const int o = row * D;
      const T rm = r[row] / D, s1 = rm * dot(psi + o, y + o, D), s2 = rm * dot(last + o, y + o, D);
      for (int i = o; i < o + D; ++i) dy[i] = d_err[i] - last[i] * s1 - psi[i] * s2;
    }
    layer_norm_vjp(dy, y, r, b, D, dz);
    for (int row = 0; row < b; ++row) {
      const int o = row * D;
      const T s3 = r[row] / D * dot(last + o, err_L + o, D);
      for (int i = o; i < o + D; ++i) dz[i] -= y[i] * s3;
    }
  }
  for (int l = L; l >= 1; --l) {
    const int din = dims[l - 1], dout = dims[l];
    gemm(true, false, din, dout, b, T(1), X(l - 1), din, dz, dout, T(1), s.spare[l].data(), dout);
    for (int i = 0; i < b * din; ++i) dh[i] = -s.e[l][i];
    gemm(false, true, b, din, dout, T(1), dz, dout, P[l - 1], dout, T(1), dh, din);
    if (l > 1) {  // z_{l−1} enters Δ_{l−1} through φ'(z) and h = φ(z)
      const T *a = s.a[l - 1].data(), *back = tape + t.back[l - 1], *second = tape + t.second_k[l - 1],
              *slope = tape + t.slope_k[l - 1];
      for (int i = 0; i < b * din; ++i) dz[i] = a[i] * back[i] * second[i] + dh[i] * slope[i];
    }
  }
  for (int i = 0; i < b * D; ++i) {
    g.dk[i] = dh[i] + (opt.residual ? d_err[i] : T(0));
    g.dv[i] = -d_err[i];
  }
  std::swap(s.carry, s.spare);
}

std::vector<int> layer_dims(const std::vector<torch::Tensor>& W) {
  std::vector<int> dims{int(W[0].size(1))};
  for (const auto& w : W) dims.push_back(int(w.size(2)));
  return dims;
}

// Layer l's start state P_l = [W_l ; S_l] of every head in a chunk's tape, as [NH, 2 d_{l-1}, d_l].
torch::Tensor state_view(const torch::Tensor& tape, const Tape& t, int l) {
  return tape.narrow(1, t.P[l], 2 * int64_t(t.dims[l - 1]) * t.dims[l]).view({tape.size(0), 2 * t.dims[l - 1], t.dims[l]});
}

}  // namespace

// Forward of DualFormChunks: (o, W_final…, S_final…, tape) with tape [C, NH, Tape::size] every chunk's start state
// and what the backward needs. `in` = (q, k, v, β, d, G, β_b, d_b, m_b, G_b, n_b), contiguous.
// Without ``keep_tape`` (nothing will call the backward) the tape is a workspace of two chunks per head, each chunk
// writing the next one's start state into the other slot, freed on return: no pool block outlives the call.
std::vector<torch::Tensor> dual_form_forward(std::vector<torch::Tensor> in, std::vector<torch::Tensor> W,
                                             std::vector<torch::Tensor> S, bool residual, bool norm, bool keep_tape) {
  const int64_t C = in[0].size(0), NH = in[0].size(1);
  const int b = int(in[0].size(2)), D = int(in[0].size(3));
  const Tape t(b, layer_dims(W), norm);
  const Options opt{residual, norm};
  auto o = torch::empty_like(in[0]);
  const int64_t slots = keep_tape ? C : std::min<int64_t>(C, 2);
  auto tape = keep_tape ? pooled({C, NH, t.size}, in[0].options()) : torch::empty({slots, NH, t.size}, in[0].options());
  std::vector<torch::Tensor> final_state;
  for (size_t l = 0; l < W.size(); ++l) {
    final_state.push_back(torch::empty({NH, 2 * W[l].size(1), W[l].size(2)}, in[0].options()));
    state_view(tape[0], t, int(l) + 1).copy_(torch::cat({W[l], S[l]}, 1));
  }
  AT_DISPATCH_FLOATING_TYPES(in[0].scalar_type(), "dual_form_forward", [&] {
    over_heads(NH, [&](int64_t lo, int64_t hi) {
      Scratch<scalar_t> s(t);
      std::vector<const scalar_t*> P(t.L);
      std::vector<scalar_t*> P_next(t.L);
      for (int64_t n = lo; n < hi; ++n)
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* here = tape.data_ptr<scalar_t>() + ((c % slots) * NH + n) * t.size;
          scalar_t* next = tape.data_ptr<scalar_t>() + (((c + 1) % slots) * NH + n) * t.size;
          for (int l = 1; l <= t.L; ++l) {
            P[l - 1] = here + t.P[l];
            P_next[l - 1] = c + 1 < C ? next + t.P[l] : final_state[l - 1][n].data_ptr<scalar_t>();
          }
          forward_chunk(t, opt, chunk_inputs<scalar_t>(in, c, n, NH, b, D), P, P_next, here,
                        o.data_ptr<scalar_t>() + (c * NH + n) * b * D, s);
        }
    });
  });
  std::vector<torch::Tensor> result{o};
  for (auto& st : final_state) result.push_back(st.unflatten(1, {2, -1}).select(1, 0));
  for (auto& st : final_state) result.push_back(st.unflatten(1, {2, -1}).select(1, 1));
  result.push_back(keep_tape ? tape : torch::Tensor());
  return result;
}

// Backward of DualFormChunks: (∂q, ∂k, ∂v, ∂β, ∂d, ∂G, ∂β_b, ∂d_b, ∂m_b, ∂G_b, ∂n_b, ∂W_0…, ∂S_0…) from the forward's
// inputs and tape, ∂o and the final states' gradients.
std::vector<torch::Tensor> dual_form_backward(std::vector<torch::Tensor> in, torch::Tensor tape, torch::Tensor d_o,
                                              std::vector<torch::Tensor> dW, std::vector<torch::Tensor> dS,
                                              bool residual, bool norm) {
  const int64_t C = in[0].size(0), NH = in[0].size(1);
  const int b = int(in[0].size(2)), D = int(in[0].size(3));
  const Tape t(b, layer_dims(dW), norm);
  const Options opt{residual, norm};
  d_o = d_o.contiguous();
  std::vector<torch::Tensor> grads;
  for (const auto& x : in) grads.push_back(torch::empty_like(x));
  std::vector<torch::Tensor> dW0, dS0;
  for (size_t l = 0; l < dW.size(); ++l) dW0.push_back(torch::empty_like(dW[l])), dS0.push_back(torch::empty_like(dS[l]));
  AT_DISPATCH_FLOATING_TYPES(in[0].scalar_type(), "dual_form_backward", [&] {
    over_heads(NH, [&](int64_t lo, int64_t hi) {
      BackScratch<scalar_t> s(t);
      std::vector<const scalar_t*> P(t.L);
      for (int64_t n = lo; n < hi; ++n) {
        for (int l = 1; l <= t.L; ++l) {
          const int64_t size = int64_t(t.dims[l - 1]) * t.dims[l];
          auto w = dW[l - 1][n].contiguous(), sm = dS[l - 1][n].contiguous();
          std::copy(w.data_ptr<scalar_t>(), w.data_ptr<scalar_t>() + size, s.carry[l].data());
          std::copy(sm.data_ptr<scalar_t>(), sm.data_ptr<scalar_t>() + size, s.carry[l].data() + size);
        }
        for (int64_t c = C - 1; c >= 0; --c) {
          const int64_t at = c * NH + n;
          const scalar_t* here = tape.data_ptr<scalar_t>() + at * t.size;
          for (int l = 1; l <= t.L; ++l) P[l - 1] = here + t.P[l];
          auto p = [&](int i) { return grads[i].data_ptr<scalar_t>(); };
          const ChunkGrads<scalar_t> g{p(0) + at * b * D, p(1) + at * b * D, p(2) + at * b * D, p(3) + at * b,
                                       p(4) + at * b,     p(5) + at * b * b, p(6) + at,         p(7) + at,
                                       p(8) + at,         p(9) + at * b,     p(10) + at * b};
          backward_chunk(t, opt, chunk_inputs<scalar_t>(in, c, n, NH, b, D), P, here,
                         d_o.data_ptr<scalar_t>() + at * b * D, g, s);
        }
        for (int l = 1; l <= t.L; ++l) {
          const int64_t size = int64_t(t.dims[l - 1]) * t.dims[l];
          std::copy(s.carry[l].data(), s.carry[l].data() + size, dW0[l - 1][n].data_ptr<scalar_t>());
          std::copy(s.carry[l].data() + size, s.carry[l].data() + 2 * size, dS0[l - 1][n].data_ptr<scalar_t>());
        }
      }
    });
  });
  grads.insert(grads.end(), dW0.begin(), dW0.end());
  grads.insert(grads.end(), dS0.begin(), dS0.end());
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dual_form_forward, "DualFormChunks forward (CPU)");
  m.def("backward", &dual_form_backward, "DualFormChunks backward (CPU)");
}
