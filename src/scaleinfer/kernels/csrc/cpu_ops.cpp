// Fused fp32 CPU ops for the per-token path: each replaces several small torch ops (and their
// dispatch, allocation and Python overhead, which at batch-1 decode costs as much as the matmuls).
//   add_rms_norm       residual += x; out = rmsnorm(residual) * w         (one pass per row)
//   rotary_            rotate-half RoPE in place on a [n, heads, D] view (e.g. Q|K of the fused QKV)
//   silu_and_mul       silu(gate) * up from the fused [M, 2I] gate/up output
//   kv_write           store the step's K and V rows at their cache slots
//   paged_decode_attention
//                      one query per sequence against its keys read through the slot table: no
//                      gathered copy of K/V, GQA groups share each key load; softmax in fp32
// References: the torch expressions in layers/ and attention/sdpa.py (tested against them).
#include "isa.h"
#include "kernels.h"

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// e^x for x in [-87, 88] to ~2 ulp, in plain float arithmetic so `omp simd` loops vectorize it (std::exp
// is a library call per element): x = n ln2 + y with |y| <= ln2 / 2 (Cody-Waite split of ln2), e^y by
// its degree-7 Taylor polynomial (error < 1e-8 relative there), 2^n put into the exponent bits.
#pragma omp declare simd
inline float exp_f32(float x) {
  x = std::min(88.f, std::max(-87.f, x));
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float y = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * y + 1.f / 720.f;
  p = p * y + 1.f / 120.f;
  p = p * y + 1.f / 24.f;
  p = p * y + 1.f / 6.f;
  p = p * y + 0.5f;
  p = p * y + 1.f;
  p = p * y + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// p[j] <- e^(p[j] - max p) in place; returns their sum (the softmax denominator).
inline float exp_shifted(float* p, int64_t L) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) mx = std::max(mx, p[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < L; ++j) {
    p[j] = exp_f32(p[j] - mx);
    sum += p[j];
  }
  return sum;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

SI_BODY void norm_row_body(const float* x, float* r, const float* w, float* out, int64_t n, float eps, bool add) {
  float ss = 0.f;
  if (add) {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) {
      const float v = r[i] + x[i];
      r[i] = v;
      ss += v * v;
    }
  } else {
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    r = const_cast<float*>(x);
  }
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = r[i] * inv * w[i];
}
SI_ISA_VERSIONS(norm_row, (const float* x, float* r, const float* w, float* out, int64_t n, float eps, bool add),
                (x, r, w, out, n, eps, add))

// Query heads g0..g1 of one GQA group (q: the group's first head; out likewise) against the L keys
// at `row`'s slots: scores, softmax in fp32, weighted sum of values. One function per ISA
// (SI_ISA_VERSIONS), with dot / axpy inlined into it: a call per key and head cost more than the arithmetic.
SI_BODY void attend_group_body(const float* q, const float* kc, const float* vc, const int64_t* row, int64_t L,
                               int64_t Hkv, int64_t h, int64_t D, int64_t g0, int64_t g1, float sc,
                               std::vector<float>& p, float* out) {
  const int64_t n = g1 - g0;
  p.assign(n * L, 0.f);
  for (int64_t j = 0; j < L; ++j) {
    const float* kr = kc + (row[j] * Hkv + h) * D;
    for (int64_t g = 0; g < n; ++g) p[g * L + j] = dot(q + (g0 + g) * D, kr, D) * sc;
  }
  for (int64_t g = 0; g < n; ++g) {
    float* pg = p.data() + g * L;
    const float sum = exp_shifted(pg, L);
    const float inv = 1.f / sum;
    float* o = out + (g0 + g) * D;
    std::fill(o, o + D, 0.f);
    for (int64_t j = 0; j < L; ++j) axpy(pg[j] * inv, vc + (row[j] * Hkv + h) * D, o, D);
  }
}
SI_ISA_VERSIONS(attend_group, (const float* q, const float* kc, const float* vc, const int64_t* row, int64_t L,
                int64_t Hkv, int64_t h, int64_t D, int64_t g0, int64_t g1, float sc, std::vector<float>& p,
                float* out), (q, kc, vc, row, L, Hkv, h, D, g0, g1, sc, p, out))

