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

// lowbit_linear.cpp
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale);
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn,
                          int64_t group_size);
// int4_a8.cpp
torch::Tensor int4_a8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor mn);
// cpu_ops.cpp
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                        torch::Tensor weight, double eps);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor gate_up);
void kv_write(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v);
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor slots, torch::Tensor lens, double scale);
