// The block loop the two vector paths of the paged decode attention share (decode_attention_512.cpp for
// AVX-512, decode_attention_256.cpp for AVX2): keys [j0, j1) of one sequence for every KV head and the G
// query heads of its group, in blocks of P::kKeys keys. Per block: the scores of every KV head's heads, the
// online-softmax update of each head, then the values; the next block's K and V lines are prefetched during
// the passes (kv::Ahead). A path P supplies its lanes per vector (kLanes), keys per block (kKeys), how many
// query heads one pass holds (group<NV>()), scores<T, NV, GB> and values<T, NV, GB> (one pass over a block
// for GB query heads of one KV head) and softmax (one head's online-softmax update). The loop itself is
// plain code: each pass is one call into the path's vector code.
#pragma once
#include "kv_access.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace kv {

// The per-token scales of keys sl[0..n) of head h (int8), `keys` of them (1 beyond n).
inline void token_scales(const float* scale, const int64_t* sl, int64_t n, int64_t keys, int64_t Hkv, int64_t h,
                         float* out) {
  for (int64_t i = 0; i < keys; ++i) out[i] = i < n ? scale[sl[i] * Hkv + h] : 1.f;
}

// Scores (values: false) of one KV head's G query heads through path P, in chunks of at most group<NV>() heads.
template <class P, KvType T, int NV>
void group_pass(bool scores, const char* base, int64_t row, const int64_t* sl, int64_t n, int64_t G, const float* q,
                float* part, float* s, const float* p, float* o, Ahead& pf) {
  constexpr int64_t D = P::kLanes * NV, K = P::kKeys, GP = P::template group<NV>();
  const int64_t chunks = (G + GP - 1) / GP;
  for (int64_t c = 0, g0 = 0; c < chunks; ++c) {
    const int64_t g1 = G * (c + 1) / chunks, gb = g1 - g0;
#define SI_GB_CASE(GB)                                                                                 \
  case GB:                                                                                             \
    if constexpr (GB <= GP) {                                                                          \
      if (scores) P::template scores<T, NV, GB>(base, row, sl, n, q + g0 * D, part, s + g0 * K, pf);   \
      else P::template values<T, NV, GB>(base, row, sl, n, p + g0 * K, o + g0 * D, pf);                \
    }                                                                                                  \
    break;
    switch (gb) {
      SI_GB_CASE(1) SI_GB_CASE(2) SI_GB_CASE(3) SI_GB_CASE(4) SI_GB_CASE(5) SI_GB_CASE(6)
    }
#undef SI_GB_CASE
    g0 = g1;
  }
}

// Leaves at st[h] (max m [G], sum l [G], unnormalized output o [G, D]) of KV head h's query heads.
template <class P, KvType T, int NV>
void attend_blocks(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st) {
  constexpr int64_t D = P::kLanes * NV, bytes = D * kv_bytes<T>(), K = P::kKeys, GP = P::template group<NV>();
  const int64_t G = J.G, Hkv = J.Hkv, row = Hkv * bytes;  // a slot's rows: its heads' side by side
  struct Scratch {
    std::vector<float> q, part, s, p;
  };
  thread_local Scratch w;
  const int64_t HG = Hkv * G;
  w.q.resize(HG * D);
  w.part.resize(GP * P::kLanes * P::kLanes);
  w.s.resize(HG * K);
  w.p.resize(HG * K);
  const float* q = J.q + b * J.qs;
  for (int64_t h = 0; h < Hkv; ++h) {  // queries times the softmax scale and the int8 key channel scales
    const float* kch = J.k.chan ? J.k.chan + h * D : nullptr;
    for (int64_t i = h * G * D; i < (h + 1) * G * D; ++i) w.q[i] = q[i] * J.sc * (kch ? kch[i % D] : 1.f);
    std::fill(st[h], st[h] + G, -std::numeric_limits<float>::infinity());
    std::fill(st[h] + G, st[h] + G * (D + 2), 0.f);
  }
  const char* kd = static_cast<const char*>(J.k.data);
  const char* vd = static_cast<const char*>(J.v.data);
  const int64_t* sl = J.slots + b * J.W;
  alignas(64) float ks[K], vs[K];
  // step() calls per block (pf.at): one per key row read by the passes of each chunk of heads
  const int64_t chunks = (G + GP - 1) / GP;
  Ahead pf{kd, vd, row, row, J.k.scale, J.v.scale, Hkv};
  pf.begin(sl, j0, j1, K, J.ahead);
  for (int64_t j = j0; j < j1; j += K) {
    const int64_t n = std::min(K, j1 - j);
    pf.at(j, 2 * Hkv * chunks * n);
    for (int64_t h = 0; h < Hkv; ++h)
      group_pass<P, T, NV>(true, kd + h * bytes, row, sl + j, n, G, w.q.data() + h * G * D, w.part.data(),
                           w.s.data() + h * G * K, nullptr, nullptr, pf);
    for (int64_t h = 0; h < Hkv; ++h) {
      if (T == KvType::i8) {
        token_scales(J.k.scale, sl + j, n, K, Hkv, h, ks);
        token_scales(J.v.scale, sl + j, n, K, Hkv, h, vs);
      }
      float *m = st[h], *l = m + G, *o = l + G;
      for (int64_t g = 0; g < G; ++g)
        P::softmax(w.s.data() + (h * G + g) * K, n, T == KvType::i8 ? ks : nullptr, T == KvType::i8 ? vs : nullptr,
                   m[g], l[g], o + g * D, D, w.p.data() + (h * G + g) * K);
    }
    for (int64_t h = 0; h < Hkv; ++h)
      group_pass<P, T, NV>(false, vd + h * bytes, row, sl + j, n, G, nullptr, nullptr, nullptr,
                           w.p.data() + h * G * K, st[h] + 2 * G, pf);
  }
  if (J.v.chan)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t i = 0; i < G * D; ++i) st[h][2 * G + i] *= J.v.chan[h * D + i % D];
}

// The head sizes the vector paths cover (D = kLanes x NV for D 64 / 128 / 256) by KV dtype; false: not covered.
template <class P>
bool attend_range_with(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st) {
  constexpr int L = static_cast<int>(P::kLanes);
  auto by_dim = [&](auto tag) {
    constexpr KvType T = decltype(tag)::value;
    switch (J.D) {
      case 64: attend_blocks<P, T, 64 / L>(J, b, j0, j1, st); return true;
      case 128: attend_blocks<P, T, 128 / L>(J, b, j0, j1, st); return true;
      case 256: attend_blocks<P, T, 256 / L>(J, b, j0, j1, st); return true;
      default: return false;
    }
  };
  switch (J.type) {
    case KvType::f32: return by_dim(std::integral_constant<KvType, KvType::f32>{});
    case KvType::f16: return by_dim(std::integral_constant<KvType, KvType::f16>{});
    case KvType::bf16: return by_dim(std::integral_constant<KvType, KvType::bf16>{});
    case KvType::i8: return by_dim(std::integral_constant<KvType, KvType::i8>{});
  }
  return false;
}

}  // namespace kv
