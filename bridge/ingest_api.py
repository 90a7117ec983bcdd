"""Millimetric's ingest API as the bridge serves it, twice: the local sink (a stand-in for
Millimetric) and the relay (the user's own servers' calls, through the outbox).

Written once for both, so that a client sees the same answers from either: the key
format and what each kind of key may call, each route's body decoded and validated by the
event Structs (`bridge.events`) with the batch limits, and the error body. A refusal is an
`IngestRefused` in Millimetric's words (status, code, message); its message names the
field, the limit or the size, never a value of the body nor the key.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from bridge.errors import IngestRefused
from bridge.events import (
    BATCH_MAX_BYTES,
    BATCH_MAX_EVENTS,
    SERVER_DERIVED_FIELDS,
    Forget,
    Identify,
    Track,
)

__all__ = [
    "KEY_FORMAT",
    "KEY_PATTERN",
    "ROUTES",
    "Batch",
    "bearer_key",
    "check_scope",
    "error_body",
    "parse_call",
]

#: A Millimetric key as published, `(pk|sk|rk)_*_*_*`: each `*` non-empty printable ASCII
#: without spaces, underscores and dashes included (so `sk_live_a_b_c` is a key). Unanchored,
#: for finding keys in text (`bridge.logs`); `KEY_FORMAT` is the whole-string check.
KEY_PATTERN: Final = r"(?:pk|sk|rk)_[!-~]+_[!-~]+_[!-~]+"
#: A string that is a Millimetric key, and nothing else (no surrounding space or newline).
KEY_FORMAT: Final = re.compile(rf"\A{KEY_PATTERN}\Z")


class Batch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of `POST /v1/batch`."""

    events: list[Track]


_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "track": msgspec.json.Decoder(Track),
    "identify": msgspec.json.Decoder(Identify),
    "batch": msgspec.json.Decoder(Batch),
    "forget": msgspec.json.Decoder(Forget),
}
#: The ingest routes, by the last part of their path (`/v1/track`).
ROUTES: Final = tuple(_DECODERS)

_UNKNOWN_FIELD: Final = re.compile(r"unknown field `([^`]+)`")
_encoder: Final = msgspec.json.Encoder()


def error_body(code: str, message: str = "") -> bytes:
    """`{"ok": false, "error": code, "message": ...}`, as Millimetric answers a refusal."""
    body: dict[str, Any] = {"ok": False, "error": code}
    if message:
        body["message"] = message
    return _encoder.encode(body)


def bearer_key(authorization: str | None) -> str:
    """The key of `Authorization: Bearer <key>`; 401 `malformed_api_key` unless it has a
    key's format."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not KEY_FORMAT.match(key):
        raise IngestRefused(
            401, "malformed_api_key", "expected Authorization: Bearer (pk|sk|rk)_x_y_z"
        )
    return key


def check_scope(route: str, key: str) -> None:
    """What a key's kind may not do, known from its prefix alone: a `pk_` key is for
    browsers on allowed origins (403 `origin_not_allowed`), only an `sk_` key may forget
    (403 `forget_requires_secret_key`), and an `rk_` key only reads (403 `read_only_key`,
    a case the contract names no code for)."""
    if key.startswith("pk_"):
        raise IngestRefused(
            403, "origin_not_allowed", "a pk_ key is for browsers on allowed origins"
        )
    if route == "forget" and not key.startswith("sk_"):
        raise IngestRefused(403, "forget_requires_secret_key")
    if key.startswith("rk_"):
        raise IngestRefused(403, "read_only_key", "an rk_ key can only read")


def parse_call(route: str, body: bytes) -> Track | Identify | Batch | Forget:
    """The body of `POST /v1/<route>` decoded and validated; 400 `invalid_payload` naming
    the field (with its JSON path) and the limit, the batch's size or its count."""
    if route == "batch" and len(body) > BATCH_MAX_BYTES:
        raise IngestRefused(
            400,
            "invalid_payload",
            f"batch body is {len(body)} bytes; the limit is {BATCH_MAX_BYTES}",
        )
    try:
        call = _DECODERS[route].decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _invalid(exc) from None
    except RecursionError:  # msgspec's answer to JSON nested past its depth limit
        raise IngestRefused(400, "invalid_payload", "the JSON body nests too deeply") from None
    if isinstance(call, Batch) and not 1 <= len(call.events) <= BATCH_MAX_EVENTS:
        raise IngestRefused(
            400,
            "invalid_payload",
            f"events: 1-{BATCH_MAX_EVENTS} per batch, got {len(call.events)}",
        )
    result: Track | Identify | Batch | Forget = call
    return result


def _invalid(exc: msgspec.ValidationError | msgspec.DecodeError) -> IngestRefused:
    message = str(exc)
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown and unknown.group(1) in SERVER_DERIVED_FIELDS:
        message = f"{unknown.group(1)} is derived by the server and must not be sent ({message})"
    return IngestRefused(400, "invalid_payload", message)
