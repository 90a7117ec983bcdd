"""Auth0 log streams (custom webhook): sign-ups, logins and user deletions.

The log types read are Auth0's current event codes (auth0.com/docs, "Log Event Type Codes"
and the log streams' event filters): `ss` (the "Signup - Success" filter), `s` and `sens`
(a native social login: Sign in with Apple or Facebook from a native app) of the "Login -
Success" filter, and `sdu`. A login whose record counts the user's first login is also
their sign-up: Auth0 logs `ss` for sign-ups through database connections, and a user
created by a first social, native social or enterprise login would have none.

Auth0 does not sign log-stream deliveries. It sends the "Authorization Token" configured on
the stream as the `Authorization` header, verbatim, so the bridge compares that whole value
(e.g. `Bearer 3f9c...`) in constant time against each configured token.

One delivery carries many log records (a JSON array, JSON lines, or one object, as the
stream's content format says). Each record is its own event: its `event_id` comes from the
record's `log_id`, so a record that Auth0 sends again, in another batch or another format,
counts once at Millimetric. A record of the wrong shape is skipped without sinking the
others in its batch; a body that is not JSON at all is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any, Final

import msgspec

from bridge import Forget, Identify, Output, PayloadInvalid, Track
from bridge.errors import EventInvalid, SignatureInvalid
from bridge.events import NAME_MAX_CHARS
from bridge.plugin import Sample, SourceOptions, WebhookRequest

__all__ = ["Auth0Handler", "Auth0Options", "AuthorizationScheme", "LogBatch", "handler"]

# Auth0's log ids are 56 characters; the cap keeps `<event>:auth0:<log_id>` within the
# 128 characters an event_id may have, so one odd record cannot fail its whole batch.
LogId = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
ZonedTime = Annotated[datetime, msgspec.Meta(tz=True)]


class AuthorizationScheme:
    """A shared token in the `Authorization` header, compared whole and in constant time.

    Nothing about the body is signed, so a tampered body with the right token is accepted:
    the token only proves the sender knows it (`signs_body = False` says so). The header is
    the secret itself, so `headers` is empty: the intake keeps the headers a scheme lists
    next to the raw body, and a bearer token has no business in the store.
    """

    headers: tuple[str, ...] = ()
    signs_timestamp = False
    signs_body = False

    def verify(self, request: WebhookRequest, secrets: Sequence[str], tolerance: int) -> None:
        # Only HTTP's own whitespace: str.strip() would also take "\xa0" and "\x85", which
        # here are bytes of a UTF-8 character (the last byte of "à" is 0xA0).
        given = request.headers.get("authorization", "").strip(" \t")
        if not given:
            raise SignatureInvalid("missing Authorization header")
        presented = _sent_bytes(given)
        matched = False
        for secret in secrets:  # every token is compared, so timing does not tell which
            matched |= hmac.compare_digest(_token_bytes(secret.strip()), presented)
        if not matched:
            raise SignatureInvalid("Authorization does not match any configured token")

    def sign(self, body: bytes, secret: str, timestamp: int) -> dict[str, str]:
        return {"authorization": secret, "content-type": "application/json"}


def _sent_bytes(value: str) -> bytes:
    """The header's bytes as they were sent. Header values reach a handler decoded as
    latin-1 (the ASGI convention, which `WebhookRequest` keeps), so encoding them back as
    latin-1 gives the sender's bytes: UTF-8 for a token with non-ASCII characters, to be
    compared with the configured token's UTF-8. A value no wire could give (a character
    past U+00FF, from a caller that built the request from text) is taken as text."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def _token_bytes(token: str) -> bytes:
    """A configured token as UTF-8. An environment variable holding bytes that are not
    UTF-8 reaches Python with them escaped as surrogates; they go back to those bytes."""
    try:
        return token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        return token.encode("utf-8", "surrogatepass")


class Auth0Options(SourceOptions, frozen=True, kw_only=True, forbid_unknown_fields=True):
    forget_on_user_deleted: bool = False  # `sdu` erases the user at Millimetric


