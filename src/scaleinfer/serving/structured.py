"""The structured-output fields of an OpenAI / vLLM request body -> StructuredOutputsParams.

Accepted (one of them per request): OpenAI's `response_format` ({"type": "json_object"} or
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and its newer `structured_outputs` object
({"json" | "regex" | "choice" | "grammar" | "json_object": ..., "disable_any_whitespace": bool}).
The schema is enforced whatever `strict` says. Pure translation: errors are RequestErrors (400).
"""
from __future__ import annotations

from scaleinfer.errors import RequestError
from scaleinfer.sampling_params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def structured_params(body) -> StructuredOutputsParams | None:
    """What the body asks its output to match, None for free text; RequestError for a malformed or
    contradictory request (two ways at once)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    whitespace = _any_whitespace(body)
    fmt = _response_format(getattr(body, "response_format", None), whitespace)
    if fmt is not None:
        found.append(("response_format", fmt))
    for field, kind in _GUIDED.items():
        value = getattr(body, field, None)
        if value is not None:
            found.append((field, StructuredOutputsParams(**{kind: value}, any_whitespace=whitespace)))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        found.append(("structured_outputs", _structured_outputs(so, whitespace)))
    if len(found) > 1:
        raise RequestError(f"{found[0][0]} and {found[1][0]} both constrain the output; send one of them")
    return found[0][1] if found else None


def _any_whitespace(body) -> bool:
    so = getattr(body, "structured_outputs", None)
    if isinstance(so, dict) and "disable_any_whitespace" in so:
        if not isinstance(so["disable_any_whitespace"], bool):
            raise RequestError("structured_outputs.disable_any_whitespace must be true or false")
        return not so["disable_any_whitespace"]
    return False


def _response_format(fmt: dict | None, any_whitespace: bool) -> StructuredOutputsParams | None:
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, any_whitespace=any_whitespace)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError("response_format json_schema needs a json_schema object: "
                               "{\"name\": ..., \"schema\": {...}, \"strict\": true}")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise RequestError(f"response_format.json_schema.strict must be true or false, got {strict!r}")
        return StructuredOutputsParams(json=schema, any_whitespace=any_whitespace)
    raise RequestError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")


def _structured_outputs(value, any_whitespace: bool) -> StructuredOutputsParams:
    if not isinstance(value, dict):
        raise RequestError("structured_outputs must be an object such as {\"json\": {...}} or {\"regex\": \"...\"}")
    kinds = {k: v for k, v in value.items() if k in _STRUCTURED_KEYS and v not in (None, False)}
    return StructuredOutputsParams(**kinds, any_whitespace=any_whitespace)
