"""Schemathesis against the server's own OpenAPI schema (issue 16): every endpoint gets requests generated from
its request model, valid ones and ones that break it, and every answer must be one the schema documents
(status, content type, body), never a 500. A tiny random model serves on 127.0.0.1.

$LMFORGE_SCHEMA_EXAMPLES sets the examples per endpoint and mode (CI: 25; `LMFORGE_SCHEMA_EXAMPLES=2000 pytest
tests/test_serve_schema.py` is the long run). The operations are driven here with Hypothesis rather than
through Schemathesis' pytest plugin, whose lazy fixture loading does not run under this pytest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from lmforge.serve import create_app

from .conftest import one_intra_op_thread, tiny_llm, train_tiny_tokenizer
from .serving import serving

EXAMPLES = int(os.environ.get("LMFORGE_SCHEMA_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema() -> Iterator[schemathesis.BaseSchema]:
    llm = tiny_llm("tiny-llama", train_tiny_tokenizer())
    with one_intra_op_thread(), serving(create_app(llm, request_timeout_s=60)) as base:
        yield schemathesis.openapi.from_url(base + "/openapi.json")


def test_the_schema_has_every_endpoint_with_its_request_model(api_schema):
    operations = {
        (op.method.upper(), op.path): op for op in (r.ok() for r in api_schema.get_all_operations())
    }
    posts = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/apply-template",
        "/v1/embeddings",
        "/v1/classify",
        "/v1/summarize",
        "/v1/explain/attention",
    ]
    assert set(operations) == {("GET", p) for p in ("/v1/models", "/health", "/metrics")} | {
        ("POST", p) for p in posts
    }
    for path in posts:
        assert operations["POST", path].body, path  # a JSON request body with its model's schema
    spec = api_schema.raw_schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):  # JSON, or a stream of server-sent events
        assert set(spec[path]["post"]["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }
    for status in ("400", "413", "422", "429"):  # every error is an OpenAI error object
        error = spec["/v1/embeddings"]["post"]["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_endpoint_answers_as_its_schema_says(api_schema, mode):
    """Every Schemathesis check but one: a request the schema allows may still be refused (a documented 400:
    a prompt too long for the context, an image content part), so a 4xx for valid data is no failure. Every
    endpoint runs even after one fails, so a long run reports all it finds."""
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode == GenerationMode.NEGATIVE and not operation.body:
            continue  # nothing to break in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def answers(case: schemathesis.Case) -> None:
            case.call_and_validate(timeout=60, excluded_checks=[checks.positive_data_acceptance])

        try:
            answers()
        except Exception as e:  # noqa: BLE001 — Hypothesis' falsifying example, with its curl command
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n\n".join(failures)
