"""Mapped sources (`handler = "mapped"` in bridge.toml): the issue's example as written, each
signature scheme with rotation, every start-up error as one line, exact ids and money,
quarantine reasons, and the example end to end over real HTTP into the local sink."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from bridge.app import create_app
from bridge.cli import main as cli_main
from bridge.config import load_settings
from bridge.errors import ConfigError, SignatureInvalid
from bridge.events import Forget, Identify, Track
from bridge.plugin import WebhookRequest, kept_headers
from bridge.registry import Source, load_handlers, load_sources, load_templates
from bridge.stages.translate import translate_one
from bridge.store import StoredDelivery, Translation
from tests.conftest import RunningSink, ServerThread, translated

#: The issue's example, exactly as written there.
EXAMPLE = """\
[sources.acme]
handler = "mapped"
secret_variable = "ACME_WEBHOOK_SECRET"
signature = { scheme = "hmac-sha256", header = "X-Acme-Signature", encoding = "hex", prefix = "sha256=" }
delivery_id = "id"        # JMESPath over the JSON body; "header:X-Acme-Delivery" reads a header
event_type = "type"

[sources.acme.on."payment.succeeded"]
track = "purchase"
event_id = "join(':', ['purchase', payment.id])"
timestamp = "created"                     # unix seconds, unix milliseconds or ISO 8601
user_id = "payment.customer.user_id"
anonymous_id = "payment.metadata.millimetric_anonymous_id"
amount = "payment.amount"                 # becomes properties.amount_cents
amount_units = "major"                    # "major": a decimal amount in major units; "minor": integer minor units
currency = "payment.currency"
properties = { plan = "payment.plan", coupon = "payment.coupon" }

[sources.acme.on."user.created"]
identify = { user_id = "user.id", traits = { email = "user.email", name = "user.name" } }
track = "signup"
event_id = "join(':', ['signup', user.id])"
user_id = "user.id"
"""  # noqa: E501 (as written in the issue)

SAMPLES = Path(__file__).parent.parent / "docs" / "examples" / "samples"
OLD_SECRET = "acme-secret-old"
SECRET = "acme-secret-new"
WHSEC = "whsec_" + base64.b64encode(b"mapped source test secret").decode()

PAYMENT = (
    b'{"id": "evt_1001", "type": "payment.succeeded", "created": 1767225600,'
    b' "payment": {"id": "pay_5001", "amount": 199.99, "currency": "usd", "plan": "pro",'
    b' "coupon": null, "customer": {"user_id": "u_42"},'
    b' "metadata": {"millimetric_anonymous_id": "anon_7f3c2a91"}}}'
)
# An id above 2^53: a float would make it ...992.
SIGNUP = (
    b'{"id": "evt_1000", "type": "user.created", "created": "2026-01-01T00:00:00Z",'
    b' "user": {"id": 9007199254740993, "email": "ada@example.com", "name": "Ada"}}'
)


def sources_from(
    tmp_path: Path, toml: str, env: Mapping[str, str] | None = None, *, samples: bool = False
) -> dict[str, Source]:
    (tmp_path / "bridge.toml").write_text(toml)
    if samples and not (tmp_path / "samples").exists():
        shutil.copytree(SAMPLES, tmp_path / "samples")
    return load_sources(
        {"BRIDGE_CONFIG": str(tmp_path / "bridge.toml"), **(env or {})},
        load_handlers(),
        templates=load_templates(),
    )


def acme(tmp_path: Path, toml: str = EXAMPLE) -> Source:
    return sources_from(tmp_path, toml, {"ACME_WEBHOOK_SECRET": f"{OLD_SECRET},{SECRET}"})["acme"]


def hex_signature(body: bytes, secret: str) -> str:
    """The example's signature, computed here from its description, not by the bridge."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def request(source: Source, body: bytes, headers: Mapping[str, str] | None = None) -> Any:
    return WebhookRequest(
        source=source.name,
        headers={k.lower(): v for k, v in (headers or {}).items()},
        body=body,
        received_at=time.time(),
    )


