// w8a8 per block of 32 (GGUF Q8_0 x Q8_0): the LM head of `w4a8` (quantization/int8.py: W8A8Block32).
#include "a8_common.h"
#include "kernels.h"

namespace {

// int8 weights with an fp16 scale per block of 32 inputs (Q8_0's layout), activations quantized per
// block of 32 like above:  y[n] = sum_g scale[n,g] * dx[g] * sum_i q[n,g,i] xq[g,i].
// vpdpbusd multiplies unsigned by signed bytes, so the weights enter as q + 128 (a XOR with 0x80) and
// the surplus 128 * sum_i xq[g,i] is taken off through sx (= dx * sum xq): per group,
//   scale * (dx * dot(q + 128, xq) - 128 * sx).
// 64 bytes of a row are two whole groups (lanes 0-7 group g, 8-15 group g+1), in natural order.
template <int R>
SI_VNNI512 inline __attribute__((always_inline)) void block_q8_vnni512(
    const int8_t* q, const uint16_t* scale, const int8_t* xq, const float* dx, const float* sx, int64_t K,
    float* y) {
  const int64_t groups = K / 32;
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t even = groups & ~int64_t(1);
  for (int64_t g = 0; g < even; g += 16) {
    const int64_t left = even - g;
    const int pairs = left >= 16 ? 8 : static_cast<int>(left / 2);
    const __mmask16 lm = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 d16 = _mm512_maskz_loadu_ps(lm, dx + g);
    const __m512 m16 = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, sx + g), _mm512_set1_ps(-128.f));
    __m512 c16[R];
    for (int r = 0; r < R; ++r) {
      const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, scale + r * groups + g));
      c16[r] = _mm512_mul_ps(s16, d16);
      acc[r] = _mm512_fmadd_ps(s16, m16, acc[r]);
    }
    for (int j = 0; j < pairs; ++j) {
      const __m512i x = _mm512_loadu_si512(xq + (g + 2 * j) * 32);
      const __m512i i0 = _mm512_add_epi32(idx, _mm512_set1_epi32(2 * j));
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(q + r * K + (g + 2 * j) * 32), flip);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(i0, c16[r]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float total = _mm512_reduce_add_ps(acc[r]);
    if (even < groups) {  // an odd last group
      const int64_t g = even;
      const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + g * 32)),
                                         _mm256_set1_epi8(static_cast<char>(0x80)));
      const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + g * 32)));
      total += h2f(scale[r * groups + g]) * (hsum(_mm256_cvtepi32_ps(p)) * dx[g] - 128.f * sx[g]);
    }
    y[r] = total;
  }
}

SI_VNNI512 void rows_q8_vnni512(const int8_t* q, const uint16_t* scale, const int8_t* xq, const float* dx,
                                const float* sx, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t groups = K / 32;
  // One row at a time: one ascending stream per thread, its lines prefetched first (a8_common.h).
  for (int64_t n = n0; n < n1; ++n) {
    if (kPrefetch >= 0) {
      const char* p = reinterpret_cast<const char*>(q + n * K) + kPrefetch;
      for (int64_t o = 0; o < K; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    }
    block_q8_vnni512<1>(q + n * K, scale + n * groups, xq, dx, sx, K, y + n);
  }
}

float row_q8_scalar(const int8_t* q, const uint16_t* scale, const int8_t* xq, const float* dx, int64_t K) {
  float total = 0.f;
  for (int64_t g = 0; g < K / 32; ++g) {
    int dot = 0;
    for (int i = 0; i < 32; ++i) dot += q[g * 32 + i] * xq[g * 32 + i];
    total += h2f(scale[g]) * dx[g] * static_cast<float>(dot);
  }
  return total;
}

}  // namespace

// x [M, K] float32 contiguous; q [N, K] int8; scale [N, K/32] float16 -> y [M, N]. The 512-bit VNNI
// path or a scalar one (every other CPU; the method keeps M small, see quantization/int8.py).
torch::Tensor int8_a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, OptTensor out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), M = x.size(0), groups = K / 32;
  TORCH_CHECK(x.size(1) == K && K % 32 == 0, "x has ", x.size(1), " features, the weight expects ", K,
              " (a multiple of 32)");
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == N * groups && scale.scalar_type() == torch::kHalf,
              "scale must be contiguous float16 [N, K / 32]");
  const A8Rows& a = quantize_rows(x.data_ptr<float>(), M, K);
  auto y = out_or_new(out, M, N, x);
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  const bool vnni = a8_vnni512();
  // Contiguous ranges per thread (a8_common.h), walked 64 rows at a time: a block's rows stay in L2
  // across the input rows.
  parallel_row_chunks(N, stream_chunk(N), [&](int64_t c0, int64_t c1) {
   for (int64_t n0 = c0; n0 < c1; n0 += 64) {
    const int64_t n1 = std::min(c1, n0 + 64);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xr = a.xq.data() + m * K;
      const float* d = a.dx.data() + m * groups;
      if (vnni) {
        rows_q8_vnni512(qp, sp, xr, d, a.sx.data() + m * groups, K, n0, n1, yp + m * N);
      } else {
        for (int64_t n = n0; n < n1; ++n) yp[m * N + n] = row_q8_scalar(qp + n * K, sp + n * groups, xr, d, K);
      }
    }
   }
  });
  return y;
}


void register_int8_a8(pybind11::module& m) {
  namespace py = pybind11;
  m.def("int8_a8_linear", &int8_a8_linear, "int8 weights with fp16 scales per 32 inputs x per-32-block int8 activations",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("out") = py::none());
}
