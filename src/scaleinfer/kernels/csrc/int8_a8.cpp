// w8a8 per block of 32 (GGUF Q8_0 x Q8_0): the LM head of `w4a8` (quantization/int8.py: W8A8Block32).
#include "a8_common.h"
#include "kernels.h"

namespace {

// int8 weights with an fp16 scale per block of 32 inputs (Q8_0's layout), activations quantized per
// block of 32 like above:  y[n] = sum_g scale[n,g] * dx[g] * sum_i q[n,g,i] xq[g,i].
// vpdpbusd multiplies unsigned by signed bytes, so the weights enter as q + 128 (a XOR with 0x80) and
// the surplus 128 * sum_i xq[g,i] is taken off through sx (= dx * sum xq): per group,
//   scale * dx * dot(q + 128, xq) - 128 * scale * sx.
// One group per 32-bit lane, as int4_a8.cpp's row_lanes: a block of 16 groups is 512 weight bytes, 8
// vectors of 2 groups x 8 dwords in natural order; a 16 x 8 dword transpose (8 two-source permutes to
// [dword d of 4 groups] x 4, then 16 128-bit shuffles) gives vector i = dword i of every group, and 8
// vpdpbusd per input row accumulate each group's whole dot in its lane (activations in lane_order).
// The transpose is shared by the MR input rows; each (output, input) pair's float steps are the same
// whatever MR is (batch invariance; tested).
template <int MR>
SI_VNNI512 inline __attribute__((always_inline)) void row_q8_lanes(
    const int8_t* q, const uint16_t* scale, const int8_t* xt, int64_t xstride, const float* dx, const float* sx,
    int64_t groups, float* y, int64_t ldy) {
  // From [group a: dwords 0..7 | group b: dwords 0..7] x [group c | group d]: dwords 0..3 (lo) or 4..7
  // (hi) of the 4 groups, lane 4 * dword + group.
  const __m512i lo = _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
  const __m512i hi = _mm512_set_epi32(31, 23, 15, 7, 30, 22, 14, 6, 29, 21, 13, 5, 28, 20, 12, 4);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0, b = 0; g < groups; g += 16, ++b) {
    const int64_t left = groups - g;
    const __mmask16 lm = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    __m512i z[8];
    for (int k = 0; k < 8; ++k) {
      const int64_t valid = std::min<int64_t>(std::max<int64_t>(left - 2 * k, 0), 2);
      const __mmask16 zm = valid == 2 ? __mmask16(0xFFFF) : valid == 1 ? __mmask16(0x00FF) : __mmask16(0);
      z[k] = _mm512_maskz_loadu_epi32(zm, q + (g + 2 * k) * 32);
    }
    __m512i w[8];
    for (int half = 0; half < 2; ++half) {   // dwords 0..3, then 4..7
      const __m512i idx = half == 0 ? lo : hi;
      __m512i a[4];
      for (int k = 0; k < 4; ++k) a[k] = _mm512_permutex2var_epi32(z[2 * k], idx, z[2 * k + 1]);
      const __m512i t0 = _mm512_shuffle_i64x2(a[0], a[1], 0x44), t1 = _mm512_shuffle_i64x2(a[0], a[1], 0xEE);
      const __m512i t2 = _mm512_shuffle_i64x2(a[2], a[3], 0x44), t3 = _mm512_shuffle_i64x2(a[2], a[3], 0xEE);
      w[4 * half + 0] = _mm512_xor_si512(_mm512_shuffle_i64x2(t0, t2, 0x88), flip);
      w[4 * half + 1] = _mm512_xor_si512(_mm512_shuffle_i64x2(t0, t2, 0xDD), flip);
      w[4 * half + 2] = _mm512_xor_si512(_mm512_shuffle_i64x2(t1, t3, 0x88), flip);
      w[4 * half + 3] = _mm512_xor_si512(_mm512_shuffle_i64x2(t1, t3, 0xDD), flip);
    }
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, scale + g));
    const __m512 n16 = _mm512_mul_ps(s16, _mm512_set1_ps(-128.f));
    lanes_block<MR>(w, s16, n16, lm, xt + b * kLaneBlock, xstride, dx + g, sx + g, groups, acc);
  }
  for (int m = 0; m < MR; ++m) y[m * ldy] = _mm512_reduce_add_ps(acc[m]);
}

// Weight rows n0..n1 for MR input rows, one row at a time: one ascending stream per thread, its lines
// prefetched first (a8_common.h).
template <int MR>
SI_VNNI512 void rows_q8_block(const int8_t* q, const uint16_t* scale, const int8_t* xt, int64_t xstride,
                              const float* dx, const float* sx, int64_t K, int64_t n0, int64_t n1, float* y,
                              int64_t ldy) {
  const int64_t groups = K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    if (kPrefetch >= 0) {
      const char* p = reinterpret_cast<const char*>(q + n * K) + kPrefetch;
      for (int64_t o = 0; o < K; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    }
    row_q8_lanes<MR>(q + n * K, scale + n * groups, xt, xstride, dx, sx, groups, y + n, ldy);
  }
}

// Rows n0..n1 of y for all M input rows, in passes of up to 8 (a8_common.h: lane_passes).
void rows_q8_vnni512(const int8_t* q, const uint16_t* scale, const int8_t* xt, int64_t xstride, const float* dx,
                     const float* sx, int64_t K, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t groups = K / 32;
  lane_passes(M, [&](auto rows, int64_t m) {
    rows_q8_block<decltype(rows)::value>(q, scale, xt + m * xstride, xstride, dx + m * groups, sx + m * groups, K,
                                         n0, n1, y + m * ldy, ldy);
  });
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
  if (a8_vnni512()) {
    const int8_t* xt = lane_rows(a.xq.data(), M, K);
    const int64_t xstride = lane_stride(groups);
    // Contiguous ranges per thread (a8_common.h), walked 64 rows at a time: with more than one pass of
    // input rows a block's rows stay in L2 across them.
    parallel_row_chunks(N, stream_chunk(N), [&](int64_t c0, int64_t c1) {
      for (int64_t n0 = c0; n0 < c1; n0 += 64)
        rows_q8_vnni512(qp, sp, xt, xstride, a.dx.data(), a.sx.data(), K, M, n0, std::min(c1, n0 + 64), yp, N);
    });
    return y;
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n)
        yp[m * N + n] = row_q8_scalar(qp + n * K, sp + n * groups, a.xq.data() + m * K, a.dx.data() + m * groups, K);
  });
  return y;
}


void register_int8_a8(pybind11::module& m) {
  namespace py = pybind11;
  m.def("int8_a8_linear", &int8_a8_linear, "int8 weights with fp16 scales per 32 inputs x per-32-block int8 activations",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("out") = py::none());
}