def translate(source: Source, body: bytes, headers: Mapping[str, str] | None = None) -> Translation:
    """As the bridge does: the delivery id at intake, then the translate stage's own
    `translate_one` over what the store keeps (the body and the kept headers)."""
    arrived = request(source, body, headers)
    delivery_id = source.handler.delivery_id(arrived)
    stored = StoredDelivery(
        id=1,
        source=source.name,
        provider_event_id=delivery_id,
        received_at=arrived.received_at,
        raw_body=body,
        headers={h: v for h, v in arrived.headers.items() if h in source.kept_headers},
    )
    return translate_one(stored, {source.name: source})


def test_the_example_works_as_written(tmp_path: Path) -> None:
    source = acme(tmp_path)
    assert source.handler.name == "mapped"
    assert source.secret_variable == "ACME_WEBHOOK_SECRET"
    assert source.secrets == (OLD_SECRET, SECRET)
    assert source.kept_headers == ("x-acme-signature",)  # the signature, for a re-check
    payment = translate(source, PAYMENT)
    assert payment.failure is None
    (purchase,) = payment.outputs
    assert isinstance(purchase, Track)
    assert purchase.event == "purchase"
    assert purchase.event_id == "purchase:pay_5001"
    assert purchase.timestamp is not None
    assert purchase.timestamp.isoformat() == "2026-01-01T00:00:00+00:00"
    assert (purchase.user_id, purchase.anonymous_id) == ("u_42", "anon_7f3c2a91")
    # 199.99 arrived as a JSON number: 19999, not 19998 (a float's 199.98999...).
    assert purchase.properties == {"plan": "pro", "amount_cents": 19999, "currency": "USD"}
    signup = translate(source, SIGNUP)
    assert signup.outputs == [
        Identify(user_id="9007199254740993", traits={"email": "ada@example.com", "name": "Ada"}),
        Track(event="signup", event_id="signup:9007199254740993", user_id="9007199254740993"),
    ]


def test_mapped_registers_as_a_template_beside_the_handlers(tmp_path: Path) -> None:
    assert "mapped" in load_templates()
    assert "mapped" not in load_handlers()  # no source of its own, no /webhooks/mapped
    (tmp_path / "bridge.toml").write_text(EXAMPLE)
    env = {"BRIDGE_CONFIG": str(tmp_path / "bridge.toml")}
    assert "mapped" not in load_sources(env, load_handlers(), templates=load_templates())
    with pytest.raises(ConfigError, match="no handler named 'mapped' is installed"):
        load_sources(env, load_handlers())
    renamed = EntryPoint("other", "handlers.mapped:template", "millimetric_bridge.handlers")
    with pytest.raises(ConfigError, match="must equal the entry-point name"):
        load_templates([renamed])


# -- signature schemes ------------------------------------------------------------------


def test_hmac_hex_with_a_prefix_any_of_several_secrets(tmp_path: Path) -> None:
    source = acme(tmp_path)
    scheme = source.handler.scheme
    for secret in (OLD_SECRET, SECRET):  # rotation: either verifies
        signed = request(source, PAYMENT, {"X-Acme-Signature": hex_signature(PAYMENT, secret)})
        scheme.verify(signed, source.secrets, source.options.tolerance)
    wrong = request(source, PAYMENT, {"X-Acme-Signature": hex_signature(PAYMENT, "other")})
    with pytest.raises(SignatureInvalid, match="does not match"):
        scheme.verify(wrong, source.secrets, 300)
    tampered = request(
        source,
        PAYMENT.replace(b"199.99", b"999.99"),
        {"X-Acme-Signature": hex_signature(PAYMENT, SECRET)},
    )
    with pytest.raises(SignatureInvalid):
        scheme.verify(tampered, source.secrets, 300)
    with pytest.raises(SignatureInvalid, match="missing x-acme-signature"):
        scheme.verify(request(source, PAYMENT), source.secrets, 300)
    unprefixed = hex_signature(PAYMENT, SECRET).removeprefix("sha256=")
    with pytest.raises(SignatureInvalid):
        scheme.verify(request(source, PAYMENT, {"X-Acme-Signature": unprefixed}), [SECRET], 300)


