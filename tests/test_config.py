"""Start-up refuses bad configuration with one line naming the variable, exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bridge.cli import main
from bridge.config import load_settings
from bridge.errors import ConfigError
from tests.conftest import free_port

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
        ("sk__a_b", "MILLIMETRIC_KEY: malformed"),  # an empty part
        ("xk_a_b_c", "MILLIMETRIC_KEY: malformed"),
        ("sk_live_a b_c", "MILLIMETRIC_KEY: malformed"),
        ("sk_live_a_b\n", "MILLIMETRIC_KEY: malformed"),
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


@pytest.mark.parametrize("key", ["sk_live_a_b_c", "sk_test_ab-cd_x_y", "sk_1_2_3", "sk_a_b_c!~"])
def test_serve_takes_any_key_in_the_published_format(key: str) -> None:
    # `(pk|sk|rk)_*_*_*`: each part non-empty, underscores and dashes included.
    assert load_settings({"MILLIMETRIC_KEY": key}).millimetric_key == key


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
        ("BRIDGE_HEADER_TIMEOUT_SECONDS", "0", "must be a number above 0"),
        ("BRIDGE_HEADER_TIMEOUT_SECONDS", "soon", "must be a number"),
        ("BRIDGE_KEEPALIVE_SECONDS", "2.5", "must be a whole number"),
        ("BRIDGE_KEEPALIVE_SECONDS", "0", "must be at least 1"),
        ("BRIDGE_MAX_CONNECTIONS", "-5", "must be at least 1"),
        ("BRIDGE_MAX_CONNECTIONS", "lots", "must be a whole number"),
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
    assert (settings.header_timeout, settings.keepalive_timeout) == (10.0, 5)
    assert (settings.body_timeout, settings.max_connections) == (30.0, 2000)
    assert load_settings({"MILLIMETRIC_KEY": GOOD, "PORT": "10000"}).port == 10000
    absolute = load_settings(
        {"MILLIMETRIC_KEY": GOOD, "BRIDGE_DATABASE_URL": "sqlite:////data/bridge.db"}
    )
    assert str(absolute.sqlite_path) == "/data/bridge.db"


def test_commands_without_millimetric_need_no_key() -> None:
    assert load_settings({}, require_key=False).millimetric_key == ""
    with pytest.raises(ConfigError, match="pk_"):
        load_settings({"MILLIMETRIC_KEY": "pk_a_b_c"}, require_key=False)


def commands(group: click.Group = main, prefix: str = "") -> list[str]:
    """Every command and subcommand, as typed after `millimetric-bridge`."""
    found = []
    for name, command in sorted(group.commands.items()):
        found.append(f"{prefix}{name}")
        if isinstance(command, click.Group):
            found += commands(command, f"{prefix}{name} ")
    return found


def test_the_commands_listed_are_the_documented_ones() -> None:
    assert {"serve", "dev", "sink", "forget", "outbox status", "outbox replay"} <= set(commands())


@pytest.mark.parametrize("command", commands())
def test_every_command_has_useful_help(command: str) -> None:
    result = CliRunner().invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0
    usage, _, rest = result.output.partition("\n")
    assert usage.startswith(f"Usage: main {command} ")
    # What it does, in words (its docstring), before the options.
    described = rest.split("Options:")[0].split()
    assert len(described) >= 5, result.output
    # And its line in its group's list of commands says so too.
    *parent, name = command.split()
    listing = CliRunner().invoke(main, [*parent, "--help"]).output
    (line,) = [line.split() for line in listing.splitlines() if line.split()[:1] == [name]]
    assert len(line) >= 3, listing


# -- refusals by the real command: one line on stderr, exit code 2, never the password ----

SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
PASSWORD = "s3cr%t#p/ss"  # unencoded %, # and /; "s3cr" is in every spelling of it
ENCODED = "s3cr%25t%23p%2Fss"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory holding the wrong things a variable could point at."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    (tmp_path / "bad.toml").write_text("[sources.x\nhandler = ")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    return tmp_path


def refused(workdir: Path, command: str, **variables: str) -> str:
    """Run `millimetric-bridge COMMAND` as an operator would, with `variables` set; check
    that it refused as the README promises, and return its one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLIMETRIC_", "BRIDGE_"))}
    env |= {"MILLIMETRIC_KEY": GOOD, **variables}
    args = command.split()
    if args[0] == "dev":
        args += ["--port", str(free_port()), "--sink-port", str(free_port())]
    done = subprocess.run(
        [SCRIPT, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stdout == ""  # nothing started, nothing printed before the refusal
    assert "s3cr" not in done.stderr
    return done.stderr.strip()


UNREACHABLE = "cannot connect to PostgreSQL at postgresql://bridge@127.0.0.1:1/bridge: "
BAD_DATABASE_URLS = [
    (f"postgresql://bridge:{PASSWORD}@127.0.0.1/bridge", "is not a PostgreSQL URL that libpq"),
    ("postgresql://bridge:s3cr/p/ss@127.0.0.1/bridge", "is not read as meant"),
    ("postgresql://bridge:s3cr@p@127.0.0.1/bridge", "is not read as meant"),
    ("postgresql://bridge:s3cr p@127.0.0.1/bridge", "is not a PostgreSQL URL that libpq"),
    (f"postgresql://bridge:{ENCODED}@127.0.0.1:1/bridge", UNREACHABLE),
    ("postgresql://bridge:s3cr#p?ss@127.0.0.1:1/bridge", UNREACHABLE),  # libpq reads this one
    ("sqlite:///adir", "adir is a directory; name a file in it"),
    ("sqlite:///afile/bridge.db", "cannot create afile/bridge.db: afile is not a directory"),
]


@pytest.mark.parametrize(("url", "says"), BAD_DATABASE_URLS)
def test_serve_refuses_a_database_url_that_cannot_work(workdir: Path, url: str, says: str) -> None:
    line = refused(workdir, "serve", BRIDGE_DATABASE_URL=url)
    assert line.startswith(f"millimetric-bridge: BRIDGE_DATABASE_URL: {says}")


@pytest.mark.parametrize("command", ["dev", "outbox status", "forget u1"])
@pytest.mark.parametrize(("url", "says"), [BAD_DATABASE_URLS[i] for i in (0, 4, 6)])
def test_every_command_that_opens_the_outbox_refuses_the_same_way(
    workdir: Path, command: str, url: str, says: str
) -> None:
    line = refused(workdir, command, BRIDGE_DATABASE_URL=url)
    assert line.startswith(f"millimetric-bridge: BRIDGE_DATABASE_URL: {says}")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_an_unwritable_sqlite_location_is_refused(workdir: Path) -> None:
    line = refused(workdir, "serve", BRIDGE_DATABASE_URL="sqlite:////proc/bridge.db")
    assert line.startswith("millimetric-bridge: BRIDGE_DATABASE_URL: ")
    assert "/proc/bridge.db" in line


def test_a_silent_postgresql_server_is_refused_within_seconds(workdir: Path) -> None:
    with socket.socket() as silent:  # takes connections and never answers them
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        start = time.monotonic()
        line = refused(
            workdir,
            "serve",
            BRIDGE_DATABASE_URL=f"postgresql://bridge:{ENCODED}@127.0.0.1:{port}/b",
        )
    assert time.monotonic() - start < 15
    assert (
        line.startswith(
            f"millimetric-bridge: BRIDGE_DATABASE_URL: no answer from PostgreSQL at "
            f"postgresql://bridge@127.0.0.1:{port}/b within 5s"
        )
        or "timeout" in line
    )


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("missing.toml", "missing.toml does not exist"),
        ("adir", "cannot read adir: Is a directory"),
        ("bad.toml", "cannot read bad.toml: not TOML: "),
        ("latin1.toml", "cannot read latin1.toml: not UTF-8 text"),
    ],
)
def test_a_bridge_config_that_cannot_be_read_is_refused(
    workdir: Path, path: str, says: str
) -> None:
    line = refused(workdir, "serve", BRIDGE_CONFIG=path)
    assert line.startswith(f"millimetric-bridge: BRIDGE_CONFIG: {says}")


