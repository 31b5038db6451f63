"""Structured outputs on real weights (SmolLM2-135M and Qwen2.5-Coder-0.5B): every mode on a set of
prompts, greedy and sampled, all in one continuous batch together with unconstrained requests, and
streamed; 100% of outputs must finish by EOS and parse / validate (jsonschema, the regex, the choices)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import xgrammar as xgr

from scaleinfer import LLM, SamplingParams
from scaleinfer.errors import RequestError
from scaleinfer.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "hobbies": {"type": "array", "items": {"enum": ["chess", "music", "sport"]}, "maxItems": 2}}}
ENTITIES = {"type": "object", "required": ["people", "places"],
            "properties": {"people": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
                           "places": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2}}}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
SUM = 'root ::= num " + " num " = " num\nnum ::= [1-9] [0-9]?'
CHOICES = ["positive", "negative", "neutral"]
PROMPTS = ["Describe a person as JSON.", "Ada Lovelace met Charles Babbage in London. Extract the entities.",
           "What is the sentiment of: I loved this film!", "Give me a phone number and an addition."]
MODES = {
    "json": (StructuredOutputsParams(json=PERSON), lambda t: jsonschema.validate(json.loads(t), PERSON)),
    "ner": (StructuredOutputsParams(json=ENTITIES), lambda t: jsonschema.validate(json.loads(t), ENTITIES)),
    "json_object": (StructuredOutputsParams(json_object=True, any_whitespace=False),
                    lambda t: _check(isinstance(json.loads(t), dict), t)),
    "regex": (StructuredOutputsParams(regex=PHONE), lambda t: _check(re.fullmatch(PHONE, t), t)),
    "choice": (StructuredOutputsParams(choice=CHOICES), lambda t: _check(t in CHOICES, t)),
    "grammar": (StructuredOutputsParams(grammar=SUM), lambda t: _check(re.fullmatch(r"[1-9]\d? \+ [1-9]\d? = [1-9]\d?",
                                                                                    t), t)),
}


def _check(ok, text: str) -> None:
    assert ok, f"output {text!r} does not match"


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def llm(request):
    return LLM(request.param, kv_cache_memory="96MiB", max_model_len=512, threads=2)


def test_every_mode_validates_in_one_mixed_batch(llm):
    prompts = PROMPTS if "smollm2" in llm.engine.config.model else PROMPTS[:2]
    jobs = []
    for name, (spec, check) in MODES.items():
        for i, text in enumerate(prompts):
            params = SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=i, max_tokens=64,
                                    structured_outputs=spec)
            jobs.append((llm.render_chat([{"role": "user", "content": text}]), params, name, check))
    free = [(llm.render_chat([{"role": "user", "content": t}]), SamplingParams(temperature=0, max_tokens=12), "free",
             None) for t in prompts[:2]]
    jobs = [j for pair in zip(jobs, free * len(jobs)) for j in pair][:len(jobs) + len(free)]
    outs = llm.generate([j[0] for j in jobs], [j[1] for j in jobs])
    assert llm.engine.stats.max_batch_size >= 8   # constrained and free requests ran together
    for (_, params, name, check), out in zip(jobs, outs):
        c = out.outputs[0]
        if check is None:
            assert c.finish_reason in ("stop", "length") and 0 < len(c.token_ids) <= 12 and c.text
        elif name == "json_object" and c.finish_reason == "length":
            # json_object bounds nothing: a 135M model can ramble inside a string past max_tokens; what it
            # wrote must still be a prefix the grammar accepts
            assert xgr.GrammarMatcher(llm.engine.compile_structured(params)).accept_string(c.text), c.text
        else:
            assert c.finish_reason == "stop", (name, c.text)
            check(c.text)


def test_streamed_outputs_validate_and_equal_the_whole(llm):
    for name in ("json", "regex", "choice"):
        spec, check = MODES[name]
        prompt = llm.render_chat([{"role": "user", "content": PROMPTS[0]}])
        params = SamplingParams(temperature=0, max_tokens=64, structured_outputs=spec)
        outs = list(llm.stream(prompt, params))
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and outs[-1].finished
        check(texts[-1])
        assert texts[-1] == llm.generate(prompt, params)[0].outputs[0].text


def test_n_samples_each_follow_the_grammar(llm):
    prompt = llm.render_chat([{"role": "user", "content": PROMPTS[2]}])
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8,
                                              structured_outputs=MODES["choice"][0]))[0]
    assert len(out.outputs) == 4 and all(c.text in CHOICES and c.finish_reason == "stop" for c in out.outputs)


@pytest.mark.parametrize("spec", [dict(json={"type": "integer", "minimum": 3, "maximum": 1}), dict(regex="(a"),
                                  dict(grammar="root ::= undefined_rule")])
def test_invalid_grammars_are_refused_at_add_and_harm_nothing(llm, spec):
    with pytest.raises(RequestError):
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**spec)))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].finish_reason == "length"


def test_a_dead_end_mid_generation_finishes_with_error_not_a_fake_stop(llm):
    """A grammar with a dead end after "a" (not detectable from its first step): the request ends
    with finish_reason "error" and stop_reason "grammar_dead_end", its text what the grammar allowed."""
    spec = StructuredOutputsParams(grammar='root ::= "a" [^\\x00-\\U0010FFFF]')
    out = llm.generate("Say a.", SamplingParams(temperature=0, max_tokens=8, structured_outputs=spec))[0].outputs[0]
    assert (out.finish_reason, out.stop_reason, out.text) == ("error", "grammar_dead_end", "a")
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("spec, words", [
    (dict(grammar='root ::= "a" root'), "grammar \\(EBNF\\) has no finite output"),
    (dict(grammar='root ::= "x" | "a" b\nb ::= "c" b'), "can run forever: rule 'b'"),
    (dict(json={"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}),
     "JSON schema has no finite instance"),
])
def test_grammars_with_no_finite_output_are_refused_before_generation(llm, spec, words):
    """Refused when added, with a one-line message, instead of generating until max_tokens; the engine is
    left clean and the next (recursive but finite) grammar is served."""
    params = SamplingParams(temperature=0, max_tokens=32, structured_outputs=StructuredOutputsParams(**spec))
    with pytest.raises(RequestError, match=words) as err:
        llm.generate("Say a.", params)
    assert "\n" not in str(err.value) and not llm.engine.has_unfinished_requests()
    finite = StructuredOutputsParams(grammar='root ::= "a" root | "b"')
    out = llm.generate("Say b.", SamplingParams(temperature=0, max_tokens=8, structured_outputs=finite))[0].outputs[0]
    assert re.fullmatch("a*b?", out.text) and (out.finish_reason == "stop") == out.text.endswith("b")
