"""Tensor-parallel sharding (distributed/sharding.py), in one process: the bands of every rank cover each
dimension exactly once; each rank's slice of a linear computes its part of the full layer (column-parallel
outputs side by side, row-parallel partial sums adding up to the full output); int4 group-32 weights are
cut along whole groups and dequantize to the full weight's columns; KV heads are replicated when fewer
than the ranks; sizes that cannot be split are one-line ConfigErrors."""
from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from scaleinfer.config import ModelConfig
from scaleinfer.distributed.sharding import plan_shard, shard_config, shard_tensors, share_row_amax, slice_tensor
from scaleinfer.errors import ConfigError
from scaleinfer.layers.linear import Linear
from scaleinfer.layers.parallel import RowParallel
from scaleinfer.quantization.int4 import PackedInt4, dequantize_groupwise, quantize_groupwise
from scaleinfer.quantization.int8 import W8A8

QWEN = ModelConfig(architecture="qwen2", vocab_size=1003, hidden_size=128, intermediate_size=352, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64, attention_bias=True)


def _weights(cfg: ModelConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    h, kv, d, hid, inter = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    p = "model.layers.0."
    shapes = {p + "self_attn.q_proj.weight": (h * d, hid), p + "self_attn.q_proj.bias": (h * d,),
              p + "self_attn.k_proj.weight": (kv * d, hid), p + "self_attn.v_proj.weight": (kv * d, hid),
              p + "self_attn.o_proj.weight": (hid, h * d), p + "mlp.gate_proj.weight": (inter, hid),
              p + "mlp.up_proj.weight": (inter, hid), p + "mlp.down_proj.weight": (hid, inter),
              p + "input_layernorm.weight": (hid,), "model.embed_tokens.weight": (cfg.vocab_size, hid),
              "lm_head.weight": (cfg.vocab_size, hid)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


@pytest.mark.parametrize("size", [1, 2, 4])
def test_shards_compute_the_full_layers(size):
    g = torch.Generator().manual_seed(0)
    full = _weights(QWEN, g)
    x = torch.randn(3, QWEN.hidden_size, generator=g)
    shards = [dict(shard_tensors(full.items(), plan_shard(QWEN, r, size), QWEN)) for r in range(size)]
    p = "model.layers.0."
    for name in ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):   # column-parallel
        torch.testing.assert_close(torch.cat([x @ s[p + name].T for s in shards], dim=1), x @ full[p + name].T)
    for name, width in (("self_attn.o_proj.weight", QWEN.num_heads * QWEN.head_dim),
                        ("mlp.down_proj.weight", QWEN.intermediate_size)):                       # row-parallel
        inputs = torch.randn(3, width, generator=g)
        bands = [plan_shard(QWEN, r, size) for r in range(size)]
        cols = [(b.heads[0] * QWEN.head_dim, b.heads[1] * QWEN.head_dim) if "o_proj" in name else b.intermediate
                for b in bands]
        partial = sum(inputs[:, a:b] @ s[p + name].T for (a, b), s in zip(cols, shards))
        torch.testing.assert_close(partial, inputs @ full[p + name].T, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.cat([s["model.embed_tokens.weight"] for s in shards]), full["model.embed_tokens.weight"])
    assert torch.equal(torch.cat([s[p + "self_attn.q_proj.bias"] for s in shards]), full[p + "self_attn.q_proj.bias"])
    assert all(torch.equal(s[p + "input_layernorm.weight"], full[p + "input_layernorm.weight"]) for s in shards)
    sizes = [shard_config(QWEN, plan_shard(QWEN, r, size)).vocab_size for r in range(size)]
    assert sum(sizes) == QWEN.vocab_size and max(sizes) - min(sizes) <= 1


def test_intermediate_bands_are_whole_groups_and_cover_everything():
    for size in (2, 3, 4):
        bands = [plan_shard(QWEN, r, size).intermediate if QWEN.num_heads % size == 0 else None for r in range(size)]
        if None in bands:
            continue
        assert bands[0][0] == 0 and bands[-1][1] == QWEN.intermediate_size
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:])) and all(a % 32 == 0 for a, _ in bands)


