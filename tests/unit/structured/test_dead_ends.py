"""Grammars that cannot be satisfied: every case detectable at compile time is a RequestError (a 400
on the server) before generation; a dead end that only shows mid-generation marks the state so the
scheduler ends the request with finish_reason "error" / stop_reason "grammar_dead_end"."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from scaleinfer.errors import RequestError
from scaleinfer.request import FinishReason
from scaleinfer.sampling_params import StructuredOutputsParams
from scaleinfer.scheduler import DEAD_END, Scheduler
from scaleinfer.structured.bitmask import GrammarState, advance, fill_bitmask
from scaleinfer.structured.compiler import GrammarCompiler
from scaleinfer.structured.schema_check import schema_problem

UNSATISFIABLE_SCHEMAS = {
    "integer min > max": {"type": "integer", "minimum": 9, "maximum": 1},
    "number min > max": {"type": "number", "minimum": 9, "maximum": 1},
    "exclusive bounds leave no integer": {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
    "no multiple in range": {"type": "integer", "minimum": 1, "maximum": 2, "multipleOf": 5},
    "minLength > maxLength": {"type": "string", "minLength": 5, "maxLength": 2},
    "minItems > maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1},
    "minProperties > maxProperties": {"type": "object", "minProperties": 3, "maxProperties": 1},
    "empty enum": {"enum": []},
    "required item of an empty enum": {"type": "array", "items": {"enum": []}, "minItems": 1},
    "const of another type": {"type": "string", "const": 5},
    "enum of another type": {"type": "integer", "enum": ["a", "b"]},
    "required but forbidden": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"],
                               "additionalProperties": False},
    "allOf of disjoint types": {"allOf": [{"type": "string"}, {"type": "integer"}]},
    "nested contradiction": {"type": "object", "properties": {"a": {"type": "array", "items": {
        "type": "boolean", "const": "yes"}}}},
    "not (unsupported)": {"not": {"type": "string"}},
    "unknown type": {"type": "bogus"},
    "missing $ref": {"$ref": "#/$defs/nope"},
    "bad pattern": {"type": "string", "pattern": "(unclosed"},
}


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return GrammarCompiler(smollm2_tokenizer, smollm2_tokenizer.vocab_size, max_threads=1)


@pytest.mark.parametrize("name", list(UNSATISFIABLE_SCHEMAS))
def test_unsatisfiable_schemas_are_refused_at_compile_time(compiler, name):
    with pytest.raises(RequestError, match="JSON schema"):
        compiler.compile(StructuredOutputsParams(json=UNSATISFIABLE_SCHEMAS[name]))


@pytest.mark.parametrize("spec", [dict(regex="a{3,1}"), dict(regex="[z-a]"), dict(regex="(unclosed"),
                                  dict(regex="a(?=b)"), dict(regex="[^\\x00-\\U0010FFFF]"),
                                  dict(grammar="root ::= nowhere"), dict(grammar='root ::= "a" | '),
                                  dict(grammar="root ::= [^\\x00-\\U0010FFFF]")])
def test_invalid_or_empty_regex_and_grammars_are_refused(compiler, spec):
    with pytest.raises(RequestError):
        compiler.compile(StructuredOutputsParams(**spec))


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer", "const": 3}}, "required": ["a"]},
    {"type": ["integer", "null"], "enum": [None]}, {"type": "number", "enum": [2]},
    {"allOf": [{"type": "number"}, {"type": "integer", "minimum": 0}]},
    {"type": "object", "required": ["x"], "additionalProperties": False, "patternProperties": {"^x$": {}}},
])
def test_satisfiable_schemas_pass_the_check(schema):
    assert schema_problem(schema) is None


def test_a_dead_end_mid_generation_ends_with_error(compiler, smollm2_tokenizer):
    """'a' then a character class that matches nothing: not refused up front (a first token exists), a
    dead end after 'a'. The state is marked; the scheduler's stop check ends the request with "error"."""
    spec = StructuredOutputsParams(grammar='root ::= "a" [^\\x00-\\U0010FFFF]')
    req = SimpleNamespace(grammar=GrammarState(compiler.compile(spec), compiler.stop_token_ids, compiler.vocab_size))
    advance([req], smollm2_tokenizer.encode("a", add_special_tokens=False))
    assert not req.grammar.dead_end
    assert fill_bitmask([req]) is not None and req.grammar.dead_end
    advance([req], [smollm2_tokenizer.eos_token_ids[0]])    # the stop token the mask allowed instead
    params = SimpleNamespace(min_tokens=0, stop_token_ids=[], ignore_eos=False, max_tokens=16)
    fake = SimpleNamespace(sampling_params=params, grammar=req.grammar, num_output_tokens=2, num_tokens=5,
                           eos_token_ids=tuple(smollm2_tokenizer.eos_token_ids))
    sched = SimpleNamespace(config=SimpleNamespace(max_model_len=64))
    assert Scheduler._check_stop(sched, fake, smollm2_tokenizer.eos_token_ids[0]) == (FinishReason.ERROR, DEAD_END)
    fake.grammar = None   # the same token without a dead end: an ordinary EOS stop
    assert Scheduler._check_stop(sched, fake, smollm2_tokenizer.eos_token_ids[0]) == (FinishReason.STOP, None)
