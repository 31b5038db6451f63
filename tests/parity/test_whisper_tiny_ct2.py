"""A tiny random Whisper (HF, built offline) converted by CTranslate2's own converter to float16 and int8
model.bin files: our reader recovers the weights (float16 exactly, int8 within half a quantization step),
the engine's logits match HF's on them within 1e-4, and the encoder-decoder engine path keeps its outputs
when requests are batched together or preempted (cross K/V freed and recomputed)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("ctranslate2")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ct2_dirs(tmp_path_factory):
    import ctranslate2
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    from scaleinfer import catalog

    tok_file = os.path.join(catalog.resolve("whisper-base"), "tokenizer.json")
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51865, num_mel_bins=80, encoder_layers=2, encoder_attention_heads=2,
                        decoder_layers=2, decoder_attention_heads=2, d_model=64, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448)
    hf = WhisperForConditionalGeneration(cfg).eval()
    src = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(src)
    WhisperTokenizerFast(tokenizer_file=tok_file).save_pretrained(src)
    out = {}
    for q in ("float16", "int8"):
        out[q] = str(tmp_path_factory.mktemp(q))
        ctranslate2.converters.TransformersConverter(str(src), copy_files=["tokenizer.json"]).convert(
            out[q], quantization=q, force=True)
    return hf, out


def _ours(path):
    from scaleinfer.weights.loader import open_checkpoint

    ckpt = open_checkpoint(path)
    return ckpt, dict(ckpt.tensors())


def test_reader_recovers_float16_and_int8(ct2_dirs):
    hf, dirs = ct2_dirs
    ref = hf.state_dict()
    _, half = _ours(dirs["float16"])
    _, int8 = _ours(dirs["int8"])
    w = ref["model.decoder.layers.0.fc1.weight"]
    assert torch.equal(half["model.decoder.layers.0.mlp.fc1.weight"], w.half().float())
    step = w.abs().amax(dim=1, keepdim=True) / 127   # per-row int8 scale
    err = (int8["model.decoder.layers.0.mlp.fc1.weight"] - w).abs()
    assert bool((err <= step * 0.5 + 1e-7).all())
    qkv = half["model.encoder.layers.1.self_attn.qkv_proj.weight"]
    prefix = "model.encoder.layers.1.self_attn."
    assert torch.equal(qkv, torch.cat([ref[prefix + p + "_proj.weight"] for p in "qkv"]).half().float())


def _logits(llm, features, prompt, steps):
    from scaleinfer.sampling_params import SamplingParams

    seen = []

    def record(output_ids, logits):
        seen.append(logits.clone())
        return logits

    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logits_processors=[record])
    out = None
    llm.engine.add_request("probe", prompt, params, encoder_input=features)
    while llm.engine.has_unfinished_requests():
        for o in llm.engine.step():
            out = o
    return torch.stack(seen), out.outputs[0].token_ids


def test_logits_match_hf(ct2_dirs):
    from scaleinfer import LLM
    from tests.parity.whisper_hf_helpers import hf_whisper

    _, dirs = ct2_dirs
    ckpt, tensors = _ours(dirs["float16"])
    hf = hf_whisper(ckpt.config, tensors.items())
    llm = LLM(dirs["float16"], threads=1, kv_cache_dtype="float32", kv_cache_memory="64MiB")
    torch.manual_seed(1)
    features = torch.randn(80, 3000) * 0.5
    prompt = [50258, 50259, 50359]
    ours, tokens = _logits(llm, features, prompt, 5)
    with torch.inference_mode():
        ids = torch.tensor([prompt + tokens[:-1]])
        ref = hf(input_features=features[None], decoder_input_ids=ids).logits[0, len(prompt) - 1:]
    assert (ours - ref).abs().max() < 1e-4


def _greedy(llm, jobs, max_tokens=12):
    from scaleinfer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, (features, prompt) in enumerate(jobs):
        llm.engine.add_request(f"r{i}", prompt, params, encoder_input=features)
    done = {}
    while llm.engine.has_unfinished_requests():
        for o in llm.engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(jobs))]


def test_batched_and_preempted_equal_alone(ct2_dirs):
    from scaleinfer import LLM

    _, dirs = ct2_dirs
    torch.manual_seed(2)
    jobs = [(torch.randn(80, 3000) * 0.5, [50258, 50259 + i, 50359]) for i in range(3)]
    roomy = LLM(dirs["float16"], threads=1, kv_cache_memory="64MiB")
    alone = [_greedy(roomy, [job])[0] for job in jobs]
    assert _greedy(roomy, jobs) == alone
    assert roomy.engine.stats.max_batch_size == 3
    # Room for two requests' cross K/V (94 blocks each) and a little more: decoding makes one yield its
    # blocks (preemption); it comes back, runs its encoder again and continues where it was.
    block_bytes = 16 * 2 * 2 * 2 * 32 * 2   # tokens x layers x (K, V) x heads x head_dim x float16
    tight = LLM(dirs["float16"], threads=1, kv_cache_memory=(2 * 95 + 1) * block_bytes)
    assert _greedy(tight, jobs, max_tokens=40) == [_greedy(roomy, [job], max_tokens=40)[0] for job in jobs]
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.num_free_blocks == tight.engine.num_kv_blocks
