"""JMESPath over a JSON body, with every number exact: the expressions of mapped sources.

A body is decoded with integers as `int`, whatever their size (an id above 2^53 stays that
id), and numbers with a fraction or an exponent as `decimal.Decimal`, never a binary
float, so that 199.99 is 199.99 and not 199.989999... JMESPath's functions take a
Decimal as a number (`to_number` gives one for a decimal string, `to_string` writes it as
sent).

An expression is compiled once, at start-up, and checked there: its syntax, and the name
and argument count of every function it calls, which JMESPath itself would only find out
on the first delivery. `header:NAME` reads a request header instead of the body.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any, Final

import jmespath
import msgspec
from jmespath import exceptions, functions, visitor

from bridge.errors import PayloadInvalid

__all__ = ["HEADER_PREFIX", "Expression", "ExpressionInvalid", "decode", "encode", "header_name"]

HEADER_PREFIX: Final = "header:"
# A header name as HTTP allows it (a token).
_HEADER: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_INTEGER: Final = re.compile(r"-?[0-9]+")
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

_decoder: Final = msgspec.json.Decoder(float_hook=Decimal)
_exact_json: Final = msgspec.json.Encoder(decimal_format="number")


def decode(body: bytes) -> Any:
    """The JSON body with exact numbers; `PayloadInvalid` when it is not JSON."""
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as error:
        raise PayloadInvalid(f"the body is not JSON: {error}") from None


def encode(value: Any) -> bytes:
    """JSON with every number as exact as it was decoded (a Decimal as a number)."""
    return _exact_json.encode(value)


class ExpressionInvalid(ValueError):
    """An expression that cannot be compiled, or calls a function wrongly."""


def header_name(name: str) -> str:
    """`name` lower-cased, as the intake names headers, if HTTP allows it."""
    if not _HEADER.fullmatch(name):
        raise ExpressionInvalid(f"{name!r} is not a header name")
    return name.lower()


def _checked(value: Any) -> Any:
    """`value` as JMESPath's type check should see it: a Decimal is a number. (The check
    goes by the name of the Python type, and knows only float and int.)"""
    if type(value) is Decimal:
        return float(value)
    if type(value) is list and any(type(v) is Decimal for v in value):
        return [float(v) if type(v) is Decimal else v for v in value]
    return value


class _ExactFunctions(functions.Functions):
    """JMESPath's built-in functions, with Decimal taken for the number it is."""

    def _type_check_single(self, current: Any, types: Any, function_name: str) -> None:
        check = getattr(super(), "_type_check_single")  # noqa: B009 (not in the stubs)
        try:
            check(current, types, function_name)
        except exceptions.JMESPathTypeError:
            probe = _checked(current)
            if probe is current:
                raise
            check(probe, types, function_name)

    @functions.signature({"types": []})
    def _func_to_string(self, arg: Any) -> str:
        if isinstance(arg, str):
            return arg
        return _exact_json.encode(arg).decode()

    @functions.signature({"types": ["string"]}, {"types": ["array"]})
    def _func_join(self, separator: str, array: list[Any]) -> str:
        # Numbers too, written exactly: ids are often integers (above 2^53 included), and
        # `join(':', ['purchase', payment.id])` should not need a to_string() around them.
        parts = []
        for item in array:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, int | Decimal) and not isinstance(item, bool):
                parts.append(_exact_json.encode(item).decode())
            else:
                kind = self._func_type(item)
                raise exceptions.JMESPathTypeError("join", item, kind, ["string", "number"])
        return separator.join(parts)

    @functions.signature({"types": []})
    def _func_to_number(self, arg: Any) -> Any:
        if isinstance(arg, bool) or arg is None or isinstance(arg, list | dict):
            return None
        if isinstance(arg, int | float | Decimal):
            return arg
        if isinstance(arg, str):
            text = arg.strip()
            if _INTEGER.fullmatch(text):
                return int(text)
            if _NUMBER.fullmatch(text):
                return Decimal(text)
        return None

    @functions.signature({"types": []})
    def _func_type(self, arg: Any) -> str:
        if type(arg) is Decimal:
            return "number"
        kind: str = getattr(super(), "_func_type")(arg)  # noqa: B009 (not in the stubs)
        return kind


# One interpreter for every search: it holds no state but a cache of its own methods,
# which `ParsedResult.search` would build again for each search, a new one each time.
_INTERPRETER: Final = visitor.TreeInterpreter(jmespath.Options(custom_functions=_ExactFunctions()))
_FUNCTIONS: Final[Mapping[str, Any]] = _ExactFunctions.FUNCTION_TABLE


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for child in node.get("children", ()):
            yield from _nodes(child)


