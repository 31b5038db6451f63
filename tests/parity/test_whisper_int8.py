"""whisper-base quantized (real weights, jfk.flac): `w8a8` is CTranslate2's int8 (int8 weights times int8
activations quantized per row, as faster-whisper's compute_type="int8" runs it): every encoder and decoder
linear takes the int8 x int8 product (torch._int_mm for the encoder's 1,500 rows), and the transcript, timestamps
included, is the fp32 model's token for token. `int8` (weight-only) too."""
from __future__ import annotations

import pathlib

import pytest

from scaleinfer.layers.linear import Linear

pytestmark = pytest.mark.slow
JFK = str(pathlib.Path(__file__).resolve().parents[2] / "data" / "jfk.flac")


@pytest.fixture(scope="module")
def fp32_segments():
    from scaleinfer import LLM

    llm = LLM("whisper-base", threads=2, kv_cache_memory="256MiB")
    return [s.tokens for s in llm.transcribe(JFK).segments]


@pytest.mark.parametrize("mode, method", [("w8a8", "W8A8"), ("int8", "Int8WeightOnly")])
def test_quantized_whisper_keeps_the_fp32_transcript(fp32_segments, mode, method):
    from scaleinfer import LLM

    llm = LLM("whisper-base", threads=2, quantization=mode, kv_cache_memory="256MiB")
    model = llm.engine.model
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    assert any(name.startswith("encoder.") for name, _ in linears)
    assert all(type(m.quant_method).__name__ == method for name, m in linears if name != "lm_head"), \
        {name: type(m.quant_method).__name__ for name, m in linears}
    out = llm.transcribe(JFK)
    assert [s.tokens for s in out.segments] == fp32_segments
    assert out.text.strip().startswith("And so my fellow Americans ask not what your country can do for you")
    assert llm.engine.num_free_blocks == llm.engine.num_kv_blocks
