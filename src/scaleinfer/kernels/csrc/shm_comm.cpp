// Collectives among the CPU ranks of one host through one shared-memory segment: all-reduce (sum),
// gather to rank 0, broadcast from rank 0, barrier. The idea of vLLM's CPU shared-memory communicator;
// a gloo all-reduce of 576 floats between two processes on one host costs ~0.5 ms of socket round
// trips, a copy into shared memory and a flag a few microseconds.
//
// Layout: a 4 KiB header (per rank a 64-byte line with its sequence number and a waiter count, its pid,
// an abort flag), then two sets of per-rank slots of `capacity` bytes, used by alternate operations.
// Every rank counts its operations; operation s uses slot set s & 1. A rank publishes s (its data is in
// its slot, or, receiving a broadcast, it has read rank 0's) and waits for the ranks it needs to reach
// s. Before writing for s it waits until every rank has reached s - 1: the last readers of set s & 1
// (operation s - 2) are done. Sums run in rank order on every rank, so all ranks get identical bits.
// Waits spin briefly, then sleep on a futex of the peer's sequence word (woken by its publish), and
// check every ~50 ms that the peer process is alive (gone or a zombie: an error naming it), the abort
// flag and the timeout: a dead rank is an error, never a hang.
#include "shm_comm.h"

#include <fcntl.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace si_shm {

constexpr int64_t kMaxRanks = 64;
constexpr size_t kHeaderBytes = 8192;
constexpr int64_t kPrefix = 64;  // a slot's first bytes: the byte count of a broadcast
constexpr uint64_t kMagic = 0x53484d434f4d4d31ULL;

struct alignas(64) Flag {
  std::atomic<uint32_t> seq;
  std::atomic<uint32_t> waiters;
};

struct Header {
  uint64_t magic;
  int64_t world;
  int64_t capacity;
  std::atomic<uint32_t> aborted;
  int32_t pids[kMaxRanks];
  Flag flags[kMaxRanks];
};
static_assert(sizeof(Header) <= kHeaderBytes, "shm header too large");

// Adds the seconds of its lifetime to `total` (stats()).
struct Timed {
  double& total;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  explicit Timed(double& t) : total(t) {}
  ~Timed() { total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};

inline bool reached(uint32_t seq, uint32_t target) { return static_cast<int32_t>(seq - target) >= 0; }

void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected, long nanos) {
  timespec ts{0, nanos};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

bool process_gone(int pid) {
  if (kill(pid, 0) != 0) return errno == ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(") ");
  if (paren == std::string::npos || paren + 2 >= text.size()) return false;
  const char state = text[paren + 2];
  return state == 'Z' || state == 'X';
}

}  // namespace si_shm

using si_shm::Header;