class LoginStats(msgspec.Struct, frozen=True):
    logins_count: int | None = msgspec.field(default=None, name="loginsCount")


class Prompt(msgspec.Struct, frozen=True):
    stats: LoginStats | None = None


class Details(msgspec.Struct, frozen=True):
    """Where a login record counts the user's logins: `details.stats.loginsCount`, or that
    of the prompt that authenticated them (`details.prompts[].stats.loginsCount`)."""

    stats: LoginStats | None = None
    prompts: list[Prompt] | None = None


class LogData(msgspec.Struct, frozen=True):
    """The fields read from a record's `data`; user names, e-mails, IPs and user agents
    are in the payload too and deliberately left unread."""

    type: str
    date: ZonedTime
    user_id: str | None = None
    log_id: LogId | None = None
    connection: str | None = None
    client_id: str | None = None
    client_name: str | None = None
    strategy: str | None = None
    # Read only for a login, and leniently: a record whose details are not of the shape
    # expected is still a login, just not known to be the first.
    details: msgspec.Raw = msgspec.Raw(b"null")


class LogRecord(msgspec.Struct, frozen=True):
    data: LogData
    log_id: LogId | None = None  # Auth0 puts it here and in data.log_id


class LogBatch(msgspec.Struct, frozen=True):
    """A delivery's readable records, in the order sent, and how many were skipped."""

    records: tuple[LogRecord, ...]
    skipped: int = 0


_raw_decoder: Final = msgspec.json.Decoder(msgspec.Raw)
_array_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_record_decoder: Final = msgspec.json.Decoder(LogRecord)
_details_decoder: Final = msgspec.json.Decoder(Details)

#: Successful logins: `s`, and `sens`, a native social login. Auth0's "Login - Success"
#: filter also lists `scoa` (cross-origin authentication), a step of an embedded login
#: whose /authorize logs the login's own `s`: counting it too would count logins twice.
LOGINS: Final = frozenset({"s", "sens"})
#: The log types translated; every other type is acknowledged and ignored.
TRANSLATED: Final = frozenset({"ss", "sdu", *LOGINS})


def _split(body: bytes) -> list[bytes]:
    """The records of a JSON array, a single object, or JSON lines, as raw JSON texts.

    A JSON-lines line that is not JSON is one bad record, skipped later like any other;
    only a body in which nothing is JSON is refused."""
    try:
        whole = bytes(_raw_decoder.decode(body))
    except (msgspec.DecodeError, RecursionError):  # nested past msgspec's depth limit
        whole = None
    if whole is not None:
        start = whole.lstrip()[:1]
        if start == b"[":
            return [bytes(item) for item in _array_decoder.decode(whole)]
        if start == b"{":
            return [whole]
        raise PayloadInvalid("an Auth0 log stream sends an array, JSON lines or an object")
    lines = [line for line in body.splitlines() if line.strip()]
    readable = 0
    for line in lines:
        try:
            _raw_decoder.decode(line)
            readable += 1
        except (msgspec.DecodeError, RecursionError):
            continue
    if not readable:
        raise PayloadInvalid("not an Auth0 log stream body: no JSON in it")
    return lines


def _read(text: bytes) -> LogRecord | None:
    try:
        record = _record_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    return record if (record.log_id or record.data.log_id) else None  # no id: no dedupe


