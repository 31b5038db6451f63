// Low-bit weight-only linear kernels for CPU: y[M, N] = x[M, K] W^T with W stored as
//   int8: q[N, K] int8, one fp32 scale per output row           (w = q * scale[n])
//   int4: q[N, K/2] uint8, fp32 scale and min per group of G     (w = q * scale[n, g] + min[n, g])
// int4 layout, per chunk of 32 elements of a row: 16 bytes, byte i = q[i] | q[i + 16] << 4
// (the GGUF Q4_0 / Q4_1 block layout, so those blocks convert without re-quantizing).
//
// Activations stay fp32: the weights are widened to fp32 in registers and multiplied with FMA, so
// the result equals x @ dequantize(W)^T up to summation order. One fused pass per output row at
// M = 1 (batch-1 decode reads each weight byte once; int8 does the same for every row up to 16 rows, so
// its results are batch invariant there); for more rows (int4: M > 1) pairs of rows are dequantized into
// a small fp32 buffer and multiplied with 4 input rows at a time (2x4 register tiles), which beats fp32
// BLAS up to M ~ 128-256 on small layers (callers switch to dequantized slices + BLAS above). Code paths:
// AVX-512, AVX2+FMA, scalar; chosen at run time from the CPU's features (isa.h; `isa()` says which).
#include "isa.h"
#include "kernels.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

namespace {

using si::Isa;

// ---------------- dequantize one row into fp32 (all ISAs; the compiler vectorizes) ------------
inline void dequant_row_int8(const int8_t* q, float scale, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(q[k]) * scale;
}

inline void dequant_row_int4(const uint8_t* q, const float* scale, const float* mn, int64_t K, int64_t G,
                             float* out) {
  for (int64_t c = 0; c < K / 32; ++c) {
    const uint8_t* b = q + c * 16;
    const int64_t g = (c * 32) / G;
    const float s = scale[g], m = mn[g];
    float* o = out + c * 32;
    for (int i = 0; i < 16; ++i) {
      o[i] = static_cast<float>(b[i] & 0xF) * s + m;
      o[i + 16] = static_cast<float>(b[i] >> 4) * s + m;
    }
  }
}

constexpr int64_t kGrain = 16;  // output rows per parallel task (at least)
constexpr int64_t kInvariantRows = 16;  // int8_linear: up to this many input rows, each row as at M = 1

// ---------------- horizontal sum (AVX2) -----------------------------------------------------
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------- M > 1: tiles of 2 weight rows x 4 input rows ---------------------------------
// Two weight rows are dequantized into a per-thread fp32 buffer (L1-resident) and reused by every
// input row; a tile keeps 8 accumulators, i.e. 8 FMAs per 6 loads where a plain dot product does 1
// per 2. Rows beyond `mr` (the last, partial tile) read row 0 again and are not stored.
__attribute__((target("avx512f,avx512bw"))) void tile_2x4_avx512(const float* w0, const float* w1,
                                                                  const float* const xs[4], int64_t K,
                                                                  float out[4][2]) {
  __m512 a00 = _mm512_setzero_ps(), a01 = _mm512_setzero_ps(), a10 = _mm512_setzero_ps(), a11 = _mm512_setzero_ps();
  __m512 a20 = _mm512_setzero_ps(), a21 = _mm512_setzero_ps(), a30 = _mm512_setzero_ps(), a31 = _mm512_setzero_ps();
  const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v0 = _mm512_loadu_ps(w0 + k), v1 = _mm512_loadu_ps(w1 + k);
    __m512 xv = _mm512_loadu_ps(x0 + k);
    a00 = _mm512_fmadd_ps(v0, xv, a00); a01 = _mm512_fmadd_ps(v1, xv, a01);
    xv = _mm512_loadu_ps(x1 + k);
    a10 = _mm512_fmadd_ps(v0, xv, a10); a11 = _mm512_fmadd_ps(v1, xv, a11);
    xv = _mm512_loadu_ps(x2 + k);
    a20 = _mm512_fmadd_ps(v0, xv, a20); a21 = _mm512_fmadd_ps(v1, xv, a21);
    xv = _mm512_loadu_ps(x3 + k);
    a30 = _mm512_fmadd_ps(v0, xv, a30); a31 = _mm512_fmadd_ps(v1, xv, a31);
  }
  out[0][0] = _mm512_reduce_add_ps(a00); out[0][1] = _mm512_reduce_add_ps(a01);
  out[1][0] = _mm512_reduce_add_ps(a10); out[1][1] = _mm512_reduce_add_ps(a11);
  out[2][0] = _mm512_reduce_add_ps(a20); out[2][1] = _mm512_reduce_add_ps(a21);
  out[3][0] = _mm512_reduce_add_ps(a30); out[3][1] = _mm512_reduce_add_ps(a31);
  for (; k < K; ++k)
    for (int i = 0; i < 4; ++i) { out[i][0] += w0[k] * xs[i][k]; out[i][1] += w1[k] * xs[i][k]; }
}

