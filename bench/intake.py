#!/usr/bin/env python3
"""Intake throughput: the bridge against a bare Litestar POST on the same server, in one run.

    .venv/bin/python bench/intake.py [--seconds 10] [--connections 64] [--runs 1]
        [--database-url postgresql://postgres@127.0.0.1:5432/test]

Three servers, all under uvicorn (one worker, uvloop, httptools), driven by wrk with the
same distinct, freshly signed ~1 KB Stripe-style bodies (each thread replays its own
slice, so no delivery repeats): a bare Litestar `@post` handler that reads the body (the
baseline every ratio is against), the same route served raw as the bridge serves its
intake (a route middleware answering from `receive`: the ceiling of that way, with no
work), and the bridge. The bridge (`millimetric-bridge serve`) verifies and commits each
delivery before answering; its translate stage and forwarder run behind it, draining into
a local sink at the published limits. The store is SQLite in a temporary directory
(synchronous=FULL, group commit), or with `--database-url postgresql://...` a fresh
database created on that server for the run and dropped after it. Prints req/s, p50 and
p99 for both, the ratio, and the load average beside them (the machine may be shared:
compare ratios, repeat with `--runs`, which alternates the servers). Needs wrk
(`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import stripe

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SECRET = "whsec_bench_secret"

LUA = r"""
local lines = {}
local counter = 0
local thread_id = 0
local threads = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  thread_id = tonumber(wrk.thread:get("id")) or 0
  threads = tonumber(args[2])
  local first = tonumber(args[3]) or 0
  local n = 0
  for line in io.lines(args[1]) do
    if n >= first and (n - first) % threads == thread_id then
      local sig, body = line:match("^([^\t]*)\t(.*)$")
      lines[#lines + 1] = wrk.format("POST", nil,
        {["Stripe-Signature"] = sig, ["Content-Type"] = "application/json"}, body)
    end
    n = n + 1
  end
  index = 0
end

function request()
  index = index + 1
  if index > #lines then index = 1 end
  return lines[index]
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_requests(path: Path, count: int) -> None:
    """Distinct invoice.paid events of ~1 KB, each signed now."""
    now = int(time.time())
    pad = "x" * 600
    with path.open("w") as out:
        for i in range(count):
            event = {
                "id": f"evt_bench_{i}",
                "object": "event",
                "type": "invoice.paid",
                "created": now,
                "livemode": True,
                "data": {
                    "object": {
                        "id": f"in_bench_{i}",
                        "object": "invoice",
                        "amount_paid": 1999,
                        "currency": "usd",
                        "customer": f"cus_{i % 1000}",
                        "status": "paid",
                        "billing_reason": "subscription_cycle",
                        "metadata": {"note": pad},
                    }
                },
            }
            body = msgspec.json.encode(event).decode()
            sig = stripe.WebhookSignature.generate_signature_header(body, SECRET, now)
            out.write(f"{sig}\t{body}\n")


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def run_wrk(
    url: str, script: Path, requests: Path, seconds: int, connections: int, first: int = 0
) -> dict[str, float]:
    """wrk replaying the requests from line `first` on."""
    done = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(requests),
            "2",
            str(first),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(\w+)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rate": rate,
        "p50": percentile("50"),
        "p99": percentile("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


@contextlib.contextmanager
def fresh_database(url: str | None, work: Path) -> Iterator[tuple[str, str]]:
    """The bridge's BRIDGE_DATABASE_URL for this run, and the backend's name."""
    if url is None or url.startswith("sqlite:///"):
        yield (url or f"sqlite:///{work}/bridge.db"), "SQLite"
        return
    if not url.startswith(("postgresql://", "postgres://")):
        raise SystemExit("--database-url: sqlite:///PATH or postgresql://...")
    import psycopg

    name = f"bridge_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}")), "PostgreSQL"
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bridge_env(sink_port: int, port: int, database_url: str, config: Path) -> dict[str, str]:
    """The environment of a bridge under test: Stripe at `SECRET`, forwarding to the local
    sink, with an empty config file written at `config`."""
    config.write_text("")
    return {
        **os.environ,
        "MILLIMETRIC_KEY": "sk_dev_local_bridge",
        "MILLIMETRIC_HOST": f"http://127.0.0.1:{sink_port}",
        "BRIDGE_DATABASE_URL": database_url,
        "PORT": str(port),
        "BRIDGE_HOST": "127.0.0.1",
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "BRIDGE_CONFIG": str(config),
    }