class Auth0Handler:
    name = "auth0"
    secret_variable = "AUTH0_WEBHOOK_TOKEN"  # noqa: S105 (a variable's name, not a secret)
    scheme = AuthorizationScheme()
    options_type = Auth0Options
    # None read: the records are in the body. `Authorization` (the scheme's token) is the
    # secret itself and is never kept: a token scheme (`signs_body = False`) contributes no
    # header to what the intake stores (`bridge.plugin.kept_headers`).
    headers: tuple[str, ...] = ()

    def delivery_id(self, request: WebhookRequest) -> str:
        # A delivery holds many records and Auth0 gives it no id of its own; a retry of
        # the same batch is the same bytes. Records are deduplicated by their log_id.
        return "sha256:" + hashlib.sha256(request.body).hexdigest()

    def parse(self, request: WebhookRequest) -> LogBatch:
        texts = _split(request.body)
        read = [_read(text) for text in texts]
        records = tuple(r for r in read if r is not None)
        return LogBatch(records=records, skipped=len(read) - len(records))

    def translate(
        self, request: WebhookRequest, payload: LogBatch, options: Auth0Options
    ) -> list[Output]:
        calls: list[Output] = []
        for record in payload.records:
            try:
                calls.extend(self._record(record, options))
            except EventInvalid:
                continue  # one record the ingest API would refuse: skip it, keep the batch
        return calls

    @staticmethod
    def _record(record: LogRecord, options: Auth0Options) -> list[Output]:
        data = record.data
        user_id = data.user_id or None
        log_id = record.log_id or data.log_id
        if data.type not in TRANSLATED or not user_id or not log_id:
            return []
        if data.type == "sdu":
            return [Forget(user_id=user_id)] if options.forget_on_user_deleted else []
        # Ids and the app's own names only: no IP, user agent, user name or e-mail.
        context = {
            "connection": data.connection,
            "strategy": data.strategy,
            "client_id": data.client_id,
            "client_name": data.client_name,
        }
        properties = {k: v for k, v in context.items() if v}
        traits = {k: v for k, v in properties.items() if k in ("connection", "strategy")}
        # One sign-up per user, whichever record says it (an `ss`, or the first login that
        # follows it or stands for it): its event_id names the user, so they collapse.
        signup: list[Output] = [
            Identify(user_id=user_id, traits=traits),
            _track("signup", _signup_id(user_id), data.date, user_id, properties),
        ]
        if data.type in LOGINS:
            login = _track("login", f"login:auth0:{log_id}", data.date, user_id, properties)
            return [*signup, login] if _first_login(data) else [login]
        return signup

    def samples(self) -> Mapping[str, Sample]:
        folder = resources.files("handlers").joinpath("samples", "auth0")
        return {
            f.name.removesuffix(".json"): Sample(body=f.read_bytes())
            for f in folder.iterdir()
            if f.name.endswith(".json")
        }

    def freshen(self, sample: Sample) -> Sample:
        """A new delivery from a sample, for `send-test`: fresh log ids and dates, and a new
        user (the same one for every record of the sample), so the records are not taken
        for ones already counted, nor the sign-up for that of a user already signed up."""
        decoded: Any = msgspec.json.decode(sample.body)
        records = decoded if isinstance(decoded, list) else [decoded]
        now = datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds")
        user = f"auth0|test{uuid.uuid4().hex[:20]}"
        for record in records:
            log_id = "900" + uuid.uuid4().hex + uuid.uuid4().hex[:21]  # 56 chars, like Auth0's
            record["log_id"] = log_id
            record["data"].update(log_id=log_id, date=now.replace("+00:00", "Z"))
            if record["data"].get("user_id"):
                record["data"]["user_id"] = user
        return Sample(body=msgspec.json.encode(decoded), headers=sample.headers)


def _track(
    event: str, event_id: str, when: datetime, user_id: str, properties: dict[str, Any]
) -> Track:
    return Track(
        event=event,
        event_id=event_id,
        timestamp=when,
        user_id=user_id,
        properties=properties,
    )


def _signup_id(user_id: str) -> str:
    """The user's sign-up, whatever record tells of it; a user id too long for an event id
    is named by its digest."""
    event_id = f"signup:auth0:{user_id}"
    if len(event_id) <= NAME_MAX_CHARS:
        return event_id
    return "signup:auth0:sha256:" + hashlib.sha256(user_id.encode()).hexdigest()[:32]


def _first_login(data: LogData) -> bool:
    """Whether the login record counts this login as the user's first."""
    try:
        details = _details_decoder.decode(data.details)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False
    stats = [details.stats, *(prompt.stats for prompt in details.prompts or ())]
    return any(found is not None and found.logins_count == 1 for found in stats)


handler: Final = Auth0Handler()