// attend_group for head_dim = 16 C on AVX-512: each query head's C vectors stay in registers across
// the keys, a key's score is C FMAs and one in-register sum, and the output accumulates in C registers
// (scaled by 1 / sum once at the end) instead of being loaded and stored per key.
template <int C>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl"))) void attend_group_512(
    const float* q, const float* kc, const float* vc, const int64_t* row, int64_t L, int64_t Hkv, int64_t h,
    int64_t g0, int64_t g1, float sc, std::vector<float>& p, float* out) {
  constexpr int64_t D = 16 * C;
  const int64_t n = g1 - g0;
  p.resize(n * L);
  for (int64_t g = 0; g < n; ++g) {
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + (g0 + g) * D + 16 * c);
    float* pg = p.data() + g * L;
    for (int64_t j = 0; j < L; ++j) {
      const float* kr = kc + (row[j] * Hkv + h) * D;
      __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), acc);
      pg[j] = _mm512_reduce_add_ps(acc) * sc;
    }
    const float sum = exp_shifted(pg, L);
    __m512 o[C];
    for (int c = 0; c < C; ++c) o[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      const float* vr = vc + (row[j] * Hkv + h) * D;
      const __m512 pj = _mm512_set1_ps(pg[j]);
      for (int c = 0; c < C; ++c) o[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vr + 16 * c), o[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (g0 + g) * D + 16 * c, _mm512_mul_ps(o[c], inv));
  }
}

SI_BODY void silu_mul_row_body(const float* g, float* o, int64_t I) {
  const float* u = g + I;
#pragma omp simd
  for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + exp_f32(-g[i])) * u[i];
}
SI_ISA_VERSIONS(silu_mul_row, (const float* g, float* o, int64_t I), (g, o, I))

// Rows n0..n1 of y[M, N] = x[M, K] W[N, K]^T, four weight rows at a time: four dot products share each
// load of x, and the block's weights are read once from memory for all M input rows (then from L1).
// The weights ~2 KiB ahead are prefetched: the hardware prefetcher stops at 4 KiB page boundaries.
SI_BODY void f32_rows_body(const float* w, const float* x, int64_t M, int64_t N, int64_t K, int64_t n0,
                           int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* w0 = w + n * K;
    const char* ahead = reinterpret_cast<const char*>(w0) + 2048;
    for (int64_t o = 0; o < 16 * K; o += 64) __builtin_prefetch(ahead + o, 0, 3);
    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xm[k];
        a0 += w0[k] * xv;
        a1 += w1[k] * xv;
        a2 += w2[k] * xv;
        a3 += w3[k] * xv;
      }
      float* ym = y + m * N + n;
      ym[0] = a0;
      ym[1] = a1;
      ym[2] = a2;
      ym[3] = a3;
    }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(w + n * K, x + m * K, K);
}
SI_ISA_VERSIONS(f32_rows, (const float* w, const float* x, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1,
                float* y), (w, x, M, N, K, n0, n1, y))

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
}

}  // namespace

// x [M, H] (rows contiguous); residual [M, H] contiguous or None; returns (norm(x + residual), x + residual)
// with the sum written into residual in place (None: the residual stream starts as x itself).
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, OptTensor residual, torch::Tensor weight, double eps,
                                        OptTensor out_buf) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, H] with contiguous rows");
  const int64_t M = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == H, "weight must hold H contiguous values");
  const bool add = residual.has_value() && residual->defined();
  torch::Tensor r = add ? *residual : x;
  if (add) {
    check_f32(r, "residual");
    TORCH_CHECK(r.is_contiguous() && r.size(0) == M && r.size(1) == H, "residual must be contiguous [M, H]");
  }
  auto out = out_or_new(out_buf, M, H, x);
  const float* xp = x.data_ptr<float>();
  float* rp = r.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      norm_row(xp + m * xs, add ? rp + m * H : nullptr, wp, op + m * H, H, static_cast<float>(eps), add);
  });
  return {out, r};
}

// x [n, heads, D] (last dim contiguous, any row/head strides), rotated in place; cos/sin [n, D] or
// [n, 1, D] contiguous: out[:h] = x1 cos - x2 sin, out[h:] = x2 cos + x1 sin (h = D / 2).
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [n, heads, D] with a contiguous last dim");
  const int64_t n = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == n * D && sin.numel() == n * D,
              "cos and sin must be contiguous [n, D]");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, n * heads, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads, h = i % heads;
      float* v = xp + t * s0 + h * s1;
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j + half] + a * s[j + half];
      }
    }
  });
}

// gate_up [M, 2I] (rows contiguous) -> [M, I]: silu(gate) * up.
torch::Tensor silu_and_mul(torch::Tensor gate_up, OptTensor out_buf) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0, "gate_up must be [M, 2I]");
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2, gs = gate_up.stride(0);
  auto out = out_or_new(out_buf, M, I, gate_up);
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) silu_mul_row(gp + m * gs, op + m * I, I);
  });
  return out;
}

