"""GPTQ rounding (quantization/gptq.py): the int4 layout is unchanged, the calibrated output error is lower
than round-to-nearest's, it reduces to round-to-nearest when inputs are uncorrelated, and the
`--calibration` path's errors are one line. (On real weights: tests/engine/test_gptq_calibration.py.)"""
from __future__ import annotations

import pathlib

import pytest
import torch

from scaleinfer.cli import main
from scaleinfer.errors import ConfigError
from scaleinfer.quantization.gptq import gptq_int4, output_error
from scaleinfer.quantization.int4 import dequantize_groupwise, quantize_groupwise, unpack_int4

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