def _exact(value: Any) -> Any:
    """A JSON literal of the expression with its floats as the decimals written (`1.5`),
    so that arithmetic on them and on the body's decimals never mixes in a float."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, list):
        return [_exact(v) for v in value]
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    return value


def _check_calls(tree: Any) -> None:
    """Every function called exists and gets as many arguments as it takes."""
    for node in _nodes(tree):
        if node.get("type") != "function_expression":
            continue
        name = node["value"]
        spec = _FUNCTIONS.get(name)
        if spec is None:
            raise ExpressionInvalid(f"unknown function {name}()")
        wanted = spec["signature"]
        given = len(node["children"])
        variadic = bool(wanted) and wanted[-1].get("variadic", False)
        if (given < len(wanted)) if variadic else (given != len(wanted)):
            least = "at least " if variadic else ""
            raise ExpressionInvalid(
                f"{name}() takes {least}{len(wanted)} argument{'s' * (len(wanted) != 1)},"
                f" not {given}"
            )


# Nodes whose children read from the same place as the node itself.
_THROUGH: Final = frozenset(
    {
        "function_expression",
        "multi_select_list",
        "multi_select_hash",
        "key_val_pair",
        "or_expression",
        "and_expression",
        "not_expression",
    }
)


def _paths(node: Any) -> Iterator[tuple[str, ...]]:
    """The plain field paths (`a.b.c`) an expression reads from the top of the body,
    through function arguments and multi-selects (not inside projections or filters,
    whose fields are relative to each element)."""
    kind = node.get("type") if isinstance(node, dict) else None
    if kind == "field":
        yield (node["value"],)
    elif kind == "subexpression" and all(c.get("type") == "field" for c in node["children"]):
        yield tuple(c["value"] for c in node["children"])
    elif kind in _THROUGH:
        for child in node["children"]:
            yield from _paths(child)


class Expression:
    """One value read from a delivery: a JMESPath expression over the decoded body, or
    `header:NAME` for a request header (lower-cased, as the intake names headers)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.header: str | None = None
        self._tree: Any = None  # what is searched: the parsed tree, literals made exact
        # A plain field path (`payment.customer.user_id`, most expressions) is read by
        # walking the body, as JMESPath would, at a fraction of an interpreter's cost.
        self._path: tuple[str, ...] | None = None
        if text.startswith(HEADER_PREFIX):
            self.header = header_name(text.removeprefix(HEADER_PREFIX).strip())
            return
        try:
            parsed = jmespath.compile(text).parsed
        except exceptions.JMESPathError as error:
            first = str(error).splitlines()[0].removesuffix(", for expression:")
            raise ExpressionInvalid(f"not a JMESPath expression: {first}") from None
        _check_calls(parsed)
        # A copy: jmespath caches the trees it parses, for any caller in the process.
        tree = self._tree = copy.deepcopy(parsed)
        for node in _nodes(tree):
            if node.get("type") == "literal":
                node["value"] = _exact(node["value"])
        if tree["type"] == "field" or (
            tree["type"] == "subexpression"
            and all(child["type"] == "field" for child in tree["children"])
        ):
            self._path = next(_paths(tree))

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    @property
    def literal(self) -> Any:
        """The constant this expression always gives (`'USD'`), else None."""
        tree = self._tree
        return tree["value"] if tree is not None and tree["type"] == "literal" else None

    def paths(self) -> list[tuple[str, ...]]:
        """The plain field paths it reads from the top of the body (for `send-test`,
        which makes a new delivery out of a sample by changing the values it reads)."""
        return [] if self._tree is None else list(_paths(self._tree))

    def search(self, headers: Mapping[str, str], body: Any) -> Any:
        """The value, or None where the body has none. A function given a value of the
        wrong type is `PayloadInvalid`, naming the expression."""
        if self.header is not None:
            return headers.get(self.header)
        if self._path is not None:
            for name in self._path:
                if not isinstance(body, dict):
                    return None
                body = body.get(name)
            return body
        try:
            return _INTERPRETER.visit(self._tree, body)
        except exceptions.JMESPathError as error:
            raise PayloadInvalid(f"`{self.text}` failed: {error}") from None
        except (TypeError, ValueError, ArithmeticError) as error:
            # What a function does with a value of a type it does not expect (`sum` of a
            # string and a number): the delivery's, not a bug to answer 503 for.
            raise PayloadInvalid(f"`{self.text}` failed: {type(error).__name__}: {error}") from None
