"""The physical K/V tensors of the paged cache, sized from a memory budget. Owned by the ModelRunner.

Per layer, K and V are flat slot arrays [num_blocks * block_size, num_kv_heads, head_dim]; slot
`block_id * block_size + offset` holds one token. Memory is reserved with torch.empty, so pages are
only touched (and counted in RSS) as tokens are written.
"""
from __future__ import annotations

import torch

from scaleinfer.config import CacheConfig, ModelConfig
from scaleinfer.errors import ConfigError


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """K + V bytes of one token over all layers."""
    if kv_cache_dtype == "int8":
        from scaleinfer.attention.kv_int8 import bytes_per_token as int8_bytes_per_token

        return int8_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def num_blocks_for_budget(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    per_block = bytes_per_token(cfg, dtype, cache.kv_cache_dtype) * cache.block_size
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
    """Per layer (K, V): tensors of `dtype`, or attention.kv_int8.Int8KV pairs for kv_cache_dtype int8."""
    shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
    if kv_cache_dtype == "int8":
        from scaleinfer.attention.kv_int8 import Int8KV

        return [(Int8KV.empty(*shape, device=device), Int8KV.empty(*shape, device=device))
                for _ in range(cfg.num_layers)]
    return [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)]
