// The AVX-512 path of the paged decode attention (decode_attention.cpp holds the driver, the split over
// threads and the portable path): keys [j0, j1) of one (sequence, KV head) for the G query heads of its
// group, head_dim D = 16 NV (64, 128 or 256), in blocks of kKeys keys:
//   scores  each key's row widened in registers (NV vectors: F16C, a bf16 shift, an int8 sign-extend) and
//           multiplied with every head's query (pre-multiplied by the softmax scale and the int8 key channel
//           scales) into one vector of partial sums per (head, key); 16 such vectors reduce to the 16 keys'
//           scores in one transpose-and-add tree (about 2 shuffles per score, where a horizontal sum per
//           key costs 4 dependent ones); an int8 key's per-token scale multiplies its score.
//   softmax the block's max, e^x on 16 lanes at once, the running sum and output rescaled when the max grows.
//   values  the block's V rows widened once into a small fp32 buffer (a float32 cache is read in place) and
//           each head's output accumulated in NV registers; an int8 value's per-token scale folds into its
//           probability, a value channel scale multiplies the output at the end.
// The rows of the next block are prefetched: a block's keys lie in two or more KV-cache blocks anywhere in
// memory, so the hardware prefetcher cannot run ahead across them.
#include "kv_access.h"

#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace kv {
namespace {

constexpr int64_t kKeys = 32;  // keys per block: two vectors of scores per head

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

// The per-token scales of keys sl[0..n) of head h (int8), as two vectors of 16 (1 beyond n).
inline void token_scales(const float* scale, const int64_t* sl, int64_t n, int64_t Hkv, int64_t h, float* out) {
  for (int64_t i = 0; i < kKeys; ++i) out[i] = i < n ? scale[sl[i] * Hkv + h] : 1.f;
}

struct Scratch {
  std::vector<float> q, part, s, p, v;
};

// Scores of block keys sl[0..n) for the G heads into s [G][kKeys] (unmasked lanes beyond n are 0).
template <KvType T, int NV>
SI_AVX512 void block_scores_512(const char* kbase, int64_t row, const int64_t* sl, int64_t n, int64_t G,
                                const float* q, float* part, float* s) {
  constexpr int64_t D = 16 * NV;
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    for (int64_t i = 0; i < 16; ++i) {
      if (i0 + i >= n) {
        for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(part + (g * 16 + i) * 16, _mm512_setzero_ps());
        continue;
      }
      const char* src = kbase + sl[i0 + i] * row;
      __m512 x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load16<T>(src + v * 16 * kv_bytes<T>());
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * D;
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), x[0]), a1 = _mm512_setzero_ps();
        for (int v = 1; v < NV; ++v) {
          if (v % 2) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), x[v], a1);
          else a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * v), x[v], a0);
        }
        _mm512_storeu_ps(part + (g * 16 + i) * 16, _mm512_add_ps(a0, a1));
      }
    }
    for (int64_t g = 0; g < G; ++g) _mm512_storeu_ps(s + g * kKeys + i0, hsum16(part + g * 256));
  }
}