def test_hmac_base64_without_a_prefix(tmp_path: Path) -> None:
    toml = EXAMPLE.replace(
        'encoding = "hex", prefix = "sha256=" }', 'encoding = "base64" }'
    ).replace('"X-Acme-Signature"', '"X-Signature"')
    source = acme(tmp_path, toml)
    given = base64.b64encode(hmac.new(SECRET.encode(), PAYMENT, hashlib.sha256).digest()).decode()
    source.handler.scheme.verify(
        request(source, PAYMENT, {"X-Signature": given}), source.secrets, 300
    )
    hexed = request(
        source, PAYMENT, {"X-Signature": hmac.new(SECRET.encode(), PAYMENT, "sha256").hexdigest()}
    )
    with pytest.raises(SignatureInvalid):
        source.handler.scheme.verify(hexed, source.secrets, 300)


STANDARD = """\
[sources.billing]
handler = "mapped"
signature = { scheme = "standard-webhooks" }
tolerance = 600
event_type = "type"

[sources.billing.on."invoice.paid"]
track = "purchase"
event_id = "join(':', ['purchase', data.invoice_id])"
amount = "data.total"
amount_units = "minor"
currency = "data.currency"
"""
INVOICE = (
    b'{"type": "invoice.paid", "data": {"invoice_id": "in_1", "total": 1500, "currency": "JPY"}}'
)


def standard_headers(body: bytes, secret: str, msg_id: str, timestamp: int) -> dict[str, str]:
    """Signed as the Standard Webhooks spec says, computed here rather than by the bridge."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


def test_standard_webhooks_with_the_sources_tolerance_and_rotation(tmp_path: Path) -> None:
    old = "whsec_" + base64.b64encode(b"the old secret").decode()
    source = sources_from(tmp_path, STANDARD, {"BILLING_WEBHOOK_SECRET": f"{old},{WHSEC}"})[
        "billing"
    ]
    assert source.options.tolerance == 600
    scheme, now = source.handler.scheme, int(time.time())
    for secret, age in ((WHSEC, 0), (old, 0), (WHSEC, 500)):  # 500 s: within this source's 600
        signed = request(source, INVOICE, standard_headers(INVOICE, secret, "msg_1", now - age))
        scheme.verify(signed, source.secrets, source.options.tolerance)
    for age in (700, -700):  # stale, or ahead
        late = request(source, INVOICE, standard_headers(INVOICE, WHSEC, "msg_1", now - age))
        with pytest.raises(SignatureInvalid, match="tolerance"):
            scheme.verify(late, source.secrets, source.options.tolerance)
    other = "whsec_" + base64.b64encode(b"someone else").decode()
    forged = request(source, INVOICE, standard_headers(INVOICE, other, "msg_1", now))
    with pytest.raises(SignatureInvalid):
        scheme.verify(forged, source.secrets, source.options.tolerance)
    # No delivery_id given: the signed message id is the delivery id.
    signed = request(source, INVOICE, standard_headers(INVOICE, WHSEC, "msg_1", now))
    assert source.handler.delivery_id(signed) == "msg_1"
    (purchase,) = translate(source, INVOICE, signed.headers).outputs
    assert isinstance(purchase, Track)
    assert purchase.properties == {"amount_cents": 1500, "currency": "JPY"}


BEARER = """\
[sources.tokened]
handler = "mapped"
signature = { scheme = "bearer" }
delivery_id = "id"
event_type = "type"

