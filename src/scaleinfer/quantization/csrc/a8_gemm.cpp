// w4a8 for many input rows (prefill): the same numbers as int4_a8.cpp's decode kernel, as a GEMM.
//   y[m,n] = sum_g  scale[n,g] * dx[m,g] * sum_i q[n,g,i] xq[m,g,i]   +   min[n,g] * sx[m,g]
// (int4 group-32 weights, activations quantized per block of 32; a8_common.h). The decode kernel reads
// each weight byte once per input row, which is right for a few rows; for hundreds the work is the
// integer products, so here the weights are unpacked to bytes once per block of 32 output rows and the
// products run on the widest integer unit the CPU has:
//   amx      AMX-INT8 tiles (tdpbusd: 16x16 int32 results of 16x32 weight bytes x 32x16 activation
//            bytes), where amx.cpp's probe says the tiles work in this process;
//   vnni512  AVX512-VNNI vpdpbusd, 4 weight rows x 32 input rows per register tile.
// Both compute each group's integer dot exactly, then apply the same float steps in the same order per
// output (acc = fma(dot, dx * scale, acc); acc = fma(min, sx, acc), group after group), so they agree bit
// for bit (tested). A group is 32 inputs, so AMX's K is 32 bytes per tile multiply and the per-group
// scaling (4 vector float ops per 16 outputs per group) is what bounds the speed, not the tile unit.
//
// Layouts (the transposed product: weights are AMX's A operand, activations its B operand):
//   wu  [32 rows][K] uint8   a block's weights, one byte per weight, natural order
//   xp  [G][8][Mp][4] int8   activations in VNNI order: per group and 4-input step, 4 bytes per input row
//   dxt, sxt [G][Mp]          per-group activation scales (Mp = M rounded up to 32; pad rows are zero)
// Other CPUs (no 512-bit VNNI) report path "none": the caller keeps its weight-only prefill there.
#include "a8_common.h"
#include "amx.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define SI_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

namespace {

enum class GemmPath { none = 0, vnni512 = 1, amx = 2 };

int g_forced = -1;  // a forced GemmPath (tests, bench), or -1: the best available

GemmPath best_path() {
  if (!a8_vnni512()) return GemmPath::none;
  return amx_int8_usable() ? GemmPath::amx : GemmPath::vnni512;
}

GemmPath current_path() {
  const GemmPath best = best_path();
  if (g_forced < 0 || best == GemmPath::none) return best;
  return static_cast<GemmPath>(std::min(g_forced, static_cast<int>(best)));
}

const char* path_name(GemmPath p) { return p == GemmPath::amx ? "amx-int8" : p == GemmPath::vnni512 ? "vnni512" : "none"; }

constexpr int64_t kBlock = 32;  // output rows per weight block, input rows per tile block

struct Activations {
  std::vector<int8_t> xp;
  std::vector<float> dxt, sxt;
  int64_t Mp = 0;
};

// x [M, K] -> per-block int8 in VNNI order (the calling thread's buffers, reused between calls).
Activations& quantize_vnni(const float* x, int64_t M, int64_t K) {
  thread_local Activations buffers;
  Activations& a = buffers;  // a reference, so that the worker threads below see the calling thread's buffers
  const int64_t G = K / 32, Mp = (M + kBlock - 1) / kBlock * kBlock;
  a.Mp = Mp;
  a.xp.assign(Mp * K, 0);
  a.dxt.assign(G * Mp, 0.f);
  a.sxt.assign(G * Mp, 0.f);
  uint32_t* xp = reinterpret_cast<uint32_t*>(a.xp.data());
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<int8_t> q(K);
    std::vector<float> d(G), s(G);
    for (int64_t m = m0; m < m1; ++m) {
      quantize_blocks(x + m * K, K, q.data(), d.data(), s.data());
      const uint32_t* qw = reinterpret_cast<const uint32_t*>(q.data());
      for (int64_t j = 0; j < K / 4; ++j) xp[j * Mp + m] = qw[j];  // j = g * 8 + step
      for (int64_t g = 0; g < G; ++g) {
        a.dxt[g * Mp + m] = d[g];
        a.sxt[g * Mp + m] = s[g];
      }
    }
  });
  return a;
}

struct WeightBlock {
  std::vector<uint8_t> wu;  // [kBlock][K]
  std::vector<float> s, mn;  // [kBlock][G]
};

// Weight rows n0 .. n0 + rows of q [N, K/2] unpacked to bytes (rows past `rows` zero), scales to float.
SI_VNNI512 void unpack_block(const uint8_t* q, const uint16_t* scale, const uint16_t* mn, int64_t K, int64_t n0,
                             int64_t rows, WeightBlock& w) {
  const int64_t G = K / 32;
  w.wu.resize(kBlock * K);
  w.s.assign(kBlock * G, 0.f);
  w.mn.assign(kBlock * G, 0.f);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < kBlock; ++r) {
    uint8_t* dst = w.wu.data() + r * K;
    if (r >= rows) {
      std::memset(dst, 0, K);
      continue;
    }
    const uint8_t* src = q + (n0 + r) * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g * 16));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + g * 32), _mm_and_si128(raw, mask));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + g * 32 + 16), _mm_and_si128(_mm_srli_epi16(raw, 4), mask));
      w.s[r * G + g] = h2f(scale[(n0 + r) * G + g]);
      w.mn[r * G + g] = h2f(mn[(n0 + r) * G + g]);
    }
  }
}

