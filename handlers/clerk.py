"""Clerk: sign-ups, sign-ins and (when asked) erasure of deleted users.

Clerk delivers through Svix, so deliveries are Standard Webhooks: the message id in
`svix-id` / `webhook-id` is the delivery id, the same on every retry. Clerk's payloads
carry no event id of their own.

Only ids and times leave the bridge: Clerk's user object is full of personal data (email
addresses, names, phone numbers, IP addresses), and none of it is sent.

A session whose `actor` is set was started by someone else signed in as the user (a support
admin impersonating them): it is not counted as the user's login.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final

import msgspec

from bridge import Forget, Identify, Output, PayloadInvalid, Track
from bridge.plugin import Sample, SignatureScheme, SourceOptions, WebhookRequest
from bridge.standard_webhooks import StandardWebhooksScheme, message_id

__all__ = ["ClerkHandler", "ClerkOptions", "handler"]


class ClerkOptions(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Off by default: deleting a Clerk user is not always a request to erase their
    # analytics (an admin may delete test accounts), so erasure is the operator's choice.
    forget_on_user_deleted: bool = False


class ClerkObject(msgspec.Struct, frozen=True):
    """The fields read from a user or a session (`data`); Clerk sends many more."""

    id: str | None = None
    user_id: str | None = None  # sessions
    created_at: int | None = None  # unix milliseconds
    # Sessions: set when someone else signed in as the user (an impersonation from the
    # dashboard or an actor token), e.g. {"sub": "user_<the admin>"}; null otherwise.
    actor: Any = None
    # Set by the browser at sign-up (`signUp.create({unsafeMetadata})`): the visitor's
    # Millimetric anonymous id, so the sign-up is attributed to the visit that led to it.
    unsafe_metadata: dict[str, Any] | None = None


class ClerkEvent(msgspec.Struct, frozen=True):
    type: str
    data: msgspec.Raw  # decoded only for the event types translated
    timestamp: int | None = None  # unix milliseconds; older deliveries lack it


_decoder: Final = msgspec.json.Decoder(ClerkEvent)
_object_decoder: Final = msgspec.json.Decoder(ClerkObject)
#: The event types translated; every other type is acknowledged and ignored unread.
TRANSLATED: Final = frozenset({"user.created", "session.created", "user.deleted"})


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _from_millis(millis: int | None) -> datetime | None:
    if millis is None:
        return None
    try:  # integer arithmetic: no float rounding of the milliseconds
        return datetime.fromtimestamp(millis // 1000, UTC) + timedelta(milliseconds=millis % 1000)
    except (ValueError, OverflowError, OSError):
        raise PayloadInvalid("timestamp is not a usable time") from None


class ClerkHandler:
    name = "clerk"
    secret_variable = "CLERK_WEBHOOK_SECRET"  # noqa: S105 (a variable's name, not a secret)
    # Typed as the protocol's members, so the handler type-checks as a `Handler`.
    scheme: SignatureScheme = StandardWebhooksScheme()
    options_type: type[SourceOptions] = ClerkOptions
    # The message id is one of the scheme's headers (kept with every delivery); the rest is
    # in the signed body.
    headers: tuple[str, ...] = ()

    def delivery_id(self, request: WebhookRequest) -> str:
        found = message_id(request.headers)
        if found is None:  # verification requires it, so only a caller skipping it gets here
            raise PayloadInvalid("no webhook-id or svix-id header")
        return found

    def parse(self, request: WebhookRequest) -> ClerkEvent:
        try:
            return _decoder.decode(request.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"not a Clerk event: {error}") from None

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "clerk")
        return {
            f.name.removesuffix(".json"): Sample(body=f.read_bytes())
            for f in folder.iterdir()
            if f.name.endswith(".json")
        }

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: a new user or session and the
        current time, so a new sign-up or sign-in shows at the sink."""
        event = msgspec.json.decode(sample.body)
        token = uuid.uuid4().hex[:16]
        event["timestamp"] = int(time.time() * 1000)
        data = event.get("data") or {}
        if data.get("object") == "user":
            data["id"] = f"user_test_{token}"
        elif data.get("object") == "session":
            data["id"] = f"sess_test_{token}"
        return Sample(body=msgspec.json.encode(event), headers=sample.headers)

    def translate(
        self, request: WebhookRequest, payload: ClerkEvent, options: ClerkOptions
    ) -> list[Output]:
        # Clerk marks no event as a test: a development instance has its own signing
        # secret, so it belongs in its own source (or is left unconfigured).
        if payload.type not in TRANSLATED:
            return []
        try:
            obj = _object_decoder.decode(payload.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise PayloadInvalid(f"unexpected {payload.type} data: {error}") from None
        when = _from_millis(payload.timestamp if payload.timestamp is not None else obj.created_at)
        match payload.type:
            case "user.created":
                user_id = _text(obj.id)
                if user_id is None:
                    raise PayloadInvalid("user.created without data.id")
                anonymous_id = _text((obj.unsafe_metadata or {}).get("millimetric_anonymous_id"))
                # The event id names the user, so one user is one sign-up at Millimetric
                # even if Clerk sends user.created as two messages.
                return [
                    Identify(user_id=user_id, anonymous_id=anonymous_id),
                    Track(
                        event="signup",
                        event_id=f"signup:{user_id}",
                        timestamp=when,
                        anonymous_id=anonymous_id,
                        user_id=user_id,
                    ),
                ]
            case "session.created":
                user_id, session = _text(obj.user_id), _text(obj.id)
                if user_id is None or session is None:
                    raise PayloadInvalid("session.created without data.id and data.user_id")
                if obj.actor:
                    # An impersonation (a support admin signed in as the user) is not the
                    # user's own login: left out, as no login of theirs.
                    return []
                return [
                    Track(
                        event="login", event_id=f"login:{session}", timestamp=when, user_id=user_id
                    )
                ]
            case "user.deleted":
                user_id = _text(obj.id)
                if not options.forget_on_user_deleted or user_id is None:
                    return []
                return [Forget(user_id=user_id)]
        return []


handler: Final = ClerkHandler()
