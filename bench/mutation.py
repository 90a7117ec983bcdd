#!/usr/bin/env python3
"""Mutation testing of the modules that carry the bridge's guarantees, with mutmut: small
deliberate bugs (mutants) are made in a module, one at a time, and the test files that
cover it are run against each; a mutant no test fails on is a gap in the tests.

    .venv/bin/python bench/mutation.py                       # every module below
    .venv/bin/python bench/mutation.py bridge/client.py      # one (or a few)
    .venv/bin/python bench/mutation.py --tests-from main     # the tests of another revision
    .venv/bin/python bench/mutation.py --list                # the modules and their tests

Each module runs in its own copy of the tracked files under .mutation/ (mutmut writes its
mutants there; the work tree is never changed), paired with the test files that cover it
so that a module takes minutes, not hours. mutmut runs only the tests that reach each
mutated function. The result per module: mutants killed (a test failed, or the mutant hung
past mutmut's timeout) out of all made; `no tests` are mutants in functions the paired
tests never call. The survivors are listed in .mutation/<module>/survivors.txt
(<module>@REV with --tests-from); `mutmut show NAME` run in that folder shows one. Not
part of the test suite (`tasks.py test` never runs it): a run takes a while and needs the
dev group's mutmut.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
MUTMUT = Path(sys.executable).parent / "mutmut"

#: The modules that carry the guarantees, each with the test files that cover it.
MODULES: dict[str, list[str]] = {
    "bridge/signatures.py": [
        "tests/test_signatures.py",
        "tests/test_handler_contract.py",
        "tests/test_stripe.py",
        "tests/test_shopify.py",
        "tests/test_github.py",
    ],
    "bridge/standard_webhooks.py": [
        "tests/test_standard_webhooks.py",
        "tests/test_clerk.py",
        "tests/test_handler_contract.py",
    ],
    "bridge/stages/intake.py": ["tests/test_hostile.py", "tests/test_app.py"],
    # The store, file by file (2,300 mutants in all: an hour and more at once).
    **{
        f"bridge/store/{name}.py": ["tests/test_store.py", "tests/test_erasure.py"]
        for name in ("__init__", "base", "operations", "identity", "sql", "sqlite", "postgres")
    },
    "bridge/stages/forward.py": ["tests/test_forwarder.py"],
    "bridge/client.py": ["tests/test_client.py"],
    "bridge/money.py": [
        "tests/test_money.py",
        "tests/test_stripe_amounts.py",
        "tests/test_shopify_currency.py",
    ],
}


def folder(module: str, tests_from: str | None) -> Path:
    """Where a module's run works: .mutation/bridge_client, or bridge_client@main."""
    name = module.replace("/", "_").removesuffix(".py")
    return WORK / (f"{name}@{tests_from.replace('/', '_')}" if tests_from else name)


def copy_tree(target: Path, tests_from: str | None) -> None:
    """The tracked files as they are in the work tree, into `target`; with `tests_from`,
    tests/ as they are at that git revision instead."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())
    if tests_from:
        shutil.rmtree(target / "tests")
        archive = subprocess.run(
            ["git", "archive", tests_from, "tests"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)


def configure(target: Path, module: str, tests: list[str]) -> None:
    """mutmut's settings for this module, appended to the copy's pyproject.toml."""
    mutate = module
    # Tests read the docs, samples and deploy files too: mutmut's copy gets everything.
    others = sorted(p.name for p in target.iterdir() if p.name not in ("bridge", "tests"))
    with (target / "pyproject.toml").open("a") as pyproject:
        pyproject.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["bridge"]\n'
            f"also_copy = {json.dumps(others)}\n"
            f"only_mutate = {json.dumps([mutate])}\n"
            f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        )


def run(module: str, tests: list[str], tests_from: str | None, jobs: int) -> dict[str, int]:
    target = folder(module, tests_from)
    copy_tree(target, tests_from)
    # Another revision's tests may lack a file of this list: run those it has.
    configure(target, module, [t for t in tests if (target / t).exists()])
    started = time.monotonic()
    with (target / "mutmut.log").open("wb") as log:
        subprocess.run(
            [MUTMUT, "run", "--max-children", str(jobs)], cwd=target, stdout=log, stderr=log
        )
    subprocess.run([MUTMUT, "export-cicd-stats"], cwd=target, capture_output=True, check=True)
    stats: dict[str, int] = json.loads((target / "mutants" / "mutmut-cicd-stats.json").read_text())
    results = subprocess.run(
        [MUTMUT, "results"], cwd=target, capture_output=True, text=True, check=True
    ).stdout
    (target / "survivors.txt").write_text(results)
    stats["seconds"] = round(time.monotonic() - started)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="of --list, or a folder (default: all)")
    parser.add_argument("--tests-from", metavar="REV", help="run the tests of a git revision")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--list", action="store_true", help="the modules and their tests")
    args = parser.parse_args()
    if args.list:
        for module, tests in MODULES.items():
            print(module, " ".join(tests))
        return 0
    # A folder stands for its modules: `bridge/store` is every file of the store.
    wanted = [m for w in args.modules for m in MODULES if m == w or m.startswith(f"{w}/")]
    unknown = [w for w in args.modules if not any(m.startswith(w) for m in wanted)]
    if unknown:
        parser.error(f"not a module of this run: {', '.join(unknown)} (see --list)")
    if not MUTMUT.exists():
        parser.error("mutmut is not installed: .venv/bin/pip install -e . --group dev")
    print(f"{'module':30} {'killed':>7} {'of':>5} {'share':>6} {'survived':>9} {'no tests':>9}")
    failed = 0
    for module in wanted or list(MODULES):
        s = run(module, MODULES[module], args.tests_from, args.jobs)
        killed = s["killed"] + s["timeout"]
        if s["total"] and not killed + s["survived"] + s["no_tests"]:
            log = folder(module, args.tests_from) / "mutmut.log"
            print(f"{module:30} the tests did not run: see {log.relative_to(ROOT)}", flush=True)
            failed += 1
            continue
        share = f"{killed / s['total']:.0%}" if s["total"] else "-"
        print(
            f"{module:30} {killed:7} {s['total']:5} {share:>6} {s['survived']:9} "
            f"{s['no_tests']:9}  ({s['seconds']} s)",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
