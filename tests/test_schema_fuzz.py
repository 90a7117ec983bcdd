"""Schemathesis over the bridge's own OpenAPI schema, against a real running app with the
admin API on: generated requests to every documented route, with and without the admin
token, and none gets a 5xx."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from bridge.app import create_app
from bridge.config import load_settings
from bridge.testing import TEST_SECRET
from tests.conftest import RunningSink, ServerThread

TOKEN = "schema-fuzz-admin-token-0123456789"


def test_no_generated_request_gets_a_server_error(sink: RunningSink, tmp_path: Path) -> None:
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_ADMIN_TOKEN": TOKEN,
        "STRIPE_WEBHOOK_SECRET": TEST_SECRET,
    }
    with ServerThread(create_app(load_settings(env))) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/schema/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        paths = {op.path for op in operations}
        assert {"/webhooks/{source}", "/admin/forget", "/admin/replay", "/admin/dead"} <= paths
        tried: dict[str, set[int]] = {}
        for operation in operations:
            for headers in ({"authorization": f"Bearer {TOKEN}"}, {}):
                fuzz(operation, server.url, headers, tried)
        assert set(tried) == {op.label for op in operations}
        # The token got through: the admin routes answered, not only refused.
        assert 200 in tried["GET /admin/outbox"]
        assert 401 in tried["GET /admin/outbox"]
        assert tried["POST /admin/forget"] & {202, 400}


def fuzz(
    operation: schemathesis.APIOperation,
    base_url: str,
    headers: dict[str, str],
    tried: dict[str, set[int]],
) -> None:
    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, headers=headers)
        case.validate_response(response, checks=[not_a_server_error])
        tried.setdefault(operation.label, set()).add(response.status_code)

    call()
