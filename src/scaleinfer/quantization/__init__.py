"""Weight (and KV) quantization applied from outside the model; see base.py for the modes."""
from scaleinfer.quantization.base import QUANTIZATION_MODES, QuantMethod, apply_quantization, resolve_mode

__all__ = ["QUANTIZATION_MODES", "QuantMethod", "apply_quantization", "resolve_mode"]
