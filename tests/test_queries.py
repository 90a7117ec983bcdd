"""The named statements: both dialects define the same ones, and the operations use them all."""

from __future__ import annotations

import ast
import inspect

from bridge.store import operations
from bridge.store.sql import load


def named_in_operations() -> set[str]:
    """Every statement name the operations pass to `count`, `rows` or `write` (or to
    `clean`, which runs the retention statements by name)."""
    names: set[str] = set()
    tree = ast.parse(inspect.getsource(operations))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"count", "rows", "write"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
    from bridge.store import base

    for node in ast.walk(ast.parse(inspect.getsource(base))):
        if isinstance(node, ast.Constant) and str(node.value).startswith("clean_"):
            names.add(node.value)
    return names


def test_both_dialects_define_the_same_statements() -> None:
    sqlite, postgres = load("sqlite"), load("postgres")
    assert sorted(sqlite) == sorted(postgres)
    assert all(sql and not sql.endswith(";") for sql in [*sqlite.values(), *postgres.values()])


def test_every_statement_is_used_and_every_use_is_defined() -> None:
    used = named_in_operations()
    assert used == set(load("sqlite"))


def test_a_statement_keeps_its_lines_and_loses_its_comments() -> None:
    append = load("sqlite")["append"]
    assert append.startswith("INSERT INTO inbox")
    assert "--" not in append
    assert append.endswith("DO NOTHING")
