"""open_checkpoint: catalog names, hub ids without a network, paths that do not exist; load speed."""
from __future__ import annotations

import time

import pytest

from scaleinfer import catalog
from scaleinfer.errors import WeightLoadError
from scaleinfer.weights.loader import open_checkpoint


def test_catalog_name_opens_the_gguf_quickly(smollm2_gguf_path):
    start = time.perf_counter()
    ckpt = open_checkpoint("smollm2-135m-instruct")
    opened = time.perf_counter() - start
    num_params = sum(t.numel() for _, t in ckpt.tensors())
    total = time.perf_counter() - start
    assert ckpt.path == smollm2_gguf_path and ckpt.format == "gguf"
    assert num_params == 134_515_008
    assert opened < 2.0 and total < 10.0, f"open {opened:.2f} s, all tensors {total:.2f} s"


def test_hub_id_without_network_fails_fast():
    """conftest sets HF_HUB_OFFLINE=1; the answer must be immediate and say what to do."""
    start = time.perf_counter()
    with pytest.raises(WeightLoadError) as exc:
        open_checkpoint("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - start < 15
    message = str(exc.value)
    assert "\n" not in message and "no-such-org/no-such-model-xyz" in message
    assert "unreachable" in message or "no public model" in message


@pytest.mark.parametrize("model", ["./missing-dir", "a/b/c", "missing.bin"])
def test_unknown_path(model):
    with pytest.raises(WeightLoadError, match="not found") as exc:
        open_checkpoint(model)
    for name in catalog.names():
        assert name in str(exc.value)
