// The AVX2 path of the paged decode attention (decode_attention.cpp holds the driver and the portable path,
// decode_attention_512.cpp the AVX-512 path, whose shape this follows; attend_blocks.h their block loop): keys
// [j0, j1) of one sequence for every KV head and the G query heads of its group, head_dim D = 8 NV (64, 128 or
// 256), in blocks of kKeys keys. With 16 vector registers the queries and outputs cannot stay in registers as
// on AVX-512; instead:
//   scores  each key row widened 8 lanes at a time (F16C, a bf16 shift, an int8 sign-extend) and multiplied
//           with up to group<NV>() heads' queries read from L1, one vector of partial sums per (head, key);
//           8 such vectors reduce to 8 keys' scores in one hadd-and-permute tree; an int8 key's per-token
//           scale multiplies its score.
//   softmax the block's max, e^x on 8 lanes, the running sum and output rescaled when the max grows.
//   values  the outputs of up to group<NV>() heads for two 8-lane column slices in registers, every key row
//           of the block added into them, slice pair after slice pair (the block's rows stay in L1).
// The next block's K and V lines are prefetched during the passes (kv::Ahead). No fp32 copy of K or V is
// written. Reference: attention/sdpa.py; tested against it at every ISA level the CPU has.
#include "attend_blocks.h"

#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace kv {
namespace {


// e^x on 8 lanes, the same range reduction and polynomial as exp_f32 (kv_access.h); 2^n built in the
// exponent bits (n in [-126, 127] after the clamp).
SI_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 y = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  y = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), y);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lane i of the result = the sum of the 8 lanes of vector i of v [8][8].
SI_AVX2 inline __m256 hsum8(const float* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
  const __m256 t1 = _mm256_hadd_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24));
  const __m256 t2 = _mm256_hadd_ps(_mm256_loadu_ps(v + 32), _mm256_loadu_ps(v + 40));
  const __m256 t3 = _mm256_hadd_ps(_mm256_loadu_ps(v + 48), _mm256_loadu_ps(v + 56));
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128 bits: vectors 0-3 / 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

SI_AVX2 inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

SI_AVX2 inline float hadd8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The path attend_blocks.h drives: 8 lanes a vector, kKeys keys a block, group<NV>() query heads a pass.
struct Path256 {
  static constexpr int64_t kLanes = 8, kKeys = 32;
  template <int NV>
  static constexpr int64_t group() { return 6; }  // accumulators: 6 (scores), 12 (values: 2 slices)

