// What the a8 kernels (int4_a8.cpp, int8_a8.cpp) share: activations quantized per block of 32 to int8.
#pragma once
#include "kernels.h"

#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

#define SI_VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// How the a8 kernels stream weights at batch-1 decode, where a token reads every weight once from DRAM.
// Measured on an AMD EPYC VM (Zen 4 class, AVX-512 VNNI, 4 KiB pages, a 2-thread torch.sum streams 35 GB/s),
// a Qwen2.5-1.5B-shaped stack of w4a8 linears (819 MB, DRAM-cold), 2 threads:
//   rows in chunks of 32 handed out dynamically, 4 rows interleaved, prefetch 2 KiB ahead   14-16 GB/s
//   two contiguous ranges per thread, same inner loop                                      21-25 GB/s
//   + one row at a time (a single ascending stream per thread), its lines prefetched first  29-33 GB/s
// The hardware prefetcher follows one ascending stream per thread well and several interleaved ones (rows
// 1.5 KB apart) or short chunks poorly. End to end, Qwen2.5-1.5B w4a8 decode went from 12.5 to 21-29 tok/s
// and SmolLM2 from 125 to 149-213 (runs differ). An Intel VM measured 2 KiB best with the old chunks of 32;
// both knobs are read once from the environment for re-measuring elsewhere:
//   SCALEINFER_PREFETCH_BYTES  where a row's prefetch starts relative to it (default 0; -1: none)
//   SCALEINFER_RANGES_PER_THREAD  contiguous row ranges per thread (default 2: a thread slowed by a
//                                 neighbour on a shared VM leaves part of its share to the other)
//                               (kernels.h: kPrefetch, stream_chunk; f32_linear walks its rows the same way)

inline float h2f(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x [K] -> xq [K] int8, dx [K/32] (scale), sx [K/32] (= dx * sum of the block's xq), on the path in use.
void quantize_blocks(const float* x, int64_t K, int8_t* xq, float* dx, float* sx);

// Whether the 512-bit VNNI path is in use (ISA level avx512_vnni, isa.h).
bool a8_vnni512();

struct A8Rows {
  std::vector<int8_t> xq;   // [M, K]
  std::vector<float> dx;    // [M, K / 32]
  std::vector<float> sx;    // [M, K / 32]
};

// Every row of x [M, K] through quantize_blocks.
// The calling thread's buffers, valid until its next call (kernels are called from one thread at a time).
A8Rows& quantize_rows(const float* x, int64_t M, int64_t K);

// The 512-bit VNNI GEMVs' activation layout (int4_a8.cpp: row_lanes; int8_a8.cpp: row_q8_lanes): one
// group of 32 per 32-bit lane, per block of 16 groups 8 vectors of 64 bytes, vector i lane l = elements
// 4i..4i+3 of group l (zero-padded past the last group), so 8 vpdpbusd give 16 groups' whole dots.
constexpr int64_t kLaneBlock = 512;  // bytes per block of 16 groups
inline int64_t lane_stride(int64_t groups) { return (groups + 15) / 16 * kLaneBlock; }

// Rows xq [M, K] (quantize_rows's) in lane order, lane_stride(K / 32) bytes apart; the calling thread's
// buffer, valid until its next call.
const int8_t* lane_rows(const int8_t* xq, int64_t M, int64_t K);

// One block of 16 groups for MR input rows (the step int4_a8.cpp's row_lanes and int8_a8.cpp's
// row_q8_lanes share): u[i] holds the weight bytes of elements 4i..4i+3 of every group (unsigned), s16
// the groups' scales and n16 what multiplies sx (int4: the minimums; int8: -128 * scale). Per input row,
// 8 vpdpbusd in two chains (their integer sum is exact), then
//   acc = fma(dot, scale * dx, acc);  acc = fma(n16, sx, acc)
// in this order whatever MR is. xb: block b of the first input row in lane order; dx, sx at group g.
template <int MR>
SI_VNNI512 inline __attribute__((always_inline)) void lanes_block(
    const __m512i (&u)[8], __m512 s16, __m512 n16, __mmask16 lm, const int8_t* xb, int64_t xstride,
    const float* dx, const float* sx, int64_t groups, __m512 (&acc)[MR]) {
  for (int m = 0; m < MR; ++m) {
    const int8_t* x = xb + m * xstride;
    __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      d0 = _mm512_dpbusd_epi32(d0, u[i], _mm512_loadu_si512(x + 64 * i));
      d1 = _mm512_dpbusd_epi32(d1, u[i + 4], _mm512_loadu_si512(x + 64 * (i + 4)));
    }
    const __m512 c16 = _mm512_mul_ps(s16, _mm512_maskz_loadu_ps(lm, dx + m * groups));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), c16, acc[m]);
    acc[m] = _mm512_fmadd_ps(n16, _mm512_maskz_loadu_ps(lm, sx + m * groups), acc[m]);
  }
}

// M input rows in passes of up to 8 (8 unpacked weight vectors and 2 per input row stay in the 32 vector
// registers), as even as the passes can be: run(std::integral_constant<int, R>{}, m) for rows m..m+R-1.
template <class F>
inline void lane_passes(int64_t M, F&& run) {
  if (M <= 0) return;  // no input rows (a step whose rows all went elsewhere)
  const int64_t passes = (M + 7) / 8, per = (M + passes - 1) / passes;
  for (int64_t m = 0; m < M; m += per) {
    switch (std::min(per, M - m)) {
#define SI_ROWS(R) case R: run(std::integral_constant<int, R>{}, m); break;
      SI_ROWS(1) SI_ROWS(2) SI_ROWS(3) SI_ROWS(4) SI_ROWS(5) SI_ROWS(6) SI_ROWS(7) SI_ROWS(8)
#undef SI_ROWS
    }
  }
}
