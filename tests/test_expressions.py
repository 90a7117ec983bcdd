"""JMESPath over exactly decoded bodies: integers of any size, decimals never floats,
expressions checked when compiled, `header:` reads."""

from __future__ import annotations

from decimal import Decimal

import pytest

from bridge.errors import PayloadInvalid
from bridge.expressions import Expression, ExpressionInvalid, decode, encode

BODY = decode(
    b'{"payment": {"id": 9007199254740993, "amount": 199.99, "items": [1.5, 2.25],'
    b' "ref": "pay_1", "big": 123456789012345678901234567890, "tiny": 0.1000000000000000000001},'
    b' "type": "payment.succeeded", "flag": true}'
)


def search(text: str, body: object = BODY, headers: dict[str, str] | None = None) -> object:
    return Expression(text).search(headers or {}, body)


def test_integers_stay_exact_and_decimals_are_never_floats() -> None:
    payment = BODY["payment"]
    assert payment["id"] == 2**53 + 1
    assert type(payment["id"]) is int
    assert payment["big"] == 123456789012345678901234567890
    assert payment["amount"] == Decimal("199.99")
    assert type(payment["amount"]) is Decimal
    # Written back as the same numbers, not as strings or rounded floats.
    assert encode(payment) == (
        b'{"id":9007199254740993,"amount":199.99,"items":[1.5,2.25],"ref":"pay_1",'
        b'"big":123456789012345678901234567890,"tiny":0.1000000000000000000001}'
    )


def test_a_body_that_is_not_json_is_payload_invalid() -> None:
    with pytest.raises(PayloadInvalid, match="not JSON"):
        decode(b"{nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("payment.amount", Decimal("199.99")),
        ("sum(payment.items)", Decimal("3.75")),
        ("max(payment.items)", Decimal("2.25")),
        ("type(payment.amount)", "number"),
        ("payment.amount > `100`", True),
        ("to_string(payment.id)", "9007199254740993"),
        ("to_string(payment.amount)", "199.99"),
        ("to_number('12.345')", Decimal("12.345")),
        ("to_number('90071992547409930')", 90071992547409930),
        ("to_number('abc')", None),
        ("join(':', ['purchase', payment.id])", "purchase:9007199254740993"),
        ("join(':', ['p', payment.amount, payment.ref])", "p:199.99:pay_1"),
        ("sum([payment.amount, `0.01`])", Decimal("200.00")),  # a literal is a decimal too
        ("payment.missing", None),
        ("'USD'", "USD"),
        ("type", "payment.succeeded"),
    ],
)
def test_functions_take_exact_numbers(text: str, expected: object) -> None:
    found = search(text)
    assert found == expected
    assert type(found) is type(expected)


@pytest.mark.parametrize("text", ["join(':', ['p', flag])", "sum(['a', `1`])", "sort([type, `1`])"])
def test_a_function_given_the_wrong_type_names_the_expression(text: str) -> None:
    # Never an exception outside the error tree: at intake that would be a 503 forever.
    with pytest.raises(PayloadInvalid) as raised:
        search(text)
    assert str(raised.value).startswith(f"`{text}` failed: ")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("payment amount", "not a JMESPath expression: Unexpected token: amount"),
        ("payment.", "not a JMESPath expression"),
        ("", "cannot be empty"),
        ("lower(type)", "unknown function lower()"),
        ("join(type)", "join() takes 2 arguments, not 1"),
        ("not_null()", "not_null() takes at least 1 argument, not 0"),
        ("header:X Acme", "'X Acme' is not a header name"),
    ],
)
def test_expressions_are_checked_when_compiled(text: str, says: str) -> None:
    with pytest.raises(ExpressionInvalid) as raised:
        Expression(text)
    assert says in str(raised.value)


def test_a_header_expression_reads_the_lower_cased_header() -> None:
    expression = Expression("header:X-Acme-Delivery")
    assert expression.header == "x-acme-delivery"
    assert expression.search({"x-acme-delivery": "d_1"}, None) == "d_1"
    assert expression.search({}, None) is None
    assert expression.paths() == []


def test_literals_and_the_paths_an_expression_reads() -> None:
    assert Expression("'EUR'").literal == "EUR"
    assert Expression("currency").literal is None
    assert Expression("join(':', ['signup', user.id, type])").paths() == [
        ("user", "id"),
        ("type",),
    ]
    # Fields inside a projection are relative to each element: not paths of the body.
    assert Expression("items[*].id").paths() == []
