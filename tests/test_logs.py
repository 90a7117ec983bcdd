"""Secrets never reach a log line, whatever field or message they hide in."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
import structlog
from structlog.testing import capture_logs

from bridge.logs import REDACTED, LineWriter, configure_logging, info_line, redact_secrets

SECRETS = [
    "sk_live_abc123_def456",
    "sk_live_a_b_c",  # Millimetric's parts may hold underscores and dashes
    "sk_test_ab-cd_x_y",
    "rk_live_p4rt!_w1th.p%nct_x~y",
    "rk_live_51HqLyjWDarjtT1zdp7dcXJ",  # Stripe's shape: one part after the mode
    "pdl_live_apikey_01gtgztp8f4kek3yd4g1wrksa3_q6TGTJyvoIz7LDtXT65bX7_AQO",
    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "Bearer s3cr3t-admin-token",
    "t=1700000000,v1=ea2950ccace22ce8e093fe72cb20ca88ba60916e10013c371a07ea66d3e6a56e",
    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
]


def test_fields_named_like_secrets_are_blanked() -> None:
    event = redact_secrets(
        None,
        "info",
        {
            "event": "x",
            "api_key": "anything",
            "Authorization": "x",
            "webhook_secret": "x",
            "stripe_signature": "x",
            "token": "x",
            "key": "x",
            "source": "stripe",
        },
    )
    assert event == {
        "event": "x",
        "api_key": REDACTED,
        "Authorization": REDACTED,
        "webhook_secret": REDACTED,
        "stripe_signature": REDACTED,
        "token": REDACTED,
        "key": REDACTED,
        "source": "stripe",
    }


@pytest.mark.parametrize("secret", SECRETS)
def test_secret_shaped_text_is_scrubbed_anywhere(secret: str) -> None:
    event = redact_secrets(
        None,
        "info",
        {
            "event": f"failed with {secret} inside",
            "nested": {"headers": [f"x {secret}"]},
        },
    )
    assert secret not in json.dumps(event)
    assert REDACTED in event["event"]


@pytest.mark.parametrize(
    "text",
    [
        "key='sk_live_a_b_c'",
        'the key "sk_live_a_b\'c_d", then more',
        "MILLIMETRIC_KEY=sk_test_ab-cd_x_y;",
        "keys [sk_live_a_b_c,sk_test_ab-cd_x_y]",
        '{"key":"sk_live_a_b_c","source":"stripe"}',
    ],
)
def test_a_key_in_free_text_is_hidden_to_the_next_space(text: str) -> None:
    # A key's parts may hold any printable character, so whatever is glued to it goes too:
    # better a hidden quote than the end of a key that holds one.
    scrubbed = redact_secrets(None, "info", {"event": f"start {text} end"})["event"]
    assert scrubbed.startswith("start ")
    assert scrubbed.endswith(" end")
    assert REDACTED in scrubbed
    for part in ("live_a", "_b_c", "ab-cd", "x_y", "c_d"):
        assert part not in scrubbed


@pytest.mark.parametrize(
    "text", ["pk_events", "sk_live_abc", "risk_a_b_c", "task_sk_a", "a pk_ column", "sk_a_b"]
)
def test_words_that_are_not_keys_stay(text: str) -> None:
    assert redact_secrets(None, "info", {"event": text})["event"] == text


def test_configured_output_is_json_and_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    try:
        structlog.get_logger().info("sent", millimetric_key=SECRETS[0], note=SECRETS[2])
        logging.getLogger("uvicorn.error").error("boom %s", SECRETS[1])
        try:
            raise RuntimeError(f"bad header {SECRETS[3]}")
        except RuntimeError:
            structlog.get_logger().exception("crashed")
        out = capsys.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["event"].split()[0] for line in lines] == ["sent", "boom", "crashed"]
    assert lines[0]["level"] == "info"
    assert "timestamp" in lines[0]
    assert "RuntimeError" in lines[2]["exception"]
    for secret in SECRETS:
        assert secret not in out


def test_lines_of_one_loop_pass_are_written_together_in_order() -> None:
    out = io.StringIO()
    writer = LineWriter(out)

    async def log_and_look() -> list[str]:
        writer.msg("one")
        writer.msg("two")
        seen = [out.getvalue()]  # nothing yet: the pass is not over
        await asyncio.sleep(0)
        seen.append(out.getvalue())
        writer.msg("three")
        await asyncio.sleep(0)
        seen.append(out.getvalue())
        return seen

    assert asyncio.run(log_and_look()) == ["", "one\ntwo\n", "one\ntwo\nthree\n"]
    writer.msg("off the loop")  # no loop runs: written at once
    assert out.getvalue().endswith("three\noff the loop\n")


def test_lines_left_by_a_stopped_loop_are_written_by_the_next_or_at_exit() -> None:
    out = io.StringIO()
    writer = LineWriter(out)
    loop = asyncio.new_event_loop()
    loop.call_soon(writer.msg, "left behind")
    loop.call_soon(loop.stop)
    loop.run_forever()  # stops before the pass that would write the line
    loop.close()
    assert out.getvalue() == ""

    async def log() -> None:
        writer.msg("next")
        await asyncio.sleep(0)

    asyncio.run(log())
    assert out.getvalue() == "left behind\nnext\n"

    other = io.StringIO()
    late = LineWriter(other)

    stopped = asyncio.new_event_loop()
    stopped.call_soon(late.msg, "pending at exit")
    stopped.call_soon(stopped.stop)
    stopped.run_forever()
    stopped.close()
    assert other.getvalue() == ""
    late.flush_all()  # what atexit runs
    assert other.getvalue() == "pending at exit\n"


def test_the_canonical_line_is_the_line_structlog_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`info_line` skips structlog's chain under `serve`; what it writes is the same, secrets
    redacted included; under another configuration it goes through structlog."""
    with capture_logs() as captured:  # before `configure_logging`: structlog's own chain
        info_line(structlog.get_logger("x"), "webhook", {"source": "stripe"})
    assert captured == [{"source": "stripe", "event": "webhook", "log_level": "info"}]
    fields = {"source": "stripe", "result": "accepted", "ms": 1.5, "note": SECRETS[2]}
    configure_logging("json", "info")
    log = structlog.get_logger("bridge.intake")
    try:
        info_line(log, "webhook", {**fields, "token": "t0ps3cret"})
        log.info("webhook", **fields, token="t0ps3cret")
        out = capsys.readouterr().out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    fast, chained = (json.loads(line) for line in out.splitlines())
    assert fast.pop("timestamp")[:16] == chained.pop("timestamp")[:16]
    assert list(fast.items()) == list(chained.items())  # same fields, same order
    assert fast["token"] == REDACTED
    assert SECRETS[2] not in out
