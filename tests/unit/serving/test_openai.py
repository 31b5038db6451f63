"""serving.openai: OpenAI bodies -> SamplingParams, engine outputs -> response JSON and stream deltas."""
from __future__ import annotations

import pytest

from scaleinfer.errors import RequestError
from scaleinfer.request import CompletionOutput, RequestOutput
from scaleinfer.serving import openai as oai
from scaleinfer.serving.protocol import ChatCompletionRequest, CompletionRequest

MSGS = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=kw.pop("messages", MSGS), **kw)


def test_completion_defaults_follow_openai():
    p = oai.sampling_params(CompletionRequest(prompt="x"), num_prompt_tokens=5, max_model_len=100)
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs, p.seed) == (16, 1.0, 1.0, 1, None, None)


def test_chat_max_completion_tokens_wins_and_none_means_rest_of_context():
    assert oai.sampling_params(chat(max_tokens=5, max_completion_tokens=7), 10, 100).max_tokens == 7
    assert oai.sampling_params(chat(), 10, 100).max_tokens == 90


def test_max_tokens_is_clamped_to_the_context():
    assert oai.sampling_params(CompletionRequest(prompt="x", max_tokens=500), 90, 100).max_tokens == 10


def test_extras_and_penalties_pass_through():
    p = oai.sampling_params(chat(temperature=0, top_k=5, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5,
                                 frequency_penalty=-0.5, ignore_eos=True, stop=["x"], seed=-1, n=3,
                                 logprobs=True, top_logprobs=2), 10, 100)
    assert (p.temperature, p.top_k, p.min_p, p.repetition_penalty) == (0, 5, 0.1, 1.2)
    assert (p.presence_penalty, p.frequency_penalty, p.ignore_eos, p.stop_strings) == (0.5, -0.5, True, ["x"])
    assert p.n == 3 and p.logprobs == 2 and 0 <= p.seed < 2**63


def test_top_k_of_the_whole_vocabulary_is_off():
    assert oai.sampling_params(chat(top_k=10**12), 10, 100, vocab_size=1000).top_k == 0
    assert oai.sampling_params(chat(top_k=-1), 10, 100, vocab_size=1000).top_k == 0
    assert oai.sampling_params(chat(top_k=40), 10, 100, vocab_size=1000).top_k == 40


def test_chat_logprobs_without_top_logprobs_is_zero_top():
    assert oai.sampling_params(chat(logprobs=True), 10, 100).logprobs == 0
    assert oai.sampling_params(chat(), 10, 100).logprobs is None


@pytest.mark.parametrize("req", [
    CompletionRequest(prompt="x", echo=True), CompletionRequest(prompt="x", suffix="y"),
    CompletionRequest(prompt="x", best_of=3), CompletionRequest(prompt="x", logit_bias={"5": 1.0}),
    chat(functions=[{"name": "f"}]), chat(function_call="auto"),   # tools, tool_choice, response_format: tools.py
    chat(modalities=["audio"]), chat(top_logprobs=3),
])
def test_unsupported_fields_are_refused_by_name(req):
    with pytest.raises(RequestError):
        oai.refuse_unsupported(req)


def test_supported_no_ops_are_accepted():
    oai.refuse_unsupported(CompletionRequest(prompt="x", best_of=1, logit_bias={}))
    oai.refuse_unsupported(chat(tool_choice="none", response_format={"type": "text"}, modalities=["text"]))


def test_chat_messages_roles_and_parts():
    req = chat(messages=[{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "assistant", "content": None}])
    assert oai.chat_messages(req.messages) == [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "a\nb"},
                                               {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("msg", [
    {"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "wizard", "content": "x"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]},
])
def test_chat_messages_refuse_what_we_cannot_render(msg):
    with pytest.raises(RequestError):
        oai.chat_messages(chat(messages=[msg]).messages)


def test_completion_prompt_forms():
    assert oai.completion_prompts(CompletionRequest(prompt="a")) == ["a"]
    assert oai.completion_prompts(CompletionRequest(prompt=["a", "b"])) == ["a", "b"]
    assert oai.completion_prompts(CompletionRequest(prompt=[1, 2])) == [[1, 2]]
    assert oai.completion_prompts(CompletionRequest(prompt=[[1], [2]])) == [[1], [2]]
    with pytest.raises(RequestError):
        oai.completion_prompts(CompletionRequest(prompt=[]))


def _out(texts, finished, logprobs=False) -> RequestOutput:
    outs = []
    for i, t in enumerate(texts):
        ids = list(range(10, 10 + len(t)))
        lps = [{tid: -0.5, 99: -0.1, 98: -2.0} for tid in ids] if logprobs else None
        outs.append(CompletionOutput(i, t, ids, "stop" if finished else None, logprobs=lps))
    return RequestOutput("r", None, [1, 2, 3], outs, finished)


def test_stream_cursor_yields_only_new_text_and_finishes_once():
    cur = oai.StreamCursor()
    assert [(d.index, d.text) for d in cur.deltas(_out(["a", "x"], False))] == [(0, "a"), (1, "x")]
    assert [(d.index, d.text) for d in cur.deltas(_out(["ab", "x"], False))] == [(0, "b")]
    final = cur.deltas(_out(["abc", "x"], True))
    assert [(d.index, d.text, d.finish_reason) for d in final] == [(0, "c", "stop"), (1, "", "stop")]
    assert cur.deltas(_out(["abc", "x"], True)) == []


def test_stream_cursor_holds_tokens_without_text_until_text_comes():
    cur = oai.StreamCursor()
    held = _out([""], False)
    held.outputs[0].token_ids = [7]
    assert cur.deltas(held) == []
    (d,) = cur.deltas(_out(["é"], False))
    assert (d.text, d.token_start, d.token_stop) == ("é", 0, 1)


def test_stream_cursor_offsets_choices_of_later_prompts():
    cur = oai.StreamCursor()
    assert [d.index for d in cur.deltas(_out(["a", "b"], False), base_index=2)] == [2, 3]


def test_bodies_and_usage():
    head = oai.Header("id", 1, "m")
    body = oai.completion_body(head, [_out(["ab"], True), _out(["c"], True)], 0, str)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    chat_body = oai.chat_body(head, _out(["hi", "yo"], True), 0, str)
    assert chat_body["choices"][1]["message"] == {"role": "assistant", "content": "yo"}
    assert chat_body["object"] == "chat.completion"


def test_logprobs_formats():
    out = _out(["ab"], True, logprobs=True).outputs[0]
    legacy = oai.completion_logprobs(out, 0, 2, 1, lambda t: f"<{t}>")
    assert legacy["tokens"] == ["<10>", "<11>"] and legacy["token_logprobs"] == [-0.5, -0.5]
    assert legacy["top_logprobs"][0] == {"<99>": -0.1} and legacy["text_offset"] == [0, 4]
    content = oai.chat_logprobs(out, 1, 2, 2, lambda t: "é")["content"]
    assert len(content) == 1 and content[0]["bytes"] == [195, 169]
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.1, -0.5]
