// w4a8 for many input rows (prefill): the same numbers as int4_a8.cpp's decode kernel, as a GEMM; and the
// same GEMM for block-32 int8 weights (int8_a8.cpp's layout: pack_block_int8).
//   y[m,n] = sum_g  scale[n,g] * dx[m,g] * sum_i q[n,g,i] xq[m,g,i]   +   min[n,g] * sx[m,g]
// (int4 group-32 weights, activations quantized per block of 32; a8_common.h). The decode kernel reads
// each weight byte once per input row, which is right for a few rows; for hundreds the work is the
// integer products, so here the weights are unpacked to bytes once per block of 32 output rows and the
// products run on the widest integer unit the CPU has:
//   amx      AMX-INT8 tiles (tdpbsud: 16x16 int32 results of 16x32 signed activation bytes x 32x16 weight
//            bytes), where amx.cpp's probe says the tiles work in this process;
//   vnni512  AVX512-VNNI vpdpbusd, 4 input rows x 32 weight rows per register tile.
// Both compute each group's integer dot exactly, then apply the same float steps in the same order per
// output (acc = fma(dot, scale * dx, acc); acc = fma(min, sx, acc), group after group), so they agree bit
// for bit (tested). A group is 32 inputs, so AMX's K is 32 bytes per tile multiply and the per-group
// scaling (4 vector float ops per 16 outputs per group) is what bounds the speed, not the tile unit.
//
// Layouts: activations row-major, xq [Mp][K] int8 and dx, sx [Mp][G] (Mp = M rounded up to 32, pad
// rows zero); a block of 32 weight rows in VNNI order, wp [G][2 halves][8 steps][16 rows][4 bytes]
// (tdpbsud's unsigned B operand; vpdpbusd's unsigned vector), its scales and minimums [G][32] float.
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
  std::vector<int8_t> xq;
  std::vector<float> dx, sx;
  int64_t Mp = 0;
};

// x [M, K] -> per-block int8, padded to whole 32-row blocks (the calling thread's buffers, reused).
Activations& quantize_padded(const float* x, int64_t M, int64_t K) {
  thread_local Activations buffers;
  Activations& a = buffers;  // a reference, so that the worker threads below see the calling thread's buffers
  const int64_t G = K / 32, Mp = (M + kBlock - 1) / kBlock * kBlock;
  a.Mp = Mp;
  a.xq.resize(Mp * K);
  a.dx.resize(Mp * G);
  a.sx.resize(Mp * G);
  std::fill(a.xq.begin() + M * K, a.xq.end(), 0);
  std::fill(a.dx.begin() + M * G, a.dx.end(), 0.f);
  std::fill(a.sx.begin() + M * G, a.sx.end(), 0.f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_blocks(x + m * K, K, a.xq.data() + m * K, a.dx.data() + m * G, a.sx.data() + m * G);
  });
  return a;
}

struct WeightBlock {
  std::vector<uint32_t> wp;  // [G][2][8][16] dwords of 4 weight bytes
  std::vector<float> s, mn;  // [G][kBlock]
};

// Weight rows n0 .. n0 + rows of q [N, K/2] unpacked to bytes in VNNI order (rows past `rows` zero),
// their scales and minimums to float.
SI_VNNI512 void pack_block(const uint8_t* q, const uint16_t* scale, const uint16_t* mn, int64_t K, int64_t n0,
                           int64_t rows, WeightBlock& w) {
  const int64_t G = K / 32;
  w.wp.assign(G * 256, 0u);
  w.s.assign(G * kBlock, 0.f);
  w.mn.assign(G * kBlock, 0.f);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = q + (n0 + r) * (K / 2);
    uint32_t* dst = w.wp.data() + (r / 16) * 128 + r % 16;
    for (int64_t g = 0; g < G; ++g) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g * 16));
      alignas(16) uint32_t e[8];  // the group's 32 weights as bytes, natural order, 4 per dword
      _mm_store_si128(reinterpret_cast<__m128i*>(e), _mm_and_si128(raw, mask));
      _mm_store_si128(reinterpret_cast<__m128i*>(e + 4), _mm_and_si128(_mm_srli_epi16(raw, 4), mask));
      for (int k = 0; k < 8; ++k) dst[g * 256 + k * 16] = e[k];
      w.s[g * kBlock + r] = h2f(scale[(n0 + r) * G + g]);
      w.mn[g * kBlock + r] = h2f(mn[(n0 + r) * G + g]);
    }
  }
}

