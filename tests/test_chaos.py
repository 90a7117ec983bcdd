"""The short version of `bench/chaos.py`'s crash phase: a real `serve` process killed with
SIGKILL three times while signed deliveries stream in. The sender retries what got no
answer, as a provider does; every acknowledged delivery reaches the sink, none counts
twice."""

from __future__ import annotations

from pathlib import Path

from bench import chaos


def test_sigkill_while_deliveries_stream_in_loses_and_doubles_nothing(tmp_path: Path) -> None:
    sink = chaos.Sink()
    bridge = chaos.Bridge(f"sqlite:///{tmp_path}/bridge.db", sink, tmp_path / "bridge.log")
    sender = chaos.Sender(bridge)
    try:
        bridge.start()
        kills = chaos.crashes(bridge, sender, sink, kills=3, every=0.5, rate=100)
        arrived, _ = chaos.drain(sink, sender, within=60)
        assert bridge.stop() == 0
    finally:
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.kill()
        sink.stop()
    assert kills == 3
    assert sender.statuses["no answer"] > 0  # the kills did cut deliveries off
    assert sender.gave_up == 0
    expected = {chaos.event_id_of(sender.run, n) for n in sender.acknowledged}
    assert len(expected) >= 45  # a half-second stream at 100/s, at least
    assert sorted(arrived) == sorted(expected)  # each acknowledged one, once
