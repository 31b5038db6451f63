// Fused fp32 CPU ops for the per-token path: each replaces several small torch ops (and their
// dispatch, allocation and Python overhead, which at batch-1 decode costs as much as the matmuls).
//   add_rms_norm       residual += x; out = rmsnorm(residual) * w         (one pass per row)
//   rotary_            rotate-half RoPE in place on a [n, heads, D] view (e.g. Q|K of the fused QKV)
//   silu_and_mul       silu(gate) * up from the fused [M, 2I] gate/up output
//   kv_write           store the step's K and V rows at their cache slots (fp32, f16, bf16 or int8 KV)
// (The decode attention that reads those caches: decode_attention.cpp.)
// References: the torch expressions in layers/ and attention/sdpa.py (tested against them).
#include "isa.h"
#include "kernels.h"
#include "kv_access.h"

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace kv;

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

SI_BODY void silu_mul_row_body(const float* g, float* o, int64_t I) {
  const float* u = g + I;
#pragma omp simd
  for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + exp_f32(-g[i])) * u[i];
}
SI_ISA_VERSIONS(silu_mul_row, (const float* g, float* o, int64_t I), (g, o, I))

// Rows n0..n1 of y[M, N] = x[M, K] W[N, K]^T, one weight row at a time (one ascending stream per thread,
// the row's lines prefetched first: kernels.h), its dot with each of the M input rows while it is in L1.
// Every output takes the same dot whatever M is (batch invariance). Measured on whisper-base's decoder
// (AMD EPYC, 2 threads): four rows side by side with a 2 KiB prefetch streamed 16-23 GB/s in place.
SI_BODY void f32_rows_body(const float* w, const float* x, int64_t M, int64_t N, int64_t K, int64_t n0,
                           int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    if (kPrefetch >= 0) {
      const char* ahead = reinterpret_cast<const char*>(wr) + kPrefetch;
      for (int64_t o = 0; o < K * static_cast<int64_t>(sizeof(float)); o += 64) __builtin_prefetch(ahead + o, 0, 3);
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(wr, x + m * K, K);
  }
}
SI_ISA_VERSIONS(f32_rows, (const float* w, const float* x, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1,
                float* y), (w, x, M, N, K, n0, n1, y))

// The AVX-512 path of the same rows, register-blocked: R weight rows x MR input rows at once (R = 2 from 8
// input rows on; at M = 1 two weight rows at a time read 1.5x slower on whisper's head), one accumulator
// per (weight row, input row) pair with four partial sums, so each weight vector is loaded once for MR
// input rows and 4 MR independent FMA chains hide the FMA latency (the loop above keeps one chain per dot
// and is latency-bound once M > 1: whisper-base's [51865, 512] head took 15.7 ms at M = 16, 2 threads,
// where the weight stream alone takes ~3.5). Every pair takes the same operations in the same order (k
// ascending, 64 at a time over the four partial sums, the rest into the first, then (s0 + s1) + (s2 + s3)
// and one reduce) whatever R, MR and M are, so an input row's outputs do not depend on the batch around
// it (batch invariance, tested).
template <int R, int MR>
SI_AVX512 inline __attribute__((always_inline)) void f32_block_512(const float* w, const float* x, int64_t N,
                                                                  int64_t K, int64_t n, int64_t m, float* y) {
  __m512 acc[R][MR][4];   // four partial sums per pair: k = 64 i + 16 u goes to u (four chains even at M = 1)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MR; ++j)
      for (int u = 0; u < 4; ++u) acc[r][j][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int u = 0; u < 4; ++u)
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_loadu_ps(w + (n + r) * K + k + 16 * u);
        for (int j = 0; j < MR; ++j)
          acc[r][j][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (m + j) * K + k + 16 * u), acc[r][j][u]);
      }
  for (; k < K; k += 16) {   // the last K % 64: into partial sum 0, a masked load for the last K % 16
    const __mmask16 lm = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(lm, w + (n + r) * K + k);
      for (int j = 0; j < MR; ++j)
        acc[r][j][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(lm, x + (m + j) * K + k), acc[r][j][0]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < MR; ++j)
      y[(m + j) * N + n + r] = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(acc[r][j][0], acc[r][j][1]), _mm512_add_ps(acc[r][j][2], acc[r][j][3])));
}

// All M input rows against weight rows n (R of them): input rows 4 at a time, then the 1-3 left.
template <int R>
SI_AVX512 inline void f32_rows_all_m_512(const float* w, const float* x, int64_t M, int64_t N, int64_t K, int64_t n,
                                         float* y) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f32_block_512<R, 4>(w, x, N, K, n, m, y);
  switch (M - m) {
    case 3: f32_block_512<R, 3>(w, x, N, K, n, m, y); break;
    case 2: f32_block_512<R, 2>(w, x, N, K, n, m, y); break;
    case 1: f32_block_512<R, 1>(w, x, N, K, n, m, y); break;
    default: break;
  }
}

