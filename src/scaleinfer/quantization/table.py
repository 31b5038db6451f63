"""The quantization table: mode name -> its methods, bits, GGUF 4-bit adoption and CLI description.

config.QUANTIZATION_MODES (pure Python, for validation) lists the same names in the same order; the CLI's
--quantization help, engine/loading.py and weights/quantized.py read everything else from here.

    mode     linears                                    lm_head
    none     dense fp32                                 dense fp32
    int8     int8 per output channel, weight-only       int8
    int4     int4 group-wise asymmetric (group 32);     int8  (llama.cpp keeps the output layer at 8 bits too)
             attention v int8 (quantization/mixed.py)
    w8a8     int8 weights x per-token int8 activations  int8 weight-only (logits are computed for few rows)
    w4a8     int4 group 32 (fp16 scales) x int8         int8 per block of 32 (fp16 scales, Q8_0's
             activations per 32 (decode kernel for few  layout: a Q8_0 embedding as stored) x int8
             rows, AMX/VNNI GEMM for prefill); v: int8  activations per 32
    auto     each GGUF tensor as stored, in the fastest layout with at least its bits (quantization/auto.py):
             Q4 -> as w4a8, Q5..Q8 -> w8a8, float -> none; HF safetensors and non-CPU devices: none
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scaleinfer.config import QUANTIZATION_MODES
from scaleinfer.quantization.int4 import W4A8, Int4WeightOnly
from scaleinfer.quantization.int8 import W8A8, Int8WeightOnly, W8A8Block32
from scaleinfer.quantization.mixed import RowSplit


@dataclass(frozen=True)
class Mode:
    name: str
    linear: Callable[[], object] | None
    """Factory of the decoder linears' method; None keeps them dense."""
    head: Callable[[], object] | None
    """Factory of the LM head's method; None keeps it dense."""
    bits: int | None
    """Bits per decoder weight (None: float). The 4-bit modes keep attention v at int8 (mixed.py) and can
    be GPTQ-rounded on a calibration text."""
    adopts_packed_int4: bool
    """Whether the decoder linears take GGUF Q4_0 / Q4_1 / Q4_K tensors as stored (int4 group 32)."""
    help: str
    """One phrase for the CLI's --quantization help."""


MODES = {m.name: m for m in (
    Mode("none", None, None, None, False, "float weights as loaded"),
    Mode("int8", Int8WeightOnly, Int8WeightOnly, 8, False, "int8 weight-only"),
    Mode("int4", Int4WeightOnly, Int8WeightOnly, 4, True, "int4 weight-only, groups of 32"),
    Mode("int4-g64", lambda: Int4WeightOnly(group_size=64), Int8WeightOnly, 4, False, "groups of 64"),
    Mode("int4-g128", lambda: Int4WeightOnly(group_size=128), Int8WeightOnly, 4, False, "groups of 128"),
    Mode("w8a8", W8A8, Int8WeightOnly, 8, False, "int8 weights and per-token int8 activations"),
    Mode("w4a8", W4A8, W8A8Block32, 4, True, "int4 weights x int8 activations (decode kernel by rows, GEMM for prefill)"),
    Mode("auto", None, None, None, True, "each GGUF tensor as stored: Q4 types as w4a8, Q5-Q8 as w8a8, "
                                         "float as none; HF checkpoints and GPUs: none"),
)}
assert tuple(MODES) == QUANTIZATION_MODES, "config.QUANTIZATION_MODES and quantization.table.MODES differ"

METHODS = {cls.name: cls for cls in (Int8WeightOnly, W8A8, Int4WeightOnly, W4A8, W8A8Block32, RowSplit)}
"""Method name (as a quantized checkpoint lists it) -> class."""


def cli_help() -> str:
    """The --quantization help: every mode with its phrase."""
    return "weight quantization after loading: " + "; ".join(f"{m.name} ({m.help})" for m in MODES.values())
