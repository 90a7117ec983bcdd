"""What a mapped source reads, made exact: money by the currency's ISO 4217 exponent and
never through a float, ids of any size, times in seconds, milliseconds or ISO 8601."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from bridge.errors import PayloadInvalid
from bridge.events import Track, encode
from bridge.expressions import Expression, decode
from handlers import mapped_values as values

AMOUNT = Expression("payment.amount")


def from_json(text: str) -> object:
    """A value as the body decoder gives it (a JSON number with a fraction: a Decimal)."""
    return decode(text.encode())


@pytest.mark.parametrize(
    ("amount", "currency", "units", "minor"),
    [
        ('"12.345"', "KWD", "major", 12345),  # three decimals
        ('"1500"', "JPY", "major", 1500),  # none
        ("199.99", "USD", "major", 19999),  # a JSON number: 199.99 * 100 as floats is 19998.99...
        ('"199.99"', "usd", "major", 19999),
        ("0.29", "EUR", "major", 29),
        ("1500.00", "JPY", "major", 1500),  # trailing zeros are not precision
        ("4.99", "USD", "major", 499),
        ("1.525", "KWD", "major", 1525),
        ("-5.10", "USD", "major", -510),  # a refund
        ("92233720368547758.07", "USD", "major", 9223372036854775807),  # far above 2^53
        ("1999", "USD", "minor", 1999),
        ('"1999"', "USD", "minor", 1999),
        ("1500", "JPY", "minor", 1500),
        ("12345", "KWD", "minor", 12345),
        ("9007199254740993", "USD", "minor", 9007199254740993),
    ],
)
def test_money_by_the_currencys_exponent(
    amount: str, currency: str, units: str, minor: int
) -> None:
    code = values.currency("currency", Expression("currency"), currency)
    found = values.minor_units("amount", AMOUNT, from_json(amount), units, code)
    assert found == minor
    assert type(found) is int
    assert code == currency.upper()


@pytest.mark.parametrize(
    ("amount", "currency", "units", "says"),
    [
        ("19.999", "USD", "major", "more decimals than USD has (2)"),
        ('"12.3456"', "KWD", "major", "more decimals than KWD has (3)"),
        ('"1,500"', "JPY", "major", "not a decimal amount"),
        ('"1e3"', "USD", "major", "not a decimal amount"),
        ("true", "USD", "major", "gave True, not an amount"),
        ('{"value": 1}', "USD", "major", "gave an object, not an amount"),
        ("19.99", "USD", "minor", "gave 19.99, not a whole number of minor units"),
        ('"19.99"', "USD", "minor", "not a whole number of minor units"),
    ],
)
def test_an_amount_that_is_not_exact_is_refused_not_rounded(
    amount: str, currency: str, units: str, says: str
) -> None:
    with pytest.raises(PayloadInvalid) as raised:
        values.minor_units("on.x.amount", AMOUNT, from_json(amount), units, currency)
    assert str(raised.value).startswith("on.x.amount: `payment.amount` gave ")
    assert says in str(raised.value)


@pytest.mark.parametrize("currency", ["XYZ", "xau", "XTS", "US", "USDT", "", 840, None])
def test_a_currency_the_bridge_does_not_know_is_refused(currency: object) -> None:
    with pytest.raises(PayloadInvalid) as raised:
        values.currency("on.x.currency", Expression("payment.currency"), currency)
    reason = str(raised.value)
    assert reason.startswith("on.x.currency: `payment.currency` gave ")
    assert "not a currency the bridge knows" in reason or "required" in reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('"u_42"', "u_42"),
        ("9007199254740993", "9007199254740993"),  # above 2^53: as sent
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("42.0", "42"),
        ("null", None),
        ('"  "', None),
    ],
)
def test_ids_are_text_as_sent(raw: str, expected: str | None) -> None:
    assert values.text("user_id", Expression("user.id"), from_json(raw)) == expected


@pytest.mark.parametrize(("raw", "kind"), [("4.5", "4.5"), ("true", "True"), ("[1]", "an array")])
def test_an_id_that_is_not_text_or_an_integer_is_refused(raw: str, kind: str) -> None:
    with pytest.raises(PayloadInvalid, match=rf"user_id: `user.id` gave {kind},"):
        values.text("user_id", Expression("user.id"), from_json(raw))


def test_a_required_value_that_is_missing_names_its_expression() -> None:
    with pytest.raises(PayloadInvalid) as raised:
        values.required('on."user.created".event_id', Expression("user.id"), None)
    assert str(raised.value) == (
        'on."user.created".event_id: `user.id` gave no value, and it is required'
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1767225600", datetime(2026, 1, 1, tzinfo=UTC)),  # seconds
        ("1767225600.25", datetime(2026, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)),
        ("1767225600123", datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)),  # milliseconds
        ('"1767225600"', datetime(2026, 1, 1, tzinfo=UTC)),
        ('"2026-01-01T00:00:00Z"', datetime(2026, 1, 1, tzinfo=UTC)),
        (
            '"2026-01-01T02:00:00.5+02:00"',
            datetime(2026, 1, 1, 2, 0, 0, 500000, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("null", None),
    ],
)
def test_times_in_seconds_milliseconds_or_iso_8601(raw: str, expected: datetime | None) -> None:
    found = values.timestamp("timestamp", Expression("created"), from_json(raw))
    assert found == expected
    if found is not None:
        assert found.utcoffset() is not None


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ('"2026-01-01T00:00:00"', "an ISO 8601 time without a zone"),
        ('"yesterday"', "not unix seconds, milliseconds or ISO 8601"),
        ("-1", "not unix seconds or milliseconds"),
        ("1767225600123456", "not unix seconds or milliseconds"),  # microseconds: not guessed
        ("true", "not a time"),
    ],
)
def test_a_time_that_cannot_be_read_is_refused(raw: str, says: str) -> None:
    with pytest.raises(PayloadInvalid, match=says):
        values.timestamp("timestamp", Expression("created"), from_json(raw))


def test_properties_are_sent_as_the_numbers_they_were() -> None:
    body = decode(b'{"price": 199.99, "id": 9007199254740993, "long": 0.12345678901234567890123}')
    sent = values.plain(body)
    # The same numbers on the wire; one a double cannot hold goes as its exact digits.
    assert encode(Track(event="x", properties=sent)) == (
        b'{"event":"x","properties":{"price":199.99,"id":9007199254740993,'
        b'"long":"0.12345678901234567890123"}}'
    )
    assert values.plain(Decimal("1E+3")) == 1000.0
