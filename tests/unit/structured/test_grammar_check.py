"""structured/grammar_check.py: the productive-rule fixpoint on xgrammar's normalized grammar text, and the
compiler refusing grammars / schemas with no finite derivation (a RequestError, a 400 on the server) while
recursive grammars that can stop still compile."""
from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from scaleinfer.errors import RequestError
from scaleinfer.sampling_params import StructuredOutputsParams
from scaleinfer.structured.compiler import GrammarCompiler
from scaleinfer.structured.grammar_check import parse_rules, productive_rules, unproductive_rules


def endless(ebnf: str) -> list[str]:
    return unproductive_rules(str(xgr.Grammar.from_ebnf(ebnf)))


@pytest.mark.parametrize("ebnf, rules", [
    ('root ::= "a" root', ["root"]),
    ('root ::= "a" b\nb ::= "c" root | "d" b', ["root", "b"]),                  # mutual recursion, no exit
    ('root ::= "a" b\nb ::= c\nc ::= b', ["root", "b", "c"]),                     # a cycle of bare references
    ('root ::= "x" | "a" b\nb ::= "c" b', ["b"]),                                 # root can stop; b is a trap
    ('root ::= x*\nx ::= "a" x', ["x"]),                                          # x* stops, but x never does
    ('root ::= "a" root{2,3}', ["root"]),                                         # at least two endless copies
    ('root ::= [a-z] root', ["root"]),                                            # a char class does not stop it
])
def test_rules_that_can_never_finish_are_found(ebnf, rules):
    assert set(endless(ebnf)) >= set(rules) and endless(ebnf)[0] == rules[0]


@pytest.mark.parametrize("ebnf", [
    'root ::= "a" root | "b"',
    'root ::= "a" b\nb ::= "c" root | "d"',                                       # mutual recursion with an exit
    'root ::= [a-z]* "x" | ("q"+ root)?',                                          # star / plus / optional forms
    'root ::= ("a" | "b")+ c?\nc ::= "(" c ")" | ""',
    'root ::= x*\nx ::= "a" x | "b"',
    'root ::= "a" [^\\x00-\\U0010FFFF]',                                          # empty class: a terminal here
    'root ::= [\\]\\-"] root | "\\"" | [^"]',                                     # escapes inside classes / strings
    'root ::= "x" unused\nunused ::= "y"\nlost ::= "z" lost',                     # unreachable endless rule
])
def test_grammars_that_can_finish_pass(ebnf):
    assert endless(ebnf) == []


def test_the_fixpoint_needs_more_than_one_pass():
    text = str(xgr.Grammar.from_ebnf('root ::= a\na ::= "x" b | "y" a\nb ::= "z" c\nc ::= "w"'))
    rules = parse_rules(text)
    assert productive_rules(rules) >= {"root", "a", "b", "c"}
    assert productive_rules({"a": ("r", "b"), "b": ("alt", [("r", "a"), ("t",)])}) == {"a", "b"}
    assert productive_rules({"a": ("r", "b"), "b": ("seq", [("r", "a"), ("t",)])}) == set()


def test_unreadable_rules_count_as_productive():
    assert parse_rules('root ::= TagDispatch(("<a>", x))\nx ::= "b"')["root"] is None
    assert unproductive_rules('root ::= Token(1, 2) root') == []
    assert unproductive_rules('root ::= "a" root\n') == ["root"]


@pytest.mark.parametrize("regex", ["a+b*", "(ab)*c", r"\d{3}-\d{4}", "[a-z]{2,5}|x?"])
def test_regexes_have_finite_matches(regex):
    assert unproductive_rules(str(xgr.Grammar.from_regex(regex))) == []


SELF = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}
ENDLESS_SCHEMAS = {
    "required self property": SELF,
    "non-empty array of itself": {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    "optional property of an endless type": {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}},
                                             "$defs": {"N": {"type": "object", "required": ["next"],
                                                             "properties": {"next": {"$ref": "#/$defs/N"}}}}},
}
FINITE_SCHEMAS = [
    {"type": "object", "properties": {"child": {"$ref": "#"}}},
    {"type": "array", "items": {"$ref": "#"}},
    {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["a"]},
]


@pytest.fixture(scope="module")
def compiler(smollm2_tokenizer):
    return GrammarCompiler(smollm2_tokenizer, smollm2_tokenizer.vocab_size, max_threads=1)


@pytest.mark.parametrize("name", list(ENDLESS_SCHEMAS))
def test_endless_schemas_are_refused_with_one_line(compiler, name):
    with pytest.raises(RequestError, match="JSON schema has (a part with )?no finite instance") as err:
        compiler.compile(StructuredOutputsParams(json=ENDLESS_SCHEMAS[name]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("schema", FINITE_SCHEMAS)
def test_recursive_schemas_that_can_stop_compile(compiler, schema):
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(schema))) is not None


@pytest.mark.parametrize("ebnf, words", [
    ('root ::= "a" root', "has no finite output: rule 'root' can never finish"),
    ('root ::= "a" b\nb ::= "c" root | "d" b', "has no finite output"),
    ('root ::= "x" | "a" b\nb ::= "c" b', "can run forever: rule 'b'"),
])
def test_endless_grammars_are_refused_naming_the_rule(compiler, ebnf, words):
    with pytest.raises(RequestError, match=words) as err:
        compiler.compile(StructuredOutputsParams(grammar=ebnf))
    assert str(err.value).startswith("the structured output grammar (EBNF)") and "\n" not in str(err.value)


def test_a_refused_grammar_is_not_cached_and_a_good_one_still_compiles(compiler):
    for _ in range(2):
        with pytest.raises(RequestError):
            compiler.compile(StructuredOutputsParams(grammar='root ::= "a" root'))
    assert compiler.compile(StructuredOutputsParams(grammar='root ::= "a" root | "b"')) is not None
