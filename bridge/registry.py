"""Finding handlers (entry points) and the sources that use them (environment, bridge.toml).

Built-in handlers register through the same entry-point group a third-party package uses.
Every handler is checked at start-up; a broken one stops start-up with a line naming it.
A source is mounted at `/webhooks/<source>` only when its secret variable is set.

A handler template (`bridge.plugin.HandlerTemplate`, such as `mapped`) registers in the
same group but has no source of its own: each `bridge.toml` table that names it builds a
handler from its options, checked like any other.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Final

import msgspec

from bridge.errors import ConfigError
from bridge.plugin import Handler, HandlerTemplate, SignatureScheme, SourceOptions, kept_headers

__all__ = [
    "HANDLER_GROUP",
    "RELAY_SOURCE",
    "Source",
    "check_handler",
    "load_handlers",
    "load_sources",
    "load_templates",
]

HANDLER_GROUP: Final = "millimetric_bridge.handlers"
#: The source of the relay's deliveries (`bridge.stages.relay`): the translate stage reads
#: them with the relay's own handler, so no configured source may take the name.
RELAY_SOURCE: Final = "relay"
_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_VARIABLE: Final = re.compile(r"^[A-Z][A-Z0-9_]*$")
# A header name as HTTP allows it (a token), lower-case as the intake names headers.
_HEADER: Final = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
# Headers that carry credentials: a handler that lists one would have it stored next to
# every raw body it receives.
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


@dataclass(frozen=True)
class Source:
    """A handler mounted at `/webhooks/<name>` with its own secrets and options."""

    name: str
    handler: Handler
    secret_variable: str
    secrets: tuple[str, ...]
    options: SourceOptions

    @property
    def configured(self) -> bool:
        return bool(self.secrets)

    @cached_property
    def kept_headers(self) -> tuple[str, ...]:
        """What the intake stores with each delivery (`bridge.plugin.kept_headers`), worked
        out once rather than per request."""
        return kept_headers(self.handler)


def check_handler(registered_as: str, handler: object) -> Handler:
    """The handler if it keeps the plugin protocol; otherwise a ConfigError naming it."""
    where = f"handler {registered_as!r}"
    if not isinstance(handler, Handler):
        missing = [
            a
            for a in (
                "name",
                "secret_variable",
                "scheme",
                "options_type",
                "headers",
                "parse",
                "delivery_id",
                "translate",
                "samples",
            )
            if not hasattr(handler, a)
        ]
        raise ConfigError(where, f"does not keep the Handler protocol (missing {missing})")
    if handler.name != registered_as or not _NAME.match(handler.name):
        raise ConfigError(
            where,
            f"its name {handler.name!r} must equal the entry-point name "
            "and be lower-case letters, digits, - or _",
        )
    if not _VARIABLE.match(handler.secret_variable):
        raise ConfigError(
            where,
            f"secret_variable {handler.secret_variable!r} is not an environment variable name",
        )
    if not isinstance(handler.scheme, SignatureScheme):
        raise ConfigError(where, "scheme does not keep the SignatureScheme protocol")
    if not (
        isinstance(handler.options_type, type) and issubclass(handler.options_type, SourceOptions)
    ):
        raise ConfigError(where, "options_type must be a subclass of SourceOptions")
    _check_headers(where, handler.headers)
    for method in ("parse", "delivery_id", "translate", "samples"):
        if not callable(getattr(handler, method)):
            raise ConfigError(where, f"{method} is not callable")
    _check_delivery_id(where, handler)
    if hasattr(handler, "list_events"):
        _check_lister(where, handler)
    return handler


def _check_lister(where: str, handler: object) -> None:
    """A handler that offers `list_events` keeps the rest of `EventLister` too."""
    for member in ("api_key_variable", "api_base_variable"):
        value = getattr(handler, member, None)
        if not isinstance(value, str) or not _VARIABLE.match(value):
            raise ConfigError(
                where, f"offers list_events: {member} {value!r} is not an environment variable name"
            )
    for method in ("check_api_key", "list_events"):
        if not callable(getattr(handler, method, None)):
            raise ConfigError(where, f"offers list_events: {method} is not callable (EventLister)")


def _check_headers(where: str, headers: object) -> None:
    if not isinstance(headers, tuple) or not all(isinstance(h, str) for h in headers):
        raise ConfigError(where, f"headers must be a tuple of header names, not {headers!r}")
    for header in headers:
        if not _HEADER.fullmatch(header):
            raise ConfigError(where, f"headers: {header!r} is not a lower-case header name")
        if header in _SECRET_HEADERS:
            raise ConfigError(where, f"headers: {header!r} carries credentials and is never stored")


def _check_delivery_id(where: str, handler: Handler) -> None:
    """`delivery_id(request)` reads the request alone; a plugin written for the older
    `delivery_id(request, payload)` is refused here rather than failing every delivery."""
    try:
        signature = inspect.signature(handler.delivery_id)
    except (TypeError, ValueError):  # a callable Python cannot describe: trusted as it is
        return
    try:
        signature.bind(None)
    except TypeError:
        taken = ", ".join(signature.parameters)
        raise ConfigError(
            where,
            f"delivery_id({taken}) must take the request alone: "
            "delivery_id(request), reading the id without the parsed payload",
        ) from None


def _is_template(plugin: object) -> bool:
    return isinstance(plugin, HandlerTemplate) and not isinstance(plugin, Handler)


def _plugins(found: Iterable[EntryPoint] | None) -> Iterable[tuple[str, object]]:
    """Every entry point of the group, loaded, once per name (the same package may be
    seen twice on sys.path)."""
    seen = set()
    for ep in found if found is not None else entry_points(group=HANDLER_GROUP):
        try:
            loaded = ep.load()
        except Exception as error:
            raise ConfigError(
                f"handler {ep.name!r}", f"cannot be loaded from {ep.value}: {error}"
            ) from error
        if ep.name not in seen:
            seen.add(ep.name)
            yield ep.name, loaded


def load_handlers(found: Iterable[EntryPoint] | None = None) -> dict[str, Handler]:
    """Every installed handler, checked (templates aside: see `load_templates`)."""
    return {
        name: check_handler(name, loaded)
        for name, loaded in _plugins(found)
        if not _is_template(loaded)
    }


def load_templates(found: Iterable[EntryPoint] | None = None) -> dict[str, HandlerTemplate]:
    """Every installed handler template (`mapped`), checked."""
    templates: dict[str, HandlerTemplate] = {}
    for name, loaded in _plugins(found):
        if not _is_template(loaded):
            continue
        assert isinstance(loaded, HandlerTemplate)  # for mypy: _is_template said so
        where = f"handler {name!r}"
        if loaded.name != name:
            raise ConfigError(where, f"its name {loaded.name!r} must equal the entry-point name")
        if not (
            isinstance(loaded.options_type, type) and issubclass(loaded.options_type, SourceOptions)
        ):
            raise ConfigError(where, "options_type must be a subclass of SourceOptions")
        if not callable(loaded.configure):
            raise ConfigError(where, "configure is not callable")
        templates[name] = loaded
    return templates


def _secrets(value: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (value or "").split(",") if s.strip())


def _default_variable(source: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", source.upper()) + "_WEBHOOK_SECRET"


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:  # a directory, no permission
        raise ConfigError("BRIDGE_CONFIG", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("BRIDGE_CONFIG", f"cannot read {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("BRIDGE_CONFIG", f"cannot read {path}: not TOML: {error}") from None
    sources = document.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, dict) for v in sources.values()):
        raise ConfigError("BRIDGE_CONFIG", f"{path}: [sources.NAME] tables expected")
    return sources


def _described(error: msgspec.ValidationError) -> str:
    """msgspec's message with the key first: `tolerance: Expected `int`, got `str``."""
    message, found, path = str(error).rpartition(" - at `$")
    if not found:
        return str(error)
    return f"{path.removesuffix('`').lstrip('.')}: {message}"


