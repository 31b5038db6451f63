"""scaleinfer prune on tiny random Llama / Qwen2 models: pruned directories load in HF transformers and in
the engine with the same logits; dead structure (an identity layer, zero channels, silent heads) is found
by the scores and removed without changing the logits; the scores rank layers by the harm of removing
them; targets resolve to the right counts; bad arguments are one-line errors with exit code 2."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from scaleinfer import LLM  # noqa: E402
from scaleinfer.cli import main  # noqa: E402
from scaleinfer.compress.prune import PruneTarget, param_count, prune_to_dir, resolve_plan  # noqa: E402
from scaleinfer.config import ModelConfig  # noqa: E402
from scaleinfer.errors import ConfigError  # noqa: E402
from tests.unit.compress.tiny import hf_logits, make_tiny  # noqa: E402

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "shakespeare-en.txt")
PROMPT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."


def _ids(path: str) -> list[int]:
    from scaleinfer.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(path).encode(PROMPT, add_special_tokens=False)


def _engine_logits(path: str, ids: list[int]) -> torch.Tensor:
    llm = LLM(path, quantization="none", kv_cache_dtype="float32", kv_cache_memory="8MiB", max_model_len=128)
    return llm.engine.executor.compute_logits(ids)


def _kill_dead_structure(model) -> None:
    """Layer 1 becomes the identity; channels 64.. of every FFN and query heads 2, 3 (KV group 1) go silent."""
    layers = model.model.layers
    layers[1].self_attn.o_proj.weight.zero_()
    layers[1].mlp.down_proj.weight.zero_()
    for layer in layers:
        layer.mlp.down_proj.weight[:, 64:] = 0
        layer.self_attn.o_proj.weight[:, 32:] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dead_structure_is_pruned_losslessly_and_loads_everywhere(tmp_path, smollm2_gguf_path, family):
    src = make_tiny(tmp_path / "src", family, smollm2_gguf_path, edit=_kill_dead_structure)
    out = str(tmp_path / "pruned")
    report = prune_to_dir(src, TEXT, PruneTarget(layers=3, ffn=0.5, heads=2, kv_heads=1), out, window=32,
                          max_windows=4)
    assert report["layers_removed"] == [1]
    assert report["kv_heads_kept"] == [[0]] * 3 and report["heads_kept"] == [[0, 1]] * 3
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (3, 64, 2, 1, 16)
    ids = _ids(out)
    pruned = hf_logits(out, ids)
    torch.testing.assert_close(pruned, hf_logits(src, ids), atol=1e-4, rtol=1e-4)   # nothing alive was cut
    torch.testing.assert_close(_engine_logits(out, ids), pruned, atol=1e-4, rtol=1e-4)
    assert report["params_after"] < report["params_before"]


def _scale_layers(model) -> None:
    """Layer 2 writes 30x more into the residual stream, layer 0 30x less."""
    for i, factor in ((2, 30.0), (0, 1 / 30)):
        model.model.layers[i].self_attn.o_proj.weight.mul_(factor)
        model.model.layers[i].mlp.down_proj.weight.mul_(factor)


def test_layer_scores_rank_the_harm_of_removing_a_layer(tmp_path, smollm2_gguf_path):
    src = make_tiny(tmp_path / "src", "llama", smollm2_gguf_path, seed=1, edit=_scale_layers)
    ids = _ids(src)
    full = torch.log_softmax(hf_logits(src, ids), -1)
    report = prune_to_dir(src, TEXT, PruneTarget(layers=3), str(tmp_path / "least"), window=32, max_windows=4)
    bi = report["layer_influence"]
    least, most = min(range(4), key=bi.__getitem__), max(range(4), key=bi.__getitem__)
    assert (least, most) == (0, 2) and report["layers_removed"] == [0]

    from scaleinfer.compress.checkpoints import open_source, write_hf_dir
    from scaleinfer.compress.prune import drop_layers

    source = open_source(src)
    state, cfg = drop_layers(source.state, source.hf_config, [0, 1, 3])   # the most influential removed
    os.makedirs(tmp_path / "most")
    write_hf_dir(str(tmp_path / "most"), cfg, state, source)

    def harm(path):   # KL(full || pruned) over the prompt
        return float(torch.nn.functional.kl_div(torch.log_softmax(hf_logits(path, ids), -1), full,
                                                log_target=True, reduction="batchmean"))

    assert harm(str(tmp_path / "least")) < harm(str(tmp_path / "most"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_gguf_path) -> str:
    return make_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", smollm2_gguf_path)


SMOL = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                   num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)


def test_targets_resolve_to_counts():
    assert resolve_plan(SMOL, PruneTarget(layers=24)).layers == 24
    assert resolve_plan(SMOL, PruneTarget(ffn=0.75)).intermediate_size == 1152
    plan = resolve_plan(SMOL, PruneTarget(params=0.7))
    kept = param_count(SMOL, plan.layers, plan.intermediate_size, plan.heads, plan.kv_heads)
    assert abs(kept / param_count(SMOL, 30, 1536, 9, 3) - 0.7) < 0.01
    assert plan.layers < 30 and plan.intermediate_size < 1536   # both shrink
    assert resolve_plan(SMOL, PruneTarget(layers=20, params=0.6)).layers == 20
    assert resolve_plan(SMOL, PruneTarget(kv_heads=2)).heads == 6
    for bad in (PruneTarget(layers=0), PruneTarget(layers=31), PruneTarget(ffn=1.5), PruneTarget(heads=4),
                PruneTarget(kv_heads=4), PruneTarget(params=0.7, layers=20, ffn=0.5), PruneTarget(params=0.05,
                                                                                                  layers=30)):
        with pytest.raises(ConfigError):
            resolve_plan(SMOL, bad)


@pytest.mark.parametrize("argv, message", [
    (["--layers", "2"], "--calibration"),    # argparse: required
    (["--calibration", "missing.txt", "--layers", "2"], "cannot read the calibration text"),
    (["--calibration", TEXT], "nothing to prune"),
    (["--calibration", TEXT, "--ffn", "abc"], "expected a number"),
    (["--calibration", TEXT, "--layers", "9"], "--layers 9"),
    (["--calibration", TEXT, "--heads", "3"], "--heads 3"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, tiny_llama, capsys, argv, message):
    src = tiny_llama
    code = _run(["prune", "--model", src, "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_output_must_be_empty(tmp_path, smollm2_gguf_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["prune", "--calibration", TEXT, "--layers", "2", "--output", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:   # argparse's own errors
        return exc.code


def test_bench_target_specs_parse():
    from scaleinfer.bench.prune import parse_target

    assert parse_target("layers=24") == PruneTarget(layers=24)
    assert parse_target("layers=20+ffn=0.75") == PruneTarget(layers=20, ffn=0.75)
    assert parse_target("kv-heads=2") == PruneTarget(kv_heads=2)
    for bad in ("depth=3", "layers=", "ffn=big"):
        with pytest.raises(ConfigError):
            parse_target(bad)
