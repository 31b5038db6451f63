// What the KV cache kernels share (cpu_ops.cpp: kv_write; decode_attention*.cpp: paged_decode_attention):
// the cache dtypes and one side (K or V) of a layer's cache, the ISA level of their conversions, loads
// that widen f16 / bf16 / int8 to fp32 in registers, and e^x in plain float arithmetic.
#pragma once
#include "isa.h"
#include "kernels.h"

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace kv {

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

enum class KvType { f32, f16, bf16, i8 };

inline KvType kv_type(const torch::Tensor& t) {
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

inline AttnIsa attn_isa() {
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

// The side of a cache a kernel reads or writes, its scales and channel multipliers checked.
inline KvSide kv_side(const torch::Tensor& cache, const OptTensor& scale, const OptTensor& chan, KvType t, const char* name) {
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

// What one paged_decode_attention call reads.
struct AttnJob {
  const float* q;
  int64_t qs, W, Hkv, G, D;
  float sc;
  KvType type;
  KvSide k, v;
  const int64_t* slots;
  AttnIsa isa;
  int64_t ahead;  // blocks whose K/V lines are prefetched ahead (attn_prefetch_blocks(), read once per call)
};

// decode_attention_512.cpp: keys [j0, j1) of sequence b for every KV head h on the AVX-512 path, leaving
// at st[h] the max m [G], sum l [G] and unnormalized output o [G, D] of its query heads; false (nothing
// done) when the path does not cover J.
bool attend_range_512(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st);
// decode_attention_256.cpp: the same on the AVX2 path (F16C and FMA), the same arithmetic up to fp32 rounding.
bool attend_range_256(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st);

// The K and V lines of the block after the one being computed, prefetched to L2 a few at a time from inside
// the passes over the current block (one call of step() per key row read), so a cold cache's misses overlap
// the arithmetic. Reading the keys as they come measured 10 GB/s where a plain read of the same rows streams
// 22-34: the passes compute between misses and keep few in flight; a whole block's prefetches issued at once
// (tried first) fill the miss buffers and stall the passes instead, no faster than none. Per row of a slot:
// `len` bytes at base + slot * stride (K rows of the slots first, then V rows). SI_ATTN_PREFETCH=N blocks ahead
// (default 1; 0 off, for A/B runs). Memory hints only: the arithmetic is the same either way.
struct Ahead {
  const char* kd;
  const char* vd;
  int64_t stride, len;
  const float* kscale = nullptr;  // int8: the per-token scales [S, Hkv], prefetched with start()
  const float* vscale = nullptr;
  int64_t hkv = 0;
  const int64_t* sl = nullptr;
  int64_t n = 0, r = 0, o = 0, per = 0;  // the block's slots, the next row (K 0..n-1, then V) and offset
  const int64_t* keys = nullptr;  // the range's slot table, its end, keys per block, keys prefetched ahead
  int64_t end = 0, block = 0, ahead = 0;

  inline void one() {
    _mm_prefetch((r < n ? kd + sl[r] * stride : vd + sl[r - n] * stride) + o, _MM_HINT_T1);  // T0 measured slower
    if ((o += 64) >= len) o = 0, ++r;
  }
  inline void step() {
    for (int64_t k = 0; k < per && r < 2 * n; ++k) one();
  }
  // A range of keys [j0, j1) of slot table `slots`, read in blocks of `blk` keys, `blocks` blocks ahead: the
  // first blocks are prefetched at once (nothing to overlap them with yet).
  void begin(const int64_t* slots, int64_t j0, int64_t j1, int64_t blk, int64_t blocks) {
    keys = slots, end = j1, block = blk, ahead = blocks * blk;
    for (int64_t i = j0; i < std::min(j0 + ahead, j1); i += blk) start(slots + i, std::min(blk, j1 - i), 0);
  }
  // Before computing the block at key j: plans the block `ahead` keys later over `iters` step() calls.
  void at(int64_t j, int64_t iters) {
    if (ahead && j + ahead < end) start(keys + j + ahead, std::min(block, end - j - ahead), iters);
    else start(keys, 0, 0);
  }
  // Issues what is left of the last block, then plans the block of slots s[0..cnt) over `iters` step() calls.
  void start(const int64_t* s, int64_t cnt, int64_t iters) {
    while (r < 2 * n) one();
    sl = s, n = cnt, r = 0, o = 0;
    per = iters > 0 ? (2 * n * ((len + 63) / 64) + iters - 1) / iters : 0;
    for (const float* sc : {kscale, vscale}) {  // a few lines: a cache block's slots hold their scales in a run
      if (!sc) continue;
      uintptr_t last = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float* p = sc + s[i] * hkv;
        if ((reinterpret_cast<uintptr_t>(p) >> 6) != last) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
        last = reinterpret_cast<uintptr_t>(p) >> 6;
      }
    }
  }
};

inline int64_t kv_bytes_of(KvType t) { return t == KvType::f32 ? 4 : t == KvType::i8 ? 1 : 2; }

inline int64_t attn_prefetch_blocks() {
  const char* e = std::getenv("SI_ATTN_PREFETCH");
  return e && *e ? std::max<int64_t>(0, std::atoll(e)) : 1;
}

}  // namespace kv
