// The AVX-512 path of the paged decode attention (decode_attention.cpp holds the driver, the split over
// threads and the portable path; attend_blocks.h the block loop this and the AVX2 path share): keys [j0, j1)
// of one sequence for every KV head and the G query heads of its group, head_dim D = 16 NV (64, 128 or 256),
// in blocks of kKeys keys. Per KV head and block:
//   scores  the queries (times the softmax scale and the int8 key channel scales) held in registers, up to
//           group<NV>() heads at a time; each key row widened once into NV registers (F16C, a bf16 shift, an
//           int8 sign-extend) and multiplied with every head's query into one vector of partial sums per
//           (head, key); 16 such vectors reduce to the 16 keys' scores in one transpose-and-add tree (about
//           2 shuffles per score, where a horizontal sum per key costs 4 dependent ones); an int8 key's
//           per-token scale multiplies its score.
//   softmax the block's max, e^x on 16 lanes at once, the running sum and output rescaled when the max grows.
//   values  the heads' outputs held in registers; each value row widened once into NV registers and added,
//           times each head's probability (times the int8 per-token value scale), into every head's output;
//           a value channel scale multiplies the output at the end.
// No fp32 copy of K or V is written anywhere. The passes read each KV head's rows of the block's slots (a
// slot holds its heads' rows side by side, a cache block its slots one after another) while the next
// block's lines are prefetched a few per key read (kv::Ahead): 1.6-1.8x on a DRAM-cold 4k context.
#include "attend_blocks.h"

#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace kv {
namespace {


// e^x on 16 lanes, the same range reduction and polynomial as exp_f32 (kv_access.h), 2^n by scalef.
SI_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.f), _mm512_max_ps(_mm512_set1_ps(-87.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 y = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  y = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), y);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result = the sum of the 16 lanes of vector i of v [16][16].
SI_AVX512 inline __m512 hsum16(const float* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) {
    const __m512 x = _mm512_loadu_ps(v + 32 * k), y = _mm512_loadu_ps(v + 32 * k + 16);
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));  // per 128 bits: x02 y02 x13 y13
  }
  for (int k = 0; k < 4; ++k) {
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),  // per 128 bits: 4 vectors' sums of it
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int k = 0; k < 2; ++k)
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),  // 128-bit blocks 0+1, 2+3
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1); }

// The path attend_blocks.h drives: 16 lanes a vector, kKeys keys a block, group<NV>() query heads a pass.
struct Path512 {
  static constexpr int64_t kLanes = 16, kKeys = 32;
  template <int NV>
  // the queries (scores) or outputs (values) that fit in registers beside a key row
  static constexpr int64_t group() { return NV == 4 ? 6 : NV == 8 ? 3 : 1; }

  // Scores of block keys sl[0..n) (rows at kd + slot * row) for GB query heads q [GB][D] of one KV head into
  // s [GB][kKeys] (lanes beyond n: 0): the queries stay in registers, each key row is widened once into NV
  // registers and used by every head, a vector of partial sums per (head, key) goes to part [GB][16][16].
  template <KvType T, int NV, int GB>
  SI_AVX512 static void scores(const char* kd, int64_t row, const int64_t* sl, int64_t n, const float* q, float* part,
                               float* s, Ahead& pf) {
    constexpr int64_t D = 16 * NV;
    __m512 qr[GB][NV];
    for (int g = 0; g < GB; ++g)
      for (int v = 0; v < NV; ++v) qr[g][v] = _mm512_loadu_ps(q + g * D + 16 * v);
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      for (int64_t i = 0; i < 16; ++i) {
        if (i0 + i >= n) {
          for (int g = 0; g < GB; ++g) _mm512_storeu_ps(part + (g * 16 + i) * 16, _mm512_setzero_ps());
          continue;
        }
        const char* src = kd + sl[i0 + i] * row;
        pf.step();
        __m512 x[NV];
        for (int v = 0; v < NV; ++v) x[v] = load16<T>(src + v * 16 * kv_bytes<T>());
        for (int g = 0; g < GB; ++g) {
          __m512 a0 = _mm512_mul_ps(qr[g][0], x[0]), a1 = _mm512_setzero_ps();
          for (int v = 1; v < NV; ++v) {
            if (v % 2) a1 = _mm512_fmadd_ps(qr[g][v], x[v], a1);
            else a0 = _mm512_fmadd_ps(qr[g][v], x[v], a0);
          }
          _mm512_storeu_ps(part + (g * 16 + i) * 16, _mm512_add_ps(a0, a1));
        }
      }
      for (int g = 0; g < GB; ++g) _mm512_storeu_ps(s + g * kKeys + i0, hsum16(part + g * 256));
    }
  }

  // o [GB][D] += p [GB][kKeys] times the value rows of block keys sl[0..n) (at vd + slot * row): the outputs
  // stay in registers, each value row is widened once into NV registers and used by every head.
  template <KvType T, int NV, int GB>
  SI_AVX512 static void values(const char* vd, int64_t row, const int64_t* sl, int64_t n, const float* p, float* o,
                               Ahead& pf) {
    constexpr int64_t D = 16 * NV;
    __m512 acc[GB][NV];
    for (int g = 0; g < GB; ++g)
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_loadu_ps(o + g * D + 16 * v);
    for (int64_t i = 0; i < n; ++i) {
      const char* src = vd + sl[i] * row;
      pf.step();
      __m512 x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load16<T>(src + v * 16 * kv_bytes<T>());
      for (int g = 0; g < GB; ++g) {
        const __m512 pv = _mm512_set1_ps(p[g * kKeys + i]);
        for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(pv, x[v], acc[g][v]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + g * D + 16 * v, acc[g][v]);
  }

  // The online-softmax update of head g for the block's scores s [kKeys] (n of them): new max m, sum l, output
  // o [D] rescaled; leaves the probabilities (times the int8 value scales vs when given) in p [kKeys].
  SI_AVX512 static void softmax(const float* s, int64_t n, const float* ks, const float* vs, float& m, float& l,
                                float* o,
                                   int64_t D, float* p) {
    const __mmask16 m0 = lanes(n), m1 = lanes(n - 16);
    __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
    if (ks) {
      s0 = _mm512_mul_ps(s0, _mm512_loadu_ps(ks));
      s1 = _mm512_mul_ps(s1, _mm512_loadu_ps(ks + 16));
    }
    float bm = _mm512_mask_reduce_max_ps(m0, s0);
    if (m1) bm = std::max(bm, _mm512_mask_reduce_max_ps(m1, s1));
    const float mn = std::max(m, bm);
    const __m512 vm = _mm512_set1_ps(mn);
    __m512 p0 = _mm512_maskz_mov_ps(m0, exp512(_mm512_sub_ps(s0, vm)));
    __m512 p1 = m1 ? _mm512_maskz_mov_ps(m1, exp512(_mm512_sub_ps(s1, vm))) : _mm512_setzero_ps();
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
    if (mn != m && m != -std::numeric_limits<float>::infinity()) {
      const float alpha = exp_f32(m - mn);
      l *= alpha;
      const __m512 va = _mm512_set1_ps(alpha);
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), va));
    }
    l += sum;
    m = mn;
    if (vs) {
      p0 = _mm512_mul_ps(p0, _mm512_loadu_ps(vs));
      p1 = _mm512_mul_ps(p1, _mm512_loadu_ps(vs + 16));
    }
    _mm512_storeu_ps(p, p0);
    _mm512_storeu_ps(p + 16, p1);
  }
};

}  // namespace

bool attend_range_512(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st) {
  return attend_range_with<Path512>(J, b, j0, j1, st);
}

}  // namespace kv
