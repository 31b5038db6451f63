// w4a8: int4 group-32 weights (lowbit_linear.cpp's layout: w = q * scale + min, q in 0..15) times
// activations quantized per block of 32 to int8 (x ~= xq * dx, symmetric), multiplied as integers:
//   y[n] = sum_g  scale[n,g] * dx[g] * sum_i q[n,g,i] xq[g,i]   +   min[n,g] * dx[g] * sum_i xq[g,i]
// (the Q4_1 x Q8_1 scheme llama.cpp uses on CPUs). The integer dot of a block is u8 x s8 products:
// AVX512-VNNI `vpdpbusd` (4 products per 32-bit lane in one instruction, 512-bit, ISA avx512_vnni) or
// AVX2 `vpmaddubsw` + `vpmaddwd` (ISA avx2 and avx512); float partial sums carried across the row.
// Weight bytes are read once per input row block, so at batch-1 decode the kernel runs at memory speed
// instead of being bound by widening nibbles to fp32. Group scales and minimums are float16 (as in
// Q4_0 / Q4_1): at memory speed fp32 ones would be a sixth more bytes per weight. Reference: the float expression above
// (quantization/int4.py: W4A8.reference), tested for every code path the CPU has.
#include "a8_common.h"
#include "isa.h"
#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

// x [K] -> xq [K] int8, dx [K/32] (scale), sx [K/32] (= dx * sum of the block's xq).
void quantize_blocks_scalar(const float* x, int64_t K, int8_t* xq, float* dx, float* sx) {
  for (int64_t g = 0; g < K / 32; ++g) {
    const float* xb = x + g * 32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = d > 0.f ? static_cast<int>(std::nearbyint(xb[i] / d)) : 0;
      xq[g * 32 + i] = static_cast<int8_t>(v);
      sum += v;
    }
    dx[g] = d;
    sx[g] = d * static_cast<float>(sum);
  }
}

// The same numbers with AVX-512: a true division (not a reciprocal multiply) and round-to-nearest-even,
// as nearbyint under the default rounding mode, so both versions agree bit for bit (tested).
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl"))) void quantize_blocks_avx512(
    const float* x, int64_t K, int8_t* xq, float* dx, float* sx) {
  for (int64_t g = 0; g < K / 32; ++g) {
    const __m512 a = _mm512_loadu_ps(x + g * 32), b = _mm512_loadu_ps(x + g * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.f;
    __m512i qa = _mm512_setzero_si512(), qb = _mm512_setzero_si512();
    if (d > 0.f) {
      const __m512 dv = _mm512_set1_ps(d);
      qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(a, dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(b, dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * 32), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + g * 32 + 16), _mm512_cvtsepi32_epi8(qb));
    dx[g] = d;
    sx[g] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}


float row_scalar(const uint8_t* q, const float* scale, const float* mn, const int8_t* xq, const float* dx,
                 const float* sx, int64_t groups) {
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* b = q + g * 16;
    const int8_t* xb = xq + g * 32;
    int dot = 0;
    for (int i = 0; i < 16; ++i) dot += (b[i] & 0xF) * xb[i] + (b[i] >> 4) * xb[i + 16];
    total += scale[g] * dx[g] * static_cast<float>(dot) + mn[g] * sx[g];
  }
  return total;
}

__attribute__((target("avx2,fma"))) inline __m256i nibbles(const uint8_t* b) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);                     // elements 0..15
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);  // elements 16..31
  return _mm256_set_m128i(hi, lo);
}

__attribute__((target("avx2,fma"))) float row_avx2(const uint8_t* q, const float* scale, const float* mn,
                                                   const int8_t* xq, const float* dx, const float* sx,
                                                   int64_t groups) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  float macc = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i w = nibbles(q + g * 16);
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + g * 32));
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);  // 8 x int32
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale[g] * dx[g]), acc);
    macc += mn[g] * sx[g];
  }
  return hsum(acc) + macc;
}

