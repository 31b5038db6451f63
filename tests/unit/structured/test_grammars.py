"""structured/: grammar compilation (errors, cache, satisfiability), bitmask fill / apply / advance on a
mixed batch, and the Sampler honouring the mask, on SmolLM2's real vocabulary (no model weights run)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from scaleinfer.errors import RequestError
from scaleinfer.sampler import Sampler, SamplingMetadata
from scaleinfer.sampling_params import SamplingParams, StructuredOutputsParams
from scaleinfer.structured.bitmask import GrammarState, advance, apply_bitmask, fill_bitmask
from scaleinfer.structured.compiler import GrammarCompiler, choice_grammar, spec_key

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return GrammarCompiler(smollm2_tokenizer, smollm2_tokenizer.vocab_size, max_threads=1)


def state(compiler, **spec) -> GrammarState:
    return GrammarState(compiler.compile(StructuredOutputsParams(**spec)), compiler.stop_token_ids,
                        compiler.vocab_size)


def allowed(mask, row: int, vocab_size: int) -> set[int]:
    logits = torch.zeros(mask.bitmask.shape[0], vocab_size)
    apply_bitmask(logits, mask)
    return set(torch.nonzero(logits[row] == 0).flatten().tolist())


@pytest.mark.parametrize("spec", [dict(json=SCHEMA, regex="a"), dict(), dict(choice=[]), dict(choice=["a", ""]),
                                  dict(regex=""), dict(json=5), dict(grammar=3)])
def test_params_need_exactly_one_well_formed_kind(spec):
    with pytest.raises(RequestError):
        StructuredOutputsParams(**spec)


def test_sampling_params_take_vllm_names_and_refuse_ignore_eos():
    spec = StructuredOutputsParams(choice=["x"])
    assert SamplingParams(guided_decoding=spec).structured_outputs is spec
    with pytest.raises(RequestError):
        SamplingParams(structured_outputs=spec, guided_decoding=spec)
    with pytest.raises(RequestError, match="ignore_eos"):
        SamplingParams(structured_outputs=spec, ignore_eos=True)


@pytest.mark.parametrize("spec, words", [
    (dict(json="{not json"), "JSON schema"), (dict(json={"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
    (dict(json={"type": "nonsense"}), "nonsense"), (dict(json={"$ref": "#/$defs/missing"}), "JSON schema"),
    (dict(regex="[a-"), "regex"), (dict(regex="(?=x)y"), "regex"), (dict(grammar="root ::= missing"), "missing"),
    (dict(grammar="no rules here"), "grammar"),
])
def test_invalid_grammars_are_request_errors_naming_the_problem(compiler, spec, words):
    with pytest.raises(RequestError, match=words) as err:
        compiler.compile(StructuredOutputsParams(**spec))
    assert "\n" not in str(err.value) and ".cc:" not in str(err.value)


def test_a_grammar_that_allows_no_first_token_is_refused(compiler):
    with pytest.raises(RequestError, match="cannot be satisfied"):
        compiler.compile(StructuredOutputsParams(grammar='root ::= [^\\x00-\\U0010FFFF]'))


def test_compiled_once_per_distinct_spec(compiler):
    a = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    b = compiler.compile(StructuredOutputsParams(json=json.dumps({"required": ["a"], **SCHEMA})))
    assert a is b   # key order and dict vs text do not matter
    assert compiler.compile(StructuredOutputsParams(json=SCHEMA, any_whitespace=True)) is not a
    assert spec_key(StructuredOutputsParams(regex="a")) != spec_key(StructuredOutputsParams(grammar="a"))


@pytest.mark.parametrize("choice", [['say "hi"', "back\\slash", "two\nlines", "é中"], ["yes", "no", "yes"]])
def test_choice_grammar_accepts_exactly_the_choices(compiler, choice):
    import xgrammar as xgr

    compiled = compiler._compiler.compile_grammar(choice_grammar(choice))
    for text in choice:
        m = xgr.GrammarMatcher(compiled)
        assert m.accept_string(text) and m.is_completed(), text
    m = xgr.GrammarMatcher(compiled)
    assert not (m.accept_string(choice[0] + "x") and m.is_completed())


def test_mixed_batch_masks_only_constrained_rows_and_ends_with_eos(compiler, smollm2_tokenizer):
    tok, vocab = smollm2_tokenizer, compiler.vocab_size
    reqs = [SimpleNamespace(grammar=None), SimpleNamespace(grammar=state(compiler, choice=["yes", "no"])),
            SimpleNamespace(grammar=state(compiler, regex="[0-9]{2}"))]
    mask = fill_bitmask(reqs)
    assert mask.rows == [1, 2]
    assert allowed(mask, 0, vocab) == set(range(vocab))   # unconstrained row untouched
    digits = allowed(mask, 2, vocab)
    assert digits and all(tok.decode([t]).isdigit() for t in digits)
    yes = tok.encode("yes", add_special_tokens=False)
    assert yes == [10407] and yes[0] in allowed(mask, 1, vocab)
    advance(reqs, [0, yes[0], min(digits)])
    advance(reqs[2:], [min(digits)])
    mask = fill_bitmask(reqs)   # "yes" and two digits are complete: only EOS may follow
    assert allowed(mask, 1, vocab) == set(tok.eos_token_ids) == allowed(mask, 2, vocab)
    advance(reqs, [0, tok.eos_token_ids[0], tok.eos_token_ids[0]])
    assert reqs[1].grammar.is_terminated and fill_bitmask(reqs) is None


def test_a_dead_end_allows_the_stop_tokens_instead_of_nothing(compiler, smollm2_tokenizer):
    reqs = [SimpleNamespace(grammar=state(compiler, grammar='root ::= "a" [^\\x00-\\U0010FFFF]'))]
    advance(reqs, smollm2_tokenizer.encode("a", add_special_tokens=False))
    mask = fill_bitmask(reqs)
    assert allowed(mask, 0, compiler.vocab_size) == set(smollm2_tokenizer.eos_token_ids)


def test_sampler_applies_the_mask_before_picking(compiler, smollm2_tokenizer):
    tok, vocab = smollm2_tokenizer, compiler.vocab_size
    reqs = [SimpleNamespace(grammar=state(compiler, choice=["no"])), SimpleNamespace(grammar=None)]
    logits = torch.randn(2, vocab)
    favourite = tok.encode("yes", add_special_tokens=False)[0]
    logits[:, favourite] = 100.0
    starts = {t for t in range(vocab) if tok.decode([t]) and "no".startswith(tok.decode([t]))}
    for params in (SamplingParams(temperature=0.0, min_tokens=3, max_tokens=4),
                   SamplingParams(temperature=1.0, top_p=0.9, seed=7)):
        meta = SamplingMetadata.from_params([params] * 2, [[1], [1]], [[], []], [params.seed] * 2,
                                            tok.eos_token_ids, vocab)
        meta.grammar_mask = fill_bitmask(reqs)
        first, second = Sampler()(logits, meta).sampled_token_ids.tolist()
        assert first in starts and second == favourite


def test_structured_rows_get_no_min_tokens_bans(compiler):
    spec = StructuredOutputsParams(choice=["x"])
    meta = SamplingMetadata.from_params([SamplingParams(min_tokens=2, structured_outputs=spec),
                                         SamplingParams(min_tokens=2)], [[1], [1]], [[], []], [None, None], (0,), 10)
    assert meta.banned_ids.tolist() == [[1], [0]]   # only the unconstrained row's EOS
