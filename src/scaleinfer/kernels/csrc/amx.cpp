// Whether this process may run AMX-INT8 tile instructions, probed once at run time.
//
// A CPU flag is not enough: Linux hands out the 8 KiB tile state only to processes that ask for it
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), and some hypervisors advertise AMX in CPUID
// but trap the instructions. So: CPUID says amx-tile + amx-int8, XCR0 says the OS saves tile state,
// the kernel grants the permission (for the whole process), and a tiny tile multiply run in a forked
// child returns the right numbers. A child that dies of SIGILL (or anything else) leaves AMX off;
// the parent never executes a tile instruction before that. The answer is cached.
#include "amx.h"

#include <cpuid.h>
#include <csignal>
#include <immintrin.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool cpu_has_amx_int8() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
  if (!tile || !int8) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv is allowed
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 3) == 3;  // XCR0: XTILECFG and XTILEDATA saved by the OS
}

// 16 x 64 int8 (signed) times 16 x 64 uint8 (VNNI layout) -> C[0][0], checked against the plain sum.
__attribute__((target("amx-tile,amx-int8"))) bool tile_op_works() {
  AmxTileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 3; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  static int8_t a[16 * 64];
  static uint8_t b[16 * 64];
  static int32_t c[16 * 16];
  for (int i = 0; i < 16 * 64; ++i) {
    a[i] = static_cast<int8_t>(i % 7 - 3);
    b[i] = static_cast<uint8_t>(i % 13);
  }
  amx_load_config(cfg);
  _tile_zero(0);
  _tile_loadd(1, a, 64);
  _tile_loadd(2, b, 64);
  _tile_dpbsud(0, 1, 2);
  _tile_stored(0, c, 64);
  _tile_release();
  int32_t want = 0;  // row 0 of A times column 0 of B: B row k holds the 4 bytes k*4..k*4+3 of column j at j*4
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 4; ++j) want += a[k * 4 + j] * b[k * 64 + j];
  return c[0] == want;
}

const char* probe() {
  if (!cpu_has_amx_int8()) return "off: the CPU (or the OS's XCR0) has no AMX-INT8";
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "off: the kernel refused arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)";
  const pid_t pid = fork();
  if (pid < 0) return "off: could not fork the probe";
  if (pid == 0) _exit(tile_op_works() ? 0 : 1);  // the child: only the tile op, then out
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return "off: lost the probe process";
  if (WIFSIGNALED(status)) return WTERMSIG(status) == SIGILL ? "off: a tile instruction trapped (SIGILL)"
                                                              : "off: the probe process was killed by a signal";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "off: a tile multiply gave wrong numbers";
  return "on";
}

const char* cached() {
  static const char* const answer = probe();
  return answer;
}

}  // namespace

bool amx_int8_usable() { return std::strcmp(cached(), "on") == 0; }

std::string amx_status() { return cached(); }
