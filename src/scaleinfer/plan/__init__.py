"""`scaleinfer plan`: memory, latency, throughput and communication of a model on a set of devices, by
arithmetic alone (no model is loaded, nothing runs).

shapes.py (model shapes: named, from an HF config.json, from a ModelConfig; weight and KV formats),
devices.py (device table and `--devices` parsing), cost.py (one layout's estimate), search.py (every
tp x pp x dp layout, the recommendation), report.py (table and JSON). All of it is pure Python (the
import test keeps torch out); plan/source.py, on the CLI's layer, reads a catalog model's GGUF header.
"""
