"""The event model enforces the ingest field reference at its boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import EventInvalid
from bridge.events import (
    NAME_MAX_CHARS,
    PROPERTIES_MAX_BYTES,
    SERVER_DERIVED_FIELDS,
    Forget,
    Identify,
    Track,
    encode,
)

names_ok = st.text(min_size=1, max_size=NAME_MAX_CHARS)
names_too_long = st.text(min_size=NAME_MAX_CHARS + 1, max_size=NAME_MAX_CHARS + 64)


@given(names_ok)
def test_event_name_within_1_to_128_chars_is_accepted(name: str) -> None:
    assert Track(event=name).event == name
    assert Track(event="x", event_id=name).event_id == name


@given(names_too_long)
def test_event_name_over_128_chars_is_refused_naming_field_and_limit(name: str) -> None:
    with pytest.raises(EventInvalid, match=r"^event: must be 1-128 characters") as caught:
        Track(event=name)
    assert caught.value.field == "event"
    with pytest.raises(EventInvalid, match=r"^event_id: must be 1-128"):
        Track(event="x", event_id=name)


def test_empty_names_are_refused() -> None:
    with pytest.raises(EventInvalid, match="event: must be 1-128 characters, got 0"):
        Track(event="")
    with pytest.raises(EventInvalid, match="event_id"):
        Track(event="x", event_id="")


def test_128_is_characters_not_bytes() -> None:
    # 128 characters of 4 UTF-8 bytes each is still a valid name.
    assert len(encode(Track(event="😀" * 128))) > 128 * 4


def _properties_of_size(size: int) -> dict[str, Any]:
    """A properties object whose compact JSON is exactly `size` bytes."""
    overhead = len(b'{"p":""}')
    return {"p": "a" * (size - overhead)}


@given(st.integers(min_value=8, max_value=PROPERTIES_MAX_BYTES))
def test_properties_up_to_8kb_of_compact_json_are_accepted(size: int) -> None:
    props = _properties_of_size(size)
    assert len(msgspec.json.encode(props)) == size
    assert Track(event="x", properties=props).properties == props


@given(st.integers(min_value=PROPERTIES_MAX_BYTES + 1, max_value=PROPERTIES_MAX_BYTES * 2))
def test_properties_over_8kb_are_refused(size: int) -> None:
    with pytest.raises(EventInvalid, match=rf"properties: must be at most 8192 bytes .*{size}"):
        Track(event="x", properties=_properties_of_size(size))


def test_properties_are_measured_in_utf8_bytes() -> None:
    # 2,100 four-byte characters: 2,100 characters but 8,400+ bytes.
    with pytest.raises(EventInvalid, match="properties"):
        Track(event="x", properties={"p": "😀" * 2100})


def test_properties_must_be_json() -> None:
    with pytest.raises(EventInvalid, match="properties: must be JSON-serialisable"):
        Track(event="x", properties={"p": object()})
    with pytest.raises(EventInvalid, match="properties: must be a JSON object"):
        Track(event="x", properties=["not", "an", "object"])  # type: ignore[arg-type]


@given(st.datetimes(timezones=st.timezones()))
def test_zoned_timestamps_round_trip_as_iso8601(when: datetime) -> None:
    offset = when.utcoffset()
    if offset is None or offset.total_seconds() % 60:  # historical local mean times
        with pytest.raises(EventInvalid, match="timestamp"):
            Track(event="x", timestamp=when)
        return
    event = Track(event="x", timestamp=when)
    decoded = msgspec.json.decode(encode(event), type=Track)
    assert decoded.timestamp is not None
    # Compare instants: an ambiguous wall time (DST fold) never equals across zones.
    assert decoded.timestamp.timestamp() == when.timestamp()


def test_timestamp_without_a_zone_is_refused() -> None:
    with pytest.raises(EventInvalid, match="timestamp: must be an ISO 8601 time with a zone"):
        Track(event="x", timestamp=datetime(2024, 1, 1))
    with pytest.raises(msgspec.ValidationError, match=r"timezone.*\$\.timestamp"):
        msgspec.json.decode(b'{"event":"x","timestamp":"2024-01-01T00:00:00"}', type=Track)
    ok = msgspec.json.decode(b'{"event":"x","timestamp":"2024-01-01T00:00:00+05:30"}', type=Track)
    assert ok.timestamp == datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30)))


@pytest.mark.parametrize("field", ["anonymous_id", "user_id", "session_id", "url", "referrer"])
def test_ids_and_urls_must_be_strings(field: str) -> None:
    with pytest.raises(EventInvalid, match=f"^{field}: must be a string"):
        Track(event="x", **{field: 12345})
    with pytest.raises(msgspec.ValidationError, match=rf"\$\.{field}"):
        msgspec.json.decode(b'{"event":"x","%s":12345}' % field.encode(), type=Track)


@pytest.mark.parametrize("field", sorted(SERVER_DERIVED_FIELDS))
def test_server_derived_fields_cannot_be_sent(field: str) -> None:
    with pytest.raises(TypeError, match=field):
        Track(event="x", **{field: "x"})
    with pytest.raises(msgspec.ValidationError, match=f"unknown field `{field}`"):
        msgspec.json.decode(b'{"event":"x","%s":"x"}' % field.encode(), type=Track)


def test_identify_and_forget_need_a_string_user_id() -> None:
    assert encode(Identify(user_id="u1", anonymous_id="a1", traits={"plan": "pro"})) == (
        b'{"user_id":"u1","anonymous_id":"a1","traits":{"plan":"pro"}}'
    )
    assert encode(Forget(user_id="u1")) == b'{"user_id":"u1"}'
    with pytest.raises(EventInvalid, match="user_id: must be a string"):
        Identify(user_id=42)  # type: ignore[arg-type]
    with pytest.raises(EventInvalid, match="user_id: must be a string"):
        Forget(user_id=None)  # type: ignore[arg-type]


def test_defaults_are_not_sent() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert encode(Track(event="purchase", event_id="e1", timestamp=when)) == (
        b'{"event":"purchase","event_id":"e1","timestamp":"2024-05-01T12:00:00Z"}'
    )