// The same for int8 weights with a float16 scale per block of 32 (int8_a8.cpp's layout, GGUF Q8_0's): the
// bytes enter as q + 128 (unsigned, as vpdpbusd / tdpbsud take B) and the minimum is -128 * scale, so
//   scale * dx * dot(q + 128, xq) - 128 * scale * sx  =  scale * dx * dot(q, xq)    (sx = dx * sum xq).
SI_VNNI512 void pack_block_int8(const int8_t* q, const uint16_t* scale, int64_t K, int64_t n0, int64_t rows,
                                WeightBlock& w) {
  const int64_t G = K / 32;
  w.wp.assign(G * 256, 0u);
  w.s.assign(G * kBlock, 0.f);
  w.mn.assign(G * kBlock, 0.f);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = q + (n0 + r) * K;
    uint32_t* dst = w.wp.data() + (r / 16) * 128 + r % 16;
    for (int64_t g = 0; g < G; ++g) {
      alignas(32) uint32_t e[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(e),
                         _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + g * 32)), flip));
      for (int k = 0; k < 8; ++k) dst[g * 256 + k * 16] = e[k];
      const float sv = h2f(scale[(n0 + r) * G + g]);
      w.s[g * kBlock + r] = sv;
      w.mn[g * kBlock + r] = -128.f * sv;
    }
  }
}

// One group's contribution to 16 outputs (one input row, 16 weight rows): the float steps both paths share.
SI_VNNI512 inline __attribute__((always_inline)) __m512 scale_group(__m512 acc, __m512i dot, __m512 sv,
                                                                     __m512 mnv, float dx, float sx) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, _mm512_set1_ps(dx)), acc);
  return _mm512_fmadd_ps(mnv, _mm512_set1_ps(sx), acc);
}

// One input row's 32 outputs (two vectors) into y, the columns past `cols` left alone.
SI_VNNI512 inline void store_row(float* y, __m512 lo, __m512 hi, int64_t cols) {
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? __mmask16(0xFFFF) : cols <= 16 ? __mmask16(0) : __mmask16((1u << (cols - 16)) - 1);
  _mm512_mask_storeu_ps(y, m0, lo);
  _mm512_mask_storeu_ps(y + 16, m1, hi);
}

// 512-bit VNNI: 4 input rows x 32 weight rows, the 8 accumulators in registers across all groups; writes
// y's rows m0 .. m0 + 31 (those below M) at columns n0 .. n0 + cols.
SI_VNNI512 void block_vnni512(const WeightBlock& w, const Activations& a, int64_t K, int64_t m0, int64_t M,
                              int64_t N, int64_t n0, int64_t cols, float* y) {
  const int64_t G = K / 32;
  for (int64_t i0 = m0; i0 < m0 + kBlock && i0 < M; i0 += 4) {
    __m512 acc[4][2];
    for (auto& row : acc) row[0] = row[1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512i dot[4][2];
      for (auto& row : dot) row[0] = row[1] = _mm512_setzero_si512();
      const uint32_t* wg = w.wp.data() + g * 256;
      for (int k = 0; k < 8; ++k) {
        const __m512i w0 = _mm512_loadu_si512(wg + k * 16), w1 = _mm512_loadu_si512(wg + 128 + k * 16);
        for (int r = 0; r < 4; ++r) {
          int32_t xd;
          std::memcpy(&xd, a.xq.data() + (i0 + r) * K + g * 32 + k * 4, 4);
          const __m512i xv = _mm512_set1_epi32(xd);
          dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], w0, xv);
          dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], w1, xv);
        }
      }
      const __m512 s0 = _mm512_loadu_ps(w.s.data() + g * kBlock), s1 = _mm512_loadu_ps(w.s.data() + g * kBlock + 16);
      const __m512 n0v = _mm512_loadu_ps(w.mn.data() + g * kBlock), n1v = _mm512_loadu_ps(w.mn.data() + g * kBlock + 16);
      for (int r = 0; r < 4; ++r) {
        const float dx = a.dx[(i0 + r) * G + g], sx = a.sx[(i0 + r) * G + g];
        acc[r][0] = scale_group(acc[r][0], dot[r][0], s0, n0v, dx, sx);
        acc[r][1] = scale_group(acc[r][1], dot[r][1], s1, n1v, dx, sx);
      }
    }
    for (int r = 0; r < 4 && i0 + r < M; ++r) store_row(y + (i0 + r) * N + n0, acc[r][0], acc[r][1], cols);
  }
}

