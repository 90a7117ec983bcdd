"""Start-up refuses bad configuration with one line naming the variable, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bridge.cli import main
from bridge.config import load_settings
from bridge.errors import ConfigError

GOOD = "sk_live_abc123_def456"


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (None, "MILLIMETRIC_KEY: not set"),
        ("", "MILLIMETRIC_KEY: not set"),
        ("pk_live_abc123_def456", "MILLIMETRIC_KEY: is a pk_ browser key"),
        ("rk_live_abc123_def456", "MILLIMETRIC_KEY: is an rk_ read-only key"),
        ("sk_live_abc123", "MILLIMETRIC_KEY: malformed"),
        ("sk-live-abc-def", "MILLIMETRIC_KEY: malformed"),
        ("Bearer sk_live_abc123_def456", "MILLIMETRIC_KEY: malformed"),
    ],
)
def test_serve_refuses_bad_keys(key: str | None, says: str) -> None:
    env = {} if key is None else {"MILLIMETRIC_KEY": key}
    result = CliRunner().invoke(main, ["serve"], env=env | {"MILLIMETRIC_KEY": key or ""})
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"millimetric-bridge: {says}")
    if key:
        assert key not in result.output  # a key is a secret even when it is the wrong one


def test_serve_refusal_from_a_real_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MILLIMETRIC_KEY"}
    env["MILLIMETRIC_KEY"] = "pk_live_abc123_def456"
    done = subprocess.run(
        [Path(sys.executable).parent / "millimetric-bridge", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("millimetric-bridge: MILLIMETRIC_KEY: is a pk_ browser key")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("MILLIMETRIC_HOST", "api.millimetric.ai", "must be an http:// or https:// URL"),
        ("BRIDGE_DATABASE_URL", "mysql://x", "must be sqlite:///PATH or postgresql://"),
        ("BRIDGE_DATABASE_URL", "sqlite:///", "must be sqlite:///PATH"),
        ("PORT", "eighty", "must be a port number"),
        ("PORT", "70000", "must be between 1 and 65535"),
        ("BRIDGE_LOG_LEVEL", "loud", "must be one of debug, info, warning, error"),
    ],
)
def test_other_variables_are_checked(variable: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings({"MILLIMETRIC_KEY": GOOD, variable: value})
    assert caught.value.variable == variable


def test_defaults_follow_the_contract() -> None:
    settings = load_settings({"MILLIMETRIC_KEY": GOOD})
    assert settings.millimetric_host == "https://api.millimetric.ai"
    assert settings.database_url == "sqlite:///data/bridge.db"
    assert str(settings.sqlite_path) == "data/bridge.db"
    assert settings.port == 8000
    assert settings.admin_token is None
    assert load_settings({"MILLIMETRIC_KEY": GOOD, "PORT": "10000"}).port == 10000
    absolute = load_settings(
        {"MILLIMETRIC_KEY": GOOD, "BRIDGE_DATABASE_URL": "sqlite:////data/bridge.db"}
    )
    assert str(absolute.sqlite_path) == "/data/bridge.db"


def test_commands_without_millimetric_need_no_key() -> None:
    assert load_settings({}, require_key=False).millimetric_key == ""
    with pytest.raises(ConfigError, match="pk_"):
        load_settings({"MILLIMETRIC_KEY": "pk_a_b_c"}, require_key=False)


@pytest.mark.parametrize(
    "command",
    [
        "serve",
        "dev",
        "sink",
        "handlers",
        "send-test",
        "forget",
        "outbox",
        "outbox status",
        "outbox dead",
        "outbox replay",
        "outbox purge",
    ],
)
def test_every_command_has_useful_help(command: str) -> None:
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0
    assert "Usage: main" in result.output or "Usage:" in result.output
    assert len(result.output.splitlines()) >= 4