// One group's contribution to 16 outputs (16 input rows of one weight row): the float steps both paths share.
SI_VNNI512 inline __attribute__((always_inline)) __m512 scale_group(__m512 acc, __m512i dot, __m512 dxv,
                                                                     __m512 sxv, float s, float mn) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dxv, _mm512_set1_ps(s)), acc);
  return _mm512_fmadd_ps(_mm512_set1_ps(mn), sxv, acc);
}

// acc [kBlock weight rows][kBlock input rows] -> y[m0 + i, n0 + r] for the real rows and columns.
void store_block(const float* acc, int64_t m0, int64_t rows_m, int64_t n0, int64_t rows_n, int64_t N, float* y) {
  for (int64_t i = 0; i < rows_m; ++i)
    for (int64_t r = 0; r < rows_n; ++r) y[(m0 + i) * N + n0 + r] = acc[r * kBlock + i];
}

// 512-bit VNNI: 4 weight rows x 32 input rows, the 8 accumulators in registers across all groups.
SI_VNNI512 void block_vnni512(const WeightBlock& w, const Activations& a, int64_t K, int64_t m0, float* acc_out) {
  const int64_t G = K / 32, Mp = a.Mp;
  for (int64_t r0 = 0; r0 < kBlock; r0 += 4) {
    __m512 acc[4][2];
    for (auto& row : acc) row[0] = row[1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512i dot[4][2];
      for (auto& row : dot) row[0] = row[1] = _mm512_setzero_si512();
      const int8_t* xg = a.xp.data() + g * 8 * Mp * 4 + m0 * 4;
      for (int k = 0; k < 8; ++k) {
        const __m512i x0 = _mm512_loadu_si512(xg + k * Mp * 4), x1 = _mm512_loadu_si512(xg + k * Mp * 4 + 64);
        for (int r = 0; r < 4; ++r) {
          int32_t wd;
          std::memcpy(&wd, w.wu.data() + (r0 + r) * K + g * 32 + k * 4, 4);
          const __m512i wv = _mm512_set1_epi32(wd);
          dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], wv, x0);
          dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], wv, x1);
        }
      }
      const __m512 d0 = _mm512_loadu_ps(a.dxt.data() + g * Mp + m0), d1 = _mm512_loadu_ps(a.dxt.data() + g * Mp + m0 + 16);
      const __m512 s0 = _mm512_loadu_ps(a.sxt.data() + g * Mp + m0), s1 = _mm512_loadu_ps(a.sxt.data() + g * Mp + m0 + 16);
      for (int r = 0; r < 4; ++r) {
        const float s = w.s[(r0 + r) * G + g], mn = w.mn[(r0 + r) * G + g];
        acc[r][0] = scale_group(acc[r][0], dot[r][0], d0, s0, s, mn);
        acc[r][1] = scale_group(acc[r][1], dot[r][1], d1, s1, s, mn);
      }
    }
    for (int r = 0; r < 4; ++r) {
      _mm512_storeu_ps(acc_out + (r0 + r) * kBlock, acc[r][0]);
      _mm512_storeu_ps(acc_out + (r0 + r) * kBlock + 16, acc[r][1]);
    }
  }
}