  // Scores of block keys sl[0..n) (rows at kd + slot * row) for GB query heads q [GB][D] of one KV head into
  // s [GB][kKeys] (lanes beyond n: 0); partial-sum vectors per (head, key) go to part [GB][8][8].
  template <KvType T, int NV, int GB>
  SI_AVX2 static void scores(const char* kd, int64_t row, const int64_t* sl, int64_t n, const float* q, float* part,
                             float* s, Ahead& pf) {
    constexpr int64_t D = 8 * NV;
    for (int64_t i0 = 0; i0 < kKeys; i0 += 8) {
      for (int64_t i = 0; i < 8; ++i) {
        if (i0 + i >= n) {
          for (int g = 0; g < GB; ++g) _mm256_storeu_ps(part + (g * 8 + i) * 8, _mm256_setzero_ps());
          continue;
        }
        const char* src = kd + sl[i0 + i] * row;
        pf.step();
        __m256 acc[GB];
        for (int g = 0; g < GB; ++g) acc[g] = _mm256_setzero_ps();
        for (int v = 0; v < NV; ++v) {
          const __m256 x = load8<T>(src + v * 8 * kv_bytes<T>());
          for (int g = 0; g < GB; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + 8 * v), x, acc[g]);
        }
        for (int g = 0; g < GB; ++g) _mm256_storeu_ps(part + (g * 8 + i) * 8, acc[g]);
      }
      for (int g = 0; g < GB; ++g) _mm256_storeu_ps(s + g * kKeys + i0, hsum8(part + g * 64));
    }
  }

  // o [GB][D] += p [GB][kKeys] times the value rows of block keys sl[0..n) (at vd + slot * row), two 8-lane
  // column slices of every head's output in registers at a time.
  template <KvType T, int NV, int GB>
  SI_AVX2 static void values(const char* vd, int64_t row, const int64_t* sl, int64_t n, const float* p, float* o,
                             Ahead& pf) {
    constexpr int64_t D = 8 * NV;
    for (int v = 0; v < NV; v += 2) {
      __m256 a0[GB], a1[GB];
      for (int g = 0; g < GB; ++g) {
        a0[g] = _mm256_loadu_ps(o + g * D + 8 * v);
        a1[g] = _mm256_loadu_ps(o + g * D + 8 * v + 8);
      }
      for (int64_t i = 0; i < n; ++i) {
        if (v == 0) pf.step();
        const char* src = vd + sl[i] * row + v * 8 * kv_bytes<T>();
        const __m256 x0 = load8<T>(src), x1 = load8<T>(src + 8 * kv_bytes<T>());
        for (int g = 0; g < GB; ++g) {
          const __m256 pv = _mm256_broadcast_ss(p + g * kKeys + i);
          a0[g] = _mm256_fmadd_ps(pv, x0, a0[g]);
          a1[g] = _mm256_fmadd_ps(pv, x1, a1[g]);
        }
      }
      for (int g = 0; g < GB; ++g) {
        _mm256_storeu_ps(o + g * D + 8 * v, a0[g]);
        _mm256_storeu_ps(o + g * D + 8 * v + 8, a1[g]);
      }
    }
  }

  // The online-softmax update of one head for the block's scores s [kKeys] (n of them): new max m, sum l,
  // output o [D] rescaled; leaves the probabilities (times the int8 value scales vs when given) in p [kKeys].
  SI_AVX2 static void softmax(const float* s, int64_t n, const float* ks, const float* vs, float& m, float& l,
                                 float* o, int64_t D, float* p) {
    const float ninf = -std::numeric_limits<float>::infinity();
    __m256 x[4];
    __m256 mx = _mm256_set1_ps(ninf);
    for (int k = 0; k < 4; ++k) {
      x[k] = _mm256_loadu_ps(s + 8 * k);
      if (ks) x[k] = _mm256_mul_ps(x[k], _mm256_loadu_ps(ks + 8 * k));
      // lanes at or beyond n: -inf here, zeroed after e^x (whose clamp at -87 would leave them 1e-38)
      const __m256 idx = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(8 * k)),
                                       _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f));
      const __m256 live = _mm256_cmp_ps(idx, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
      x[k] = _mm256_blendv_ps(_mm256_set1_ps(ninf), x[k], live);
      mx = _mm256_max_ps(mx, x[k]);
    }
    const float mn = std::max(m, hmax8(mx));
    const __m256 vm = _mm256_set1_ps(mn);
    __m256 sum = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      const __m256 live = _mm256_cmp_ps(x[k], _mm256_set1_ps(ninf), _CMP_NEQ_OQ);
      x[k] = _mm256_and_ps(live, exp256(_mm256_sub_ps(x[k], vm)));
      sum = _mm256_add_ps(sum, x[k]);
    }
    if (mn != m && m != ninf) {
      const float alpha = exp_f32(m - mn);
      l *= alpha;
      const __m256 va = _mm256_set1_ps(alpha);
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), va));
    }
    l += hadd8(sum);
    m = mn;
    for (int k = 0; k < 4; ++k) {
      if (vs) x[k] = _mm256_mul_ps(x[k], _mm256_loadu_ps(vs + 8 * k));
      _mm256_storeu_ps(p + 8 * k, x[k]);
    }
  }
};

}  // namespace

bool attend_range_256(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st) {
  return attend_range_with<Path256>(J, b, j0, j1, st);
}

}  // namespace kv