ShmComm::ShmComm(const std::string& name, int64_t rank, int64_t world, int64_t capacity, bool create,
                 double timeout_s)
    : name_(name), rank_(rank), world_(world), capacity_(capacity), timeout_s_(timeout_s) {
  TORCH_CHECK(world >= 1 && world <= si_shm::kMaxRanks, "shm communicator: world size ", world, " not in [1, ",
              si_shm::kMaxRanks, "]");
  TORCH_CHECK(rank >= 0 && rank < world, "shm communicator: rank ", rank, " not in [0, ", world, ")");
  TORCH_CHECK(capacity >= 4096 && capacity % 64 == 0, "shm communicator: capacity must be >= 4096, a multiple of 64");
  size_ = si_shm::kHeaderBytes + static_cast<size_t>(2 * world * capacity);
  const int fd = shm_open(name.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR, 0600);
  TORCH_CHECK(fd >= 0, "shm communicator: cannot ", create ? "create" : "open", " /dev/shm", name, ": ",
              std::strerror(errno));
  struct stat st {};
  if (create && ftruncate(fd, static_cast<off_t>(size_)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    TORCH_CHECK(false, "shm communicator: cannot size /dev/shm", name, " to ", size_, " bytes: ", std::strerror(err));
  }
  if (!create && (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != size_)) {
    close(fd);
    TORCH_CHECK(false, "shm communicator: /dev/shm", name, " has another size than ", size_, " bytes");
  }
  void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  TORCH_CHECK(p != MAP_FAILED, "shm communicator: mmap of ", size_, " bytes failed: ", std::strerror(errno));
  base_ = static_cast<char*>(p);
  hdr_ = reinterpret_cast<Header*>(base_);
  if (create) {
    hdr_->world = world;
    hdr_->capacity = capacity;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    hdr_->magic = si_shm::kMagic;
  } else {
    TORCH_CHECK(hdr_->magic == si_shm::kMagic && hdr_->world == world && hdr_->capacity == capacity,
                "shm communicator: /dev/shm", name, " was made for another group");
  }
  hdr_->pids[rank] = static_cast<int32_t>(getpid());
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

ShmComm::~ShmComm() {
  if (base_ != nullptr) munmap(base_, size_);
}

void ShmComm::unlink() { shm_unlink(name_.c_str()); }

char* ShmComm::slot(uint32_t s, int64_t r) const {
  return base_ + si_shm::kHeaderBytes + ((static_cast<int64_t>(s & 1) * world_ + r) * capacity_);
}

uint32_t ShmComm::next_op() {
  const uint32_t s = ++seq_;
  wait_all(s - 1, timeout_s_);  // the last readers of this slot set (operation s - 2) are done
  return s;
}

void ShmComm::publish(uint32_t s) {
  si_shm::Flag& f = hdr_->flags[rank_];
  f.seq.store(s, std::memory_order_seq_cst);
  if (f.waiters.load(std::memory_order_seq_cst) > 0) si_shm::futex_wake(&f.seq);
}

void ShmComm::check_peer(int64_t r) {
  if (hdr_->aborted.load(std::memory_order_relaxed))
    throw std::runtime_error("shm communicator: the group was aborted");
  const int pid = hdr_->pids[r];
  if (pids_visible_ && pid > 0 && si_shm::process_gone(pid))
    throw std::runtime_error("rank " + std::to_string(r) + " (pid " + std::to_string(pid) + ") exited");
}

void ShmComm::wait_rank(int64_t r, uint32_t target, double timeout_s) {
  si_shm::Flag& f = hdr_->flags[r];
  for (int i = 0; i < 2000; ++i) {
    if (si_shm::reached(f.seq.load(std::memory_order_acquire), target)) return;
    _mm_pause();
  }
  const auto start = std::chrono::steady_clock::now();
  auto last_check = start;
  while (true) {
    const uint32_t cur = f.seq.load(std::memory_order_acquire);
    if (si_shm::reached(cur, target)) return;
    f.waiters.fetch_add(1, std::memory_order_seq_cst);
    if (!si_shm::reached(f.seq.load(std::memory_order_seq_cst), target)) si_shm::futex_wait(&f.seq, cur, 5000000);
    f.waiters.fetch_sub(1, std::memory_order_seq_cst);
    if (si_shm::reached(f.seq.load(std::memory_order_acquire), target)) return;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_check > std::chrono::milliseconds(50)) {
      check_peer(r);
      last_check = now;
    }
    if (timeout_s > 0 && std::chrono::duration<double>(now - start).count() > timeout_s)
      throw std::runtime_error("rank " + std::to_string(r) + " did not reach the collective within " +
                               std::to_string(static_cast<int64_t>(timeout_s)) + " s");
  }
}

void ShmComm::wait_all(uint32_t target, double timeout_s) {
  for (int64_t r = 0; r < world_; ++r)
    if (r != rank_) wait_rank(r, target, timeout_s);
}

void ShmComm::all_reduce_raw(float* data, int64_t n) {
  si_shm::Timed timed(busy_s_);
  ++calls_;
  const int64_t per = (capacity_ - si_shm::kPrefix) / static_cast<int64_t>(sizeof(float));
  for (int64_t off = 0; off < n; off += per) {
    const int64_t m = std::min(per, n - off);
    const uint32_t s = next_op();
    std::memcpy(slot(s, rank_) + si_shm::kPrefix, data + off, m * sizeof(float));
    publish(s);
    wait_all(s, timeout_s_);
    float* out = data + off;
    std::memcpy(out, slot(s, 0) + si_shm::kPrefix, m * sizeof(float));
    for (int64_t r = 1; r < world_; ++r) {
      const float* in = reinterpret_cast<const float*>(slot(s, r) + si_shm::kPrefix);
      for (int64_t i = 0; i < m; ++i) out[i] += in[i];
    }
  }
}

torch::Tensor ShmComm::all_reduce_(torch::Tensor t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(),
              "shm all_reduce_ takes a contiguous float32 CPU tensor");
  if (world_ > 1) all_reduce_raw(t.data_ptr<float>(), t.numel());
  return t;
}

