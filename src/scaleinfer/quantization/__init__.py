"""Weight (and KV) quantization applied from outside the model; table.py lists the modes, base.py applies them."""
from scaleinfer.quantization.base import QUANTIZATION_MODES, QuantMethod, apply_quantization, resolve_mode

__all__ = ["QUANTIZATION_MODES", "QuantMethod", "apply_quantization", "resolve_mode"]
