// What the a8 kernels (int4_a8.cpp, int8_a8.cpp) share: activations quantized per block of 32 to int8.
#pragma once
#include "kernels.h"

#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
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