// 512-bit VNNI, 16 groups per step with one group per 32-bit lane: per block of 16 groups (512 weights
// of a row), vector i (0..7) holds elements 4i..4i+3 of each of the 16 groups, so 8 vpdpbusd accumulate
// each group's whole integer dot in its own lane and one float step per block applies the 16 groups'
// scales (acc = fma(dot, scale * dx, acc); acc = fma(min, sx, acc)). Per input row that is 8 integer and
// 4 float instructions per 512 weights, where a layout of two groups per vector needs a conversion, a
// permute of the scales and an fma per 64 weights (32 + 2): input rows cost a third as much, which is
// what speculative verification (k + 1 rows) and batched decode pay per row.
// The weights stay in their natural order (lowbit_linear.cpp's layout, which every other reader of
// `q` uses): the block's 256 bytes load as 4 vectors of 4 groups x 4 dwords and a 16 x 4 dword
// transpose (4 two-source permutes, 4 128-bit shuffles) gives dword d of every group in one vector;
// its low nibbles are elements 4d..4d+3, its high ones 16 + 4d..16 + 4d + 3. That work is shared by all
// input rows; the activations are laid out to match once per call (lane_order).
// MR input rows at once: each weight byte is loaded and unpacked once for all of them. Every (output,
// input) pair has an accumulator of its own that takes the same operations in the same order whatever
// MR is, so an input row's outputs are bit-identical to running it alone (batch invariance; tested).
// A last block of fewer than 16 groups takes masked loads (its activations are zero-padded).
// xt rows are `xstride` bytes apart (lane_order's layout), dx / sx rows `groups` floats, y rows ldy floats.
template <int MR>
SI_VNNI512 inline __attribute__((always_inline)) void row_lanes(
    const uint8_t* q, const uint16_t* scale, const uint16_t* mn, const int8_t* xt, int64_t xstride,
    const float* dx, const float* sx, int64_t groups, float* y, int64_t ldy) {
  // Two-source permutes: dwords 0 and 1 (ia), 2 and 3 (ib) of groups 0..7 from [4 groups | 4 groups].
  const __m512i ia = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i ib = _mm512_set_epi32(31, 27, 23, 19, 15, 11, 7, 3, 30, 26, 22, 18, 14, 10, 6, 2);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0, b = 0; g < groups; g += 16, ++b) {
    const int64_t left = groups - g;
    const __mmask16 lm = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    __m512i z[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t valid = std::min<int64_t>(std::max<int64_t>(left - 4 * k, 0), 4);
      const __mmask16 zm = valid == 4 ? __mmask16(0xFFFF) : __mmask16((1u << (4 * valid)) - 1);
      z[k] = _mm512_maskz_loadu_epi32(zm, q + (g + 4 * k) * 16);
    }
    const __m512i a01 = _mm512_permutex2var_epi32(z[0], ia, z[1]), a23 = _mm512_permutex2var_epi32(z[0], ib, z[1]);
    const __m512i b01 = _mm512_permutex2var_epi32(z[2], ia, z[3]), b23 = _mm512_permutex2var_epi32(z[2], ib, z[3]);
    const __m512i w[4] = {_mm512_shuffle_i64x2(a01, b01, 0x44), _mm512_shuffle_i64x2(a01, b01, 0xEE),
                          _mm512_shuffle_i64x2(a23, b23, 0x44), _mm512_shuffle_i64x2(a23, b23, 0xEE)};
    __m512i u[8];
    for (int d = 0; d < 4; ++d) {
      u[d] = _mm512_and_si512(w[d], low);
      u[d + 4] = _mm512_and_si512(_mm512_srli_epi16(w[d], 4), low);
    }
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, scale + g));
    const __m512 n16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, mn + g));
    lanes_block<MR>(u, s16, n16, lm, xt + b * kLaneBlock, xstride, dx + g, sx + g, groups, acc);
  }
  for (int m = 0; m < MR; ++m) y[m * ldy] = _mm512_reduce_add_ps(acc[m]);
}

// Weight rows n0..n1, one at a time (a single ascending stream per thread, its lines prefetched first:
// a8_common.h), for MR input rows.
template <int MR>
SI_VNNI512 void rows_block(const uint8_t* q, const uint16_t* scale, const uint16_t* mn, const int8_t* xt,
                           int64_t xstride, const float* dx, const float* sx, int64_t groups, int64_t n0,
                           int64_t n1, float* y, int64_t ldy) {
  const int64_t rb = groups * 16;
  for (int64_t n = n0; n < n1; ++n) {
    // The row's bytes from kPrefetch on (scales and minimums from a quarter as far: they are 4x denser).
    // Prefetches past the end of the tensor are harmless: they never fault.
    if (kPrefetch >= 0) {
      const char* p = reinterpret_cast<const char*>(q + n * rb) + kPrefetch;
      for (int64_t o = 0; o < rb; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
      const char* ps = reinterpret_cast<const char*>(scale + n * groups) + kPrefetch / 4;
      const char* pm = reinterpret_cast<const char*>(mn + n * groups) + kPrefetch / 4;
      for (int64_t o = 0; o < 2 * groups; o += 64) {
        _mm_prefetch(ps + o, _MM_HINT_T0);
        _mm_prefetch(pm + o, _MM_HINT_T0);
      }
    }
    row_lanes<MR>(q + n * rb, scale + n * groups, mn + n * groups, xt, xstride, dx, sx, groups, y + n, ldy);
  }
}

// Rows n0..n1 of y for all M input rows, in passes of up to 8 (a8_common.h: lane_passes).
void rows_vnni512(const uint8_t* q, const uint16_t* scale, const uint16_t* mn, const int8_t* xt, int64_t xstride,
                  const float* dx, const float* sx, int64_t groups, int64_t M, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  lane_passes(M, [&](auto rows, int64_t m) {
    rows_block<decltype(rows)::value>(q, scale, mn, xt + m * xstride, xstride, dx + m * groups, sx + m * groups,
                                      groups, n0, n1, y + m * ldy, ldy);
  });
}

}  // namespace