__attribute__((target("avx2,fma"))) void tile_2x4_avx2(const float* w0, const float* w1, const float* const xs[4],
                                                        int64_t K, float out[4][2]) {
  __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
  __m256 a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps(), a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
  const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
    __m256 xv = _mm256_loadu_ps(x0 + k);
    a00 = _mm256_fmadd_ps(v0, xv, a00); a01 = _mm256_fmadd_ps(v1, xv, a01);
    xv = _mm256_loadu_ps(x1 + k);
    a10 = _mm256_fmadd_ps(v0, xv, a10); a11 = _mm256_fmadd_ps(v1, xv, a11);
    xv = _mm256_loadu_ps(x2 + k);
    a20 = _mm256_fmadd_ps(v0, xv, a20); a21 = _mm256_fmadd_ps(v1, xv, a21);
    xv = _mm256_loadu_ps(x3 + k);
    a30 = _mm256_fmadd_ps(v0, xv, a30); a31 = _mm256_fmadd_ps(v1, xv, a31);
  }
  out[0][0] = hsum256(a00); out[0][1] = hsum256(a01);
  out[1][0] = hsum256(a10); out[1][1] = hsum256(a11);
  out[2][0] = hsum256(a20); out[2][1] = hsum256(a21);
  out[3][0] = hsum256(a30); out[3][1] = hsum256(a31);
  for (; k < K; ++k)
    for (int i = 0; i < 4; ++i) { out[i][0] += w0[k] * xs[i][k]; out[i][1] += w1[k] * xs[i][k]; }
}

inline void tile_2x4(Isa isa, const float* w0, const float* w1, const float* const xs[4], int64_t K,
                     float out[4][2]) {
  if (isa >= Isa::avx512) return tile_2x4_avx512(w0, w1, xs, K, out);
  if (isa >= Isa::avx2) return tile_2x4_avx2(w0, w1, xs, K, out);
  for (int i = 0; i < 4; ++i) {
    float s0 = 0.f, s1 = 0.f;
    for (int64_t k = 0; k < K; ++k) { s0 += w0[k] * xs[i][k]; s1 += w1[k] * xs[i][k]; }
    out[i][0] = s0; out[i][1] = s1;
  }
}

// y[M, N] = x[M, K] W^T for M > 1, where dequant(n, out) writes weight row n as fp32 into out[K].
template <class Dequant>
void multi_row_linear(const float* xp, int64_t M, int64_t N, int64_t K, float* yp, const Dequant& dequant) {
  const Isa isa = si::isa();
  at::parallel_for(0, (N + 1) / 2, kGrain / 2, [&](int64_t p0, int64_t p1) {
    std::vector<float> w(2 * K, 0.f);
    float t[4][2];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = 2 * p;
      const bool two = n + 1 < N;
      dequant(n, w.data());
      if (two) dequant(n + 1, w.data() + K);
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t mr = std::min<int64_t>(4, M - m);
        const float* xs[4];
        for (int64_t i = 0; i < 4; ++i) xs[i] = xp + (m + (i < mr ? i : 0)) * K;
        tile_2x4(isa, w.data(), w.data() + K, xs, K, t);
        for (int64_t i = 0; i < mr; ++i) {
          yp[(m + i) * N + n] = t[i][0];
          if (two) yp[(m + i) * N + n + 1] = t[i][1];
        }
      }
    }
  });
}

// ---------------- fused M = 1 row kernels -----------------------------------------------------
__attribute__((target("avx512f,avx512bw"))) float row_int8_avx512(const int8_t* q, const float* x, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // bytes widened straight to int32 (vpmovsxbd from memory), then fp32
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    const __m512 w1 =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16))));
    acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), acc0);
    acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; k < K; ++k) s += static_cast<float>(q[k]) * x[k];
  return s;
}