def load_sources(
    env: Mapping[str, str],
    handlers: Mapping[str, Handler],
    *,
    templates: Mapping[str, HandlerTemplate] | None = None,
    dev: bool = False,
) -> dict[str, Source]:
    """Every source: one per handler by default, plus those `bridge.toml` declares,
    including those built from a template (`handler = "mapped"`)."""
    templates = templates or {}
    config_path = Path(env.get("BRIDGE_CONFIG", "bridge.toml"))
    declared: dict[str, dict[str, Any]] = {}
    if config_path.exists():
        declared = _read_toml(config_path)
    elif "BRIDGE_CONFIG" in env:
        raise ConfigError("BRIDGE_CONFIG", f"{config_path} does not exist")
    tables: dict[str, dict[str, Any]] = {name: {} for name in handlers} | declared
    sources: dict[str, Source] = {}
    for name, table in tables.items():
        where = f"bridge.toml [sources.{name}]"
        options = dict(table)
        handler_name = options.pop("handler", name)
        if not isinstance(handler_name, str):
            raise ConfigError(where, "handler must be a handler's name")
        plugin: Handler | HandlerTemplate | None = handlers.get(handler_name) or templates.get(
            handler_name
        )
        if plugin is None:
            raise ConfigError(where, f"no handler named {handler_name!r} is installed")
        if not _NAME.match(name):
            raise ConfigError(where, "a source name is lower-case letters, digits, - or _")
        if name == RELAY_SOURCE:
            raise ConfigError(where, "relay is the name of the relay's own deliveries")
        default_variable = (
            plugin.secret_variable
            if isinstance(plugin, Handler) and name == plugin.name
            else _default_variable(name)
        )
        variable = options.pop("secret_variable", default_variable)
        if not isinstance(variable, str) or not _VARIABLE.match(variable):
            raise ConfigError(where, "secret_variable must be an environment variable name")
        if dev:
            options.setdefault("include_test_events", True)
        try:
            parsed = msgspec.convert(options, plugin.options_type)
        except msgspec.ValidationError as error:
            raise ConfigError(where, _described(error)) from None
        handler = (
            plugin
            if isinstance(plugin, Handler)
            else _configure(where, plugin, name, parsed, variable, config_path.parent)
        )
        sources[name] = Source(
            name=name,
            handler=handler,
            secret_variable=variable,
            secrets=_secrets(env.get(variable)),
            options=parsed,
        )
    return sources


def _configure(
    where: str,
    template: HandlerTemplate,
    name: str,
    options: SourceOptions,
    variable: str,
    folder: Path,
) -> Handler:
    """The source's own handler, built by its template and checked like any handler."""
    try:
        built = template.configure(name, options, secret_variable=variable, folder=folder)
        return check_handler(template.name, built)
    except ConfigError as error:
        raise ConfigError(where, str(error)) from None
