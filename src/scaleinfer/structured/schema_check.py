"""Contradictions in a JSON schema that xgrammar compiles without complaint, found before generation.

xgrammar refuses empty ranges, empty enums, minLength > maxLength and the like itself (compiler.py turns
that into a RequestError). It accepts a few schemas no JSON value satisfies, or keywords it cannot
enforce, and would then constrain the output to something that does not validate (or dead-end mid
generation). Those are found here, walking every subschema:

- `not`: unsupported (a grammar cannot exclude a language); refused rather than silently ignored;
- `const` / `enum` values none of which has the schema's `type`;
- `required` properties that `additionalProperties: false` forbids (not in `properties`);
- `allOf` members whose `type`s have nothing in common.
"""
from __future__ import annotations

_CHILD_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_CHILD_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_CHILD_ONE = ("items", "additionalProperties", "contains", "propertyNames", "additionalItems")
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")


def schema_problem(schema, path: str = "#") -> str | None:
    """The first contradiction or unsupported keyword in `schema` (a parsed JSON schema), else None."""
    if not isinstance(schema, dict):
        return None
    if "not" in schema:
        return f"{path}: the keyword 'not' is not supported (a grammar cannot exclude a schema)"
    types = _types(schema.get("type"))
    if types is not None and "const" in schema and not _has_type(schema["const"], types):
        return f"{path}: const {schema['const']!r} is not of type {schema['type']}"
    if types is not None and isinstance(schema.get("enum"), list) and schema["enum"] \
            and not any(_has_type(v, types) for v in schema["enum"]):
        return f"{path}: no enum value is of type {schema['type']}"
    if schema.get("additionalProperties") is False and isinstance(schema.get("required"), list):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        missing = [r for r in schema["required"] if r not in props and not schema.get("patternProperties")]
        if missing:
            return f"{path}: required {missing} are forbidden by additionalProperties: false"
    if isinstance(schema.get("allOf"), list):
        common = set(_TYPES) if types is None else set(types)
        for member in schema["allOf"]:
            member_types = _types(member.get("type")) if isinstance(member, dict) else None
            if member_types is not None:
                common &= set(member_types) | ({"integer"} if "number" in member_types else set())
        if not common:
            return f"{path}: the allOf members' types have nothing in common"
    for key in _CHILD_MAPS:
        if isinstance(schema.get(key), dict):
            for name, child in schema[key].items():
                if (problem := schema_problem(child, f"{path}/{key}/{name}")) is not None:
                    return problem
    for key in _CHILD_LISTS:
        if isinstance(schema.get(key), list):
            for i, child in enumerate(schema[key]):
                if (problem := schema_problem(child, f"{path}/{key}/{i}")) is not None:
                    return problem
    for key in _CHILD_ONE:
        if (problem := schema_problem(schema.get(key), f"{path}/{key}")) is not None:
            return problem
    return None


def _types(value) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    return None


def _has_type(value, types: list[str]) -> bool:
    for t in types:
        if t == "string" and isinstance(value, str):
            return True
        if t == "boolean" and isinstance(value, bool):
            return True
        if t == "null" and value is None:
            return True
        if t == "object" and isinstance(value, dict):
            return True
        if t == "array" and isinstance(value, list):
            return True
        if isinstance(value, bool):
            continue
        if t == "integer" and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return True
        if t == "number" and isinstance(value, (int, float)):
            return True
        if t not in _TYPES:
            return True   # xgrammar reports unknown types itself
    return False
