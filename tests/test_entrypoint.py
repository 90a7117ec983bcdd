"""The image's entrypoint (deploy/entrypoint.sh), run for real without Docker: started as
root over a data folder owned by root, as Fly and Render mount a volume, it gives the
folder to the bridge user and runs the server as that user for good; started as anyone
else, it only runs the command."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_processes import listening, wait_for

ENTRYPOINT = Path(__file__).parent.parent / "deploy" / "entrypoint.sh"
SCRIPT = Path(sys.executable).parent / "millimetric-bridge"
#: An unprivileged user every Linux has, standing in for the image's `bridge`.
USER = pwd.getpwnam("nobody")

as_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the entrypoint's work happens as root (the container starts as root; CI runs as "
    "root): run the suite as root to test it",
)


@pytest.fixture
def data() -> Iterator[Path]:
    """An empty data folder owned by root, as a freshly mounted volume, under a folder the
    test user may enter (pytest's own temporary folders are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="bridge-entrypoint-"))
    try:
        base.chmod(0o755)
        folder = base / "data"
        folder.mkdir(mode=0o755)
        yield folder
    finally:
        shutil.rmtree(base)


def entrypoint_env(data: Path, user: str = USER.pw_name, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLIMETRIC_", "BRIDGE_"))}
    return env | {"BRIDGE_USER": user, "BRIDGE_DATA_DIR": str(data), **extra}


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid and Groups lines of /proc/<pid>/status (real, effective, saved, fs)."""
    found: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Uid", "Gid", "Groups", "NoNewPrivs"):
            found[name] = [int(v) for v in value.split()]
    return found


@as_root
def test_as_root_it_gives_the_folder_away_and_serves_as_the_user_for_good(data: Path) -> None:
    stray = data / "left-by-a-root-shell.txt"
    stray.write_text("x")
    assert data.stat().st_uid == stray.stat().st_uid == 0
    port = free_port()
    env = entrypoint_env(
        data,
        MILLIMETRIC_KEY="sk_live_a_b_c",
        MILLIMETRIC_HOST="http://127.0.0.1:9",
        PORT=str(port),
        BRIDGE_HOST="127.0.0.1",
        BRIDGE_DATABASE_URL=f"sqlite:///{data}/bridge.db",
    )
    proc = subprocess.Popen(
        [ENTRYPOINT, SCRIPT, "serve"],
        cwd=data,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a failure here leaves nothing behind
    )
    try:
        assert wait_for(f"http://127.0.0.1:{port}/healthz", proc).json() == {"status": "ok"}
        # The entrypoint's own process became the server: no shell, no setpriv left waiting.
        command = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(SCRIPT).encode() in command
        assert b"serve" in command
        running = ids(proc.pid)
        assert running["Uid"] == [USER.pw_uid] * 4  # no saved root id to go back to
        assert running["Gid"] == [USER.pw_gid] * 4
        assert 0 not in running["Groups"]
        assert running["NoNewPrivs"] == [1]
        # The folder, what was in it, and the database the server created are the user's.
        for path in (data, stray, data / "bridge.db"):
            assert (path.stat().st_uid, path.stat().st_gid) == (USER.pw_uid, USER.pw_gid), path
        proc.send_signal(signal.SIGTERM)  # as the platform stops the machine
        out, _ = proc.communicate(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert not listening(port)


@as_root
@pytest.mark.parametrize(
    ("user", "says"),
    [
        ("root", "BRIDGE_USER: root is root; the server never runs as root"),
        ("no-such-user", "BRIDGE_USER: no user named no-such-user"),
    ],
)
def test_it_refuses_to_run_anything_as_root_or_as_nobody_known(
    data: Path, user: str, says: str
) -> None:
    done = subprocess.run(
        [ENTRYPOINT, "id", "-u"],
        env=entrypoint_env(data, user),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"bridge-entrypoint: {says}\n")
    assert data.stat().st_uid == 0  # refused before touching anything


def test_started_as_another_user_it_only_runs_the_command(data: Path) -> None:
    """`docker run --user`: the entrypoint has no rights to give and none to drop."""
    command: list[str | Path] = [ENTRYPOINT, "id", "-u"]
    expected = os.geteuid()
    if expected == 0:  # start it as the unprivileged user, as `--user` would
        command = [
            "setpriv",
            f"--reuid={USER.pw_uid}",
            f"--regid={USER.pw_gid}",
            "--clear-groups",
            *command,
        ]
        expected = USER.pw_uid
    done = subprocess.run(
        command, env=entrypoint_env(data), capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{expected}\n", "")
    assert data.stat().st_uid == os.geteuid()  # left as it was
