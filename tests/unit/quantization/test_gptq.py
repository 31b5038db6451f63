"""GPTQ rounding (quantization/gptq.py): the int4 layout is unchanged, the calibrated output error is lower
than round-to-nearest's, it reduces to round-to-nearest when inputs are uncorrelated, and the
`--calibration` path (statistics, quantize, checkpoint, errors) works end to end on real weights."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from scaleinfer import LLM
from scaleinfer.cli import main
from scaleinfer.errors import ConfigError
from scaleinfer.quantization.gptq import gptq_int4, output_error
from scaleinfer.quantization.int4 import dequantize_groupwise, quantize_groupwise, unpack_int4
from scaleinfer.weights import quantized as checkpoint

SHAKESPEARE = str(pathlib.Path(__file__).resolve().parents[3] / "data" / "shakespeare-en.txt")


def _correlated(k: int, n_rows: int = 4096, seed: int = 0) -> torch.Tensor:
    """H = X^T X / n of inputs with mixed channels and a few loud ones (like an LLM's activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(n_rows, k, generator=g) @ mix * (torch.rand(k, generator=g) * 3) ** 2
    return x.t() @ x / n_rows


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_gptq_lowers_the_output_error_of_round_to_nearest(act_order, group):
    torch.manual_seed(1)
    w = torch.randn(96, 256) * 0.02
    h = _correlated(256)
    q, scale, mn = gptq_int4(w, h, group, act_order=act_order)
    assert q.shape == (96, 128) and q.dtype == torch.uint8 and scale.shape == mn.shape == (96, 256 // group)
    rtn = output_error(w, dequantize_groupwise(*quantize_groupwise(w, group)), h)
    ours = output_error(w, dequantize_groupwise(q, scale, mn), h)
    assert ours < 0.85 * rtn, (ours, rtn)
    # every stored value is on its group's grid: q * scale + min with q in [0, 15]
    assert int(unpack_int4(q).max()) <= 15


def test_uncorrelated_inputs_give_round_to_nearest():
    """With H diagonal no error is propagated and the grid is min/max: exactly quantize_groupwise."""
    torch.manual_seed(2)
    w = torch.randn(40, 128)
    h = torch.diag(torch.rand(128) + 0.5)
    q, scale, mn = gptq_int4(w, h, 32)
    rq, rscale, rmn = quantize_groupwise(w, 32)
    assert torch.equal(q, rq) and torch.allclose(scale, rscale) and torch.allclose(mn, rmn)


def test_half_scales_are_float16_values():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    _, scale, mn = gptq_int4(w, _correlated(64), 32, half_scales=True, act_order=True)
    assert torch.equal(scale, scale.half().float()) and torch.equal(mn, mn.half().float())


@pytest.mark.slow
def test_statistics_are_the_inputs_second_moment(monkeypatch, tmp_path):
    """Layer 0's fused QKV is rounded with H = mean of h h^T over the calibration tokens, h =
    RMSNorm(embedding) (computed here by hand); the LM head is not GPTQ's."""
    from scaleinfer.quantization import gptq as module

    llm = LLM("smollm2-135m-instruct", quantization="none", kv_cache_memory="32MiB", max_model_len=600)
    model = llm.engine.model
    text = open(SHAKESPEARE, encoding="utf-8").read()[:3000]
    ids = module.calibration_windows(llm.tokenizer, text, max_windows=1)[0]
    seen = []
    real = module.gptq_int4

    def spy(w, h, group, **kw):
        seen.append((w.shape, h))
        return real(w, h, group, **kw)

    monkeypatch.setattr(module, "gptq_int4", spy)
    layer = model.layers[0]
    x = model.embed_tokens.weight[torch.tensor(ids)].float()
    norm = layer.input_layernorm
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    qkv = layer.self_attn.qkv_proj
    first_shard_rows = qkv.shard_bounds()[0][1]
    monkeypatch.setattr(module, "decoder_linears", lambda m: {"layers.0.self_attn.qkv_proj": qkv})
    module.gptq_quantize_model(model, llm.engine.compute_logits, [ids], 32, False)
    assert seen[0][0] == (first_shard_rows, qkv.in_features)
    assert torch.allclose(seen[0][1], h.t() @ h / len(ids), rtol=1e-4, atol=1e-6)
    # q and k are rounded (with the same H); v, which the int4 modes keep at int8, is left dense
    assert [shape for shape, _ in seen] == [(hi - lo, qkv.in_features) for lo, hi in qkv.shard_bounds()[:2]]
    assert set(qkv.packed_shards) == {0, 1}


@pytest.mark.slow
def test_exact_gguf_shards_are_kept(tmp_path):
    """SmolLM2's decoder is all Q4_1: at int4 group 32 GPTQ has nothing to round, the weights are the file's
    (v included: a shard stored in Q4 stays int4, mixed.int8_bands)."""
    calib = tmp_path / "calib.txt"
    calib.write_text(open(SHAKESPEARE, encoding="utf-8").read()[:6000], encoding="utf-8")
    plain = LLM("smollm2-135m-instruct", kv_cache_memory="32MiB", max_model_len=256, quantization="int4")
    calibrated = LLM("smollm2-135m-instruct", kv_cache_memory="32MiB", max_model_len=256, quantization="int4",
                     calibration=str(calib))
    for a, b in zip(plain.engine.model.layers, calibrated.engine.model.layers):
        assert torch.equal(a.mlp.down_proj.qweight, b.mlp.down_proj.qweight)
        assert torch.equal(a.self_attn.qkv_proj.weight_scale, b.self_attn.qkv_proj.weight_scale)


@pytest.mark.slow
def test_calibrated_checkpoint_beats_nearest_on_held_out_text(tmp_path):
    """SmolLM2 at int4-g64 (its Q4_1 group-32 grid re-rounded: +31% perplexity to nearest): GPTQ on the
    first half of the Shakespeare file scores better on windows from the second half, and the written
    checkpoint loads as is and matches calibrating on the fly."""
    from scaleinfer.bench.perplexity import perplexity

    text = open(SHAKESPEARE, encoding="utf-8").read()
    calib = tmp_path / "calib.txt"
    calib.write_text(text[:7000], encoding="utf-8")
    held_out = text[30000:42000]
    out = tmp_path / "q"
    assert main(["quantize", "--model", "smollm2-135m-instruct", "--quantization", "int4-g64",
                 "--calibration", str(calib), "--output", str(out)]) == 0
    cfg = json.loads((out / checkpoint.CONFIG_FILE).read_text())
    assert cfg["quantization"]["rounding"] == "gptq" and cfg["quantization"]["calibration"] == str(calib)

    def ppl(model, **kw):
        llm = LLM(model, kv_cache_memory="32MiB", max_model_len=512, **kw)
        return perplexity(llm, held_out, window=256, max_windows=6).perplexity

    fp32 = ppl("smollm2-135m-instruct", quantization="none")
    nearest = ppl("smollm2-135m-instruct", quantization="int4-g64")
    calibrated = ppl(str(out))
    assert fp32 < calibrated < nearest, (fp32, calibrated, nearest)
    assert calibrated - fp32 < 0.7 * (nearest - fp32), (fp32, calibrated, nearest)


def test_calibration_errors_are_one_line(tmp_path, capsys):
    bad = [
        (["--quantization", "int8", "--calibration", SHAKESPEARE], "applies to"),
        (["--quantization", "int4", "--calibration", str(tmp_path / "missing.txt")], "cannot read"),
    ]
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    bad.append((["--quantization", "int4", "--calibration", str(short)], "needs at least"))
    for args, expected in bad:
        code = main(["quantize", "--model", "smollm2-135m-instruct", *args, "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and expected in err and "\n" not in err, err


def test_calibrating_a_quantized_checkpoint_is_refused(tmp_path):
    from scaleinfer.config import EngineConfig
    from scaleinfer.engine.loading import build_model

    class Ckpt:
        format = "scaleinfer-quantized"
        path = str(tmp_path)
        config = None

    with pytest.raises(ConfigError, match="already quantized"):
        build_model(Ckpt(), EngineConfig(quantization="int4", calibration=SHAKESPEARE))


def test_eval_refuses_to_calibrate_on_the_scored_text(capsys):
    code = main(["eval", "perplexity", "--quantization", "int4", "--calibration", SHAKESPEARE, "--text", SHAKESPEARE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--calibration is the --text" in err and "\n" not in err
