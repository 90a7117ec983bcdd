"""`BRIDGE_DATABASE_URL`: checked once, and never shown with its password.

A PostgreSQL password often holds characters that a URL reserves (`%`, `#`, `/`, `@`).
Left unencoded, libpq reads such a URL differently from what was meant, and its
complaints quote what it could not read: pieces of the password. `urllib` fails on the
same URLs with the password in its exception. So a URL that libpq would misread is refused
here with a line of our own, every message that names the database shows it through
`redacted`, and a driver's message passes `scrubbed` before it is shown.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import unquote

from bridge.errors import ConfigError

__all__ = ["VARIABLE", "check_postgresql_url", "redacted", "scrubbed"]

VARIABLE: Final = "BRIDGE_DATABASE_URL"

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
#: A user or database name plain enough to show: nothing in it can be a piece of a
#: password that a misplaced delimiter moved there.
_NAME: Final = re.compile(r"[A-Za-z0-9._~$-]+")
#: One host of a (comma-separated) host list: a name, an encoded socket directory or a
#: bracketed IPv6 address, with a numeric port.
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]*)(?::[0-9]+)?")
_QUOTED: Final = re.compile(r'"[^"]*"')
#: Password pieces shorter than this are not blanked in a driver's message: they would
#: blank ordinary words, and the URL was checked before any driver saw it.
_PIECE: Final = 3
_HINT: Final = (
    "percent-encode the user name and password (% as %25, / as %2F, @ as %40, # as %23, "
    "? as %3F, a space as %20)"
)
_HIDDEN: Final = "***"


def redacted(url: str) -> str:
    """The URL as a message may show it: scheme, user, hosts and ports, database name.

    Never the password, nor the query (options can carry one). The credentials end at the
    last `@`, wherever an unencoded character would make a parser end them; a user name,
    host or database name that is not plainly one is shown as `***`, so that a piece of a
    password which a malformed URL moved elsewhere is not shown either.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return _HIDDEN
    user = ""
    if "@" in rest:
        credentials, _, rest = rest.rpartition("@")
        name = credentials.partition(":")[0]
        user = (name if _NAME.fullmatch(name) else _HIDDEN) + "@"
    location = re.split(r"[?#]", rest, maxsplit=1)[0]
    hosts, slash, database = location.partition("/")
    if not all(_HOST.fullmatch(host) for host in hosts.split(",")):
        # The hosts are not hosts: what follows them is no more trustworthy.
        return f"{scheme}://{user}{_HIDDEN}"
    if database and not _NAME.fullmatch(database):
        database = _HIDDEN
    return f"{scheme}://{user}{hosts}{slash}{database}"


def _passwords(url: str) -> set[str]:
    """The password as written and decoded, its pieces between reserved characters, and any
    `password=` option in the query."""
    credentials = url.partition("://")[2].rpartition("@")[0]
    found = {credentials.partition(":")[2]}
    found |= set(re.findall(r"[?&]password=([^&#\s]*)", url))
    pieces = set()
    for password in found:
        pieces |= {password, unquote(password), *re.split(r"[%#/?@:&=\s]", password)}
    return {piece for piece in pieces if len(piece) >= _PIECE}


def scrubbed(message: str, url: str) -> str:
    """A driver's `message` about `url`, on one line, without the password or a piece of it."""
    for piece in sorted(_passwords(url), key=len, reverse=True):
        message = message.replace(piece, _HIDDEN)
    return " ".join(message.split())


def check_postgresql_url(url: str) -> str:
    """The URL if libpq reads it as written; otherwise a ConfigError that quotes none of it.

    libpq ends the credentials at the first `@` and not at all when a `/` comes first, so an
    unencoded `@` or `/` in a password shows as a host with an `@`, a port that is not a
    number, or a database name with a `/` or `@`; a bad `%` escape or a space fails outright.
    """
    # Imported here: commands that never open a store do not pay for psycopg.
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] | None = None
    try:
        params = conninfo_to_dict(url)
    except Error as error:
        # libpq's reason names the problem and quotes the fragment: keep the first only.
        unreadable = " ".join(_QUOTED.sub("...", str(error)).split())
    if params is None:  # raised out here, so that libpq's exception is not its context either
        raise ConfigError(
            VARIABLE, f"is not a PostgreSQL URL that libpq can read ({unreadable}); {_HINT}"
        )
    hosts = str(params.get("host", "")).split(",")
    ports = str(params.get("port", "")).split(",")
    database = str(params.get("dbname", ""))
    if (
        any("@" in host for host in hosts)
        or not all(re.fullmatch("[0-9]*", port) for port in ports)
        or "/" in database
        or "@" in database
    ):
        raise ConfigError(
            VARIABLE,
            "is not read as meant: its host, port or database name is not valid (an "
            f"unencoded @ or / in the password moves part of it there); {_HINT}",
        )
    return url
