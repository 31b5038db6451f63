// What the a8 kernels (int4_a8.cpp, int8_a8.cpp) share: activations quantized per block of 32 to int8.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <vector>

#define SI_VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// Software prefetch distance of the 512-bit kernel, in weight bytes. Measured on SmolLM2's 120
// decoder linears at M = 1 (2 threads, weights evicted from the L3 between passes, medians of 14):
// 0 -> 7.36 ms, 1 KiB -> 6.30, 2 KiB -> 6.12, 4 KiB -> 6.66; with the weights L3-resident it makes no
// difference (3.52 vs 3.59 ms). The hardware prefetcher stops at each 4 KiB page, and this VM gets
// no transparent huge pages.
constexpr int64_t kPrefetch = 2048;

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
