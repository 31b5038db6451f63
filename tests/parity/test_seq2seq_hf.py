"""T5 (relu, tied + scaled head; gated-gelu v1.1 style), BART (with forced_bos_token_id) and Marian (with
bad_words_ids=[[pad]]) against HF transformers on tiny random-weight checkpoints HF builds offline: logits
of every decoder step within 1e-4 (where the generation rules leave them finite), identical greedy
and beam-search (num_beams=4) outputs on several inputs, batched equals alone, and a KV cache so small
that requests and beams are preempted still gives the same outputs."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaleinfer import LLM, SamplingParams  # noqa: E402

from tests.parity.seq2seq_tiny import build, load_hf  # noqa: E402

KINDS = ["t5", "t5-gated", "bart", "marian"]
SOURCES = [[5, 6, 7, 8, 9, 10, 11], [20, 30, 40], [7, 81, 7, 64, 7, 33, 12, 19, 90, 4, 55, 21, 60, 3, 17]]
MAX_TOKENS = 10


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    kind = request.param
    path = build(kind, str(tmp_path_factory.mktemp(kind)))
    llm = LLM(path, quantization="none", kv_cache_dtype="float32", max_model_len=64, kv_cache_memory="4MiB")
    eos = llm.tokenizer.eos_token_ids
    assert len(eos) == 1   # the same single stop id on both sides
    sources = [s + list(eos) if kind.startswith("t5") else s for s in SOURCES]   # T5's tokenizer ends with </s>
    return kind, path, llm, load_hf(kind, path), sources


def _cut(row: list[int], eos: tuple[int, ...]) -> list[int]:
    """An HF output row without its decoder start token and padding (EOS kept, as our token_ids keep it)."""
    row = row[1:]
    end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return row[:end]


@torch.inference_mode()
def test_logits_and_greedy_match_hf(pair):
    kind, _, llm, hf, sources = pair
    start = llm.engine.model.decoder_prompt_ids()
    for src in sources:
        rows = []

        def capture(output_ids, logits_row):   # the raw logits row of every step
            rows.append(logits_row.clone())
            return logits_row

        out = llm.generate([src], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logits_processors=[capture]))
        ours = out[0].outputs[0].token_ids
        ref = hf.generate(torch.tensor([src]), do_sample=False, num_beams=1, max_new_tokens=MAX_TOKENS)[0].tolist()
        assert ours == _cut(ref, llm.tokenizer.eos_token_ids), (kind, src)
        decoder = torch.tensor([start + ours[:len(rows) - 1]])
        hf_logits = hf(input_ids=torch.tensor([src]), decoder_input_ids=decoder).logits[0]
        ours_logits = torch.stack(rows)
        banned = ~torch.isfinite(ours_logits)   # the checkpoint's generation rules (models/bart.py)
        if kind == "bart":     # forced_bos_token_id=0: the first row allows <s> only, the others everything
            assert banned[0].sum() == banned.shape[1] - 1 and not banned[0, 0] and not banned[1:].any()
            assert ours_logits[0, 0] == 0.0   # HF's ForcedBOS sets it to 0 too
            banned[0] = True                  # so the first row is no model output to compare
        elif kind == "marian":  # bad_words_ids=[[pad]]
            assert banned[:, -1].all() and banned.sum() == banned.shape[0]
        else:
            assert not banned.any()
        diff = (ours_logits - hf_logits)[~banned].abs().max().item()
        assert diff < 1e-4, f"{kind}: max abs logit diff {diff}"


@torch.inference_mode()
def test_beam_search_matches_hf(pair):
    kind, _, llm, hf, sources = pair
    eos = llm.tokenizer.eos_token_ids
    params = SamplingParams(temperature=0, use_beam_search=True, n=4, max_tokens=MAX_TOKENS)
    outs = llm.generate(sources, params)
    for src, out in zip(sources, outs):
        ref = hf.generate(torch.tensor([src]), do_sample=False, num_beams=4, num_return_sequences=4,
                          max_new_tokens=MAX_TOKENS).tolist()
        assert [o.token_ids for o in out.outputs] == [_cut(r, eos) for r in ref], (kind, src)
    bm = llm.engine.scheduler.block_manager
    assert not any(bm.ref_counts) and bm.num_free_blocks == llm.engine.num_kv_blocks


def test_batched_equals_alone_and_preemption(pair):
    kind, path, llm, _, sources = pair
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    beam = SamplingParams(temperature=0, use_beam_search=True, n=2, best_of=3, max_tokens=MAX_TOKENS)
    alone = [llm.generate([s], p)[0] for s in sources for p in (greedy, beam)]
    batched = llm.generate([s for s in sources for _ in (0, 1)], [greedy, beam] * len(sources))
    assert [[o.token_ids for o in r.outputs] for r in batched] == [[o.token_ids for o in r.outputs] for r in alone]
    # 8 blocks of 16 slots: the cross blocks and beams of six requests cannot all stay; an 8-token
    # budget also splits the beams of one request across steps.
    bytes_per_block = 2 * 2 * 4 * 8 * 4 * 16   # K+V, decoder layers, heads, head_dim, fp32, block
    tiny = LLM(path, quantization="none", kv_cache_dtype="float32", max_model_len=64,
               kv_cache_memory=8 * bytes_per_block, max_num_batched_tokens=8)
    squeezed = tiny.generate([s for s in sources for _ in (0, 1)], [greedy, beam] * len(sources))
    assert tiny.engine.scheduler.num_preemptions > 0
    assert [[o.token_ids for o in r.outputs] for r in squeezed] == [[o.token_ids for o in r.outputs] for r in alone]
    bm = tiny.engine.scheduler.block_manager
    assert not any(bm.ref_counts) and bm.num_free_blocks == tiny.engine.num_kv_blocks