// k_cache / v_cache [S, Hkv, D] contiguous; slots [n] int64; k, v [n, Hkv, D] with contiguous heads.
void kv_write(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v) {
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t n = slots.numel(), S = k_cache.size(0), row = k_cache.size(1) * k_cache.size(2);
  for (const auto& t : {k, v}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == n && t.size(1) * t.size(2) == row && t.stride(2) == 1 &&
                t.stride(1) == t.size(2), "k and v must be [n, Hkv, D] with contiguous heads");
  }
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "slot ", sp[i], " is outside the cache");
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kc + sp[i] * row, kp + i * ks, row * sizeof(float));
    std::memcpy(vc + sp[i] * row, vp + i * vs, row * sizeof(float));
  }
}

// out [>= d, H, D] contiguous (rows 0..d-1 written); q [d, H, D] (contiguous heads); caches
// [S, Hkv, D]; slots [d, W] int64 (row b's first lens[b] entries are its keys); lens [d] int64.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor lens, double scale) {
  check_f32(q, "q");
  check_f32(out, "out");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.dim() == 2, "slots must be [d, W] int64");
  TORCH_CHECK(lens.scalar_type() == torch::kLong && lens.is_contiguous(), "lens must be contiguous int64");
  const int64_t d = slots.size(0), W = slots.size(1), H = q.size(1), D = q.size(2);
  const int64_t S = k_cache.size(0), Hkv = k_cache.size(1);
  TORCH_CHECK(q.size(0) >= d && q.stride(2) == 1 && q.stride(1) == D, "q must be [d, H, D] with contiguous heads");
  TORCH_CHECK(out.is_contiguous() && out.size(0) >= d && out.size(1) == H && out.size(2) == D, "out must be [d, H, D]");
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(2) == D, "head counts or sizes do not match the cache");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < d; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= W, "decode row ", b, " has ", lp[b], " keys for a table of ", W);
    for (int64_t j = 0; j < lp[b]; ++j) TORCH_CHECK(sp[b * W + j] >= 0 && sp[b * W + j] < S, "slot outside the cache");
  }
  const int64_t G = H / Hkv, qs = q.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // Work items: (sequence, KV head) with its whole GQA group sharing each key load; when there are
  // too few of those to keep every thread busy (batch-1 decode of a 3-KV-head model on 2 threads),
  // each item takes one query head instead. Every query head's numbers are the same either way.
  const int64_t nt = at::get_num_threads();
  const int64_t split = d * Hkv >= 2 * nt ? 1 : G;
  const bool avx512 = si::isa() >= si::Isa::avx512;
  at::parallel_for(0, d * Hkv * split, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (Hkv * split), h = (i / split) % Hkv, part = i % split;
      const int64_t g0 = split == 1 ? 0 : part, g1 = split == 1 ? G : part + 1;
      const float* qg = qp + b * qs + h * G * D;
      float* og = op + (b * H + h * G) * D;
      if (avx512 && D == 64) attend_group_512<4>(qg, kc, vc, sp + b * W, lp[b], Hkv, h, g0, g1, sc, p, og);
      else if (avx512 && D == 128) attend_group_512<8>(qg, kc, vc, sp + b * W, lp[b], Hkv, h, g0, g1, sc, p, og);
      else attend_group(qg, kc, vc, sp + b * W, lp[b], Hkv, h, D, g0, g1, sc, p, og);
    }
  });
}

// x [M, K] float32 contiguous; w [N, K] float32 row-major contiguous; bias [N] or None -> y [M, N].
// For decode-sized M (the caller keeps M small): at M = 1 it reads the weights at memory speed, where
// BLAS's GEMV on a row-major weight does not (see layers/linear.py: DenseLinearMethod).
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w, OptTensor bias, OptTensor out) {
  check_f32(x, "x");
  check_f32(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1),
              "x must be contiguous [M, K] and w contiguous [N, K]");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  auto y = out_or_new(out, M, N, x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_row_chunks(N, 64, [&](int64_t n0, int64_t n1) { f32_rows(wp, xp, M, N, K, n0, n1, yp); });
  if (bias.has_value() && bias->defined()) y += *bias;
  return y;
}

void register_cpu_ops(pybind11::module& m) {
  namespace py = pybind11;
  m.def("f32_linear", &f32_linear, "y = x W^T (+ b) for a few rows of x, W row-major", py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("out") = py::none());
  m.def("add_rms_norm", &add_rms_norm, "(norm(x + residual) * w, x + residual), residual updated in place",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("out") = py::none());
  m.def("rotary_", &rotary_, "rotate-half RoPE in place on [n, heads, D]");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of a fused [M, 2I] tensor", py::arg("gate_up"),
        py::arg("out") = py::none());
  m.def("kv_write", &kv_write, "store K and V rows at their cache slots");
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention read through slot tables");
}