SI_AVX512 void f32_rows_512(const float* w, const float* x, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1,
                            float* y) {
  // Two weight rows at a time from 8 input rows on (each x vector then serves two rows: fewer loads per
  // FMA where the product, not the weight stream, bounds the time); one at a time below.
  const int64_t R = M >= 8 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    if (kPrefetch >= 0) {   // the rows' lines from kPrefetch on, as f32_rows_body does
      const char* ahead = reinterpret_cast<const char*>(w + n * K) + kPrefetch;
      for (int64_t o = 0; o < R * K * static_cast<int64_t>(sizeof(float)); o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
    }
    if (R == 2) f32_rows_all_m_512<2>(w, x, M, N, K, n, y);
    else f32_rows_all_m_512<1>(w, x, M, N, K, n, y);
  }
  for (; n < n1; ++n) f32_rows_all_m_512<1>(w, x, M, N, K, n, y);
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
}


// Row x [Hkv * D] stored at `slot` of a side of type t (torch's round-to-nearest-even conversions; int8:
// per head, y = x / chan, s = max(max|y| / 127, 1e-12), q = round(y / s) clamped to +-127, as
// attention/kv_int8.py: quantize_per_head does).
SI_AVX2 void f16_row_f16c(const float* x, c10::Half* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = c10::Half(x[i]);
}

void write_row(KvType t, const KvSide& s, int64_t slot, const float* x, int64_t Hkv, int64_t D) {
  const int64_t row = Hkv * D, at = slot * row;
  switch (t) {
    case KvType::f32:
      std::memcpy(static_cast<float*>(s.data) + at, x, row * sizeof(float));
      return;
    case KvType::f16: {
      c10::Half* y = static_cast<c10::Half*>(s.data) + at;
      if (attn_isa() >= AttnIsa::avx2) return f16_row_f16c(x, y, row);
      for (int64_t i = 0; i < row; ++i) y[i] = c10::Half(x[i]);
      return;
    }
    case KvType::bf16: {
      c10::BFloat16* y = static_cast<c10::BFloat16*>(s.data) + at;
      for (int64_t i = 0; i < row; ++i) y[i] = c10::BFloat16(x[i]);
      return;
    }
    case KvType::i8: {
      int8_t* y = static_cast<int8_t*>(s.data) + at;
      float yv[1024];
      for (int64_t h = 0; h < Hkv; ++h) {
        const float* xh = x + h * D;
        const float* ch = s.chan ? s.chan + h * D : nullptr;
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          yv[d] = ch ? xh[d] / ch[d] : xh[d];
          amax = std::max(amax, std::fabs(yv[d]));
        }
        const float sc = std::max(amax / 127.f, 1e-12f);
        for (int64_t d = 0; d < D; ++d)
          y[h * D + d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(yv[d] / sc))));
        s.scale[slot * Hkv + h] = sc;
      }
      return;
    }
  }
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

// k_cache / v_cache [S, Hkv, D] contiguous, float32, float16, bfloat16 or int8 (then with k_scale / v_scale
// [S, Hkv] float32 and optional channel multipliers k_chan / v_chan [Hkv, D]); slots [n] int64; k, v
// [n, Hkv, D] float32 with contiguous heads.
void kv_write(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v,
              OptTensor k_scale, OptTensor v_scale, OptTensor k_chan, OptTensor v_chan) {
  const KvType t = kv_type(k_cache);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "K and V caches must have the same dtype");
  const KvSide ks = kv_side(k_cache, k_scale, k_chan, t, "k"), vs = kv_side(v_cache, v_scale, v_chan, t, "v");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t n = slots.numel(), S = k_cache.size(0), Hkv = k_cache.size(1), D = k_cache.size(2), row = Hkv * D;
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "K and V caches must have the same shape");
  TORCH_CHECK(t != KvType::i8 || D <= 1024, "int8 KV supports head_dim up to 1024");
  for (const auto& x : {k, v}) {
    check_f32(x, "k and v");
    TORCH_CHECK(x.dim() == 3 && x.size(0) == n && x.size(1) * x.size(2) == row && x.stride(2) == 1 &&
                x.stride(1) == x.size(2), "k and v must be [n, Hkv, D] with contiguous heads");
  }
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "slot ", sp[i], " is outside the cache");
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    write_row(t, ks, sp[i], kp + i * k.stride(0), Hkv, D);
    write_row(t, vs, sp[i], vp + i * v.stride(0), Hkv, D);
  }
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
  // Contiguous ranges per thread (kernels.h: stream_chunk), walked 64 rows at a time so that with several
  // input rows a block's weights stay in L2 across them.
  const si::Isa level = si::isa();
  parallel_row_chunks(N, stream_chunk(N), [&](int64_t c0, int64_t c1) {
    for (int64_t n0 = c0; n0 < c1; n0 += 64) {
      if (level >= si::Isa::avx512) f32_rows_512(wp, xp, M, N, K, n0, std::min(c1, n0 + 64), yp);
      else f32_rows(wp, xp, M, N, K, n0, std::min(c1, n0 + 64), yp);
    }
  });
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
  m.def("kv_write", &kv_write, "store K and V rows at their cache slots (converted or quantized to the cache's dtype)",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("k"), py::arg("v"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("k_chan") = py::none(),
        py::arg("v_chan") = py::none());
}
