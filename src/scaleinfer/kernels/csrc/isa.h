// The one ISA dispatch of the CPU kernels. The best instruction set this CPU runs is detected once, at
// load; every kernel branches on `si::isa()` (read once per call, before its parallel loop), and
// `set_isa` forces a lower one so the tests run each code path against its reference.
//   avx512_vnni  AVX-512 F/BW/VL + VNNI (vpdpbusd): the w4a8 / w8a8 integer dot products, 512-bit
//   avx512       AVX-512 F/BW/VL: the fp32 and weight-only kernels, 512-bit
//   avx2         AVX2 + FMA, 256-bit
//   scalar       plain C++ (the compiler still vectorizes it for the baseline ISA)
// Each level includes the ones below it: a kernel without a code path for a level takes the next lower.
#pragma once
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace si {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2, avx512_vnni = 3 };

inline const char* isa_name(Isa i) {
  static const char* const names[] = {"scalar", "avx2", "avx512", "avx512_vnni"};
  return names[static_cast<int>(i)];
}

inline Isa detect_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) return Isa::avx512_vnni;
  return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::scalar;
}

inline Isa best_isa() {
  static const Isa best = detect_isa();
  return best;
}

inline Isa& isa_slot() {
  static Isa current = best_isa();
  return current;
}

// The level the kernels use now: best_isa() unless a test forced a lower one.
inline Isa isa() { return isa_slot(); }

// Every level this CPU runs, lowest first.
inline std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= static_cast<int>(best_isa()); ++i) out.emplace_back(isa_name(static_cast<Isa>(i)));
  return out;
}

// Force a level (for tests: the kernels are not thread-safe against a change mid-call); returns the previous.
inline std::string set_isa(const std::string& name) {
  int want = -1;
  for (int i = 0; i <= static_cast<int>(Isa::avx512_vnni); ++i)
    if (name == isa_name(static_cast<Isa>(i))) want = i;
  TORCH_CHECK(want >= 0, "unknown ISA '", name, "': one of scalar, avx2, avx512, avx512_vnni");
  TORCH_CHECK(want <= static_cast<int>(best_isa()), "this CPU does not support ", name, " (best: ",
              isa_name(best_isa()), ")");
  const std::string prev = isa_name(isa());
  isa_slot() = static_cast<Isa>(want);
  return prev;
}

}  // namespace si

// The body of a function compiled by SI_ISA_VERSIONS.
#define SI_BODY __attribute__((always_inline)) inline

// A void function compiled for three levels from one body, `name##_body` (an always-inline function, so
// each copy is vectorized for its target): name##_avx512 (target "avx512f"), name##_avx2 (target "avx2")
// and name##_scalar (the baseline); `name` calls the copy for si::isa(). `params` is the parenthesized
// parameter list, `args` the parenthesized argument names.
#define SI_ISA_VERSIONS(name, params, args)                                                   \
  __attribute__((target("avx512f"))) void name##_avx512 params { name##_body args; }         \
  __attribute__((target("avx2"))) void name##_avx2 params { name##_body args; }              \
  void name##_scalar params { name##_body args; }                                              \
  inline void name params {                                                                    \
    const si::Isa level = si::isa();                                                           \
    if (level >= si::Isa::avx512) name##_avx512 args;                                          \
    else if (level >= si::Isa::avx2) name##_avx2 args;                                         \
    else name##_scalar args;                                                                   \
  }
