#!/usr/bin/env python3
"""The quick start's two commands, needing nothing but Python 3.11+:

    python3 tasks.py dev     # create .venv, install, run `millimetric-bridge dev`
    python3 tasks.py test    # create .venv, install, run ruff, mypy and the test suite

Extra arguments after `test` go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed"


def run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)  # noqa: S603 (our own tools)


def _wanted() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def installed() -> bool:
    """Whether the virtualenv holds what pyproject.toml asks for (nothing to install)."""
    return STAMP.exists() and STAMP.read_text() == _wanted()


def ensure_env() -> None:
    """Create the virtualenv and (re)install when pyproject.toml changed since last time."""
    if sys.version_info < (3, 11):  # noqa: UP036 (this file runs under any python3)
        sys.exit(f"millimetric-bridge needs Python 3.11+, this is {sys.version.split()[0]}")
    if installed():
        return
    wanted = _wanted()
    if not (BIN / "python").exists():
        venv.create(VENV, with_pip=True)
    # Dependency groups need pip 25.1 or newer.
    run(BIN / "python", "-m", "pip", "install", "-q", "--upgrade", "pip>=25.1")
    run(BIN / "python", "-m", "pip", "install", "-q", "-e", ".", "--group", "dev")
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command not in ("dev", "test"):
        print(__doc__)
        return 2
    ensure_env()
    if command == "dev" and os.name != "nt":
        # Become the bridge (the same process): a supervisor's SIGTERM or a Ctrl-C reaches
        # it, and no child is left running, orphaned, when this process is stopped.
        program = BIN / "millimetric-bridge"
        print("+", program, "dev", *rest, flush=True)
        os.chdir(ROOT)
        os.execv(program, [program, "dev", *rest])  # noqa: S606 (our own tool)
    try:
        if command == "dev":  # Windows: its exec starts a new process, so run a child
            run(BIN / "millimetric-bridge", "dev", *rest)
        else:
            run(BIN / "ruff", "check", ".")
            run(BIN / "ruff", "format", "--check", ".")
            run(BIN / "mypy")
            run(BIN / "python", "-m", "pytest", *rest)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
