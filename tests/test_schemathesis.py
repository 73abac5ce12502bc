"""schemathesis against the live panel's /openapi.json: generated requests, valid and not, never
get a 5xx, and every 4xx is an OpenAI-style JSON error."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import LocalCluster

MAX_TOKENS = 4      # each generated request generates a few tokens at most, so the run stays short


@pytest.fixture(scope="module")
def live(broker, tmp_path_factory):
    c = LocalCluster(broker, tmp_path_factory.mktemp("schema")).start(1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live):
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and not isinstance(case.body.get(key), bool):
                case.body[key] = max(1, min(case.body[key], MAX_TOKENS))
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = MAX_TOKENS
    response = case.call(timeout=30)
    assert response.status_code < 500, response.text
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert error["message"] and error["type"]
    # the cluster is still whole after each example
    assert live.health()["ready"] is True
