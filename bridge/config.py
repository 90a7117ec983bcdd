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

from bridge.database_url import check_postgresql_url
from bridge.errors import ConfigError
from bridge.ingest_api import KEY_FORMAT
from bridge.ratelimit import RateLimit
from bridge.stages.forward import ForwarderConfig
from bridge.stages.reconcile import ReconcileConfig
from bridge.store import Retention

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_HOST",
    "Settings",
    "check_key",
    "check_url",
    "load_settings",
    "parse_duration",
]

DEFAULT_HOST: Final = "https://api.millimetric.ai"
DEFAULT_DATABASE_URL: Final = "sqlite:///data/bridge.db"
_DURATION: Final = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The shortest reconcile interval: each round calls the providers' APIs.
MIN_RECONCILE_EVERY: Final = 60.0

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
    sqlite_synchronous: str = "FULL"
    forwarder: ForwarderConfig = ForwarderConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    ready_max_lag: float = 900.0  # /readyz says degraded when the oldest pending is older
    shutdown_grace: float = 10.0
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 30.0  # seconds a webhook's whole body may take to arrive (408)
    header_timeout: float = 10.0  # seconds a request's headers may take (then closed)
    keepalive_timeout: int = 5  # seconds an idle keep-alive connection is kept open
    max_connections: int = 2000  # open connections past which new ones are refused
    relay_keys: tuple[str, ...] = ()  # keys the relay takes (/v1/*); none: the relay is off
    relay_max_pending: int = 1_000_000  # calls waiting above which the relay answers 429
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
    if not KEY_FORMAT.match(key):
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


def _relay_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """`BRIDGE_RELAY_KEYS`: a comma list of secret keys in Millimetric's format; unset or
    empty, the relay is off. A message never repeats a key, nor says which one is wrong
    (its place in the list would narrow it down for whoever reads the logs)."""
    raw = env.get("BRIDGE_RELAY_KEYS", "")
    if not raw.strip():
        return ()
    keys = tuple(key.strip() for key in raw.split(","))
    for key in keys:
        if not key:
            raise ConfigError("BRIDGE_RELAY_KEYS", "has an empty entry: keys are comma-separated")
        check_key(key, "BRIDGE_RELAY_KEYS")
    return keys


def _count(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(variable, "must be a whole number") from None
    if value < 1:
        raise ConfigError(variable, "must be at least 1")
    return value


def check_url(variable: str, value: str) -> str:
    """A base URL httpx can send to; the message never repeats it (it may carry a login)."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(variable, "must be an http:// or https:// URL without spaces")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (urllib checks the port only when it is read)
    except ValueError:
        raise ConfigError(variable, "is not a valid URL: check its host and port") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(variable, "must be an http:// or https:// URL")
    if not parts.hostname:
        raise ConfigError(variable, "names no host, e.g. https://api.millimetric.ai")
    if parts.query or parts.fragment:
        raise ConfigError(variable, "is a base URL: no ?query or #fragment")
    return value.rstrip("/")


def _check_database_url(value: str) -> str:
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if value.startswith(("postgresql://", "postgres://")):
        return check_postgresql_url(value)
    raise ConfigError("BRIDGE_DATABASE_URL", "must be sqlite:///PATH or postgresql://...")


def _check_port(variable: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(variable, "must be a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(variable, "must be between 1 and 65535")
    return port


def _number(
    env: Mapping[str, str], variable: str, default: float, *, minimum: float = 0.0
) -> float:
    """A finite number above `minimum` from the environment, in the variable's unit."""
    raw = env.get(variable)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, "must be a number") from None
    if not (minimum < value < float("inf")):  # also refuses NaN
        raise ConfigError(variable, f"must be a number above {minimum:g}")
    return value