[sources.tokened.on."*"]
track = "thing_happened"
"""


def test_bearer_tokens_with_rotation_never_kept(tmp_path: Path) -> None:
    env = {"TOKENED_WEBHOOK_SECRET": "old-token, new-token"}
    source = sources_from(tmp_path, BEARER, env)["tokened"]
    scheme = source.handler.scheme
    body = b'{"id": "d_1", "type": "anything"}'
    for token in ("old-token", "new-token"):
        sent = request(source, body, {"Authorization": f"Bearer {token}"})
        scheme.verify(sent, source.secrets, 300)
    for header in ("Bearer other", "new-token", "Basic new-token", ""):
        with pytest.raises(SignatureInvalid):
            scheme.verify(request(source, body, {"Authorization": header}), source.secrets, 300)
    # The token is the secret itself: nothing of it is stored with the body.
    assert kept_headers(source.handler) == ()
    assert source.kept_headers == ()
    raw = sources_from(tmp_path, BEARER.replace('"bearer" }', '"bearer", prefix = "" }'), env)[
        "tokened"
    ]
    raw.handler.scheme.verify(request(raw, body, {"Authorization": "new-token"}), raw.secrets, 300)
    with pytest.raises(SignatureInvalid):
        raw.handler.scheme.verify(
            request(raw, body, {"Authorization": "Bearer new-token"}), raw.secrets, 300
        )


# -- start-up errors --------------------------------------------------------------------

HEAD = """\
[sources.acme]
handler = "mapped"
signature = { scheme = "hmac-sha256", header = "X-Sig" }
delivery_id = "id"
event_type = "type"
"""
PAID = '[sources.acme.on."paid"]\n'


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        (HEAD + "trak = 1\n" + PAID, "Object contains unknown field `trak`"),
        (HEAD + PAID + 'trak = "purchase"\n', "on.paid: Object contains unknown field `trak`"),
        (HEAD + PAID + 'track = "p"\nuser_id = "user id"\n', "on.paid.user_id: not a JMESPath"),
        (HEAD + PAID + 'track = "p"\nuser_id = "lower(u)"\n', "unknown function lower()"),
        (HEAD + PAID + 'track = "p"\nevent_id = "join(id)"\n', "join() takes 2 arguments, not 1"),
        (
            HEAD.replace("hmac-sha256", "hmac-sha1") + PAID,
            "signature.scheme: unknown scheme 'hmac-sha1': one of hmac-sha256,",
        ),
        (HEAD.replace(', header = "X-Sig"', "") + PAID, "signature.header: hmac-sha256 needs"),
        (HEAD.replace('"X-Sig"', '"X Sig"') + PAID, "signature.header: 'X Sig' is not a header"),
        (
            HEAD.replace('"X-Sig" }', '"X-Sig", encoding = "base32" }') + PAID,
            "signature.encoding: 'base32' is neither hex nor base64",
        ),
        (
            HEAD.replace('"hmac-sha256", header = "X-Sig"', '"standard-webhooks", header = "X"')
            + PAID,
            "signature.header: standard-webhooks takes no such option",
        ),
        (
            HEAD.replace('"hmac-sha256", header = "X-Sig"', '"bearer", header = "X"') + PAID,
            "signature.header: bearer reads Authorization only",
        ),
        (HEAD.replace("signature = {", "# {") + PAID, "missing required field `signature`"),
        (HEAD.replace('delivery_id = "id"', "") + PAID, "delivery_id: missing"),
        (HEAD.replace('event_type = "type"', "") + PAID, "event_type: missing"),
        (HEAD, "Object missing required field `on`"),
        (HEAD + "on = {}\n", "on: no event type is mapped"),
        (HEAD + 'on.paid = "purchase"\n', "on.paid: must be a table"),
        (HEAD + PAID + 'event_id = "id"\n', "on.paid.track: missing: event_id describes a track"),
        (HEAD + PAID + 'track = ""\n', "on.paid.track: an event name is 1-128 characters"),
        (HEAD + PAID + f'track = "{"x" * 129}"\n', "an event name is 1-128 characters"),
        (HEAD + PAID + "track = 5\n", "on.paid.track: Expected `str | null`, got `int`"),
        (
            HEAD + PAID + 'track = "p"\namount = "a"\ncurrency = "c"\n',
            "on.paid.amount_units: say whether amount is in major units",
        ),
        (
            HEAD + PAID + 'track = "p"\namount = "a"\namount_units = "cents"\ncurrency = "c"\n',
            "on.paid.amount_units: say whether",
        ),
        (
            HEAD + PAID + 'track = "p"\namount = "a"\namount_units = "minor"\n',
            "on.paid.currency: missing: amount needs its currency",
        ),
        (HEAD + PAID + 'track = "p"\ncurrency = "c"\n', "on.paid.currency: only with amount"),
        (
            HEAD
            + PAID
            + 'track = "p"\namount = "a"\namount_units = "minor"\ncurrency = "\'XYZ\'"\n',
            "on.paid.currency: 'XYZ' is not an ISO 4217 currency the bridge knows",
        ),
        (
            HEAD
            + PAID
            + 'track = "p"\namount = "a"\namount_units = "minor"\ncurrency = "c"\n'
            + 'properties = { amount_cents = "x" }\n',
            "on.paid.properties.amount_cents: already set from amount and currency",
        ),
        (
            HEAD + PAID + 'track = "p"\nuser_id = "header:Authorization"\n',
            "on.paid.user_id: authorization carries credentials and is never read",
        ),
        (
            HEAD + PAID + 'identify = { traits = { a = "b" } }\n',
            "on.paid.identify: Object missing required field `user_id`",
        ),
        (
            HEAD + PAID + 'track = "p"\nforget = "user"\n',
            "on.paid.forget: a forget is the delivery's only call",
        ),
        (HEAD + 'samples = "samples/nowhere"\n' + PAID, "samples: "),
        (HEAD + "tolerance = 0\n" + PAID, "tolerance: Expected `int` >= 1"),
    ],
)
def test_each_mistake_stops_start_up_naming_the_source_and_the_key(
    tmp_path: Path, toml: str, says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        sources_from(tmp_path, toml)
    line = str(raised.value)
    assert line.startswith("bridge.toml [sources.acme]: ")
    assert says in line
    assert "\n" not in line


def test_a_bad_mapping_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "bridge.toml").write_text(HEAD + PAID + 'track = "p"\nuser_id = "user id"\n')
    env = {**os.environ, "BRIDGE_CONFIG": str(tmp_path / "bridge.toml")}
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "handlers"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        "millimetric-bridge: bridge.toml [sources.acme]: on.paid.user_id: not a JMESPath"
        " expression: Unexpected token: id"
    )


# -- what deliveries become -------------------------------------------------------------


def test_ids_above_2_53_stay_exact_in_every_field(tmp_path: Path) -> None:
    toml = (
        HEAD + PAID + 'track = "p"\nevent_id = "id"\nuser_id = "user"\nproperties = { n = "n" }\n'
    )
    source = acme(tmp_path, toml)
    body = (
        b'{"id": 18446744073709551617, "type": "paid",'
        b' "user": 9007199254740993, "n": 9007199254740993}'
    )
    arrived = request(source, body)
    assert source.handler.delivery_id(arrived) == "18446744073709551617"
    (call,) = translate(source, body).outputs
    assert isinstance(call, Track)
    assert (call.event_id, call.user_id) == ("18446744073709551617", "9007199254740993")
    assert call.properties == {"n": 9007199254740993}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            PAYMENT.replace(b'"usd"', b'"XYZ"'),
            "payload: on.\"payment.succeeded\".currency: `payment.currency` gave 'XYZ',"
            " not a currency the bridge knows",
        ),
        (
            PAYMENT.replace(b'"currency": "usd", ', b""),
            'payload: on."payment.succeeded".currency: `payment.currency` gave no value,'
            " and it is required",
        ),
        (
            PAYMENT.replace(b"199.99", b"199.999"),
            'payload: on."payment.succeeded".amount: `payment.amount` gave 199.999:'
            " 199.999 has more decimals than USD has (2)",
        ),
        (
            PAYMENT.replace(b"1767225600", b'"2026-01-01T00:00:00"'),
            'payload: on."payment.succeeded".timestamp: `created` gave'
            " '2026-01-01T00:00:00', an ISO 8601 time without a zone",
        ),
        (
            PAYMENT.replace(b'"id": "pay_5001", ', b""),
            "payload: on.\"payment.succeeded\".event_id: `join(':', ['purchase', payment.id])`"
            " failed: In function join(), invalid type for value: None",
        ),
        (
            SIGNUP.replace(b'"id": 9007199254740993, ', b""),
            'payload: on."user.created".identify.user_id: `user.id` gave no value,'
            " and it is required",
        ),
        (
            PAYMENT.replace(b'"type": "payment.succeeded", ', b""),
            "payload: event_type: `type` gave no value, and it is required",
        ),
        (
            PAYMENT.replace(b'"pay_5001"', b'"' + b"p" * 130 + b'"'),
            "event: event_id: must be 1-128 characters, got 139",
        ),
    ],
)
def test_what_cannot_be_translated_is_quarantined_naming_the_expression(
    tmp_path: Path, body: bytes, reason: str
) -> None:
    translation = translate(acme(tmp_path), body)
    assert translation.outputs == []
    assert translation.failure is not None
    assert translation.failure.startswith(reason), translation.failure


def test_optional_values_that_are_missing_are_left_out(tmp_path: Path) -> None:
    bare = b'{"id": "evt_2", "type": "payment.succeeded", "payment": {"id": "pay_2"}}'
    (call,) = translate(acme(tmp_path), bare).outputs
    # No time, no ids, no amount (so no currency either), no plan or coupon.
    assert call == Track(event="purchase", event_id="purchase:pay_2")


CATCH_ALL = """\
[sources.acme]
handler = "mapped"
signature = { scheme = "hmac-sha256", header = "X-Sig" }
delivery_id = "header:X-Acme-Delivery"
event_type = "header:X-Acme-Event"
test_event = "livemode == `false`"

