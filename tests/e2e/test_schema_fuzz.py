"""schemathesis (an API fuzzer none of us wrote) against the server's own OpenAPI schema: every operation,
a bounded number of generated requests each (valid and invalid), and every response must be no 5xx
and conform to the schema (status code documented, content type, body schema, headers).

It drives the real app (routes, validation, gate, error handlers) over ASGI with the fake engine of
tests/unit/serving/fakes.py, not the real model: the engine is not what is fuzzed, and generated bodies
such as max_tokens=null (up to the context) would take the real model seconds each on a busy CPU, where
the fake takes milliseconds. uvicorn's own layer is fuzzed by hand in test_http_guards.py.

One check is left out: positive_data_acceptance (a schema-valid body must get 2xx). Limits no JSON schema
states (the prompt must fit the context, the model's name, n x prompts under the caps, fields we parse
but refuse such as echo=true) rightly answer such bodies 400.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, settings

from scaleinfer.serving.app import build_app
from scaleinfer.serving.generation import ServerConfig
from scaleinfer.serving.limits import ServerLimits

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = 40


def _fakes():
    spec = importlib.util.spec_from_file_location(
        "serving_fakes", Path(__file__).resolve().parents[1] / "unit" / "serving" / "fakes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


APP = build_app(_fakes().FakeAsyncEngine(), ServerConfig(served_model_name="tiny", max_waiting=64,
                                                         limits=ServerLimits(max_seqs_per_request=16)))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