// Tiles: 0-3 results C[a][b] (16 x 16 int32: input half a x weight half b), 4-5 activations (16 rows x
// 32 bytes), 6-7 weights (8 steps x 16 rows x 4 bytes).
SI_AMX void amx_configure() {
  AmxTileConfig cfg;
  cfg.palette = 1;
  for (int t = 0; t < 4; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  for (int t = 4; t < 6; ++t) cfg.colsb[t] = 32, cfg.rows[t] = 16;
  for (int t = 6; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 8;
  amx_load_config(cfg);
}

// The 4 tile multiplies of group g (32 input rows x 32 weight rows), left running in the tile unit.
SI_AMX inline __attribute__((always_inline)) void amx_group(const WeightBlock& w, const Activations& a, int64_t K,
                                                             int64_t m0, int64_t g) {
  const int8_t* xg = a.xq.data() + m0 * K + g * 32;
  const uint32_t* wg = w.wp.data() + g * 256;
  _tile_loadd(4, xg, K);
  _tile_loadd(5, xg + 16 * K, K);
  _tile_loadd(6, wg, 64);
  _tile_loadd(7, wg + 128, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_dpbsud(0, 4, 6);
  _tile_dpbsud(1, 4, 7);
  _tile_dpbsud(2, 5, 6);
  _tile_dpbsud(3, 5, 7);
}

// AMX: per group, 4 tile multiplies give the 32 x 32 block's integer dots; the float steps read them
// back from memory. Software-pipelined: group g + 1's multiplies are issued before group g's float
// steps run (two buffers of dots), so the tile unit and the vector units work at the same time.
SI_AMX void block_amx(const WeightBlock& w, const Activations& a, int64_t K, int64_t m0, int64_t M, int64_t N,
                      int64_t n0, int64_t cols, float* y) {
  const int64_t G = K / 32;
  alignas(64) int32_t dots[2][kBlock * kBlock];  // [input row][weight row], per group parity
  alignas(64) float acc[kBlock * kBlock];
  for (int64_t i = 0; i < kBlock * kBlock; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());  // no memset call
  amx_group(w, a, K, m0, 0);
  for (int64_t g = 0; g < G; ++g) {
    int32_t* d = dots[g & 1];
    _tile_stored(0, d, kBlock * 4);
    _tile_stored(1, d + 16, kBlock * 4);
    _tile_stored(2, d + 16 * kBlock, kBlock * 4);
    _tile_stored(3, d + 16 * kBlock + 16, kBlock * 4);
    if (g + 1 < G) amx_group(w, a, K, m0, g + 1);
    const __m512 s0 = _mm512_loadu_ps(w.s.data() + g * kBlock), s1 = _mm512_loadu_ps(w.s.data() + g * kBlock + 16);
    const __m512 n0v = _mm512_loadu_ps(w.mn.data() + g * kBlock), n1v = _mm512_loadu_ps(w.mn.data() + g * kBlock + 16);
    for (int64_t i = 0; i < kBlock; ++i) {
      const float dx = a.dx[(m0 + i) * G + g], sx = a.sx[(m0 + i) * G + g];
      float* ar = acc + i * kBlock;
      const int32_t* dr = d + i * kBlock;
      _mm512_store_ps(ar, scale_group(_mm512_load_ps(ar), _mm512_load_si512(dr), s0, n0v, dx, sx));
      _mm512_store_ps(ar + 16, scale_group(_mm512_load_ps(ar + 16), _mm512_load_si512(dr + 16), s1, n1v, dx, sx));
    }
  }
  for (int64_t i = 0; i < kBlock && m0 + i < M; ++i)
    store_row(y + (m0 + i) * N + n0, _mm512_load_ps(acc + i * kBlock), _mm512_load_ps(acc + i * kBlock + 16), cols);
}

SI_AMX void amx_release() { _tile_release(); }

}  // namespace

namespace {

// y [M, N] = the GEMM of x against weight blocks that pack(n0, rows, w) fills (pack_block or
// pack_block_int8), 32 output rows per block.
template <class Pack>
torch::Tensor a8_gemm(const torch::Tensor& x, int64_t N, int64_t K, const OptTensor& out, const char* name,
                      const Pack& pack) {
  const int64_t M = x.size(0);
  const GemmPath path = current_path();
  TORCH_CHECK(path != GemmPath::none, name, " needs AVX512-VNNI (a8_gemm_path() is 'none' on this CPU)");
  auto y = out_or_new(out, M, N, x);
  if (M == 0 || N == 0) return y;
  const Activations& a = quantize_padded(x.data_ptr<float>(), M, K);
  float* yp = y.data_ptr<float>();
  parallel_row_chunks(N, kBlock, [&](int64_t n0, int64_t n1) {
    thread_local WeightBlock w;
    pack(n0, n1 - n0, w);
    // Configured once per chunk, after the packing's library calls (the library is linked with -z now,
    // so no lazy-binding trampoline runs XSAVE/XRSTOR over the tile state in between).
    if (path == GemmPath::amx) amx_configure();
    for (int64_t m0 = 0; m0 < a.Mp; m0 += kBlock) {
      if (path == GemmPath::amx) block_amx(w, a, K, m0, M, N, n0, n1 - n0, yp);
      else block_vnni512(w, a, K, m0, M, N, n0, n1 - n0, yp);
    }
    if (path == GemmPath::amx) amx_release();
  });
  return y;
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == K && K % 32 == 0, "x has ", x.size(1), " features, the weight expects ", K);
}

}  // namespace

// x [M, K] float32; q [N, K/2] uint8; scale, mn [N, K/32] float16 -> y [M, N] (no bias).
torch::Tensor int4_a8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn, OptTensor out) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.is_contiguous(), "q must be uint8 [N, K/2]");
  const int64_t N = q.size(0), K = q.size(1) * 2, G = K / 32;
  check_x(x, K);
  TORCH_CHECK(scale.is_contiguous() && mn.is_contiguous() && scale.numel() == N * G && mn.numel() == N * G &&
                  scale.scalar_type() == torch::kHalf && mn.scalar_type() == torch::kHalf,
              "scale and min must be contiguous float16 [N, K / 32] (group 32)");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(mn.data_ptr<at::Half>());
  return a8_gemm(x, N, K, out, "int4_a8_gemm",
                 [&](int64_t n0, int64_t rows, WeightBlock& w) { pack_block(qp, sp, mp, K, n0, rows, w); });
}

// x [M, K] float32; q [N, K] int8; scale [N, K/32] float16 -> y [M, N] (no bias).
torch::Tensor int8_a8_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, OptTensor out) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1);
  check_x(x, K);
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == N * (K / 32) && scale.scalar_type() == torch::kHalf,
              "scale must be contiguous float16 [N, K / 32]");
  const int8_t* qp = q.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  return a8_gemm(x, N, K, out, "int8_a8_gemm",
                 [&](int64_t n0, int64_t rows, WeightBlock& w) { pack_block_int8(qp, sp, K, n0, rows, w); });
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
  m.def("int8_a8_gemm", &int8_a8_gemm, "w8a8 block-32 for many input rows: int8 weights with fp16 scales per 32 "
        "inputs x per-32 int8 activations", py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("out") = py::none());
  m.def("a8_gemm_path", &a8_gemm_path, "the w4a8 prefill GEMM in use: amx-int8, vnni512 or none");
  m.def("set_a8_gemm_path", &set_a8_gemm_path, "force the w4a8 prefill GEMM path (amx-int8, vnni512, auto)");
  m.def("amx_status", &amx_status, "whether AMX-INT8 tiles work in this process: 'on' or 'off: <why>'");
}
