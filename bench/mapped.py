#!/usr/bin/env python3
"""What a mapped source costs per delivery, next to a built-in handler.

    .venv/bin/python bench/mapped.py [--deliveries 20000] [--runs 5]

For the example of docs/handlers.md ("Without code": HMAC-signed, a purchase with an amount
in major units) and for Stripe's checkout.session.completed sample, it times, in this
process, the intake's part (verify the signature, read the delivery id) and the translate
stage's (`translate_one`: parse and translate from the stored request), and prints the
median microseconds per delivery over the runs. No server, no store: the work of the
handler alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bridge.registry import Source, load_handlers, load_sources, load_templates
from bridge.stages.translate import translate_one
from bridge.store import StoredDelivery
from bridge.testing import TEST_SECRET, signed_request

DOCS = Path(__file__).resolve().parent.parent / "docs" / "handlers.md"
BODY = (
    b'{"id": "evt_1001", "type": "payment.succeeded", "created": 1767225600,'
    b' "payment": {"id": "pay_5001", "amount": 199.99, "currency": "usd", "plan": "pro",'
    b' "coupon": null, "customer": {"user_id": "u_42"},'
    b' "metadata": {"millimetric_anonymous_id": "anon_7f3c2a91"}}}'
)


def sources(folder: Path) -> dict[str, Source]:
    example = DOCS.read_text().partition("## Without code")[2].split("```toml\n")[1]
    (folder / "bridge.toml").write_text(example.split("```")[0])
    env = {
        "BRIDGE_CONFIG": str(folder / "bridge.toml"),
        "ACME_WEBHOOK_SECRET": TEST_SECRET,
        "STRIPE_WEBHOOK_SECRET": TEST_SECRET,
    }
    # dev: test-mode events included, so that the Stripe sample (test mode) is translated.
    return load_sources(env, load_handlers(), templates=load_templates(), dev=True)


def timed(work: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        work()
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        found = sources(Path(folder))
    cases = {
        "mapped (docs example)": (found["acme"], BODY),
        "stripe (checkout.session.completed)": (
            found["stripe"],
            found["stripe"].handler.samples()["checkout.session.completed"].body,
        ),
    }
    print(f"{'source':38} {'intake us':>10} {'translate us':>13}")
    for label, (source, body) in cases.items():
        handler = source.handler
        request = signed_request(handler, body, source=source.name)
        stored = StoredDelivery(
            id=1,
            source=source.name,
            provider_event_id=handler.delivery_id(request),
            received_at=request.received_at,
            raw_body=body,
            headers={h: v for h, v in request.headers.items() if h in source.kept_headers},
        )
        assert translate_one(stored, found).failure is None

        def intake(handler=handler, request=request, source=source) -> str:  # type: ignore[no-untyped-def]
            handler.scheme.verify(request, source.secrets, source.options.tolerance)
            return handler.delivery_id(request)

        intakes, translations = [], []
        for _ in range(args.runs):
            intakes.append(timed(intake, args.deliveries))
            translate = functools.partial(translate_one, stored, found)
            translations.append(timed(translate, args.deliveries))
        print(
            f"{label:38} {statistics.median(intakes):10.1f} {statistics.median(translations):13.1f}"
        )


if __name__ == "__main__":
    main()
