// AMX (Advanced Matrix Extensions) in this process: the run-time probe (amx.cpp) and the tile
// configuration block that _tile_loadconfig reads.
#pragma once
#include <cstdint>
#include <string>

// Whether AMX-INT8 tile instructions work here: CPU + OS support, the kernel's permission
// (requested once for the whole process) and a tile multiply that ran correctly in a forked child.
bool amx_int8_usable();
// "on", or "off: <why>" (for `scaleinfer bench` and logs).
std::string amx_status();

// The 64-byte operand of ldtilecfg, palette 1: bytes per row and rows of each of the 8 tiles.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(AmxTileConfig) == 64, "ldtilecfg reads 64 bytes");

// ldtilecfg with the whole 64-byte block as the operand: GCC 12's _tile_loadconfig names only its
// first 8 bytes, so the compiler dropped the stores of the tile shapes before it (tiles unconfigured: SIGILL).
inline void amx_load_config(const AmxTileConfig& cfg) { __asm__ volatile("ldtilecfg %0" ::"m"(cfg)); }