// Tiles: 0-3 results C[a][b] (16 x 16 int32), 4-5 weights (16 rows x 32 bytes), 6-7 activations
// (8 steps x 16 input rows x 4 bytes).
SI_AMX void amx_configure() {
  AmxTileConfig cfg;
  cfg.palette = 1;
  for (int t = 0; t < 4; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  for (int t = 4; t < 6; ++t) cfg.colsb[t] = 32, cfg.rows[t] = 16;
  for (int t = 6; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 8;
  _tile_loadconfig(&cfg);
}

// AMX: per group, 4 tile multiplies give the 32 x 32 block's integer dots; the float steps read them back.
SI_AMX void block_amx(const WeightBlock& w, const Activations& a, int64_t K, int64_t m0, float* acc) {
  const int64_t G = K / 32, Mp = a.Mp;
  alignas(64) int32_t dots[kBlock * kBlock];  // [weight row][input row]
  std::fill(acc, acc + kBlock * kBlock, 0.f);
  // Configure right before the tile ops, with no library call in between: glibc's lazy-binding
  // trampoline saves and restores the extended state with XSAVE/XRSTOR, which can reset the tile
  // configuration (the first memset of a process, resolved between a configure and a tileloadd, did).
  amx_configure();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = w.wu.data() + g * 32;
    const int8_t* xg = a.xp.data() + g * 8 * Mp * 4 + m0 * 4;
    _tile_loadd(4, wg, K);
    _tile_loadd(5, wg + 16 * K, K);
    _tile_loadd(6, xg, Mp * 4);
    _tile_loadd(7, xg + 64, Mp * 4);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
    _tile_stored(0, dots, kBlock * 4);
    _tile_stored(1, dots + 16, kBlock * 4);
    _tile_stored(2, dots + 16 * kBlock, kBlock * 4);
    _tile_stored(3, dots + 16 * kBlock + 16, kBlock * 4);
    const __m512 d0 = _mm512_loadu_ps(a.dxt.data() + g * Mp + m0), d1 = _mm512_loadu_ps(a.dxt.data() + g * Mp + m0 + 16);
    const __m512 s0 = _mm512_loadu_ps(a.sxt.data() + g * Mp + m0), s1 = _mm512_loadu_ps(a.sxt.data() + g * Mp + m0 + 16);
    for (int64_t r = 0; r < kBlock; ++r) {
      const float s = w.s[r * G + g], mn = w.mn[r * G + g];
      float* ar = acc + r * kBlock;
      const int32_t* dr = dots + r * kBlock;
      _mm512_storeu_ps(ar, scale_group(_mm512_loadu_ps(ar), _mm512_load_si512(dr), d0, s0, s, mn));
      _mm512_storeu_ps(ar + 16, scale_group(_mm512_loadu_ps(ar + 16), _mm512_load_si512(dr + 16), d1, s1, s, mn));
    }
  }
}

SI_AMX void amx_release() { _tile_release(); }

}  // namespace

// x [M, K] float32; q [N, K/2] uint8; scale, mn [N, K/32] float16 -> y [M, N] (no bias).
torch::Tensor int4_a8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn, OptTensor out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), "q must be uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, M = x.size(0), G = K / 32;
  TORCH_CHECK(x.size(1) == K && K % 32 == 0, "x has ", x.size(1), " features, the weight expects ", K);
  TORCH_CHECK(scale.is_contiguous() && mn.is_contiguous() && scale.numel() == N * G && mn.numel() == N * G &&
                  scale.scalar_type() == torch::kHalf && mn.scalar_type() == torch::kHalf,
              "scale and min must be contiguous float16 [N, K / 32] (group 32)");
  const GemmPath path = current_path();
  TORCH_CHECK(path != GemmPath::none, "int4_a8_gemm needs AVX512-VNNI (a8_gemm_path() is 'none' on this CPU)");
  auto y = out_or_new(out, M, N, x);
  if (M == 0 || N == 0) return y;
  const Activations& a = quantize_vnni(x.data_ptr<float>(), M, K);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(mn.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  parallel_row_chunks(N, kBlock, [&](int64_t n0, int64_t n1) {
    thread_local WeightBlock w;
    alignas(64) float acc[kBlock * kBlock];
    unpack_block(qp, sp, mp, K, n0, n1 - n0, w);
    for (int64_t m0 = 0; m0 < a.Mp; m0 += kBlock) {
      if (path == GemmPath::amx) block_amx(w, a, K, m0, acc);
      else block_vnni512(w, a, K, m0, acc);
      store_block(acc, m0, std::min(kBlock, M - m0), n0, n1 - n0, N, yp);
    }
    if (path == GemmPath::amx) amx_release();
  });
  return y;
}

std::string a8_gemm_path() { return path_name(current_path()); }

// Force "amx-int8", "vnni512" or "auto" (tests and bench); returns the previous setting's name.
std::string set_a8_gemm_path(const std::string& name) {
  const std::string prev = g_forced < 0 ? "auto" : path_name(static_cast<GemmPath>(g_forced));
  if (name == "auto") {
    g_forced = -1;
    return prev;
  }
  const GemmPath want = name == "amx-int8" ? GemmPath::amx : name == "vnni512" ? GemmPath::vnni512 : GemmPath::none;
  TORCH_CHECK(want != GemmPath::none, "unknown a8 GEMM path ", name, "; choose amx-int8, vnni512 or auto");
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best_path()), "a8 GEMM path ", name,
              " is not available here (best: ", path_name(best_path()), "; AMX ", amx_status(), ")");
  g_forced = static_cast<int>(want);
  return prev;
}

void register_a8_gemm(pybind11::module& m) {
  namespace py = pybind11;
  m.def("int4_a8_gemm", &int4_a8_gemm, "w4a8 for many input rows: int4 group-32 weights x per-32 int8 activations",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("mn"), py::arg("out") = py::none());
  m.def("a8_gemm_path", &a8_gemm_path, "the w4a8 prefill GEMM in use: amx-int8, vnni512 or none");
  m.def("set_a8_gemm_path", &set_a8_gemm_path, "force the w4a8 prefill GEMM path (amx-int8, vnni512, auto)");
  m.def("amx_status", &amx_status, "whether AMX-INT8 tiles work in this process: 'on' or 'off: <why>'");
}
