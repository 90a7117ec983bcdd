"""The bridge's one error tree.

Core code raises these and nothing HTTP-specific; the edge (the Litestar app and the CLI)
maps them to status codes and exit codes in one place each::

    BridgeError
    ├── ConfigError          invalid configuration: start-up stops, exit code 2
    ├── EventInvalid         a Track/Identify/Forget breaks the ingest field reference
    ├── SignatureInvalid     a webhook's signature is bad, missing or stale (401)
    ├── PayloadInvalid       a verified body cannot be understood (400)
    ├── HandlerFailed        a handler's code raised what it should not have (503)
    ├── StoreUnavailable     the store cannot take or give data right now (503)
    └── ProviderError        a provider's event API did not answer what was asked
                             (`retryable`: a 429, a 5xx or the network; try again later)
    └── IngestRefused        a call to the ingest API (the sink's, the relay's) refused in
                             Millimetric's words: its own status and code

Anything else that escapes a request (a bug) is answered 503 by the app's last-resort
handler, which logs the exception's type and counts it: never a bare 500.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "ConfigError",
    "EventInvalid",
    "HandlerFailed",
    "IngestRefused",
    "PayloadInvalid",
    "ProviderError",
    "SignatureInvalid",
    "StoreUnavailable",
]


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """Configuration that cannot work; `variable` names what the operator must fix."""

    def __init__(self, variable: str, reason: str) -> None:
        self.variable = variable
        self.reason = reason
        super().__init__(f"{variable}: {reason}")


class EventInvalid(BridgeError, ValueError):
    """An analytics call breaks a limit of the ingest API.

    Subclasses ValueError so that msgspec reports it as a validation error with the JSON
    path when it is raised while decoding.
    """

    def __init__(self, field: str, limit: str) -> None:
        self.field = field
        self.limit = limit
        super().__init__(f"{field}: {limit}")


class SignatureInvalid(BridgeError):
    """A webhook delivery whose signature does not prove it came from the provider."""


class PayloadInvalid(BridgeError):
    """A verified webhook body that is not what the handler can read."""


class HandlerFailed(BridgeError):
    """A handler (its scheme, `parse`, `delivery_id` or `translate`) raised an exception
    outside the error tree: a bug in the plugin, not in the delivery. The message names
    the exception's type only, never its text, which may quote the payload."""

    def __init__(self, error: BaseException) -> None:
        self.error_type = type(error).__name__
        super().__init__(f"handler failed: {self.error_type}")


class StoreUnavailable(BridgeError):
    """The outbox store cannot be reached or written; the provider should retry."""


class StoreRefused(StoreUnavailable):
    """The store refused what it was given (a value it cannot hold, a limit, a
    constraint): the same again cannot succeed, whereas an outage passes. Intake still
    answers 503 (a redelivery may differ); the translate stage quarantines the delivery
    whose calls were refused, and waits out any other `StoreUnavailable`."""


class ProviderError(BridgeError):
    """A provider's API (its event list, for backfill and reconcile) failed to answer.

    `retryable` for what passes (a 429, a 5xx, a timeout, the network): the bridge tries
    again after a backoff, at least `retry_after` seconds when the provider said so. A
    refused API key is a `ConfigError` naming its variable instead. The message never
    quotes the key."""

    def __init__(
        self, reason: str, *, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(reason)


class IngestRefused(BridgeError):
    """A call to the ingest API refused as Millimetric refuses it: `status`, `code`
    (`invalid_payload`, `malformed_api_key`, `rate_limited`, ...) and a message naming the
    field, the limit or the size, never a value from the body nor the key. `headers` go
    with the answer (`retry-after`)."""

    def __init__(
        self, status: int, code: str, message: str = "", headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        super().__init__(f"{status} {code}: {message}" if message else f"{status} {code}")