// The online-softmax update of head g for the block's scores s [kKeys] (n of them): new max m, sum l, output
// o [D] rescaled; leaves the probabilities (times the int8 value scales vs when given) in p [kKeys].
SI_AVX512 void block_softmax_512(float* s, int64_t n, const float* ks, const float* vs, float& m, float& l, float* o,
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

// o [G, D] += p [G][kKeys] times the block's value rows (sl[0..n)), widened into vbuf unless float32.
template <KvType T, int NV>
SI_AVX512 void block_values_512(const char* vbase, int64_t row, const int64_t* sl, int64_t n, int64_t G,
                                const float* p, float* vbuf, float* o) {
  constexpr int64_t D = 16 * NV;
  const float* vr[kKeys];
  for (int64_t i = 0; i < n; ++i) {
    const char* src = vbase + sl[i] * row;
    if constexpr (T == KvType::f32) {
      vr[i] = reinterpret_cast<const float*>(src);
    } else {
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(vbuf + i * D + 16 * v, load16<T>(src + v * 16 * kv_bytes<T>()));
      vr[i] = vbuf + i * D;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* og = o + g * D;
    const float* pg = p + g * kKeys;
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_loadu_ps(og + 16 * v);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 pv = _mm512_set1_ps(pg[i]);
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vr[i] + 16 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(og + 16 * v, acc[v]);
  }
}

// Each row (D elements of T) of keys sl[0..n) in both caches, into the cache hierarchy.
inline void prefetch_rows(const char* kbase, const char* vbase, int64_t row, int64_t bytes, const int64_t* sl,
                          int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t off = 0; off < bytes; off += 64) {
      __builtin_prefetch(kbase + sl[i] * row + off, 0, 3);
      __builtin_prefetch(vbase + sl[i] * row + off, 0, 3);
    }
}

template <KvType T, int NV>
SI_AVX512 void attend_512(const AttnJob& J, int64_t b, int64_t h, int64_t j0, int64_t j1, float* m, float* l,
                          float* o) {
  constexpr int64_t D = 16 * NV, bytes = D * kv_bytes<T>();
  const int64_t G = J.G, row = J.Hkv * bytes;  // bytes from one slot's row of head h to the next slot's
  thread_local Scratch w;
  w.q.resize(G * D);
  w.part.resize(G * 256);
  w.s.resize(G * kKeys);
  w.p.resize(G * kKeys);
  w.v.resize(kKeys * D);
  const float* q = J.q + b * J.qs + h * G * D;
  const float* kch = J.k.chan ? J.k.chan + h * D : nullptr;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) w.q[g * D + d] = q[g * D + d] * J.sc * (kch ? kch[d] : 1.f);
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  std::fill(o, o + G * D, 0.f);
  const char* kbase = static_cast<const char*>(J.k.data) + h * bytes;
  const char* vbase = static_cast<const char*>(J.v.data) + h * bytes;
  const int64_t* sl = J.slots + b * J.W;
  alignas(64) float ks[kKeys], vs[kKeys];
  for (int64_t j = j0; j < j1; j += kKeys) {
    const int64_t n = std::min(kKeys, j1 - j);
    if (j + kKeys < j1) prefetch_rows(kbase, vbase, row, bytes, sl + j + kKeys, std::min(kKeys, j1 - j - kKeys));
    block_scores_512<T, NV>(kbase, row, sl + j, n, G, w.q.data(), w.part.data(), w.s.data());
    if (T == KvType::i8) {
      token_scales(J.k.scale, sl + j, n, J.Hkv, h, ks);
      token_scales(J.v.scale, sl + j, n, J.Hkv, h, vs);
    }
    for (int64_t g = 0; g < G; ++g)
      block_softmax_512(w.s.data() + g * kKeys, n, T == KvType::i8 ? ks : nullptr, T == KvType::i8 ? vs : nullptr,
                        m[g], l[g], o + g * D, D, w.p.data() + g * kKeys);
    block_values_512<T, NV>(vbase, row, sl + j, n, G, w.p.data(), w.v.data(), o);
  }
  if (const float* vch = J.v.chan ? J.v.chan + h * D : nullptr)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) o[g * D + d] *= vch[d];
}

template <KvType T>
bool attend_by_dim(const AttnJob& J, int64_t b, int64_t h, int64_t j0, int64_t j1, float* m, float* l, float* o) {
  switch (J.D) {
    case 64: attend_512<T, 4>(J, b, h, j0, j1, m, l, o); return true;
    case 128: attend_512<T, 8>(J, b, h, j0, j1, m, l, o); return true;
    case 256: attend_512<T, 16>(J, b, h, j0, j1, m, l, o); return true;
    default: return false;
  }
}

}  // namespace

bool attend_range_512(const AttnJob& J, int64_t b, int64_t h, int64_t j0, int64_t j1, float* m, float* l, float* o) {
  switch (J.type) {
    case KvType::f32: return attend_by_dim<KvType::f32>(J, b, h, j0, j1, m, l, o);
    case KvType::f16: return attend_by_dim<KvType::f16>(J, b, h, j0, j1, m, l, o);
    case KvType::bf16: return attend_by_dim<KvType::bf16>(J, b, h, j0, j1, m, l, o);
    case KvType::i8: return attend_by_dim<KvType::i8>(J, b, h, j0, j1, m, l, o);
  }
  return false;
}

}  // namespace kv
