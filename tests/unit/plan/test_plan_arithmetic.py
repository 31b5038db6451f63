"""The planner's arithmetic against hand computations: parameters, weights and KV bytes of known configs,
sharding (KV heads replicated past their count), alpha-beta collectives, the roofline, batch capacity."""
from __future__ import annotations

import dataclasses
import json

import pytest

from scaleinfer.errors import ConfigError
from scaleinfer.plan.cost import Layout, Workload, allreduce_s, estimate
from scaleinfer.plan.devices import Cluster, Link, cpu_device, parse_devices
from scaleinfer.plan.search import layouts, plan
from scaleinfer.plan.shapes import WEIGHT_FORMATS, from_hf_config, kv_bytes_per_token, named_shape

LLAMA70 = named_shape("Llama-3-70B")
QWEN15 = named_shape("qwen2.5-1.5b")


def work(**kw) -> Workload:
    base = dict(context=1024, weights=WEIGHT_FORMATS["bf16"], kv_format="bf16", act_dtype="bf16", compute_dtype="bf16")
    return Workload(**{**base, **kw})


def test_llama3_70b_params_and_bf16_weights():
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 8 * 128 + 3 * 8192 * 28672   # q, o + k, v + gate, up, down
    assert per_layer == 855_638_016
    total = 80 * per_layer + 2 * 128256 * 8192 + (2 * 80 + 1) * 8192       # + embedding, LM head, norms
    assert LLAMA70.total_params() == total == 70_553_706_496
    assert 141.0e9 < total * 2 < 141.2e9                                   # "~141 GB in bf16"


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(LLAMA70, "bf16") == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(QWEN15, "fp16") == 2 * 28 * 2 * 128 * 2 == 28_672
    assert kv_bytes_per_token(QWEN15, "int8") == 2 * 28 * 2 * (128 + 4)    # + one fp32 scale per token and head
    assert kv_bytes_per_token(QWEN15, "fp32", layers=14, kv_heads=1) == 2 * 14 * 1 * 128 * 4


def test_tp8_weights_per_device_by_hand():
    e = estimate(LLAMA70, parse_devices("8xH100"), Layout(tp=8), work())
    layer = 2 * 8192 * 8192 / 8 + 2 * 8192 * 1 * 128 + 3 * 8192 * 28672 / 8   # one KV head per rank
    assert e.weights_bytes == pytest.approx((80 * layer + 2 * 128256 * 8192 / 8) * 2)
    assert e.kv_bytes_per_token == 2 * 80 * 1 * 128 * 2


def test_kv_heads_replicate_past_their_count():
    """Qwen2.5-1.5B has 2 KV heads: at tp=4 every rank holds one (replicated), not half of one."""
    cluster = parse_devices("4xH100")
    assert estimate(QWEN15, cluster, Layout(tp=2, dp=2), work()).kv_bytes_per_token == 2 * 28 * 1 * 128 * 2
    assert estimate(QWEN15, cluster, Layout(tp=4), work()).kv_bytes_per_token == 2 * 28 * 1 * 128 * 2


def test_pipeline_stage_holds_its_layers_and_one_end():
    e = estimate(LLAMA70, parse_devices("4xH100"), Layout(pp=4), work())
    assert e.weights_bytes == pytest.approx((20 * 855_638_016 + 128256 * 8192) * 2)
    assert e.kv_bytes_per_token == 2 * 20 * 8 * 128 * 2


def test_embedding_stays_in_the_model_dtype_and_a_tied_int8_head_is_a_copy():
    """This engine's w4a8 on CPU: fp32 embedding + int8 head (a second table even when tied), 5-bit linears;
    in bf16 a tied head is the embedding itself (one table)."""
    vocab = 151936 * 1536
    w4a8 = work(weights=WEIGHT_FORMATS["w4a8"], kv_format="fp16", act_dtype="fp32", compute_dtype="int8")
    e = estimate(QWEN15, parse_devices("cpu"), Layout(), w4a8)
    assert e.weights_bytes == pytest.approx(28 * 46_792_704 * 0.625 + vocab * 4 + vocab * 1.0625)
    assert estimate(QWEN15, parse_devices("H100"), Layout(), work()).weights_bytes == \
        pytest.approx((28 * 46_792_704 + vocab) * 2)


def test_allreduce_alpha_beta():
    link = Link("test", 10e-6, 1e9)
    assert allreduce_s(1e6, 1, link) == 0
    assert allreduce_s(1e6, 2, link) == pytest.approx(10e-6 + 1e-3)             # alpha + 2(1)/2 n / beta
    assert allreduce_s(1e6, 8, link) == pytest.approx(3 * 10e-6 + 14 / 8 * 1e-3)


def _roofline_cpu() -> Cluster:
    """A device whose FLOP/s never bind: decode time is bytes / bandwidth."""
    dev = dataclasses.replace(cpu_device(bandwidth=10e9, memory=100e9), flops={"fp32": 1e30, "bf16": 1e30})
    return Cluster(dev, 1, "test")


