"""scaleinfer distill on tiny random models: the loss falls, an interrupted run resumed with --resume gives the
same loss sequence and weights as an uninterrupted one, the student loads in the engine like in HF, the
held-out windows are never trained on, and bad arguments are one-line errors with exit code 2."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from scaleinfer import LLM  # noqa: E402
from scaleinfer.cli import main  # noqa: E402
from scaleinfer.compress.distill import LOG_FILE, DistillConfig, distill_to_dir  # noqa: E402
from scaleinfer.compress.distill_data import batch_indices, split_windows  # noqa: E402
from scaleinfer.compress.prune import PruneTarget, prune_to_dir  # noqa: E402
from scaleinfer.errors import ConfigError  # noqa: E402
from tests.unit.compress.tiny import hf_logits, make_tiny  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "shakespeare-en.txt")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, smollm2_gguf_path):
    """(teacher dir, student dir: the teacher pruned to 2 layers and half its FFN, a short text file)."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make_tiny(root / "teacher", "llama", smollm2_gguf_path, seed=3)
    student = str(root / "student")
    prune_to_dir(teacher, DATA, PruneTarget(layers=2, ffn=0.5), student, window=32, max_windows=4)
    text = root / "text.txt"
    text.write_text(open(DATA, encoding="utf-8").read()[:1500], encoding="utf-8")
    return teacher, student, str(text)


CFG = DistillConfig(steps=4, seq_len=32, batch_size=2, lr=3e-3, warmup=0, top_k=16, save_every=2, holdout=0.2)


def test_loss_falls_and_the_student_loads_in_the_engine(pair, tmp_path):
    teacher, student, text = pair
    out = str(tmp_path / "out")
    meta = distill_to_dir(teacher, student, [text], out, dataclasses.replace(CFG, steps=8))
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, LOG_FILE))]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert meta["held_out_ppl_end"] < meta["held_out_ppl_start"]
    ids = list(range(100, 140))
    llm = LLM(out, quantization="none", kv_cache_dtype="float32", kv_cache_memory="8MiB", max_model_len=128)
    torch.testing.assert_close(llm.engine.executor.compute_logits(ids), hf_logits(out, ids), atol=1e-4, rtol=1e-4)


def test_resume_continues_with_identical_state(pair, tmp_path):
    teacher, student, text = pair
    whole = str(tmp_path / "whole")
    distill_to_dir(teacher, student, [text], whole, CFG)

    def stop_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt   # killed right after the step-2 checkpoint

    cut = str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        distill_to_dir(teacher, student, [text], cut, CFG, on_step=stop_after_two)
    assert len(open(os.path.join(cut, LOG_FILE)).readlines()) == 2
    distill_to_dir(teacher, student, [text], cut, CFG, resume=True)

    def log(path):
        return [(r["step"], r["loss"], r["kl"], r["ce"], r["grad_norm"])
                for r in map(json.loads, open(os.path.join(path, LOG_FILE)))]
    assert log(cut) == log(whole) and len(log(whole)) == 4
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(whole, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_held_out_windows_are_never_trained_on(pair):
    from scaleinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(pair[0])
    split = split_windows(tok, [open(DATA, encoding="utf-8").read()], 64, 0.25)
    assert split.held_out and not {tuple(w) for w in split.held_out} & {tuple(w) for w in split.train}
    n = len(split.train)
    epoch = [i for step in range(n) for i in batch_indices(step, 1, n, seed=1)]
    assert sorted(epoch) == list(range(n))   # an epoch visits every training window once, none beyond them
    assert batch_indices(7, 4, len(split.train), 1) == batch_indices(7, 4, len(split.train), 1)


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:   # argparse's own errors
        return exc.code


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "2", "--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--steps", "2", "--resume"], "no trainer_state.pt"),
    (["--steps", "2", "--seq-len", "100000"], "windows of 100000"),
    (["--steps", "x"], "invalid int value"),
])
def test_bad_arguments_are_one_line_exit_2(pair, tmp_path, capsys, extra, message):
    teacher, student, text = pair
    code = _run(["distill", "--teacher", teacher, "--student", student, "--text", text, "--output",
                 str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_a_student_with_another_vocabulary_is_refused(pair, tmp_path, capsys):
    import transformers

    other = tmp_path / "other"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes(open(os.path.join(pair[1], name), "rb").read())
    code = _run(["distill", "--teacher", pair[0], "--student", str(other), "--text", pair[2], "--steps", "1",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "vocabularies differ" in capsys.readouterr().err


def test_freeze_embeddings_trains_the_layers_only(pair, tmp_path):
    from safetensors.torch import load_file

    teacher, student, text = pair
    out = str(tmp_path / "frozen")
    meta = distill_to_dir(teacher, student, [text], out, dataclasses.replace(CFG, freeze_embeddings=True))
    before = load_file(os.path.join(student, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("model.layers.") or k == "model.norm.weight" for k in changed)
    embedding = before["model.embed_tokens.weight"].numel()
    assert meta["trainable_params"] == sum(v.numel() for v in before.values()) - embedding
    with pytest.raises(ConfigError, match="--freeze-embeddings"):   # the optimizer's parameters would not match
        distill_to_dir(teacher, student, [text], out, dataclasses.replace(CFG, steps=6), resume=True)


@pytest.mark.parametrize("device, message", [("tpu", "give cpu, cuda or cuda:N"), ("cuda:x", "give cpu, cuda")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU is visible")]))
def test_bad_device_is_one_line_exit_2(pair, tmp_path, capsys, device, message):
    teacher, student, text = pair
    code = _run(["distill", "--teacher", teacher, "--student", student, "--text", text, "--output",
                 str(tmp_path / "o"), "--steps", "1", "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not os.path.exists(tmp_path / "o")   # refused before anything was written
