"""scaleinfer distill on a CUDA GPU gives the CPU run's losses and weights, and resumes there (skipped without a
GPU). Self-contained: random-weight teacher and student with a made-up tokenizer written here, so it runs on a
GPU machine that holds none of the catalog's models."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")

from scaleinfer.compress.distill import LOG_FILE, DistillConfig, distill_to_dir  # noqa: E402
from tests.kernel_tests.cuda_models import write_wordlevel_tokenizer  # noqa: E402

VOCAB = 512


def _model_dir(path, layers: int, seed: int) -> str:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    write_wordlevel_tokenizer(path, VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-distill")
    teacher = _model_dir(root / "teacher", 3, seed=1)
    student = _model_dir(root / "student", 1, seed=2)
    g = torch.Generator().manual_seed(0)
    words = [f"t{int(i)}" for i in torch.randint(3, VOCAB, (3000,), generator=g)]
    text = root / "text.txt"
    text.write_text(" ".join(words))
    return teacher, student, str(text)


CFG = DistillConfig(steps=6, seq_len=64, batch_size=4, lr=1e-3, warmup=0, top_k=16, save_every=3, holdout=0.1)


def _log(path):
    return [json.loads(line) for line in open(os.path.join(path, LOG_FILE))]


def test_cuda_run_matches_the_cpu_run(pair, tmp_path):
    from safetensors.torch import load_file

    cpu, gpu = str(tmp_path / "cpu"), str(tmp_path / "gpu")
    meta_cpu = distill_to_dir(*pair[:2], [pair[2]], cpu, CFG)
    meta_gpu = distill_to_dir(*pair[:2], [pair[2]], gpu, dataclasses.replace(CFG, device="cuda"))
    a, b = _log(cpu), _log(gpu)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-3 * abs(x["loss"]), (x, y)
    assert abs(meta_cpu["held_out_ppl_end"] - meta_gpu["held_out_ppl_end"]) <= 1e-3 * meta_cpu["held_out_ppl_end"]
    assert a[-1]["loss"] < a[0]["loss"]
    wa, wb = load_file(os.path.join(cpu, "model.safetensors")), load_file(os.path.join(gpu, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4, rtol=1e-3) for k in wa)


def test_cuda_run_resumes_and_moves_between_devices(pair, tmp_path):
    """Cut after step 3 on the GPU, resumed on the GPU (and another cut resumed on the CPU): the same losses as
    an uninterrupted GPU run (within float noise: CUDA's embedding backward adds with atomics)."""
    whole = str(tmp_path / "whole")
    distill_to_dir(*pair[:2], [pair[2]], whole, dataclasses.replace(CFG, device="cuda", bf16=True))

    def stop_after_three(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    for resume_on in ("cuda", "cpu"):
        cut = str(tmp_path / f"cut-{resume_on}")
        with pytest.raises(KeyboardInterrupt):
            distill_to_dir(*pair[:2], [pair[2]], cut, dataclasses.replace(CFG, device="cuda", bf16=True),
                           on_step=stop_after_three)
        distill_to_dir(*pair[:2], [pair[2]], cut, dataclasses.replace(CFG, device=resume_on, bf16=True),
                       resume=True)
        for x, y in zip(_log(whole), _log(cut)):
            assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 2e-2 * abs(x["loss"]), (resume_on, x, y)
        assert len(_log(cut)) == 6
