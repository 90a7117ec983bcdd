"""Money in a currency's minor unit, exactly: for providers that send decimal strings in
major units ("404.95", Shopify), or integers counted in another number of decimals than the
currency's ISO 4217 one (Stripe's ISK), where Millimetric wants an integer `amount_cents`.

The number of minor-unit digits is the currency's ISO 4217 exponent: JPY has none, USD two,
KWD three. The conversion is integer arithmetic on the decimal digits, never a float, so
"0.29" is 29 and an amount that is not a whole number of minor units is refused instead of
being rounded. `CURRENCIES` lists the codes the bridge knows, for callers that must refuse
a code they do not know rather than guess that it has two digits (`known_only=True`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Final

from bridge.errors import PayloadInvalid

__all__ = ["CURRENCIES", "EXPONENTS", "exponent", "rescale_minor_units", "to_minor_units"]


def _table(codes: str, digits: int) -> dict[str, int]:
    return dict.fromkeys(codes.split(), digits)


def _codes(codes: str) -> frozenset[str]:
    return frozenset(codes.split())


#: ISO 4217 currencies whose minor unit is not 1/100 (the default for every other code).
EXPONENTS: Final[Mapping[str, int]] = {
    **_table("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF", 0),
    **_table("BHD IQD JOD KWD LYD OMR TND", 3),
    **_table("CLF UYW", 4),
}

#: ISO 4217 currencies (list one, 2025), and the few withdrawn in the 2020s that old
#: payments may still name (HRK, SLL, ZWL). Not the funds, metals and testing codes that
#: have no minor unit (XAU, XDR, XTS, XXX, ...): an amount in them is not money to count.
CURRENCIES: Final = _codes(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL
    BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK
    DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HRK HTG HUF
    IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR
    LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO
    NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK
    SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH
    UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    ZWL
    """
)

# Plain decimal notation only, ASCII digits: Decimal() would also take "1e3", "NaN",
# "1_000" and non-ASCII digits, none of which is an amount a provider means. The length
# cap keeps a hostile body from asking for arbitrarily large integers.
_AMOUNT: Final = re.compile(r"-?[0-9]{1,30}(?:\.[0-9]{1,30})?")
_CURRENCY: Final = re.compile(r"[A-Za-z]{3}")


def exponent(currency: str, *, known_only: bool = False) -> int:
    """The number of decimal digits of `currency`'s minor unit (ISO 4217). A code of
    three letters not in `CURRENCIES` has two, unless `known_only` refuses it."""
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise PayloadInvalid(f"not an ISO 4217 currency code: {currency!r}")
    code = currency.upper()
    if known_only and code not in CURRENCIES:
        raise PayloadInvalid(
            f"unknown currency {currency!r}: not an ISO 4217 code the bridge knows"
        )
    return EXPONENTS.get(code, 2)


def to_minor_units(amount: str, currency: str, *, known_only: bool = False) -> int:
    """`amount` (a decimal string in major units) as an integer count of minor units.

    Raises PayloadInvalid for anything that is not a plain decimal number (a float
    included: it may already have lost the exact value) and for an amount that has more
    significant decimals than the currency has; trailing zeros are fine ("1500.00" JPY is
    1500, "1.500" USD is 150). `known_only`: as for `exponent`.
    """
    places = exponent(currency, known_only=known_only)
    if not isinstance(amount, str) or not _AMOUNT.fullmatch(amount):
        raise PayloadInvalid(f"not a decimal amount: {amount!r}")
    sign, digits, exp = Decimal(amount).as_tuple()
    if not isinstance(exp, int):  # cannot happen: the pattern admits finite numbers only
        raise PayloadInvalid(f"not a decimal amount: {amount!r}")
    value = int("".join(map(str, digits)))
    shift = exp + places  # the power of ten that turns the digits into minor units
    scale: int = 10 ** abs(shift)
    if shift >= 0:
        minor = value * scale
    else:
        minor, rest = divmod(value, scale)
        if rest:
            raise PayloadInvalid(
                f"{amount} has more decimals than {currency.upper()} has ({places})"
            )
    return -minor if sign else minor


def rescale_minor_units(amount: int, currency: str, digits: int) -> int:
    """`amount`, an integer count of 10**-`digits` of the currency's major unit (how a
    provider with its own idea of the currency's decimals counts it), in ISO 4217 minor
    units: 500000 ISK counted with two digits is 5000, 5000 MGA counted with none 500000.

    Raises PayloadInvalid for anything but an integer (a bool or a float included) and for
    an amount that is not a whole number of the currency's minor units, never rounding it.
    """
    places = exponent(currency)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise PayloadInvalid(f"not an integer amount: {amount!r}")
    scale: int = 10 ** abs(places - digits)
    if digits <= places:
        return amount * scale
    minor, rest = divmod(abs(amount), scale)
    if rest:
        raise PayloadInvalid(
            f"{amount} counted in {digits} decimals is not a whole amount of "
            f"{currency.upper()}, which has {places}"
        )
    return -minor if amount < 0 else minor
