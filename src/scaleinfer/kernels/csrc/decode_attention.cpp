// Decode attention over a paged float32 / float16 / bfloat16 / int8 KV cache: one query row per sequence
// against its keys, read through the sequence's slot table (no gathered copy of K/V); the query heads of a
// GQA group share each key read; softmax in fp32, online (a running max, sum and output per head).
// For batch-1 decode the keys of a sequence are split into parts that different threads take
// (flash-decoding): each part leaves its max, sum and unnormalized output, and one combine weighs them.
//
// An item is one key range of one sequence over all its KV heads (a slot holds its heads' rows side by
// side, so the range's K and V are read as runs through memory). Three code paths, the same arithmetic up
// to fp32 rounding:
//   AVX-512 (decode_attention_512.cpp, head_dim 64 / 128 / 256): K and V widened in registers only,
//     queries and outputs held in registers, a block's 16 scores per transpose-and-add tree instead of a
//     horizontal sum per key, e^x on 16 lanes.
//   AVX2 (decode_attention_256.cpp, the same head sizes): the same passes on 8 lanes, queries read from L1.
//   portable (here; scalar, other head sizes), head by head: the keys in blocks of kBlock, each
//     block's K rows (then its V rows) converted to fp32 once into a small buffer (F16C / shifts / int8 x
//     per-token scale) that every query head of the group reads; a float32 cache is read in place.
// Reference: attention/sdpa.py (SdpaBackend), tested against it on every KV dtype and ISA level.
#include "isa.h"
#include "kernels.h"
#include "kv_access.h"

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using namespace kv;

// The vector width of a rows_vec instance: 16 lanes of AVX-512 or 8 of AVX2, the K/V loads of kv_access.h.
struct V512 {
  static constexpr int64_t W = 16;
  template <KvType T> SI_AVX512 static __m512 load(const void* p) { return load16<T>(p); }
  SI_AVX512 static __m512 set1(float x) { return _mm512_set1_ps(x); }
  SI_AVX512 static __m512 loadf(const float* p) { return _mm512_loadu_ps(p); }
  SI_AVX512 static __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
  SI_AVX512 static void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
};
struct V256 {
  static constexpr int64_t W = 8;
  template <KvType T> SI_AVX2 static __m256 load(const void* p) { return load8<T>(p); }
  SI_AVX2 static __m256 set1(float x) { return _mm256_set1_ps(x); }
  SI_AVX2 static __m256 loadf(const float* p) { return _mm256_loadu_ps(p); }
  SI_AVX2 static __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
  SI_AVX2 static void store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
};

// Rows r = slots[i] * Hkv + h (i < n) of a side as fp32 into out [n, D]: x (* scale[r] for int8) (* chan[h]),
// in that order, as attention/kv_int8.py's read computes them (so the values are bit-identical to it).
// One body for both vector widths (D a multiple of V::W), compiled per width by rows_512 / rows_256.
template <class V, KvType T>
SI_BODY void rows_vec(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out,
                      Ahead& pf) {
  const char* base = static_cast<const char*>(s.data);
  const float* ch = s.chan ? s.chan + h * D : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = slots[i] * Hkv + h;
    const char* src = base + r * D * kv_bytes<T>();
    pf.step();
    const auto sc = V::set1(T == KvType::i8 ? s.scale[r] : 1.f);
    for (int64_t c = 0; c < D; c += V::W) {
      auto x = V::template load<T>(src + c * kv_bytes<T>());
      if (T == KvType::i8) x = V::mul(x, sc);
      if (ch) x = V::mul(x, V::loadf(ch + c));
      V::store(out + i * D + c, x);
    }
  }
}

template <KvType T>
SI_AVX512 void rows_512(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out,
                       Ahead& pf) {
  rows_vec<V512, T>(s, slots, n, Hkv, h, D, out, pf);
}