__attribute__((target("avx2,fma"))) float row_int8_avx2(const int8_t* q, const float* x, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), acc1);
  }
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; k < K; ++k) s += static_cast<float>(q[k]) * x[k];
  return s;
}

// sum over groups of scale[g] * (q_g . x_g), without the min term (added by the caller)
__attribute__((target("avx512f,avx512bw"))) float row_int4_avx512(const uint8_t* q, const float* scale,
                                                                  const float* x, int64_t K, int64_t G) {
  const __m512i mask = _mm512_set1_epi32(0xF);
  __m512 total = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t k = g0; k < g0 + G; k += 32) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2)));
      __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
      __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      acc0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + k), acc0);
      acc1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + k + 16), acc1);
    }
    total = _mm512_fmadd_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(scale[g0 / G]), total);
  }
  return _mm512_reduce_add_ps(total);
}

__attribute__((target("avx2,fma"))) float row_int4_avx2(const uint8_t* q, const float* scale, const float* x,
                                                        int64_t K, int64_t G) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  __m256 total = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t k = g0; k < g0 + G; k += 32) {
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2));
      __m256i v0 = _mm256_cvtepu8_epi32(b);                    // bytes 0..7
      __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));  // bytes 8..15
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), _mm256_loadu_ps(x + k), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), _mm256_loadu_ps(x + k + 8), acc1);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), _mm256_loadu_ps(x + k + 16), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), _mm256_loadu_ps(x + k + 24), acc1);
    }
    total = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(scale[g0 / G]), total);
  }
  return hsum256(total);
}

float row_int4_scalar(const uint8_t* q, const float* scale, const float* x, int64_t K, int64_t G) {
  float total = 0.f;
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    float acc = 0.f;
    for (int64_t k = g0; k < g0 + G; k += 32) {
      const uint8_t* b = q + k / 2;
      for (int i = 0; i < 16; ++i) acc += (b[i] & 0xF) * x[k + i] + (b[i] >> 4) * x[k + 16 + i];
    }
    total += acc * scale[g0 / G];
  }
  return total;
}

// Per-group sums of every input row: the min term is sum_g min[n, g] * xsum[m, g].
std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t num_groups = K / G;
  std::vector<float> sums(M * num_groups);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < num_groups; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < G; ++k) s += x[m * K + g * G + k];
      sums[m * num_groups + g] = s;
    }
  return sums;
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight expects ", K);
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, OptTensor out) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == torch::kFloat32, "scale must be float32 [N]");
  auto y = out_or_new(out, M, N, x);
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M > kInvariantRows) {
    multi_row_linear(xp, M, N, K, yp, [&](int64_t n, float* out) { dequant_row_int8(qp + n * K, sp[n], K, out); });
    return y;
  }
  // Up to kInvariantRows input rows: every output is the M = 1 row dot product, so an input row's result
  // does not depend on what else is in the batch (a decode step and a speculative verification of the same
  // token agree bit for bit). Rows go in contiguous ranges per thread (kernels.h: stream_chunk), walked in
  // blocks of ~64 KiB of weights that stay in L2 across the input rows; each row's lines prefetched first.
  const Isa isa = si::isa();
  const int64_t block = std::max<int64_t>(1, (64 << 10) / K);
  parallel_row_chunks(N, stream_chunk(N), [&](int64_t c0, int64_t c1) {
    for (int64_t b0 = c0; b0 < c1; b0 += block) {
      const int64_t b1 = std::min(c1, b0 + block);
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        for (int64_t n = b0; n < b1; ++n) {
          if (m == 0 && kPrefetch >= 0) {
            const char* p = reinterpret_cast<const char*>(qp + n * K) + kPrefetch;
            for (int64_t o = 0; o < K; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
          }
          float s;
          if (isa >= Isa::avx512) s = row_int8_avx512(qp + n * K, xr, K);
          else if (isa >= Isa::avx2) s = row_int8_avx2(qp + n * K, xr, K);
          else { s = 0.f; for (int64_t k = 0; k < K; ++k) s += qp[n * K + k] * xr[k]; }
          yp[m * N + n] = s * sp[n];
        }
      }
    }
  });
  return y;
}

torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn,
                          int64_t group_size, OptTensor out) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), "q must be uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, M = x.size(0), G = group_size;
  check_x(x, K);
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "group size ", G, " must be a multiple of 32 dividing K=", K);
  TORCH_CHECK(scale.is_contiguous() && mn.is_contiguous() && scale.numel() == N * (K / G) &&
              mn.numel() == N * (K / G), "scale and min must be contiguous float32 [N, K / group]");
  const int64_t num_groups = K / G;
  auto y = out_or_new(out, M, N, x);
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = mn.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M > 1) {
    multi_row_linear(xp, M, N, K, yp, [&](int64_t n, float* out) {
      dequant_row_int4(qp + n * (K / 2), sp + n * num_groups, mp + n * num_groups, K, G, out);
    });
    return y;
  }
  std::vector<float> xsum = group_sums(xp, M, K, G);
  const Isa isa = si::isa();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    {
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* qr = qp + n * (K / 2);
        const float* sr = sp + n * num_groups;
        float s;
        if (isa >= Isa::avx512) s = row_int4_avx512(qr, sr, xp, K, G);
        else if (isa >= Isa::avx2) s = row_int4_avx2(qr, sr, xp, K, G);
        else s = row_int4_scalar(qr, sr, xp, K, G);
        const float* mr = mp + n * num_groups;
        for (int64_t g = 0; g < num_groups; ++g) s += mr[g] * xsum[g];
        yp[n] = s;
      }
      return;
    }
  });
  return y;
}

// Dequantize into `out` [N, K] float32 (a reused buffer: prefill-sized inputs go through BLAS on it).
void int4_dequantize_out(torch::Tensor q, torch::Tensor scale, torch::Tensor mn, int64_t group_size,
                         torch::Tensor out) {
  const int64_t N = q.size(0), K = q.size(1) * 2, G = group_size, num_groups = K / G;
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && mn.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.numel() == N * K,
              "out must be a contiguous float32 [N, K] tensor");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = mn.data_ptr<float>();
  float* wp = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      dequant_row_int4(qp + n * (K / 2), sp + n * num_groups, mp + n * num_groups, K, G, wp + n * K);
  });
}

void int8_dequantize_out(torch::Tensor q, torch::Tensor scale, torch::Tensor out) {
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && out.scalar_type() == torch::kFloat32 &&
              out.numel() == N * K, "q must be contiguous and out a contiguous float32 [N, K] tensor");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* wp = out.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequant_row_int8(qp + n * K, sp[n], K, wp + n * K);
  });
}

void register_cpu_ops(pybind11::module& m);  // cpu_ops.cpp
void register_decode_attention(pybind11::module& m);  // decode_attention.cpp
void register_int4_a8(pybind11::module& m);  // int4_a8.cpp
void register_decode_step(pybind11::module& m);  // decode_step.cpp
void register_int8_a8(pybind11::module& m);  // int8_a8.cpp
void register_a8_gemm(pybind11::module& m);  // a8_gemm.cpp
void register_shm_comm(pybind11::module& m);  // shm_comm.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_cpu_ops(m);
  register_decode_attention(m);
  register_int4_a8(m);
  register_decode_step(m);
  register_int8_a8(m);
  register_a8_gemm(m);
  register_shm_comm(m);
  namespace py = pybind11;
  m.def("int8_linear", &int8_linear, "y = x (q * scale)^T, int8 weight per output channel", py::arg("x"),
        py::arg("q"), py::arg("scale"), py::arg("out") = py::none());
  m.def("int4_linear", &int4_linear, "y = x (q * scale + min)^T, group-wise int4 weight", py::arg("x"),
        py::arg("q"), py::arg("scale"), py::arg("mn"), py::arg("group_size"), py::arg("out") = py::none());
  m.def("int4_dequantize_out", &int4_dequantize_out, "group-wise int4 weight -> float32 [N, K] in out");
  m.def("int8_dequantize_out", &int8_dequantize_out, "per-channel int8 weight -> float32 [N, K] in out");
  m.def("isa", [] { return std::string(si::isa_name(si::isa())); },
        "the ISA level in use (isa.h): avx512_vnni, avx512, avx2 or scalar");
  m.def("isas", &si::isas, "every ISA level this CPU runs, lowest first");
  m.def("set_isa", &si::set_isa, "force an ISA level (for tests); returns the previous one");
#ifdef SI_SOURCES_HASH  // setup.py: the fingerprint of csrc/ this module was built from (kernels/sources.py)
#define SI_STR2(x) #x
#define SI_STR(x) SI_STR2(x)
  m.def("sources_hash", [] { return std::string(SI_STR(SI_SOURCES_HASH)); }, "csrc/'s fingerprint at build");
#endif
}
