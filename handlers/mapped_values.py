"""The values a mapped source reads, made exact: ids, times, money and free properties.

Each takes what an expression gave (`bridge.expressions`: integers of any size, Decimal
for other numbers) and either returns the value to send, None where there is nothing, or
raises `PayloadInvalid` naming the key and the expression, so that the delivery is
quarantined with a reason that says which line of `bridge.toml` to look at.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from bridge.errors import PayloadInvalid
from bridge.expressions import Expression
from bridge.money import CURRENCIES, to_minor_units

__all__ = ["currency", "minor_units", "plain", "required", "text", "timestamp"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: Below this, a unix time is in seconds (10^11 s is the year 5138); below the next, in
#: milliseconds. Microseconds and beyond are refused rather than guessed.
_SECONDS_BELOW: Final = 10**11
_MILLISECONDS_BELOW: Final = 10**14
_UNIX: Final = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,9})?")
_MINOR: Final = re.compile(r"-?[0-9]{1,30}")
_CODE: Final = re.compile(r"[A-Za-z]{3}")
_SHOWN_MAX: Final = 60


def _shown(value: Any) -> str:
    """A value as a reason quotes it: short, and a Decimal as written."""
    if isinstance(value, Decimal):
        shown = format(value, "f")
    elif isinstance(value, dict):
        shown = "an object"
    elif isinstance(value, list):
        shown = "an array"
    else:
        shown = repr(value)
    return shown if len(shown) <= _SHOWN_MAX else shown[: _SHOWN_MAX - 3] + "..."


def _invalid(key: str, expression: Expression, problem: str) -> PayloadInvalid:
    return PayloadInvalid(f"{key}: `{expression.text}` {problem}")


def required(key: str, expression: Expression, value: Any) -> Any:
    """`value`, unless there is none: then the delivery cannot be translated."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _invalid(key, expression, "gave no value, and it is required")
    return value


def text(key: str, expression: Expression, value: Any) -> str | None:
    """An id or a name: a string as sent, or an integer written exactly (an id above
    2^53 stays that id). Nothing, or only spaces, is None."""
    if value is None or isinstance(value, bool):
        if value is None:
            return None
        raise _invalid(key, expression, f"gave {value!r}, not a string or an integer")
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return str(int(value))
    raise _invalid(key, expression, f"gave {_shown(value)}, not a string or an integer")


def timestamp(key: str, expression: Expression, value: Any) -> datetime | None:
    """When it happened: unix seconds or milliseconds (a number or a string of digits),
    or an ISO 8601 time with a zone. A time without a zone is refused, not guessed."""
    if value is None:
        return None
    number: Decimal | None = None
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, str) and _UNIX.fullmatch(value.strip()):
        number = Decimal(value.strip())
    if number is not None:
        if number < 0 or number >= _MILLISECONDS_BELOW:
            raise _invalid(
                key, expression, f"gave {_shown(value)}, not unix seconds or milliseconds"
            )
        scale = 10**6 if number < _SECONDS_BELOW else 10**3  # to microseconds
        return _EPOCH + timedelta(microseconds=int(number * scale))
    if not isinstance(value, str):
        raise _invalid(key, expression, f"gave {_shown(value)}, not a time")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _invalid(
            key, expression, f"gave {_shown(value)}, not unix seconds, milliseconds or ISO 8601"
        ) from None
    if moment.tzinfo is None:
        raise _invalid(key, expression, f"gave {_shown(value)}, an ISO 8601 time without a zone")
    return moment


def currency(key: str, expression: Expression, value: Any) -> str:
    """An ISO 4217 code the bridge knows, upper-case; anything else is refused rather than
    taken to have two decimals."""
    code = required(key, expression, value)
    if not isinstance(code, str) or not _CODE.fullmatch(code) or code.upper() not in CURRENCIES:
        raise _invalid(key, expression, f"gave {_shown(code)}, not a currency the bridge knows")
    return code.upper()


def minor_units(key: str, expression: Expression, value: Any, units: str, code: str) -> int:
    """An amount as an integer of `code`'s minor unit. `major`: a decimal in major units,
    a string or a JSON number, converted by the currency's ISO 4217 exponent with integer
    arithmetic ("12.345" KWD is 12345, 199.99 USD is 19999). `minor`: already an integer
    of minor units."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise _invalid(key, expression, f"gave {_shown(value)}, not an amount")
    if units == "minor":
        if isinstance(value, str) and _MINOR.fullmatch(value.strip()):
            return int(value.strip())
        if isinstance(value, int):
            return value
        if isinstance(value, Decimal) and value == value.to_integral_value():
            return int(value)
        raise _invalid(key, expression, f"gave {_shown(value)}, not a whole number of minor units")
    written = value if isinstance(value, str) else format(value, "f")
    try:
        return to_minor_units(written.strip(), code, known_only=True)
    except PayloadInvalid as error:
        raise _invalid(key, expression, f"gave {_shown(value)}: {error}") from None


def plain(value: Any) -> Any:
    """A property or trait as it is sent: numbers with a fraction as the float that is
    written the same way (199.99), or, past what a float holds, as the exact decimal
    string; integers of any size as they are."""
    if isinstance(value, Decimal):
        as_float = float(value)
        if math.isfinite(as_float) and Decimal(repr(as_float)) == value:
            return as_float
        return format(value, "f")
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
