"""Schema fuzzing with schemathesis against the running server's /openapi.json.

Bodies generated from the published schema (valid ones, and ones that break it on purpose)
are sent over HTTP; every response must be a non-5xx status the schema documents, with the
content type and body shape it documents, and invalid data must be rejected. Bounded: a fixed
number of derandomized examples per operation and mode, and valid bodies get a small
`max_tokens` so the engine work stays small.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 60}


@pytest.fixture(scope="module")
def schema(served):
    return schemathesis.openapi.from_url(served.url + "/openapi.json")


def bound(body: dict, served, real_model: bool, max_tokens: int) -> None:
    """Keeps a valid body cheap to serve; and mostly names the served model, so generation
    reaches past the 404 into the deeper checks."""
    if real_model and isinstance(body.get("model"), str):
        body["model"] = served.model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > max_tokens:
            body[key] = max_tokens
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = max_tokens


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_fuzzed_bodies_never_get_a_server_error(served, schema, path, mode):
    operation = schema[path]["POST"]
    headers = {"Authorization": f"Bearer {served.api_key}"}
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    statuses = []

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        real_model=st.sampled_from([True, True, True, False]),
        max_tokens=st.integers(1, 6),
    )
    def run(case, real_model, max_tokens):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            bound(case.body, served, real_model, max_tokens)
        response = case.call(base_url=served.url, headers=headers, timeout=60)
        statuses.append(response.status_code)
        case.validate_response(response, checks=checks, headers=headers)

    run()
    assert all(s < 500 for s in statuses)
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # valid bodies did reach the engine
    served.wait_idle()
