"""The app's health routes, served for real, with the store and forwarder in its lifespan."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from bridge.app import create_app
from bridge.config import load_settings
from tests.conftest import RunningSink, ServerThread


def test_healthz_and_readyz(sink: RunningSink, tmp_path: Path) -> None:
    settings = load_settings(
        {
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        }
    )
    with ServerThread(create_app(settings)) as server:
        assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        assert ready.json()["forwarding"] == "leader"  # SQLite: the one process forwards


def test_readyz_is_degraded_while_the_key_is_refused(sink: RunningSink, tmp_path: Path) -> None:
    from bridge.forwarder import Forwarder

    httpx.post(f"{sink.url}/_sink/knobs", json={"keys": []}).raise_for_status()
    settings = load_settings(
        {
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": sink.url,
            "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        }
    )
    app = create_app(settings)
    with ServerThread(app) as server:
        forwarder: Forwarder = app.state.forwarder
        # The CLI's forget queues a call; the forwarder meets the refused key with it.
        from click.testing import CliRunner

        from bridge.cli import main

        CliRunner().invoke(
            main, ["forget", "u1"], env={"BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db"}
        )
        deadline = time.monotonic() + 10
        while forwarder.paused is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "degraded"
        assert "invalid_api_key" in ready["reasons"][0]
        assert ready["pending"] == 1
