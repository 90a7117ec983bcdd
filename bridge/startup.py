"""What every command does before it works: refuse bad configuration with one line and exit
code 2, and open the outbox that `BRIDGE_DATABASE_URL` names, within a bound.

A store that cannot be opened is a configuration problem seen from the shell (a directory
where the SQLite file should be, a PostgreSQL server that is not there), so it is refused
the same way: one line naming the variable, the URL redacted, no traceback.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Final, NoReturn

import click

from bridge.database_url import VARIABLE, redacted, scrubbed
from bridge.errors import ConfigError, StoreUnavailable
from bridge.store import Store

__all__ = ["CONNECT_BOUND", "open_outbox", "refuse"]

#: How long start-up waits for a PostgreSQL server to answer before it gives up (libpq's
#: own connect timeout is the same; this also bounds name resolution).
CONNECT_BOUND: Final = 5.0


def refuse(error: ConfigError) -> NoReturn:
    """One line naming the variable and why; exit code 2, before anything listens."""
    click.echo(f"millimetric-bridge: {' '.join(str(error).split())}", err=True)
    sys.exit(2)


def _check_sqlite_path(path: Path) -> None:
    """Say plainly what SQLite would only call "unable to open database file"."""
    if path.is_dir():
        raise ConfigError(
            VARIABLE, f"{path} is a directory; name a file in it, e.g. sqlite:///{path}/bridge.db"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders are made on open
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(VARIABLE, f"cannot create {path}: {folder} is not a directory")
    if not os.access(folder if not path.exists() else path, os.W_OK):
        raise ConfigError(VARIABLE, f"cannot write {path}: permission denied")


async def _reach_postgresql(url: str, bound: float) -> None:
    """One connection, so that a server that is not there fails within `bound`, with
    libpq's reason, before the store's migrations and pool start."""
    # Imported here: a SQLite bridge never loads psycopg's driver.
    import psycopg

    from bridge.store.postgres import CONNECT

    try:
        conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(url, **CONNECT), bound)
    except TimeoutError:
        raise ConfigError(
            VARIABLE, f"no answer from PostgreSQL at {redacted(url)} within {bound:g}s"
        ) from None
    except psycopg.Error as error:
        raise ConfigError(
            VARIABLE,
            f"cannot connect to PostgreSQL at {redacted(url)}: {scrubbed(str(error), url)}",
        ) from None
    await conn.close()


async def open_outbox(store: Store, database_url: str, *, bound: float = CONNECT_BOUND) -> Store:
    """`store` (built by `open_store(database_url)`) opened, or a ConfigError that names
    the variable and shows the URL only redacted."""
    if database_url.startswith("sqlite:///"):
        _check_sqlite_path(Path(database_url.removeprefix("sqlite:///")))
    else:
        await _reach_postgresql(database_url, bound)
    try:
        await store.open()
    except ConfigError:
        await store.close()
        raise
    except (StoreUnavailable, OSError) as error:
        await store.close()
        # `from None`: the driver's exception may quote the URL, and a traceback is not
        # what an operator fixing a variable needs.
        raise ConfigError(VARIABLE, scrubbed(str(error), database_url)) from None
    return store