def _forwarder(env: Mapping[str, str]) -> ForwarderConfig:
    defaults = ForwarderConfig()
    return ForwarderConfig(
        batch_limit=RateLimit(
            rate=_number(env, "BRIDGE_BATCH_RATE", defaults.batch_limit.rate),
            burst=_number(env, "BRIDGE_BATCH_BURST", defaults.batch_limit.burst, minimum=0.99),
        ),
        single_limit=RateLimit(
            rate=_number(env, "BRIDGE_CALL_RATE", defaults.single_limit.rate),
            burst=_number(env, "BRIDGE_CALL_BURST", defaults.single_limit.burst, minimum=0.99),
        ),
        max_age=_number(env, "BRIDGE_MAX_AGE_HOURS", defaults.max_age / 3600) * 3600,
        retention=Retention(
            delivered=_days(env, "BRIDGE_DELIVERED_RETENTION_DAYS", defaults.retention.delivered),
            raw_payloads=_days(env, "BRIDGE_RAW_RETENTION_DAYS", defaults.retention.raw_payloads),
            inbox=_days(env, "BRIDGE_INBOX_RETENTION_DAYS", defaults.retention.inbox),
        ),
    )


def parse_duration(value: str) -> float | None:
    """Seconds in a duration such as `90s`, `15m`, `2h` or `7d`; None if it is not one."""
    match = _DURATION.match(value.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def _reconcile(env: Mapping[str, str]) -> ReconcileConfig:
    raw = env.get("BRIDGE_RECONCILE_EVERY", "").strip()
    if not raw:
        return ReconcileConfig()
    every = 0.0 if raw == "0" else parse_duration(raw)
    if every is None:
        raise ConfigError(
            "BRIDGE_RECONCILE_EVERY", "must be a duration like 15m or 1h, or 0 to turn it off"
        )
    if 0 < every < MIN_RECONCILE_EVERY:
        raise ConfigError("BRIDGE_RECONCILE_EVERY", "must be at least 1m (or 0: off)")
    return ReconcileConfig(every=every)


def _days(env: Mapping[str, str], variable: str, default_seconds: float) -> float:
    return _number(env, variable, default_seconds / 86400) * 86400


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
        millimetric_host=check_url("MILLIMETRIC_HOST", env.get("MILLIMETRIC_HOST", DEFAULT_HOST)),
        database_url=_check_database_url(env.get("BRIDGE_DATABASE_URL", DEFAULT_DATABASE_URL)),
        admin_token=env.get("BRIDGE_ADMIN_TOKEN") or None,
        host=host or env.get("BRIDGE_HOST", "0.0.0.0"),  # noqa: S104 (see Settings.host)
        port=port or _check_port("PORT", env.get("PORT", "8000")),
        log_format=log_format,
        log_level=_check_choice(
            "BRIDGE_LOG_LEVEL", env.get("BRIDGE_LOG_LEVEL", "info").lower(), _LOG_LEVELS
        ),
        sqlite_synchronous=_check_choice(
            "BRIDGE_SQLITE_SYNCHRONOUS",
            env.get("BRIDGE_SQLITE_SYNCHRONOUS", "FULL").upper(),
            ("FULL", "NORMAL", "EXTRA"),
        ),
        forwarder=_forwarder(env),
        reconcile=_reconcile(env),
        ready_max_lag=_number(env, "BRIDGE_READY_MAX_LAG_SECONDS", 900.0),
        max_body_bytes=int(_number(env, "BRIDGE_MAX_BODY_BYTES", 1024 * 1024, minimum=1023)),
        body_timeout=_number(env, "BRIDGE_BODY_TIMEOUT_SECONDS", 30.0),
        header_timeout=_number(env, "BRIDGE_HEADER_TIMEOUT_SECONDS", 10.0),
        keepalive_timeout=_count(env, "BRIDGE_KEEPALIVE_SECONDS", 5),
        max_connections=_count(env, "BRIDGE_MAX_CONNECTIONS", 2000),
        relay_keys=_relay_keys(env),
        relay_max_pending=_count(env, "BRIDGE_RELAY_MAX_PENDING", 1_000_000),
        env=dict(env),
    )
