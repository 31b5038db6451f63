"""Attention: metadata built once per step, backends that read K/V through block tables, the layer."""
