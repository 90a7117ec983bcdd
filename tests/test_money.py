"""Decimal strings in major units become exact integers in the currency's minor unit: by
table, and as properties over amounts a float could not hold."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import PayloadInvalid
from bridge.money import CURRENCIES, EXPONENTS, exponent, to_minor_units

# The ISO 4217 codes whose minor unit is not a hundredth, written out again here.
# fmt: off
ZERO = frozenset({
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
    "VUV", "XAF", "XOF", "XPF",
})
# fmt: on
THREE = frozenset({"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"})
FOUR = frozenset({"CLF", "UYW"})


def major(minor: int, places: int) -> str:
    """`minor` written in major units, by string operations only (no float, no Decimal)."""
    digits = str(abs(minor)).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}" if places else digits
    return f"-{text}" if minor < 0 else text


@pytest.mark.parametrize(
    ("amount", "currency", "cents"),
    [
        ("404.95", "USD", 40495),
        ("0.29", "USD", 29),  # 0.29 * 100 is 28.999999999999996 as floats
        ("1.15", "EUR", 115),  # 1.15 * 100 is 114.99999999999999
        ("19.99", "usd", 1999),  # codes in any case
        ("0.00", "USD", 0),
        ("0.0", "USD", 0),  # fewer decimals than the currency has
        ("7", "GBP", 700),
        ("1500", "JPY", 1500),  # no minor unit
        ("1500.00", "JPY", 1500),  # trailing zeros are not more precision
        ("980", "KRW", 980),
        ("1.234", "KWD", 1234),  # three decimals
        ("1.2", "BHD", 1200),
        ("12.3456", "CLF", 123456),  # four
        ("-5.10", "USD", -510),
        ("92233720368547758.07", "USD", 9223372036854775807),  # far above 2**53
        ("123456789012345678901234567.89", "USD", 12345678901234567890123456789),
    ],
)
def test_amounts_by_table(amount: str, currency: str, cents: int) -> None:
    result = to_minor_units(amount, currency)
    assert result == cents
    assert type(result) is int


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("1.005", "USD"),  # a third decimal in a two-decimal currency
        ("0.001", "USD"),
        ("1.5", "JPY"),  # any decimal in a zero-decimal one
        ("1500.01", "JPY"),
        ("1.2345", "KWD"),
        ("1.23456", "CLF"),
    ],
)
def test_more_decimals_than_the_currency_has_are_refused(amount: str, currency: str) -> None:
    with pytest.raises(PayloadInvalid, match="more decimals than"):
        to_minor_units(amount, currency)


@pytest.mark.parametrize(
    "amount",
    [
        "",
        "abc",
        "1e3",
        "1E-2",
        "NaN",
        "Infinity",
        "-inf",
        "1_000",
        " 1.00",
        "1.00 ",
        "1.",
        ".5",
        "+1.00",
        "1,00",
        "١٢",  # Arabic-Indic digits, which Decimal() would take
        "1" * 31,
        19.99,  # a float may already have lost the exact amount
        1999,
        None,
    ],
)
def test_what_is_not_a_plain_decimal_string_is_refused(amount: Any) -> None:
    with pytest.raises(PayloadInvalid, match="not a decimal amount"):
        to_minor_units(amount, "USD")


@pytest.mark.parametrize("currency", ["", "US", "USDT", "U$D", "12A", None, "ÉUR"])
def test_what_is_not_a_currency_code_is_refused(currency: Any) -> None:
    with pytest.raises(PayloadInvalid, match="ISO 4217"):
        to_minor_units("1.00", currency)


def test_exponents_follow_iso_4217() -> None:
    assert {c: exponent(c) for c in ZERO} == dict.fromkeys(ZERO, 0)
    assert {c: exponent(c) for c in THREE} == dict.fromkeys(THREE, 3)
    assert {c: exponent(c) for c in FOUR} == dict.fromkeys(FOUR, 4)
    assert set(EXPONENTS) == {*ZERO, *THREE, *FOUR}  # every other code has two
    assert [exponent(c) for c in ("USD", "EUR", "GBP", "CAD", "jpy", "kwd")] == [2, 2, 2, 2, 0, 3]


def test_an_unknown_code_has_two_digits_unless_only_known_ones_are_taken() -> None:
    assert "XYZ" not in CURRENCIES
    assert exponent("XYZ") == 2
    assert to_minor_units("1.00", "XYZ") == 100
    for known in ("usd", "JPY", "KWD"):  # what is known is taken either way
        assert exponent(known, known_only=True) == exponent(known)
    assert to_minor_units("1.5", "kwd", known_only=True) == 1500
    with pytest.raises(PayloadInvalid, match=r"unknown currency 'XYZ': not an ISO 4217 code"):
        exponent("XYZ", known_only=True)
    with pytest.raises(PayloadInvalid, match="unknown currency 'xyz'"):
        to_minor_units("1.00", "xyz", known_only=True)


def test_refusals_say_what_was_refused() -> None:
    with pytest.raises(PayloadInvalid, match=r"^not a decimal amount: '1e3'$"):
        to_minor_units("1e3", "USD")
    with pytest.raises(PayloadInvalid, match=r"^1\.005 has more decimals than USD has \(2\)$"):
        to_minor_units("1.005", "usd")


currencies = st.sampled_from(["USD", "EUR", "JPY", "KRW", "KWD", "BHD", "CLF", "UYW"])
minor_amounts = st.integers(min_value=-(10**25), max_value=10**25)


@given(minor=minor_amounts, currency=currencies, padding=st.integers(0, 3))
def test_every_minor_amount_round_trips_exactly(minor: int, currency: str, padding: int) -> None:
    places = exponent(currency)
    text = major(minor, places)
    if padding:  # trailing zeros change nothing
        text += ("" if places else ".") + "0" * padding
    assert to_minor_units(text, currency) == minor


@given(
    minor=minor_amounts,
    currency=currencies,
    extra=st.integers(1, 9),
    zeros=st.integers(0, 3),
)
def test_a_digit_beyond_the_minor_unit_is_always_refused(
    minor: int, currency: str, extra: int, zeros: int
) -> None:
    places = exponent(currency)
    text = major(minor, places) + ("" if places else ".") + "0" * zeros + str(extra)
    with pytest.raises(PayloadInvalid):
        to_minor_units(text, currency)
