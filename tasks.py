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


def ensure_env() -> None:
    """Create the virtualenv and (re)install when pyproject.toml changed since last time."""
    if sys.version_info < (3, 11):  # noqa: UP036 (this file runs under any python3)
        sys.exit(f"millimetric-bridge needs Python 3.11+, this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
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
    try:
        if command == "dev":
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