[sources.acme.on.ping]

[sources.acme.on."user.deleted"]
forget = "user.id"

[sources.acme.on."*"]
track = "acme_event"
properties = { kind = "header:X-Acme-Event", total = "sum(items[].price)" }
"""


def test_event_types_without_a_table_are_ignored_or_caught_by_the_catch_all(
    tmp_path: Path,
) -> None:
    source = acme(tmp_path, EXAMPLE)
    assert translate(source, b'{"id": "e", "type": "invoice.created"}').outputs == []
    source = acme(tmp_path, CATCH_ALL)
    # Header reads are kept with the delivery, for translation from the store.
    assert source.kept_headers == ("x-sig", "x-acme-delivery", "x-acme-event")
    body = b'{"livemode": true, "items": [{"price": 0.1}, {"price": 0.2}], "user": {"id": "u_1"}}'
    headers = {"X-Acme-Delivery": "d_1", "X-Acme-Event": "order.placed"}
    (call,) = translate(source, body, headers).outputs
    # 0.1 + 0.2 is exactly 0.3 here, not 0.30000000000000004.
    assert call == Track(event="acme_event", properties={"kind": "order.placed", "total": 0.3})
    assert translate(source, body, {**headers, "X-Acme-Event": "ping"}).outputs == []
    forget = translate(source, body, {**headers, "X-Acme-Event": "user.deleted"}).outputs
    assert forget == [Forget(user_id="u_1")]
    # A test event is ignored unless the source includes them.
    test_body = body.replace(b"true", b"false")
    assert translate(source, test_body, headers).outputs == []
    included = sources_from(
        tmp_path, CATCH_ALL.replace("test_event", "include_test_events = true\ntest_event")
    )["acme"]
    assert len(translate(included, test_body, headers).outputs) == 1
    # Not JSON: stored under its header id, then quarantined.
    assert translate(source, b"<xml/>", headers).failure == (
        "payload: the body is not JSON: JSON is malformed: invalid character (byte 0)"
    )


def test_samples_and_send_test_make_new_deliveries(tmp_path: Path) -> None:
    source = sources_from(
        tmp_path,
        EXAMPLE.replace('event_type = "type"\n', 'event_type = "type"\nsamples = "samples/acme"\n'),
        samples=True,
    )["acme"]
    samples = source.handler.samples()
    assert sorted(samples) == ["payment.succeeded", "user.created"]
    handler: Any = source.handler
    for sample in samples.values():
        first = translate(source, sample.body)
        fresh = handler.freshen(sample)
        again = translate(source, fresh.body)
        assert first.failure is None
        assert again.failure is None
        assert again.delivery.provider_event_id != first.delivery.provider_event_id
        old_ids = {c.event_id for c in first.outputs if isinstance(c, Track)}
        new_ids = {c.event_id for c in again.outputs if isinstance(c, Track)}
        assert old_ids.isdisjoint(new_ids)


def test_map_prints_the_calls_and_handlers_lists_mapped_sources(tmp_path: Path) -> None:
    (tmp_path / "bridge.toml").write_text(EXAMPLE)
    (tmp_path / "payment.json").write_bytes(PAYMENT)
    env = {"BRIDGE_CONFIG": str(tmp_path / "bridge.toml"), "ACME_WEBHOOK_SECRET": "a,b"}
    runner = CliRunner(env=env)
    mapped = runner.invoke(cli_main, ["map", "acme", str(tmp_path / "payment.json")])
    assert mapped.exit_code == 0, mapped.output
    assert mapped.output.splitlines() == [
        "delivery evt_1001",
        'track     {"event":"purchase","event_id":"purchase:pay_5001",'
        '"timestamp":"2026-01-01T00:00:00Z","anonymous_id":"anon_7f3c2a91","user_id":"u_42",'
        '"properties":{"plan":"pro","amount_cents":19999,"currency":"USD"}}',
    ]
    unknown = PAYMENT.replace(b'"usd"', b'"XYZ"')
    quarantined = runner.invoke(cli_main, ["map", "acme", "-"], input=unknown)
    assert quarantined.exit_code == 1
    assert quarantined.output.splitlines()[-1].startswith(
        'quarantined: payload: on."payment.succeeded".currency:'
    )
    ignored = runner.invoke(cli_main, ["map", "acme", "-"], input=b'{"id": "e", "type": "x"}')
    assert ignored.output.splitlines() == ["delivery e", "no call: acknowledged and ignored"]
    listed = runner.invoke(cli_main, ["handlers"])
    assert listed.exit_code == 0
    line = next(x for x in listed.output.splitlines() if x.startswith("acme "))
    assert "handler=mapped" in line
    assert "/webhooks/acme" in line
    assert "configured (2 secrets)" in line
    assert "on: payment.succeeded, user.created" in listed.output


# -- end to end -------------------------------------------------------------------------


class Bridge:
    def __init__(self, url: str, sink: RunningSink, database: Path) -> None:
        self.url = url
        self.sink = sink
        self.database = database

    def post(self, body: bytes, secret: str = SECRET) -> httpx.Response:
        return httpx.post(
            f"{self.url}/webhooks/acme",
            content=body,
            headers={"X-Acme-Signature": hex_signature(body, secret)},
        )


@pytest.fixture
def bridge(sink: RunningSink, tmp_path: Path) -> Iterator[Bridge]:
    env = {
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": sink.url,
        "BRIDGE_DATABASE_URL": f"sqlite:///{tmp_path}/bridge.db",
        "BRIDGE_CONFIG": str(tmp_path / "bridge.toml"),
        "ACME_WEBHOOK_SECRET": f"{OLD_SECRET},{SECRET}",
    }
    (tmp_path / "bridge.toml").write_text(EXAMPLE)
    sources = load_sources(env, load_handlers(), templates=load_templates())
    with ServerThread(create_app(load_settings(env), sources=sources)) as server:
        yield Bridge(server.url, sink, tmp_path / "bridge.db")


def test_the_example_end_to_end_over_http_into_the_sink(bridge: Bridge) -> None:
    assert bridge.post(SIGNUP, OLD_SECRET).json() == {"ok": True, "result": "accepted"}
    assert bridge.post(PAYMENT).json() == {"ok": True, "result": "accepted"}
    # A redelivery (same id, signed again) is not stored twice...
    assert bridge.post(PAYMENT, OLD_SECRET).json() == {"ok": True, "result": "duplicate"}
    # ...and the same payment in a delivery of its own collapses into the same event.
    again = PAYMENT.replace(b"evt_1001", b"evt_1001_resent")
    assert bridge.post(again).json() == {"ok": True, "result": "accepted"}
    assert translated(bridge.database, "evt_1001_resent") == ("translated", None)
    # Identifies and tracks go by different routes: compared in a fixed order.
    calls = sorted(bridge.sink.arrived(4), key=lambda c: (c["route"], c.get("event", c["user_id"])))
    assert calls == [
        {
            "route": "identify",
            "user_id": "9007199254740993",
            "traits": {"email": "ada@example.com", "name": "Ada"},
        },
        # Learned from the purchase, which names the visitor and the user: sent once.
        {"route": "identify", "user_id": "u_42", "anonymous_id": "anon_7f3c2a91"},
        {
            "route": "track",
            "event": "purchase",
            "event_id": "purchase:pay_5001",
            "timestamp": "2026-01-01T00:00:00Z",
            "anonymous_id": "anon_7f3c2a91",
            "user_id": "u_42",
            "properties": {"plan": "pro", "amount_cents": 19999, "currency": "USD"},
        },
        {
            "route": "track",
            "event": "signup",
            "event_id": "signup:9007199254740993",
            "user_id": "9007199254740993",
        },
    ]
    stats = httpx.get(f"{bridge.sink.url}/_sink/stats").json()
    assert stats["received"] == 4


def test_refusals_and_quarantine_end_to_end(bridge: Bridge) -> None:
    unsigned = httpx.post(f"{bridge.url}/webhooks/acme", content=PAYMENT)
    assert unsigned.status_code == 401
    assert bridge.post(PAYMENT, "not the secret").status_code == 401
    # No delivery id in the body: nothing to tell a retry by, so refused (400).
    assert bridge.post(b'{"type": "payment.succeeded"}').status_code == 400
    unknown = PAYMENT.replace(b"evt_1001", b"evt_xyz").replace(b'"usd"', b'"XYZ"')
    assert bridge.post(unknown).json() == {"ok": True, "result": "accepted"}
    state, reason = translated(bridge.database, "evt_xyz")
    assert state == "quarantined"
    assert reason == (
        "payload: on.\"payment.succeeded\".currency: `payment.currency` gave 'XYZ',"
        " not a currency the bridge knows"
    )
    ignored = b'{"id": "evt_other", "type": "invoice.created"}'
    assert bridge.post(ignored).json() == {"ok": True, "result": "accepted"}
    assert translated(bridge.database, "evt_other") == ("translated", None)
    with sqlite3.connect(bridge.database) as db:
        stored = sorted(r[0] for r in db.execute("SELECT provider_event_id FROM inbox"))
    assert stored == ["evt_other", "evt_xyz"]  # the refusals stored nothing
    time.sleep(0.3)
    assert httpx.get(f"{bridge.sink.url}/_sink/stats").json()["received"] == 0