void quantize_blocks(const float* x, int64_t K, int8_t* xq, float* dx, float* sx) {
  if (a8_vnni512()) quantize_blocks_avx512(x, K, xq, dx, sx);
  else quantize_blocks_scalar(x, K, xq, dx, sx);
}

bool a8_vnni512() { return si::isa() >= si::Isa::avx512_vnni; }

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoll(v) : fallback;
}

// One row of quantized activations in lane order: per block of 16 groups, 8 vectors of 64 bytes, vector i
// lane l = elements 4i..4i+3 of group l (zero past the last group).
void lane_order(const int8_t* xq, int64_t groups, int8_t* out) {
  std::memset(out, 0, lane_stride(groups));
  for (int64_t g = 0; g < groups; ++g) {
    int8_t* block = out + (g / 16) * kLaneBlock + (g % 16) * 4;
    for (int i = 0; i < 8; ++i) std::memcpy(block + 64 * i, xq + g * 32 + 4 * i, 4);
  }
}

const int8_t* lane_rows(const int8_t* xq, int64_t M, int64_t K) {
  thread_local std::vector<int8_t> lanes;  // reused, like quantize_rows's buffers
  const int64_t groups = K / 32, stride = lane_stride(groups);
  lanes.resize(M * stride);
  for (int64_t m = 0; m < M; ++m) lane_order(xq + m * K, groups, lanes.data() + m * stride);
  return lanes.data();
}

A8Rows& quantize_rows(const float* x, int64_t M, int64_t K) {
  const int64_t groups = K / 32;
  thread_local A8Rows a;  // reused: a decode step quantizes ~100 activations; their buffers keep their capacity
  a.xq.resize(M * K);
  a.dx.resize(M * groups);
  a.sx.resize(M * groups);
  for (int64_t m = 0; m < M; ++m)
    quantize_blocks(x + m * K, K, a.xq.data() + m * K, a.dx.data() + m * groups, a.sx.data() + m * groups);
  return a;
}

// x [M, K] float32 contiguous; q [N, K/2] uint8; scale, mn [N, K/32] float16 -> y [M, N].
torch::Tensor int4_a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn,
                             OptTensor out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), "q must be uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, M = x.size(0), groups = K / 32;
  TORCH_CHECK(x.size(1) == K && K % 32 == 0, "x has ", x.size(1), " features, the weight expects ", K);
  TORCH_CHECK(scale.is_contiguous() && mn.is_contiguous() && scale.numel() == N * groups &&
              mn.numel() == N * groups && scale.scalar_type() == torch::kHalf && mn.scalar_type() == torch::kHalf,
              "scale and min must be contiguous float16 [N, K / 32] (group 32)");
  const si::Isa isa = si::isa();
  const bool vnni512 = isa >= si::Isa::avx512_vnni;
  A8Rows& a = quantize_rows(x.data_ptr<float>(), M, K);
  const std::vector<int8_t>& xq = a.xq;
  const std::vector<float>&dx = a.dx, &sx = a.sx;
  auto y = out_or_new(out, M, N, x);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(mn.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  if (vnni512) {
    const int8_t* xt = lane_rows(xq.data(), M, K);
    const int64_t xstride = lane_stride(groups);
    // Contiguous ranges per thread (a8_common.h), walked 32 rows at a time so that with more than one
    // pass of input rows a block's weights stay in L1 / L2 across them.
    parallel_row_chunks(N, stream_chunk(N), [&](int64_t n0, int64_t n1) {
      for (int64_t b = n0; b < n1; b += 32)
        rows_vnni512(qp, sp, mp, xt, xstride, dx.data(), sx.data(), groups, M, b, std::min(n1, b + 32), yp, N);
    });
    return y;
  }
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> sf(groups), mf(groups);  // the row's scales and minimums in float32
    const float* sr = sf.data();
    const float* mr = mf.data();
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* qr = qp + n * (K / 2);
      for (int64_t g = 0; g < groups; ++g) {
        sf[g] = h2f(sp[n * groups + g]);
        mf[g] = h2f(mp[n * groups + g]);
      }
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xr = xq.data() + m * K;
        const float* d = dx.data() + m * groups;
        const float* s = sx.data() + m * groups;
        float v;
        if (isa >= si::Isa::avx2) v = row_avx2(qr, sr, mr, xr, d, s, groups);
        else v = row_scalar(qr, sr, mr, xr, d, s, groups);
        yp[m * N + n] = v;
      }
    }
  });
  return y;
}

void register_int4_a8(pybind11::module& m) {
  namespace py = pybind11;
  m.def("int4_a8_linear", &int4_a8_linear, "int4 group-32 weights x per-32-block int8 activations", py::arg("x"),
        py::arg("q"), py::arg("scale"), py::arg("mn"), py::arg("out") = py::none());
}