def test_int4_weights_are_cut_along_whole_groups():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 352, generator=g)
    packed = PackedInt4(*quantize_groupwise(w, 32))
    full = packed.dequantize()
    cols = slice_tensor(packed, 1, 96, 224)
    assert cols.shape == (64, 128)
    assert torch.equal(dequantize_groupwise(cols.qweight, cols.scale, cols.min), full[:, 96:224])
    rows = slice_tensor(packed, 0, 16, 48)
    assert torch.equal(rows.dequantize(), full[16:48])


def test_fewer_kv_heads_than_ranks_are_replicated():
    gemma = replace(QWEN, num_heads=4, num_kv_heads=1, head_dim=64)
    shards = [plan_shard(gemma, r, 2) for r in range(2)]
    assert [s.heads for s in shards] == [(0, 2), (2, 4)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1)]
    four = replace(QWEN, num_heads=8, num_kv_heads=2, head_dim=64)   # ranks 0, 1 read KV head 0; 2, 3 head 1
    assert [plan_shard(four, r, 4).kv_heads for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def test_sizes_that_do_not_split_are_one_line_errors():
    with pytest.raises(ConfigError, match="must divide the model's 4 attention heads"):
        plan_shard(QWEN, 0, 3)
    with pytest.raises(ConfigError, match="KV heads"):
        plan_shard(replace(QWEN, num_heads=6, num_kv_heads=3), 0, 2)


class _ThreadComm:
    """One rank of a group of threads: the sum collective over a shared list (what RowParallel needs)."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world_size, self.shared = rank, shared["size"], shared

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        self.shared["parts"][self.rank] = t.clone()
        self.shared["barrier"].wait()
        total = sum(self.shared["parts"][1:], self.shared["parts"][0].clone())
        self.shared["barrier"].wait()
        return t.copy_(total)


def _run_ranks(size: int, fn) -> list:
    shared = {"size": size, "parts": [None] * size, "barrier": threading.Barrier(size, timeout=60)}
    out = [None] * size
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(_ThreadComm(r, shared))))
               for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and None not in out
    return out


@pytest.mark.parametrize("rows", [4, 24])   # the int8 weight-only kernel below 16 rows, int8 x int8 above
def test_row_parallel_w8a8_shards_round_on_one_process_scales(rows):
    """Each rank of a row-parallel w8a8 linear holds some input columns; activations and per-channel weights
    are rounded on the whole row's scale (the group's maximum), so the summed partials are one process's
    output up to float summation order. Outliers sit in one rank's columns, as Gemma 3's activations do:
    with a scale per shard the other rank's columns round differently and the sum moves by ~1e-2."""
    g = torch.Generator().manual_seed(3)
    k, n, size = 256, 96, 2
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 200] *= 40.0
    x = torch.randn(rows, k, generator=g)
    x[:, 230] *= 60.0

    def linear(weight: torch.Tensor) -> Linear:
        layer = Linear(weight.shape[1], weight.shape[0])
        layer.weight.data.copy_(weight)
        layer.quant_method = W8A8()
        return layer

    full = linear(w)
    full.quant_method.process_weights_after_loading(full)
    want = full(x)
    band = k // size

    def rank(comm) -> torch.Tensor:
        cols = slice(comm.rank * band, (comm.rank + 1) * band)
        layer = linear(w[:, cols])
        share_row_amax(torch.nn.ModuleDict({"o_proj": layer}), comm)
        layer.quant_method.process_weights_after_loading(layer)
        layer.quant_method = RowParallel(layer.quant_method, comm)
        return layer(x[:, cols].contiguous())

    outs = _run_ranks(size, rank)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-4)
