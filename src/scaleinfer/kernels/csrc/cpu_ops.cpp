// Fused fp32 CPU ops for the per-token path: each replaces several small torch ops (and their
// dispatch, allocation and Python overhead, which at batch-1 decode costs as much as the matmuls).
//   add_rms_norm       residual += x; out = rmsnorm(residual) * w         (one pass per row)
//   rotary_            rotate-half RoPE in place on a [n, heads, D] view (e.g. Q|K of the fused QKV)
//   silu_and_mul       silu(gate) * up from the fused [M, 2I] gate/up output
//   kv_write           store the step's K and V rows at their cache slots (fp32, f16, bf16 or int8 KV)
//   paged_decode_attention
//                      one query per sequence against its keys read through the slot table: no
//                      gathered copy of K/V, GQA groups share each key load, f16 / bf16 / int8 K/V
//                      converted to fp32 in registers; softmax in fp32; long sequences split over threads
// References: the torch expressions in layers/ and attention/sdpa.py (tested against them).
#include "isa.h"
#include "kernels.h"

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
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


// ---- Decode attention over a float32 / float16 / bfloat16 / int8 KV cache --------------------------------
// The keys of a (sequence, KV head) are read in blocks of kBlock: each block's K rows (and then its V rows)
// are converted to fp32 once into a small buffer (F16C / shifts / int8 x per-token scale, in registers),
// and every query head of the GQA group uses that copy; a block updates a running max, sum and output
// (online softmax). A float32 cache is read in place. For batch-1 decode the keys of a sequence are split
// into parts taken by different threads (flash-decoding): each part leaves its max, sum and unnormalized
// output, and one combine weighs them.

enum class KvType { f32, f16, bf16, i8 };

KvType kv_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return KvType::f32;
    case torch::kFloat16: return KvType::f16;
    case torch::kBFloat16: return KvType::bf16;
    case torch::kChar: return KvType::i8;
    default: TORCH_CHECK(false, "KV cache dtype ", t.scalar_type(), " is not float32, float16, bfloat16 or int8");
  }
  return KvType::f32;
}

// One of K or V of a layer: data [S, Hkv, D]; int8: scale [S, Hkv] (per token and head) and an optional
// per-channel multiplier chan [Hkv, D] (attention/kv_int8.py: keys are stored as quantize(k / chan)).
struct KvSide {
  void* data;
  float* scale;
  const float* chan;
};

// The code path of the K/V conversions, from the one ISA dispatch (isa.h; its set_isa forces a lower
// level for tests). The 256- and 512-bit paths convert f16 with F16C, which every AVX2 CPU has.
enum class AttnIsa { scalar = 0, avx2 = 1, avx512 = 2 };

AttnIsa attn_isa() {
  const si::Isa level = si::isa();
  if (level >= si::Isa::avx512) return AttnIsa::avx512;
  if (level >= si::Isa::avx2 && __builtin_cpu_supports("f16c")) return AttnIsa::avx2;
  return AttnIsa::scalar;
}

#define SI_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#define SI_AVX2 __attribute__((target("avx2,fma,f16c")))

template <KvType T>
SI_AVX512 inline __m512 load16(const void* p) {
  if constexpr (T == KvType::f32) return _mm512_loadu_ps(static_cast<const float*>(p));
  if constexpr (T == KvType::f16) return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  if constexpr (T == KvType::bf16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16));
  if constexpr (T == KvType::i8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
}

template <KvType T>
SI_AVX2 inline __m256 load8(const void* p) {
  if constexpr (T == KvType::f32) return _mm256_loadu_ps(static_cast<const float*>(p));
  if constexpr (T == KvType::f16) return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  if constexpr (T == KvType::bf16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 16));
  if constexpr (T == KvType::i8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p))));
}

template <KvType T>
constexpr int64_t kv_bytes() { return T == KvType::f32 ? 4 : T == KvType::i8 ? 1 : 2; }

template <KvType T>
inline float kv_scalar(const void* p, int64_t i) {
  if constexpr (T == KvType::f32) return static_cast<const float*>(p)[i];
  if constexpr (T == KvType::f16) return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
  if constexpr (T == KvType::bf16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  if constexpr (T == KvType::i8) return static_cast<float>(static_cast<const int8_t*>(p)[i]);
}

// Rows r = slots[i] * Hkv + h (i < n) of a side as fp32 into out [n, D]: x (* scale[r] for int8) (* chan[h]),
// in that order, as attention/kv_int8.py's read computes them (so the values are bit-identical to it).
template <KvType T>
SI_AVX512 void rows_512(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out) {
  const char* base = static_cast<const char*>(s.data);
  const float* ch = s.chan ? s.chan + h * D : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = slots[i] * Hkv + h;
    const char* src = base + r * D * kv_bytes<T>();
    const __m512 sc = _mm512_set1_ps(T == KvType::i8 ? s.scale[r] : 1.f);
    for (int64_t c = 0; c < D; c += 16) {
      __m512 x = load16<T>(src + c * kv_bytes<T>());
      if (T == KvType::i8) x = _mm512_mul_ps(x, sc);
      if (ch) x = _mm512_mul_ps(x, _mm512_loadu_ps(ch + c));
      _mm512_storeu_ps(out + i * D + c, x);
    }
  }
}

