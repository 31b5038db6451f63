"""Beam search on the real SmolLM2-135M-Instruct weights (fp32) equals HF transformers'
generate(num_beams=4, do_sample=False): the same n best sequences, alone, mixed with other requests
in one engine, and under a KV cache so small that beams are preempted; no block stays referenced."""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, BeamSearchParams, SamplingParams  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):",
]
MAX_TOKENS = 20


def beam(n=4, best_of=4, **kw):
    return SamplingParams(temperature=0, use_beam_search=True, n=n, best_of=best_of, max_tokens=MAX_TOKENS, **kw)


def make_llm(**kw):
    return LLM("smollm2-135m-instruct", quantization="none", max_model_len=512, kv_cache_dtype="float32", **kw)


@pytest.fixture(scope="module")
def llm():
    return make_llm(kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def hf_model(llm):
    path = llm.engine.checkpoint_path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_beams(llm, hf_model):
    """Per prompt: HF's 4 best output token lists (EOS kept, padding cut), best first."""
    out = {}
    eos = list(llm.tokenizer.eos_token_ids)   # the same stop ids on both sides
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = llm.tokenizer.encode(prompt)
            seqs = hf_model.generate(torch.tensor([ids]), num_beams=4, do_sample=False, num_return_sequences=4,
                                     max_new_tokens=MAX_TOKENS, eos_token_id=eos, pad_token_id=eos[0])
            rows = []
            for row in seqs[:, len(ids):].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                rows.append(row[:cut])
            out[prompt] = rows
    return out


def assert_no_leaks(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    bm = engine.scheduler.block_manager
    assert not any(bm.ref_counts) and bm.num_free_blocks == engine.num_kv_blocks


def test_beam_search_matches_hf(llm, hf_beams):
    outs = llm.generate(PROMPTS, beam())
    for prompt, out in zip(PROMPTS, outs):
        assert [o.token_ids for o in out.outputs] == hf_beams[prompt], prompt
        scores = [o.cumulative_logprob / len(o.token_ids) for o in out.outputs]
        assert scores == sorted(scores, reverse=True)
    assert_no_leaks(llm)
    best = llm.generate(PROMPTS[0], beam(n=1))[0].outputs   # n=1 of 4 beams: the best one
    assert len(best) == 1 and best[0].token_ids == hf_beams[PROMPTS[0]][0]


def test_beam_search_mixed_with_other_requests(llm, hf_beams):
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    prompts = [p for p in PROMPTS for _ in range(2)]
    params = [beam(), greedy] * len(PROMPTS)
    outs = llm.generate(prompts, params)
    for i, prompt in enumerate(PROMPTS):
        assert [o.token_ids for o in outs[2 * i].outputs] == hf_beams[prompt]
        assert outs[2 * i + 1].outputs[0].token_ids == alone[i]
    assert llm.engine.stats.max_batch_size > 4   # beams and greedy requests shared steps
    assert_no_leaks(llm)


def test_abort_releases_every_block(llm):
    engine = llm.engine
    engine.add_request("beam-abort", PROMPTS[1], beam())
    for _ in range(5):
        engine.step()
    assert engine.scheduler.block_manager.num_free_blocks < engine.num_kv_blocks
    assert len(engine.scheduler.running) == 4   # four live beams
    engine.abort_request("beam-abort")
    assert_no_leaks(llm)


def test_beam_search_api_and_stops(llm, hf_beams):
    [res] = llm.beam_search([{"prompt": PROMPTS[2]}], BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS))
    ids = llm.tokenizer.encode(PROMPTS[2])
    assert [s.tokens for s in res.sequences] == [ids + h for h in hf_beams[PROMPTS[2]]]
    assert res.sequences[0].text.startswith(PROMPTS[2])
    out = llm.generate(PROMPTS[0], beam(n=2, stop=["."]))[0]
    assert out.outputs[0].text == " Paris" and out.outputs[0].stop_reason == "."   # a stop string ends a beam
    assert all("." not in o.text for o in out.outputs)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, use_beam_search=True, n=2, max_tokens=3))[0]
    assert all(len(o.token_ids) == 3 and o.finish_reason == "length" for o in out.outputs)
    assert_no_leaks(llm)


def test_preemption_under_a_tiny_kv_cache(hf_beams):
    # 10 blocks of 16 tokens: the 4 beams of one prompt and another request do not fit together, and
    # a 3-token budget cannot run all beams in one step: beams wait for their siblings and get preempted.
    tiny = make_llm(kv_cache_memory=10 * 16 * 46080, max_num_batched_tokens=3, max_num_seqs=6)
    outs = tiny.generate([PROMPTS[1], PROMPTS[0]], [beam(), beam()])
    assert tiny.engine.scheduler.num_preemptions > 0
    for prompt, out in zip([PROMPTS[1], PROMPTS[0]], outs):
        assert [o.token_ids for o in out.outputs] == hf_beams[prompt]
    assert_no_leaks(tiny)


def test_completions_endpoint_returns_the_n_best(llm, hf_beams):
    # Last in this file: the server's engine thread takes over the module's engine.
    from fastapi.testclient import TestClient

    from scaleinfer.engine.async_engine import AsyncEngine
    from scaleinfer.serving.app import build_app
    from scaleinfer.serving.generation import ServerConfig

    engine = AsyncEngine(engine=llm.engine)
    with TestClient(build_app(engine, ServerConfig(served_model_name="smol"))) as client:
        body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "n": 2, "best_of": 4, "use_beam_search": True}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in r.json()["choices"]]
        assert texts == [llm.tokenizer.decode(h) for h in hf_beams[PROMPTS[0]][:2]]
        r = client.post("/v1/completions", json={**body, "temperature": 0.8})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