def test_batch1_decode_is_bytes_over_bandwidth():
    w = work(bw_efficiency=1.0, context=100)
    e = estimate(QWEN15, _roofline_cpu(), Layout(), w)
    linears = 28 * (QWEN15.attention_params() + QWEN15.mlp_params())
    read = linears * 2 + 151936 * 1536 * 2 + 100 * kv_bytes_per_token(QWEN15, "bf16")   # tied head read once
    assert e.latency_b1 == pytest.approx(read / 10e9)
    assert e.comm_s_per_step == 0 and e.comm_bytes_per_token == 0


@pytest.mark.parametrize("name, counted", [("Qwen2.5-1.5B", 1_100_120_064), ("Qwen2.5-0.5B", 386_556_928)])
def test_w4a8_bytes_per_token_near_the_engine_s_count(name, counted):
    """benchmarks/decode_bandwidth.py counts what a w4a8 decode step reads from the loaded tensors (fp32 KV at
    24 positions; benchmarks/results/decode-bandwidth-20261202-1*.json): the plan's format constants come
    within 5% (they leave out the Q6_K tensors of Q4_K_M that the engine keeps at int8)."""
    w = work(weights=WEIGHT_FORMATS["w4a8"], kv_format="fp32", act_dtype="fp32", compute_dtype="fp32", context=24)
    e = estimate(named_shape(name), _roofline_cpu(), Layout(), w)
    assert e.read_bytes_b1 == pytest.approx(counted, rel=0.05)


def test_largest_batch_is_free_memory_over_kv_per_sequence():
    e = estimate(LLAMA70, parse_devices("8xH100"), Layout(tp=8), work(context=4096, max_batch=10_000, max_tpot=None))
    per_sequence = 2 * 80 * 1 * 128 * 2 * 4096
    assert e.max_batch == int(e.free_bytes // per_sequence) and e.max_batch > 256
    assert e.free_bytes == pytest.approx(80e9 * 0.9 - 1.5e9 - e.weights_bytes - e.workspace_bytes)


def test_latency_bound_caps_the_batch():
    bounded = estimate(LLAMA70, parse_devices("8xH100"), Layout(tp=8), work(max_tpot=0.015))
    assert bounded.tpot <= 0.015 and bounded.batch < bounded.max_batch


def test_pp_does_not_cut_batch1_latency():
    """Batch 1 crosses every stage in turn: pp=2 costs one stage-to-stage send more than pp=1."""
    cpu2 = parse_devices("cpu:ranks=2")
    one = estimate(QWEN15, parse_devices("cpu:bw=11"), Layout(), work(act_dtype="fp32", compute_dtype="fp32"))
    two = estimate(QWEN15, cpu2, Layout(pp=2), work(act_dtype="fp32", compute_dtype="fp32"))
    assert two.latency_b1 > one.latency_b1
    assert two.comm_bytes_per_token == 1536 * 4


def test_layouts_enumerate_divisors():
    assert len(layouts(8)) == 10                          # (t, p, d) with t p d = 8
    assert {(lay.tp, lay.pp, lay.dp) for lay in layouts(8, tp=4)} == {(4, 1, 2), (4, 2, 1)}
    with pytest.raises(ConfigError, match="--tp 3 does not divide the 8 devices"):
        layouts(8, tp=3)


def test_70b_on_8xh100_recommends_a_fitting_layout_and_1xl4_none():
    result = plan(LLAMA70, parse_devices("8xH100"), work(context=4096, max_tpot=0.05))
    assert result.best is not None and result.best.fits and result.meets_bound
    assert not next(e for e in result.estimates if e.layout == Layout(dp=8)).fits     # 141 GB on one 80 GB GPU
    assert plan(LLAMA70, parse_devices("L4"), work()).best is None


def test_parse_devices():
    c = parse_devices("8xH100")
    assert (c.count, c.device.name, c.device.memory) == (8, "H100-80GB-SXM", 80e9)
    ranks = parse_devices("cpu:ranks=2")
    assert ranks.count == 2 and ranks.device.bandwidth == pytest.approx(11e9)
    assert parse_devices("cpu:cores=16,bw=200,mem=128").device.bandwidth == 200e9
    assert parse_devices("16xH100").link_for(16).name.startswith("InfiniBand")
    for bad, message in (("8xTPU", "unknown device 'tpu'"), ("cpu:foo=1", "unknown option"),
                         ("cpu:bw=fast", "bw must be a number"), ("0xH100", "at least 1")):
        with pytest.raises(ConfigError, match=message) as exc:
            parse_devices(bad)
        assert "\n" not in str(exc.value)


def test_hf_config_json(tmp_path):
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
           "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = from_hf_config(str(tmp_path / "config.json"))
    assert shape == dataclasses.replace(named_shape("Mixtral-8x7B"), name=str(tmp_path / "config.json"))
    assert 46.6e9 < shape.total_params() < 46.8e9                      # Mixtral 8x7B: 46.7B parameters
    assert shape.active_experts(1) == pytest.approx(2) and shape.active_experts(64) == pytest.approx(8, abs=1e-3)
    del cfg["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="lacks 'vocab_size'"):
        from_hf_config(str(tmp_path / "config.json"))