template <KvType T>
SI_AVX2 void rows_256(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out,
                       Ahead& pf) {
  rows_vec<V256, T>(s, slots, n, Hkv, h, D, out, pf);
}

template <KvType T>
void rows_scalar(const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out,
                 Ahead& pf) {
  const float* ch = s.chan ? s.chan + h * D : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    pf.step();
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
void rows_f32(AttnIsa isa, const KvSide& s, const int64_t* slots, int64_t n, int64_t Hkv, int64_t h, int64_t D, float* out,
              Ahead& pf) {
  if (isa == AttnIsa::avx512 && D % 16 == 0) return rows_512<T>(s, slots, n, Hkv, h, D, out, pf);
  if (isa >= AttnIsa::avx2 && D % 8 == 0) return rows_256<T>(s, slots, n, Hkv, h, D, out, pf);
  rows_scalar<T>(s, slots, n, Hkv, h, D, out, pf);
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

// The fp32 rows of a block: pointers into a float32 cache, else into `buf` after converting.
void block_rows(const AttnJob& J, const KvSide& s, const int64_t* slots, int64_t n, int64_t h, float* buf,
                const float** rows, Ahead& pf) {
  const int64_t D = J.D;
  if (J.type == KvType::f32) {
    for (int64_t j = 0; j < n; ++j) rows[j] = static_cast<const float*>(s.data) + (slots[j] * J.Hkv + h) * D;
    return;
  }
  switch (J.type) {
    case KvType::f16: rows_f32<KvType::f16>(J.isa, s, slots, n, J.Hkv, h, D, buf, pf); break;
    case KvType::bf16: rows_f32<KvType::bf16>(J.isa, s, slots, n, J.Hkv, h, D, buf, pf); break;
    default: rows_f32<KvType::i8>(J.isa, s, slots, n, J.Hkv, h, D, buf, pf); break;
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
  // This head's rows of the next block (D * bytes at slot * Hkv rows) prefetched while converting this one's.
  // (a float32 cache is read in place, where no per-key loop of ours could spread the prefetches)
  const int64_t bytes = D * kv_bytes_of(J.type);
  Ahead pf{static_cast<const char*>(J.k.data) + h * bytes, static_cast<const char*>(J.v.data) + h * bytes,
           J.Hkv * bytes, bytes, J.k.scale ? J.k.scale + h : nullptr, J.v.scale ? J.v.scale + h : nullptr, J.Hkv};
  pf.begin(J.slots + b * J.W, j0, j1, kBlock, J.type == KvType::f32 ? 0 : J.ahead);
  for (int64_t j = j0; j < j1; j += kBlock) {
    const int64_t n = std::min(kBlock, j1 - j);
    const int64_t* sl = J.slots + b * J.W + j;
    pf.at(j, 2 * n);
    block_rows(J, J.k, sl, n, h, buf.data(), kr, pf);
    block_scores(q, G, D, J.sc, kr, n, m, l, o, p.data());
    block_rows(J, J.v, sl, n, h, buf.data(), vr, pf);
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

// Parts a sequence's keys are split into: `splits` when given (> 0), else items of about equal keys,
// kRangesPerThread of them per thread (two by default, as the weight streams: a thread slowed by a
// neighbour leaves part of its share to the other) and at least 256 keys each. Fewer, longer items than
// the 8 per thread this took before: each item's first block is read without a prefetch ahead of it
// (kv::Ahead), and 4 items measured 5-8% faster than 16 at 4k keys on 2 threads. From the row's own
// length only, never the step's other rows: the split sets the order of the float sums, and a row must
// give the same bits alone and in any batch (speculative verification, continuous batching; tested).
int64_t parts_for(int64_t splits, int64_t len, int64_t threads) {
  if (splits > 0) return std::min(splits, len);
  const int64_t items = kRangesPerThread * threads, target = std::max<int64_t>(256, (len + items - 1) / items);
  return std::max<int64_t>(1, (len + target - 1) / target);
}

// Keys [j0, j1) of sequence b for every KV head h, its (m [G], l [G], o [G, D]) at st[h]: all heads in one
// pass over each slot's K and V rows on the AVX-512 and AVX2 paths (a slot holds its heads' rows side by side
// and a cache block its slots one after another, so the reads run through memory in order), else head by head.
void attend_heads(const AttnJob& J, int64_t b, int64_t j0, int64_t j1, float* const* st) {
  if (J.isa == AttnIsa::avx512 && attend_range_512(J, b, j0, j1, st)) return;
  if (J.isa == AttnIsa::avx2 && attend_range_256(J, b, j0, j1, st)) return;
  for (int64_t h = 0; h < J.Hkv; ++h) attend_range(J, b, h, j0, j1, st[h], st[h] + J.G, st[h] + 2 * J.G);
}

}  // namespace

// out [>= d, H, D] contiguous (rows 0..d-1 written); q [d, H, D] float32 (contiguous heads); caches
// [S, Hkv, D] of any kv_write dtype (int8: with scales, see there); slots [d, W] int64 (row b's first
// lens[b] entries are its keys); lens [d] int64; splits: parts per sequence (0: chosen here).
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor lens, double scale, OptTensor k_scale,
                            OptTensor v_scale, OptTensor k_chan, OptTensor v_chan, int64_t splits) {
  for (const auto* t : {&q, &out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32, "q and out must be float32 CPU tensors");
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
  const AttnJob J{q.data_ptr<float>(), q.stride(0), W, Hkv, G, D, static_cast<float>(scale), t, ks, vs, sp, attn_isa(),
                  attn_prefetch_blocks()};
  float* op = out.data_ptr<float>();
  // Items: (sequence, key range) over all KV heads; a sequence split in parts leaves each head's part
  // (max, sum, output) at parts[first_part[b] + h * num_parts[b] + s], combined after.
  struct Item { int64_t b, j0, j1, s; };
  std::vector<Item> items;
  std::vector<int64_t> first_part(d, -1), num_parts(d, 1);
  int64_t nparts = 0;
  const int64_t nt = at::get_num_threads();
  for (int64_t b = 0; b < d; ++b) {
    const int64_t ns = parts_for(splits, lp[b], nt);
    num_parts[b] = ns;
    if (ns > 1) first_part[b] = nparts, nparts += ns * Hkv;
    for (int64_t s = 0; s < ns; ++s) items.push_back({b, lp[b] * s / ns, lp[b] * (s + 1) / ns, ns > 1 ? s : -1});
  }
  const int64_t stride = G * (D + 2);
  std::vector<float> parts(nparts * stride);
  parallel_row_chunks(static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> own;
    thread_local std::vector<float*> st;
    own.resize(Hkv * stride);
    st.resize(Hkv);
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      for (int64_t h = 0; h < Hkv; ++h)
        st[h] = it.s >= 0 ? parts.data() + (first_part[it.b] + h * num_parts[it.b] + it.s) * stride : own.data() + h * stride;
      attend_heads(J, it.b, it.j0, it.j1, st.data());
      if (it.s < 0)
        for (int64_t h = 0; h < Hkv; ++h) combine_parts(st[h], 1, G, D, op + (it.b * H + h * G) * D);
    }
  });
  for (int64_t b = 0; b < d; ++b) {
    if (num_parts[b] < 2) continue;
    for (int64_t h = 0; h < Hkv; ++h)
      combine_parts(parts.data() + (first_part[b] + h * num_parts[b]) * stride, num_parts[b], G, D,
                    op + (b * H + h * G) * D);
  }
}

void register_decode_attention(pybind11::module& m) {
  namespace py = pybind11;
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention read through slot tables",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("lens"),
        py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
        py::arg("k_chan") = py::none(), py::arg("v_chan") = py::none(), py::arg("splits") = 0);
}
