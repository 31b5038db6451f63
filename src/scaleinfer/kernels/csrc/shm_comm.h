// Collectives among the CPU ranks of one host through one shared-memory segment (shm_comm.cpp).
// distributed/communicators.py wraps it; decode_step.cpp calls all_reduce_raw between its kernels.
#pragma once
#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>

namespace si_shm {
struct Header;
}

class ShmComm {
 public:
  // Rank 0 creates the segment `name` (/dev/shm), the others open it once it exists (the caller orders
  // that with a barrier). `capacity`: bytes of one rank's slot; larger tensors go in several rounds.
  // `timeout_s`: the longest wait for a peer inside a collective (<= 0: none).
  ShmComm(const std::string& name, int64_t rank, int64_t world, int64_t capacity, bool create, double timeout_s);
  ~ShmComm();
  ShmComm(const ShmComm&) = delete;
  ShmComm& operator=(const ShmComm&) = delete;

  void unlink();                                  // remove the name (the mappings stay valid)
  void all_reduce_raw(float* data, int64_t n);    // in place, summed in rank order: identical on every rank
  torch::Tensor all_reduce_(torch::Tensor t);     // float32, contiguous, CPU
  torch::Tensor gather(torch::Tensor t);          // rank 0: [world, numel] float32; others: an empty tensor
  torch::Tensor broadcast(torch::Tensor t, double timeout_s);  // int64 1-D from rank 0; timeout <= 0: none
  void barrier();
  void abort();                                   // wake every rank's waits with an error
  // Seconds spent inside collectives (copies and waits for peers) and their count, since the last reset.
  std::tuple<double, int64_t> stats() const { return {busy_s_, calls_}; }
  void reset_stats() { busy_s_ = 0; calls_ = 0; }
  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }

 private:
  uint32_t next_op();
  void publish(uint32_t s);
  void wait_rank(int64_t r, uint32_t target, double timeout_s);
  void wait_all(uint32_t target, double timeout_s);
  void check_peer(int64_t r);
  char* slot(uint32_t s, int64_t r) const;

  std::string name_;
  int64_t rank_, world_, capacity_;
  double timeout_s_;
  size_t size_ = 0;
  char* base_ = nullptr;
  si_shm::Header* hdr_ = nullptr;
  uint32_t seq_ = 0;
  bool pids_visible_ = true;
  double busy_s_ = 0;
  int64_t calls_ = 0;
};

void register_shm_comm(pybind11::module& m);