template <KvType T>
SI_AVX2 void rows_256(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out) {
  const char* base = static_cast<const char*>(s.data);
  const float* ch = s.chan ? s.chan + h * D : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = slots[i] * Hkv + h;
    const char* src = base + r * D * kv_bytes<T>();
    const __m256 sc = _mm256_set1_ps(T == KvType::i8 ? s.scale[r] : 1.f);
    for (int64_t c = 0; c < D; c += 8) {
      __m256 x = load8<T>(src + c * kv_bytes<T>());
      if (T == KvType::i8) x = _mm256_mul_ps(x, sc);
      if (ch) x = _mm256_mul_ps(x, _mm256_loadu_ps(ch + c));
      _mm256_storeu_ps(out + i * D + c, x);
    }
  }
}

template <KvType T>
void rows_scalar(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out) {
  const float* ch = s.chan ? s.chan + h * D : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = slots[i] * Hkv + h;
    const float sc = T == KvType::i8 ? s.scale[r] : 1.f;
    for (int64_t c = 0; c < D; ++c) {
      float x = kv_scalar<T>(s.data, r * D + c);
      if (T == KvType::i8) x *= sc;
      if (ch) x *= ch[c];
      out[i * D + c] = x;
    }
  }
}

template <KvType T>
void rows_f32(AttnIsa isa, const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out) {
  if (isa == AttnIsa::avx512 && D % 16 == 0) return rows_512<T>(s, slots, n, Hkv, h, D, out);
  if (isa >= AttnIsa::avx2 && D % 8 == 0) return rows_256<T>(s, slots, n, Hkv, h, D, out);
  rows_scalar<T>(s, slots, n, Hkv, h, D, out);
}

constexpr int64_t kBlock = 32;  // keys per block: their fp32 rows (8 KiB at D = 64) stay in L1

// Scores of one block of n keys (rows kr[j]) for the G query heads at q [G, D], folded into the running
// max m [G], sum l [G] and output o [G, D] (rescaled when the max grows); leaves e^(score - max) in p [G, kBlock].
// DC: D as a compile-time constant (64, 128) so each head's query and output stay in registers; 0: runtime D.
template <int64_t DC>
inline void block_scores_t(const float* q, int64_t G, int64_t Dr, float sc, const float* const* kr, int64_t n,
                           float* m, float* l, float* o, float* p) {
  const int64_t D = DC ? DC : Dr;
  for (int64_t g = 0; g < G; ++g) {
    float qg[DC ? DC : 1];
    const float* qp = q + g * D;
    if (DC) std::copy(qp, qp + D, qg);
    for (int64_t j = 0; j < n; ++j) p[g * kBlock + j] = dot(DC ? qg : qp, kr[j], D) * sc;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* pg = p + g * kBlock;
    float mx = m[g];
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, pg[j]);
    if (mx != m[g] && m[g] != -std::numeric_limits<float>::infinity()) {
      const float alpha = exp_f32(m[g] - mx);
      l[g] *= alpha;
      float* og = o + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] *= alpha;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      pg[j] = exp_f32(pg[j] - mx);
      sum += pg[j];
    }
    l[g] += sum;
    m[g] = mx;
  }
}

SI_BODY void block_scores_body(const float* q, int64_t G, int64_t D, float sc, const float* const* kr, int64_t n,
                               float* m, float* l, float* o, float* p) {
  if (D == 64) return block_scores_t<64>(q, G, D, sc, kr, n, m, l, o, p);
  if (D == 128) return block_scores_t<128>(q, G, D, sc, kr, n, m, l, o, p);
  block_scores_t<0>(q, G, D, sc, kr, n, m, l, o, p);
}
SI_ISA_VERSIONS(block_scores, (const float* q, int64_t G, int64_t D, float sc, const float* const* kr, int64_t n,
                float* m, float* l, float* o, float* p), (q, G, D, sc, kr, n, m, l, o, p))

