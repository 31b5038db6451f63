// The kernels each .cpp file defines, for the ones that call each other (decode_step.cpp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// fn(n0, n1) over rows [0, N) in chunks of `chunk`, handed out dynamically to the threads: a thread
// slowed by its neighbours (a shared VM) takes fewer chunks instead of the step waiting for its half.
template <class F>
void parallel_row_chunks(int64_t N, int64_t chunk, const F& fn) {
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int nt = static_cast<int>(std::min<int64_t>(at::in_parallel_region() ? 1 : at::get_num_threads(), chunks));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t c = 0; c < chunks; ++c) fn(c * chunk, std::min(N, c * chunk + chunk));
}

// An integer from the environment (read where a knob is defined: once per process), or `fallback`.
int64_t env_int(const char* name, int64_t fallback);

// Batch-1 decode streams every weight once from DRAM; the hardware prefetcher keeps up with one ascending
// run per thread and not with short chunks handed out dynamically (measured: a8_common.h). The rows of a
// weight go in contiguous ranges, SCALEINFER_RANGES_PER_THREAD (default 2) per thread, so a thread slowed
// by a neighbour on a shared VM still leaves part of its share to the other.
inline const int64_t kPrefetch = env_int("SCALEINFER_PREFETCH_BYTES", 0);  // from a row's start (-1: none)
inline const int64_t kRangesPerThread = std::max<int64_t>(1, env_int("SCALEINFER_RANGES_PER_THREAD", 2));

// Rows per range for a weight of N rows: kRangesPerThread ranges per thread, multiples of 32.
inline int64_t stream_chunk(int64_t N) {
  const int64_t parts = (at::in_parallel_region() ? 1 : at::get_num_threads()) * kRangesPerThread;
  return std::max<int64_t>(32, ((N + parts - 1) / parts + 31) / 32 * 32);
}

// `out` when one is given (checked: contiguous [M, N] of `like`'s dtype), else a new [M, N] tensor:
// the kernels below write into a caller's buffer when asked (decode_step.cpp keeps one per tensor of a step).
inline torch::Tensor out_or_new(const c10::optional<torch::Tensor>& out, int64_t M, int64_t N,
                                const torch::Tensor& like) {
  if (!out.has_value() || !out->defined()) return torch::empty({M, N}, like.options());
  TORCH_CHECK(out->scalar_type() == like.scalar_type() && out->dim() == 2 && out->is_contiguous() &&
                  out->size(0) == M && out->size(1) == N,
              "out must be a contiguous [", M, ", ", N, "] tensor of the input's dtype");
  return *out;
}
using OptTensor = c10::optional<torch::Tensor>;

// lowbit_linear.cpp
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, OptTensor out = c10::nullopt);
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn,
                          int64_t group_size, OptTensor out = c10::nullopt);
// int4_a8.cpp
torch::Tensor int4_a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn,
                             OptTensor out = c10::nullopt);
// int8_a8.cpp
torch::Tensor int8_a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, OptTensor out = c10::nullopt);
// cpu_ops.cpp
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w, OptTensor bias, OptTensor out = c10::nullopt);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, OptTensor residual, torch::Tensor weight, double eps,
                                        OptTensor out = c10::nullopt);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up, OptTensor out = c10::nullopt);
void kv_write(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v,
              OptTensor k_scale = c10::nullopt, OptTensor v_scale = c10::nullopt, OptTensor k_chan = c10::nullopt,
              OptTensor v_chan = c10::nullopt);
// decode_attention.cpp
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor lens, double scale, OptTensor k_scale = c10::nullopt,
                            OptTensor v_scale = c10::nullopt, OptTensor k_chan = c10::nullopt,
                            OptTensor v_chan = c10::nullopt, int64_t splits = 0);
