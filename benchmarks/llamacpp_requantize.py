"""Re-quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python), to compare our 4-bit
modes with llama.cpp's on the same source weights.

    .venv-llamacpp/bin/python benchmarks/llamacpp_requantize.py SRC.gguf DST.gguf Q4_1
    .venv/bin/scaleinfer eval perplexity --model DST.gguf --text data/hongloumeng-zh.txt

Run with the llama-cpp-python venv that `make bench` builds (.venv-llamacpp). `allow_requantize` lets
llama.cpp re-round tensors that are already quantized (e.g. Qwen2.5-Coder-0.5B's Q5_0 ones).
"""
from __future__ import annotations

import ctypes
import sys


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: llamacpp_requantize.py SRC.gguf DST.gguf TYPE (e.g. Q4_0, Q4_1, Q8_0)", file=sys.stderr)
        return 2
    import llama_cpp

    src, dst, kind = sys.argv[1:]
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        print(f"unknown type {kind!r}; llama.cpp's are Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_M, ...", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    print(f"llama_model_quantize returned {rc}; wrote {dst}" if rc == 0 else f"llama_model_quantize failed ({rc})")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