// o [G, D] += p [G, kBlock] times the block's value rows vr[j] (a head's output in registers for DC > 0).
template <int64_t DC>
inline void block_values_t(int64_t G, int64_t Dr, const float* const* vr, int64_t n, const float* p, float* o) {
  const int64_t D = DC ? DC : Dr;
  for (int64_t g = 0; g < G; ++g) {
    float acc[DC ? DC : 1];
    float* og = o + g * D;
    float* a = DC ? acc : og;
    if (DC) std::copy(og, og + D, acc);
    for (int64_t j = 0; j < n; ++j) axpy(p[g * kBlock + j], vr[j], a, D);
    if (DC) std::copy(acc, acc + D, og);
  }
}

SI_BODY void block_values_body(int64_t G, int64_t D, const float* const* vr, int64_t n, const float* p, float* o) {
  if (D == 64) return block_values_t<64>(G, D, vr, n, p, o);
  if (D == 128) return block_values_t<128>(G, D, vr, n, p, o);
  block_values_t<0>(G, D, vr, n, p, o);
}
SI_ISA_VERSIONS(block_values, (int64_t G, int64_t D, const float* const* vr, int64_t n, const float* p, float* o),
                (G, D, vr, n, p, o))

// What one paged_decode_attention call reads.
struct AttnJob {
  const float* q;
  int64_t qs, W, Hkv, G, D;
  float sc;
  KvType type;
  KvSide k, v;
  const int64_t* slots;
  AttnIsa isa;
};

// The fp32 rows of a block: pointers into a float32 cache, else into `buf` after converting.
void block_rows(const AttnJob& J, const KvSide& s, const int64_t* slots, int64_t n, int64_t h, float* buf,
                const float** rows) {
  const int64_t D = J.D;
  if (J.type == KvType::f32) {
    for (int64_t j = 0; j < n; ++j) rows[j] = static_cast<const float*>(s.data) + (slots[j] * J.Hkv + h) * D;
    return;
  }
  switch (J.type) {
    case KvType::f16: rows_f32<KvType::f16>(J.isa, s, slots, n, J.Hkv, h, D, buf); break;
    case KvType::bf16: rows_f32<KvType::bf16>(J.isa, s, slots, n, J.Hkv, h, D, buf); break;
    default: rows_f32<KvType::i8>(J.isa, s, slots, n, J.Hkv, h, D, buf); break;
  }
  for (int64_t j = 0; j < n; ++j) rows[j] = buf + j * D;
}

// Keys [j0, j1) of sequence b for the query heads of KV head h: max m [G], sum l [G], unnormalized o [G, D].
void attend_range(const AttnJob& J, int64_t b, int64_t h, int64_t j0, int64_t j1, float* m, float* l, float* o) {
  thread_local std::vector<float> buf, p;
  const int64_t G = J.G, D = J.D;
  buf.resize(kBlock * D);
  p.resize(G * kBlock);
  const float* kr[kBlock];
  const float* vr[kBlock];
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  std::fill(o, o + G * D, 0.f);
  const float* q = J.q + b * J.qs + h * G * D;
  for (int64_t j = j0; j < j1; j += kBlock) {
    const int64_t n = std::min(kBlock, j1 - j);
    const int64_t* sl = J.slots + b * J.W + j;
    block_rows(J, J.k, sl, n, h, buf.data(), kr);
    block_scores(q, G, D, J.sc, kr, n, m, l, o, p.data());
    block_rows(J, J.v, sl, n, h, buf.data(), vr);
    block_values(G, D, vr, n, p.data(), o);
  }
}

// out [G, D] = the parts' outputs weighed by e^(their max - the overall max), over their summed weights.
// parts: ns blocks of (m [G], l [G], o [G, D]) laid out one after another.
void combine_parts(const float* parts, int64_t ns, int64_t G, int64_t D, float* out) {
  const int64_t stride = G * (D + 2);
  for (int64_t g = 0; g < G; ++g) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < ns; ++s) mx = std::max(mx, parts[s * stride + g]);
    float sum = 0.f;
    float* og = out + g * D;
    std::fill(og, og + D, 0.f);
    for (int64_t s = 0; s < ns; ++s) {
      const float* part = parts + s * stride;
      const float w = exp_f32(part[g] - mx);
      sum += w * part[G + g];
      axpy(w, part + 2 * G + g * D, og, D);
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; ++d) og[d] *= inv;
  }
}

