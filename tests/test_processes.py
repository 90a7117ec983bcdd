"""The commands as a user runs them: real processes, real ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import tasks
from bridge.cli import main as cli_main
from bridge.registry import load_handlers
from tests.conftest import free_port

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited early"
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out.decode()


def test_dev_runs_bridge_and_sink_without_keys(tmp_path: Path) -> None:
    port, sink_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLIMETRIC_", "BRIDGE_"))}
    proc = subprocess.Popen(
        [SCRIPT, "dev", "--port", str(port), "--sink-port", str(sink_port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for(f"http://127.0.0.1:{port}/healthz", proc).json() == {"status": "ok"}
        assert wait_for(f"http://127.0.0.1:{sink_port}/_sink/stats", proc).status_code == 200
        # send-test posts a signed sample; the purchase reaches the sink within a second.
        sent = subprocess.run(
            [
                SCRIPT,
                "send-test",
                "stripe",
                "checkout.session.completed",
                "--url",
                f"http://127.0.0.1:{port}",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.startswith('200 {"ok":true,"result":"accepted"}')
        posted = time.monotonic()
        while True:
            events = httpx.get(f"http://127.0.0.1:{sink_port}/_sink/events").json()["events"]
            if events:
                break
            assert time.monotonic() - posted < 1.0, "the purchase took over a second"
            time.sleep(0.02)
        assert events[0]["body"]["event"] == "purchase"
        assert events[0]["body"]["properties"]["amount_cents"] == 1900
        # The relay takes the dev key: the README's track example, as it is written there.
        relayed = httpx.post(
            f"http://127.0.0.1:{port}/v1/track",
            headers={"authorization": "Bearer sk_dev_local_bridge"},
            json={"event": "signup", "event_id": "signup-u_123", "user_id": "u_123"},
        )
        assert relayed.json() == {"ok": True, "event_id": "signup-u_123"}
        deadline = time.monotonic() + 5
        while not any(
            e["body"].get("event_id") == "signup-u_123"
            for e in httpx.get(f"http://127.0.0.1:{sink_port}/_sink/events").json()["events"]
        ):
            assert time.monotonic() < deadline, "the relayed track did not arrive"
            time.sleep(0.05)
        # Every built-in source is mounted in dev mode, and send-test's every sample is taken.
        (tmp_path / "empty.toml").write_text("")
        runner = CliRunner(env={"BRIDGE_CONFIG": str(tmp_path / "empty.toml")})
        for name, handler in load_handlers().items():
            for event in sorted(handler.samples()):
                result = runner.invoke(
                    cli_main, ["send-test", name, event, "--url", f"http://127.0.0.1:{port}"]
                )
                assert result.exit_code == 0, f"{name} {event}: {result.output}"
                assert result.output.startswith("200 "), f"{name} {event}: {result.output}"
    finally:
        code, out = stop(proc)
    assert code == 0
    assert f"curl http://127.0.0.1:{port}/healthz" in out  # the line saying what to try


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_tasks_dev_stops_with_a_supervisors_sigterm(tmp_path: Path) -> None:
    """`python3 tasks.py dev` under a supervisor (systemd, honcho, an IDE): its SIGTERM
    stops the bridge and the sink, and nothing is left running, orphaned."""
    if not tasks.installed():
        pytest.skip("tasks.py would install the virtualenv first: run `python3 tasks.py test`")
    port, sink_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLIMETRIC_", "BRIDGE_"))}
    env["BRIDGE_DATABASE_URL"] = f"sqlite:///{tmp_path}/bridge.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            tasks.ROOT / "tasks.py",
            "dev",
            "--port",
            str(port),
            "--sink-port",
            str(sink_port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so a failure here kills any orphan
    )
    try:
        assert wait_for(f"http://127.0.0.1:{port}/healthz", proc).json() == {"status": "ok"}
        assert wait_for(f"http://127.0.0.1:{sink_port}/_sink/stats", proc).status_code == 200
        proc.send_signal(signal.SIGTERM)  # to that one process, as a supervisor sends it
        out, _ = proc.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert not listening(port)
    assert not listening(sink_port)


def test_serve_answers_healthz(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MILLIMETRIC_KEY": "sk_live_abc123_def456",
        "PORT": str(port),
        "BRIDGE_HOST": "127.0.0.1",
        "MILLIMETRIC_HOST": "http://127.0.0.1:9",
    }
    proc = subprocess.Popen(
        [SCRIPT, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert wait_for(f"http://127.0.0.1:{port}/healthz", proc).json() == {"status": "ok"}
    finally:
        code, out = stop(proc)
    assert code == 0
    assert '"level": "info"' in out or '"level":"info"' in out  # JSON lines under serve
    assert "sk_live_abc123_def456" not in out