def test_dev_refuses_a_bridge_config_as_serve_does(workdir: Path) -> None:
    line = refused(workdir, "dev", BRIDGE_CONFIG="adir")
    assert line == "millimetric-bridge: BRIDGE_CONFIG: cannot read adir: Is a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_bridge_config_is_refused(workdir: Path) -> None:
    (workdir / "secret.toml").write_text("")
    (workdir / "secret.toml").chmod(0)
    line = refused(workdir, "serve", BRIDGE_CONFIG="secret.toml")
    assert line == "millimetric-bridge: BRIDGE_CONFIG: cannot read secret.toml: Permission denied"


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("api.millimetric.ai", "must be an http:// or https:// URL"),
        ("ftp://api.millimetric.ai", "must be an http:// or https:// URL"),
        ("https://api millimetric.ai", "must be an http:// or https:// URL without spaces"),
        ("https://", "names no host"),
        ("https://api.millimetric.ai:99999", "is not a valid URL"),
        ("https://[::1", "is not a valid URL"),
    ],
)
def test_a_malformed_millimetric_host_is_refused(workdir: Path, host: str, says: str) -> None:
    line = refused(workdir, "serve", MILLIMETRIC_HOST=host)
    assert line.startswith(f"millimetric-bridge: MILLIMETRIC_HOST: {says}")


def test_outbox_commands_check_millimetric_host_too(workdir: Path) -> None:
    line = refused(workdir, "outbox status", MILLIMETRIC_HOST="https://")
    assert line.startswith("millimetric-bridge: MILLIMETRIC_HOST: names no host")


def test_a_connection_limit_out_of_range_stops_serve(workdir: Path) -> None:
    line = refused(workdir, "serve", BRIDGE_MAX_CONNECTIONS="0")
    assert line == "millimetric-bridge: BRIDGE_MAX_CONNECTIONS: must be at least 1"
