"""The deploy files agree with the app: port, health path, data path, start command; and
the wheel built from the repo installs into a clean virtualenv and serves /healthz."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

import httpx
import yaml

from bridge.app import create_app
from bridge.config import load_settings
from tests.conftest import free_port

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
FLY = tomllib.loads((ROOT / "fly.toml").read_text())
RENDER = yaml.safe_load((ROOT / "render.yaml").read_text())["services"][0]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", DOCKERFILE, re.M | re.S):
        for key, value in re.findall(r"(\w+)=(\S+)", block):
            env[key] = value
    return env


def test_the_image_runs_serve_as_a_non_root_user_on_port_with_a_healthcheck() -> None:
    assert 'CMD ["millimetric-bridge", "serve"]' in DOCKERFILE
    # The entrypoint (tests/test_entrypoint.py) drops from root to BRIDGE_USER, the user the
    # image creates, and gives it BRIDGE_DATA_DIR, the data path.
    assert 'ENTRYPOINT ["bridge-entrypoint"]' in DOCKERFILE
    assert "COPY --chmod=755 deploy/entrypoint.sh /usr/local/bin/bridge-entrypoint" in DOCKERFILE
    env = dockerfile_env()
    assert env["BRIDGE_USER"] != "root"
    assert re.search(rf"^RUN useradd .* {env['BRIDGE_USER']} ", DOCKERFILE, re.M)
    assert env["BRIDGE_DATA_DIR"] == "/data"
    assert env["PORT"] == "8000"
    assert f"EXPOSE {env['PORT']}" in DOCKERFILE
    assert "/healthz" in DOCKERFILE.split("HEALTHCHECK", 1)[1]
    assert "FROM python:3.11-slim AS build" in DOCKERFILE  # multi-stage, slim


def test_one_data_path_everywhere() -> None:
    settings = load_settings({"MILLIMETRIC_KEY": "sk_a_b_c", **dockerfile_env()})
    data = str(settings.sqlite_path.parent) if settings.sqlite_path else ""
    assert data == "/data"
    assert 'VOLUME ["/data"]' in DOCKERFILE
    assert FLY["mounts"][0]["destination"] == data
    assert FLY["env"]["BRIDGE_DATABASE_URL"] == dockerfile_env()["BRIDGE_DATABASE_URL"]
    assert RENDER["disk"]["mountPath"] == data
    render_env = {e["key"]: e.get("value") for e in RENDER["envVars"]}
    assert render_env["BRIDGE_DATABASE_URL"] == dockerfile_env()["BRIDGE_DATABASE_URL"]


def test_ports_and_health_paths_agree_with_the_app(tmp_path: Path) -> None:
    port = dockerfile_env()["PORT"]
    assert str(FLY["http_service"]["internal_port"]) == port == FLY["env"]["PORT"]
    render_env = {e["key"]: e.get("value") for e in RENDER["envVars"]}
    assert render_env["PORT"] == port
    assert FLY["http_service"]["auto_stop_machines"] == "off"  # the forwarder keeps running
    assert FLY["http_service"]["min_machines_running"] >= 1
    health = {c["path"] for c in FLY["http_service"]["checks"]} | {RENDER["healthCheckPath"]}
    app = create_app(
        load_settings(
            {"MILLIMETRIC_KEY": "sk_a_b_c", "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/b.db"}
        ),
        sources={},
    )
    assert health == {"/healthz"}
    assert "/healthz" in {route.path for route in app.routes}
    secrets = {e["key"] for e in RENDER["envVars"] if e.get("sync") is False}
    assert {"MILLIMETRIC_KEY", "STRIPE_WEBHOOK_SECRET"} <= secrets


def test_the_wheel_installs_into_a_clean_virtualenv_and_serves(tmp_path: Path) -> None:
    """The steps the Dockerfile runs: build the wheel, install it, start serve."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, ROOT],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("millimetric_bridge-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", wheel], check=True, timeout=600)
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "MILLIMETRIC_KEY": "sk_live_abc_def",
        "PORT": str(port),
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/data/bridge.db",
    }
    proc = subprocess.Popen(
        [env_dir / "bin" / "millimetric-bridge", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert answer.json() == {"status": "ok"}
        handlers = subprocess.run(
            [env_dir / "bin" / "millimetric-bridge", "handlers"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "stripe" in handlers.stdout  # built-in handlers and their samples ship
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_the_grafana_dashboard_shows_series_the_bridge_exports() -> None:
    import json

    from bridge import metrics

    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    from prometheus_client.metrics import MetricWrapperBase

    exported = {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    used = set(re.findall(r"bridge_[a-z_]+", exprs))
    for series in used - {"bridge_http_request_duration_seconds_bucket"}:
        assert series.removesuffix("_total") in exported, series
    assert exported <= {s.removesuffix("_total") for s in used}  # every series is shown
