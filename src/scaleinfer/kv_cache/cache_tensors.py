"""The physical K/V tensors of the paged cache, sized from a memory budget. Owned by the ModelRunner.

Per layer, K and V are flat slot arrays [num_blocks * block_size, num_kv_heads, head_dim]; slot
`block_id * block_size + offset` holds one token. Memory is reserved with torch.empty, so pages are
only touched (and counted in RSS) as tokens are written; on the CPU the arrays ask for 2 MiB pages
(kernels/huge_pages.py): decode attention reads a token's whole KV, block by block.

The storage dtype follows the model's precision class (`kv_dtype`): on the CPU, float32 and float16
models keep K/V in float16 (decode attention streams its KV, so half the bytes is about half the time;
the kernels convert to fp32 in registers), bfloat16 models in bfloat16. float32 is an explicit choice.
"""
from __future__ import annotations

import torch

from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.errors import ConfigError
from scaleinfer.kernels.huge_pages import advise_huge_pages

_NAMED = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_dtype(kv_cache_dtype: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The K/V element dtype for --kv-cache-dtype (None for int8, stored by attention/kv_int8.py)."""
    if kv_cache_dtype == "int8":
        return None
    if kv_cache_dtype != "auto":
        return _NAMED[kv_cache_dtype]
    if torch.device(device).type != "cpu":
        return dtype
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto",
                    device: str | torch.device = "cpu") -> int:
    """K + V bytes of one token over all layers."""
    if kv_cache_dtype == "int8":
        from scaleinfer.attention.kv_int8 import bytes_per_token as int8_bytes_per_token

        return int8_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    itemsize = torch.empty((), dtype=kv_dtype(kv_cache_dtype, dtype, device)).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def num_blocks_for_budget(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                          device: str | torch.device = "cpu") -> int:
    per_block = bytes_per_token(cfg, dtype, cache.kv_cache_dtype, device) * cache.block_size
    num_blocks = cache.kv_cache_memory // per_block
    if num_blocks < 1:
        raise ConfigError(
            f"--kv-cache-memory {cache.kv_cache_memory} bytes is smaller than one KV block "
            f"({per_block} bytes for {cache.block_size} tokens); raise it, e.g. --kv-cache-memory 256MiB"
        )
    return int(num_blocks)


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: str | torch.device = "cpu", kv_cache_dtype: str = "auto"
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V): tensors of kv_dtype(...), or attention.kv_int8.Int8KV pairs for int8."""
    shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
    if kv_cache_dtype == "int8":
        from scaleinfer.attention.kv_int8 import Int8KV

        caches = [(Int8KV.empty(*shape, device=device), Int8KV.empty(*shape, device=device))
                  for _ in range(cfg.num_layers)]
        for kv in caches:
            for side in kv:
                advise_huge_pages(side.data)
        return caches
    store = kv_dtype(kv_cache_dtype, dtype, device)
    caches = [(torch.empty(shape, dtype=store, device=device), torch.empty(shape, dtype=store, device=device))
              for _ in range(cfg.num_layers)]
    for kv in caches:
        for side in kv:
            advise_huge_pages(side)
    return caches


def copy_blocks(kv_caches: list, pairs: list[tuple[int, int]], block_size: int) -> None:
    """Copy whole KV blocks src -> dst in every layer (copy-on-write of beams sharing a block)."""
    src = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.long)
    offsets = torch.arange(block_size)
    src_slots = (src[:, None] * block_size + offsets).reshape(-1)
    dst_slots = (dst[:, None] * block_size + offsets).reshape(-1)
    from scaleinfer.attention.kv_int8 import Int8KV

    for kv in kv_caches:
        for side in kv:
            for t in ((side.data, side.scale) if isinstance(side, Int8KV) else (side,)):
                s, d = src_slots.to(t.device), dst_slots.to(t.device)
                t.index_copy_(0, d, t.index_select(0, s))
