#!/usr/bin/env python3
"""Intake throughput: the bridge against a bare Litestar POST on the same server, in one run.

    .venv/bin/python bench/intake.py [--seconds 10] [--connections 64]

Both run under uvicorn (one worker, uvloop, httptools) and are driven by wrk with the same
distinct, freshly signed ~1 KB Stripe-style bodies (each thread replays its own slice, so
no delivery repeats). The bridge verifies, translates and commits each delivery to SQLite
(synchronous=FULL, group commit) before answering, with its forwarder draining into a
local sink at the published limits. Prints req/s, p50 and p99 for both, and the ratio.
Needs wrk (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
  local n = 0
  for line in io.lines(args[1]) do
    if n % threads == thread_id then
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
    url: str, script: Path, requests: Path, seconds: int, connections: int
) -> dict[str, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="bridge-intake-"))
    try:
        requests = work / "requests.tsv"
        script = work / "replay.lua"
        script.write_text(LUA)
        # Enough distinct deliveries that none repeats at 20k req/s.
        make_requests(requests, 20_000 * args.seconds + 20_000)
        results = {}
        bare_port, sink_port, bridge_port = free_port(), free_port(), free_port()
        bare = subprocess.Popen(
            [
                BIN / "uvicorn",
                "bare_app:app",
                "--port",
                str(bare_port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--app-dir",
                str(ROOT / "bench"),
            ],
            stdout=subprocess.DEVNULL,
        )
        sink = subprocess.Popen(
            [BIN / "millimetric-bridge", "sink", "--port", str(sink_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = {
            **os.environ,
            "MILLIMETRIC_KEY": "sk_dev_local_bridge",
            "MILLIMETRIC_HOST": f"http://127.0.0.1:{sink_port}",
            "BRIDGE_DATABASE_URL": f"sqlite:///{work}/bridge.db",
            "PORT": str(bridge_port),
            "BRIDGE_HOST": "127.0.0.1",
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "BRIDGE_CONFIG": str(work / "bridge.toml"),
        }
        (work / "bridge.toml").write_text("")
        bridge = subprocess.Popen(
            [BIN / "millimetric-bridge", "serve"], env=env, stdout=subprocess.DEVNULL
        )
        try:
            wait_up(f"http://127.0.0.1:{bare_port}/webhooks/x", bare)
            wait_up(f"http://127.0.0.1:{bridge_port}/healthz", bridge)
            wait_up(f"http://127.0.0.1:{sink_port}/healthz", sink)
            results["bare Litestar POST"] = run_wrk(
                f"http://127.0.0.1:{bare_port}/webhooks/stripe",
                script,
                requests,
                args.seconds,
                args.connections,
            )
            results["bridge (SQLite)"] = run_wrk(
                f"http://127.0.0.1:{bridge_port}/webhooks/stripe",
                script,
                requests,
                args.seconds,
                args.connections,
            )
            stats = httpx.get(f"http://127.0.0.1:{bridge_port}/readyz").json()
        finally:
            for proc in (bare, bridge, sink):
                proc.terminate()
                proc.wait(30)
        base = results["bare Litestar POST"]["rate"]
        print(f"{'':20} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'ratio':>6}")
        for name, r in results.items():
            print(
                f"{name:20} {r['rate']:>9,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}"
                f" {r['errors']:>8.0f} {r['rate'] / base:>6.2f}"
            )
        print(
            f"bridge outbox after the run: {stats.get('pending')} pending "
            f"({args.connections} connections, {args.seconds}s each, wrk -t2)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