// The side of a cache a kernel reads or writes, its scales and channel multipliers checked.
KvSide kv_side(const torch::Tensor& cache, const OptTensor& scale, const OptTensor& chan, KvType t, const char* name) {
  TORCH_CHECK(cache.device().is_cpu() && cache.is_contiguous() && cache.dim() == 3, name, " cache must be a contiguous [S, Hkv, D] CPU tensor");
  const int64_t S = cache.size(0), Hkv = cache.size(1), D = cache.size(2);
  const bool has_scale = scale.has_value() && scale->defined(), has_chan = chan.has_value() && chan->defined();
  KvSide s{cache.data_ptr(), nullptr, nullptr};
  if (t == KvType::i8) {
    TORCH_CHECK(has_scale && scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() && scale->numel() == S * Hkv,
                "an int8 ", name, " cache needs its per-token scales: a contiguous float32 [S, Hkv] tensor");
    s.scale = scale->data_ptr<float>();
  } else {
    TORCH_CHECK(!has_scale && !has_chan, "scales go with int8 caches only (", name, " cache is ", cache.scalar_type(), ")");
  }
  if (has_chan) {
    TORCH_CHECK(chan->scalar_type() == torch::kFloat32 && chan->is_contiguous() && chan->numel() == Hkv * D,
                name, " channel scales must be a contiguous float32 [Hkv, D] tensor");
    s.chan = chan->data_ptr<float>();
  }
  return s;
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

// Parts each (sequence, KV head) of the decode rows is split into: `splits` when given (> 0), else
// enough to give every thread several items when there are few (batch-1 decode), at most one per 256 keys.
int64_t parts_for(int64_t splits, int64_t len, int64_t items, int64_t threads) {
  if (splits > 0) return std::min(splits, len);
  const int64_t most = (8 * threads + items - 1) / items;
  return std::max<int64_t>(1, std::min(most, (len + 255) / 256));
}

// out [>= d, H, D] contiguous (rows 0..d-1 written); q [d, H, D] float32 (contiguous heads); caches
// [S, Hkv, D] of any kv_write dtype (int8: with scales, see there); slots [d, W] int64 (row b's first
// lens[b] entries are its keys); lens [d] int64; splits: parts per sequence (0: chosen here).
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor lens, double scale, OptTensor k_scale,
                            OptTensor v_scale, OptTensor k_chan, OptTensor v_chan, int64_t splits) {
  check_f32(q, "q");
  check_f32(out, "out");
  const KvType t = kv_type(k_cache);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes(),
              "K and V caches must have the same dtype and shape");
  const KvSide ks = kv_side(k_cache, k_scale, k_chan, t, "k"), vs = kv_side(v_cache, v_scale, v_chan, t, "v");
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
  const int64_t G = H / Hkv;
  const AttnJob J{q.data_ptr<float>(), q.stride(0), W, Hkv, G, D, static_cast<float>(scale), t, ks, vs, sp, attn_isa()};
  float* op = out.data_ptr<float>();
  // Items: (sequence, KV head, key range); a sequence split in parts leaves them in `parts`, combined after.
  struct Item { int64_t b, h, j0, j1, part; };
  std::vector<Item> items;
  std::vector<int64_t> first_part(d, -1), num_parts(d, 1);
  int64_t nparts = 0;
  const int64_t nt = at::get_num_threads();
  for (int64_t b = 0; b < d; ++b) {
    const int64_t ns = parts_for(splits, lp[b], d * Hkv, nt);
    num_parts[b] = ns;
    if (ns > 1) first_part[b] = nparts;
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t s = 0; s < ns; ++s)
        items.push_back({b, h, lp[b] * s / ns, lp[b] * (s + 1) / ns, ns > 1 ? nparts++ : -1});
  }
  const int64_t stride = G * (D + 2);
  std::vector<float> parts(nparts * stride);
  parallel_row_chunks(static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> own;
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      float* part = it.part >= 0 ? parts.data() + it.part * stride : (own.resize(stride), own.data());
      attend_range(J, it.b, it.h, it.j0, it.j1, part, part + G, part + 2 * G);
      if (it.part < 0) combine_parts(part, 1, G, D, op + (it.b * H + it.h * G) * D);
    }
  });
  for (int64_t b = 0; b < d; ++b) {
    if (num_parts[b] < 2) continue;
    for (int64_t h = 0; h < Hkv; ++h)
      combine_parts(parts.data() + (first_part[b] + h * num_parts[b]) * stride, num_parts[b], G, D,
                    op + (b * H + h * G) * D);
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
  m.def("kv_write", &kv_write, "store K and V rows at their cache slots (converted or quantized to the cache's dtype)",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("k"), py::arg("v"),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("k_chan") = py::none(),
        py::arg("v_chan") = py::none());
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention read through slot tables",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("lens"),
        py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
        py::arg("k_chan") = py::none(), py::arg("v_chan") = py::none(), py::arg("splits") = 0);
}
