"""How the store's logic talks to a database: named statements, and the steps of an operation.

Every operation of the store (`bridge.store.operations`) is written once, as a generator
that yields the statements it needs, by name, and is sent their results: decisions free of
I/O, as httpx writes its `auth_flow`, with a thin loop per driver doing the I/O (SQLite's
writer thread runs it synchronously, PostgreSQL's pool asynchronously). The statements
themselves are in `queries/<dialect>.sql`, one file per dialect side by side, each
statement under a `-- name:` line (procrastinate's queries.sql): placeholders, booleans,
arrays and locking differ too much between the two to template one text.

A step is one of three kinds:

- `count`: run it; its row count.
- `rows`: run it; every row it returns.
- `write`: run it for many rows at once, returning nothing. SQLite runs the statement once
  a row (`executemany`); PostgreSQL runs it once, with one array per column (`unnest`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from importlib import resources
from typing import Any, Literal, NamedTuple, TypeAlias, TypeVar

__all__ = ["Op", "Step", "count", "drive", "drive_async", "load", "rows", "write"]

T = TypeVar("T")
Kind = Literal["count", "rows", "write"]
Params: TypeAlias = Sequence[Any] | Mapping[str, Any]


class Step(NamedTuple):
    query: str  # its name in the dialect's file
    params: Params  # `write`: the rows, each a sequence of values
    kind: Kind


#: An operation: yields steps, is sent each one's result, and returns its own.
Op: TypeAlias = Generator[Step, Any, T]


def count(query: str, *params: Any, **named: Any) -> Op[int]:
    result: int = yield Step(query, named or params, "count")
    return result


def rows(query: str, *params: Any, **named: Any) -> Op[list[tuple[Any, ...]]]:
    result: list[tuple[Any, ...]] = yield Step(query, named or params, "rows")
    return result


def write(query: str, values: Sequence[Sequence[Any]]) -> Op[None]:
    if values:
        yield Step(query, values, "write")


def drive(op: Op[T], run: Callable[[Step], Any]) -> T:
    """Run an operation with a blocking `run` of each step."""
    result: Any = None
    while True:
        try:
            step = op.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        result = run(step)


async def drive_async(op: Op[T], run: Callable[[Step], Awaitable[Any]]) -> T:
    """Run an operation with an awaited `run` of each step."""
    result: Any = None
    while True:
        try:
            step = op.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        result = await run(step)


def load(dialect: str) -> dict[str, str]:
    """The statements of `queries/<dialect>.sql` by name, comments left out."""
    text = resources.files("bridge.store").joinpath(f"queries/{dialect}.sql").read_text()
    found: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in [*text.splitlines(), "-- name: "]:
        if line.startswith("-- name: "):
            if name is not None:
                found[name] = "\n".join(lines).strip().removesuffix(";")
            name, lines = line.removeprefix("-- name: ").strip(), []
        elif not line.lstrip().startswith("--"):
            lines.append(line)
    return found