SERVERS = ("bare Litestar POST", "bare, served raw", "bridge")


def per_run(args: argparse.Namespace) -> int:
    """Requests set aside for one server's run: more than the fastest server takes."""
    return 20_000 * args.seconds + 20_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1, help="alternate bare and bridge N times")
    parser.add_argument(
        "--database-url",
        help="the bridge's store: sqlite:///PATH, or postgresql://... (a fresh database is "
        "created on that server and dropped after) [default: SQLite in a temporary directory]",
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bridge-intake-"))
    try:
        requests = work / "requests.tsv"
        script = work / "replay.lua"
        script.write_text(LUA)
        if args.runs * len(SERVERS) * (args.seconds + 3) > 240:
            raise SystemExit("the signatures would go stale (300 s): fewer --runs or --seconds")
        # Enough distinct deliveries that none repeats at 20k req/s: each run its own slice.
        make_requests(requests, per_run(args) * args.runs * len(SERVERS))
        with fresh_database(args.database_url, work) as (database_url, backend):
            run(args, work, requests, script, database_url, backend)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(
    args: argparse.Namespace,
    work: Path,
    requests: Path,
    script: Path,
    database_url: str,
    backend: str,
) -> None:
    bare_port, raw_port, sink_port, bridge_port = free_port(), free_port(), free_port(), free_port()
    bare, raw = (
        subprocess.Popen(
            [
                BIN / "uvicorn",
                f"bare_app:{name}",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--app-dir",
                str(ROOT / "bench"),
            ],
            stdout=subprocess.DEVNULL,
        )
        for name, port in (("app", bare_port), ("raw", raw_port))
    )
    sink = subprocess.Popen(
        [BIN / "millimetric-bridge", "sink", "--port", str(sink_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = bridge_env(sink_port, bridge_port, database_url, work / "bridge.toml")
    bridge = subprocess.Popen(
        [BIN / "millimetric-bridge", "serve"], env=env, stdout=subprocess.DEVNULL
    )
    bridge_name = f"bridge ({backend})"
    rows: list[tuple[str, dict[str, float], float]] = []
    try:
        wait_up(f"http://127.0.0.1:{bare_port}/webhooks/x", bare)
        wait_up(f"http://127.0.0.1:{raw_port}/webhooks/x", raw)
        wait_up(f"http://127.0.0.1:{bridge_port}/healthz", bridge)
        wait_up(f"http://127.0.0.1:{sink_port}/healthz", sink)
        ports = (bare_port, raw_port, bridge_port)
        for number in range(args.runs):
            for index, (name, port) in enumerate(zip(SERVERS, ports, strict=True)):
                result = run_wrk(
                    f"http://127.0.0.1:{port}/webhooks/stripe",
                    script,
                    requests,
                    args.seconds,
                    args.connections,
                    first=(number * len(SERVERS) + index) * per_run(args),
                )
                rows.append(
                    (bridge_name if port == bridge_port else name, result, os.getloadavg()[0])
                )
        stats = httpx.get(f"http://127.0.0.1:{bridge_port}/readyz").json()
    finally:
        for proc in (bare, raw, bridge, sink):
            proc.terminate()
            proc.wait(30)
    print(
        f"{'':22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ratio':>6} {'load':>5}"
    )
    ratios: list[float] = []  # the bridge against the bare POST of its round
    ceiling: list[float] = []  # ... and against the route served raw
    p99s: list[float] = []
    for index, (name, r, load) in enumerate(rows):
        base = rows[index - index % len(SERVERS)][1]["rate"]
        if index % len(SERVERS) == len(SERVERS) - 1:
            ratios.append(r["rate"] / base)
            ceiling.append(r["rate"] / rows[index - 1][1]["rate"])
            p99s.append(r["p99"])
        print(
            f"{name:22} {r['rate']:>9,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}"
            f" {r['errors']:>8.0f} {r['rate'] / base:>6.2f} {load:>5.2f}"
        )
    print(
        f"bridge over {len(ratios)} run(s), medians: {statistics.median(ratios):.2f} of the bare"
        f" POST, {statistics.median(ceiling):.2f} of the raw route, p99"
        f" {statistics.median(p99s):.1f} ms"
    )
    print(
        f"bridge outbox after the run: {stats.get('pending')} pending "
        f"({args.connections} connections, {args.seconds}s each, wrk -t2, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