torch::Tensor ShmComm::gather(torch::Tensor t) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(),
              "shm gather takes a contiguous float32 CPU tensor");
  const int64_t n = t.numel(), per = (capacity_ - si_shm::kPrefix) / static_cast<int64_t>(sizeof(float));
  torch::Tensor out = rank_ == 0 ? torch::empty({world_, n}, t.options()) : torch::empty({0}, t.options());
  si_shm::Timed timed(busy_s_);
  ++calls_;
  const float* src = t.data_ptr<float>();
  for (int64_t off = 0; off < n; off += per) {
    const int64_t m = std::min(per, n - off);
    const uint32_t s = next_op();
    std::memcpy(slot(s, rank_) + si_shm::kPrefix, src + off, m * sizeof(float));
    publish(s);
    if (rank_ != 0) continue;
    wait_all(s, timeout_s_);
    float* dst = out.data_ptr<float>();
    for (int64_t r = 0; r < world_; ++r)
      std::memcpy(dst + r * n + off, slot(s, r) + si_shm::kPrefix, m * sizeof(float));
  }
  return out;
}

torch::Tensor ShmComm::broadcast(torch::Tensor t, double timeout_s) {
  const int64_t cap = capacity_ - si_shm::kPrefix;
  if (rank_ == 0) {
    si_shm::Timed timed(busy_s_);   // a worker's wait for the next step is idle time, not communication
    ++calls_;
    TORCH_CHECK(t.scalar_type() == torch::kInt64 && t.dim() == 1 && t.is_contiguous(),
                "shm broadcast sends a contiguous 1-D int64 tensor");
    const int64_t total = t.numel() * 8;
    const char* src = static_cast<const char*>(t.data_ptr());
    int64_t off = 0;
    do {
      const int64_t m = std::min(cap, total - off);
      const uint32_t s = next_op();
      std::memcpy(slot(s, 0), &total, sizeof(total));
      std::memcpy(slot(s, 0) + si_shm::kPrefix, src + off, m);
      publish(s);
      off += m;
    } while (off < total);
    return t;
  }
  torch::Tensor out;
  int64_t total = -1, off = 0;
  do {
    const uint32_t s = ++seq_;
    wait_rank(0, s, timeout_s);
    if (total < 0) {
      std::memcpy(&total, slot(s, 0), sizeof(total));
      out = torch::empty({total / 8}, torch::kInt64);
    }
    const int64_t m = std::min(cap, total - off);
    std::memcpy(static_cast<char*>(out.data_ptr()) + off, slot(s, 0) + si_shm::kPrefix, m);
    publish(s);
    off += m;
  } while (off < total);
  return out;
}

void ShmComm::barrier() {
  const uint32_t s = next_op();
  publish(s);
  wait_all(s, timeout_s_);
  for (int64_t r = 0; r < world_; ++r) {  // pids of another pid namespace cannot be checked: do not try
    const int pid = hdr_->pids[r];
    if (pid <= 0 || (kill(pid, 0) != 0 && errno == ESRCH)) pids_visible_ = false;
  }
}

void ShmComm::abort() {
  hdr_->aborted.store(1, std::memory_order_seq_cst);
  for (int64_t r = 0; r < world_; ++r) si_shm::futex_wake(&hdr_->flags[r].seq);
}

void register_shm_comm(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<ShmComm>(m, "ShmComm", py::module_local())
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, bool, double>(), py::arg("name"),
           py::arg("rank"), py::arg("world"), py::arg("capacity"), py::arg("create"), py::arg("timeout_s"))
      .def("unlink", &ShmComm::unlink)
      .def("all_reduce_", &ShmComm::all_reduce_, py::call_guard<py::gil_scoped_release>())
      .def("gather", &ShmComm::gather, py::call_guard<py::gil_scoped_release>())
      .def("broadcast", &ShmComm::broadcast, py::arg("t"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("barrier", &ShmComm::barrier, py::call_guard<py::gil_scoped_release>())
      .def("abort", &ShmComm::abort)
      .def("stats", &ShmComm::stats, "(seconds inside collectives, number of collectives) since reset_stats")
      .def("reset_stats", &ShmComm::reset_stats)
      .def_property_readonly("rank", &ShmComm::rank)
      .def_property_readonly("world", &ShmComm::world);
}
