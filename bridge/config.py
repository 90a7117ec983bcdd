"""Settings from the environment, typed and validated once at start-up.

Every problem becomes a `ConfigError` naming the variable, so the CLI can print one line
and exit 2 before anything listens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

import msgspec

from bridge.errors import ConfigError

__all__ = ["DEFAULT_DATABASE_URL", "DEFAULT_HOST", "Settings", "check_key", "load_settings"]

DEFAULT_HOST: Final = "https://api.millimetric.ai"
DEFAULT_DATABASE_URL: Final = "sqlite:///data/bridge.db"
_KEY: Final = re.compile(r"^(pk|sk|rk)_[A-Za-z0-9]+_[A-Za-z0-9]+_[A-Za-z0-9]+$")

_LOG_LEVELS: Final = ("debug", "info", "warning", "error")

LogFormat = Literal["json", "console"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    millimetric_key: str
    millimetric_host: str = DEFAULT_HOST
    database_url: str = DEFAULT_DATABASE_URL
    admin_token: str | None = None
    host: str = "0.0.0.0"  # noqa: S104 (a server in a container listens on all interfaces)
    port: int = 8000
    log_format: LogFormat = "json"
    log_level: str = "info"
    env: Mapping[str, str] = msgspec.field(default_factory=dict)  # source secrets are read here

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file for a `sqlite:///` URL (relative) or `sqlite:////` (absolute)."""
        if not self.database_url.startswith("sqlite:///"):
            return None
        return Path(self.database_url.removeprefix("sqlite:///"))


def check_key(key: str | None, variable: str = "MILLIMETRIC_KEY") -> str:
    """The key if it can authenticate a server; otherwise a ConfigError saying why.

    The message never repeats the key: it is a secret even when it is the wrong one.
    """
    if not key:
        raise ConfigError(variable, "not set; create a secret ingest key (sk_...) in Millimetric")
    if not _KEY.match(key):
        raise ConfigError(variable, "malformed: a Millimetric key looks like sk_x_y_z")
    if key.startswith("pk_"):
        raise ConfigError(
            variable,
            "is a pk_ browser key; a server needs a secret sk_ key (pk_ keys are refused "
            "without an allowed origin and cannot call forget)",
        )
    if key.startswith("rk_"):
        raise ConfigError(variable, "is an rk_ read-only key; the bridge needs a secret sk_ key")
    return key


def _check_url(variable: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(variable, "must be an http:// or https:// URL")
    return value.rstrip("/")


def _check_database_url(value: str) -> str:
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("postgresql://", "postgres://")):
        return value
    raise ConfigError("BRIDGE_DATABASE_URL", "must be sqlite:///PATH or postgresql://...")


def _check_port(variable: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(variable, "must be a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(variable, "must be between 1 and 65535")
    return port


def _check_choice(variable: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(variable, f"must be one of {', '.join(choices)}")
    return value


def load_settings(
    env: Mapping[str, str],
    *,
    require_key: bool = True,
    log_format: LogFormat = "json",
    host: str | None = None,
    port: int | None = None,
) -> Settings:
    """Read and validate the environment. `require_key=False` is for commands that do not
    talk to Millimetric; the key, when present, is still checked."""
    key = env.get("MILLIMETRIC_KEY")
    if require_key or key:
        key = check_key(key)
    return Settings(
        millimetric_key=key or "",
        millimetric_host=_check_url("MILLIMETRIC_HOST", env.get("MILLIMETRIC_HOST", DEFAULT_HOST)),
        database_url=_check_database_url(env.get("BRIDGE_DATABASE_URL", DEFAULT_DATABASE_URL)),
        admin_token=env.get("BRIDGE_ADMIN_TOKEN") or None,
        host=host or env.get("BRIDGE_HOST", "0.0.0.0"),  # noqa: S104 (see Settings.host)
        port=port or _check_port("PORT", env.get("PORT", "8000")),
        log_format=log_format,
        log_level=_check_choice(
            "BRIDGE_LOG_LEVEL", env.get("BRIDGE_LOG_LEVEL", "info").lower(), _LOG_LEVELS
        ),
        env=dict(env),
    )
