"""What the operator's console reads from the store: deliveries as a list and one by one,
each source's recent activity, and the rates of the last hour.

Read-only, each read served by an index (`inbox_source_received` for a source's latest
deliveries and its counts, `inbox_received` for the newest deliveries of all sources,
`outbox_inbox` for a delivery's calls, `outbox_done` for the calls delivered or dead).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

__all__ = [
    "RESULTS",
    "CallView",
    "DeliveryDetail",
    "DeliveryRow",
    "Rates",
    "Result",
    "SourceActivity",
]

#: What the deliveries list filters on: the delivery's state in the pipeline, or `dead`:
#: one of its calls is in dead letters.
Result = Literal["untranslated", "translated", "quarantined", "dropped", "dead"]
RESULTS: Final[tuple[Result, ...]] = (
    "untranslated",
    "translated",
    "quarantined",
    "dropped",
    "dead",
)


class DeliveryRow(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery in the list: where it is, and its calls by state."""

    id: int
    source: str
    provider_event_id: str
    received_at: float
    state: str  # untranslated | translated | quarantined | dropped
    calls: int  # how many calls its translation made (0: knowingly ignored)
    pending: int
    delivered: int
    dead: int


class CallView(msgspec.Struct, frozen=True, kw_only=True):
    """One call a delivery became, as the outbox holds it: its state and, once it has one,
    Millimetric's answer (`reason`: why it was refused, or the failure that made it dead)."""

    id: int
    route: str
    state: str  # pending | delivered | dead
    event_id: str | None
    attempts: int
    created_at: float
    done_at: float | None
    reason: str | None
    in_flight: bool  # claimed by the forwarder, its lease running
    next_at: float
    body: bytes  # the call as sent


class DeliveryDetail(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    source: str
    provider_event_id: str
    received_at: float
    state: str
    reason: str | None  # why it was quarantined (or erased)
    headers: dict[str, str]  # the headers kept for translation, never a secret
    raw_kept: bool  # whether its raw body is still stored (retention and forgets drop it)
    raw_size: int
    calls: list[CallView]


class SourceActivity(msgspec.Struct, frozen=True, kw_only=True):
    """A source's deliveries: the latest's arrival, and counts over the last hour and day
    (`failed`: quarantined, or with a call in dead letters)."""

    source: str
    last_received_at: float | None
    hour: int
    day: int
    failed_hour: int
    failed_day: int


class Rates(msgspec.Struct, frozen=True, kw_only=True):
    """Counts a bucket of `step` seconds from `since`, oldest first."""

    since: float
    step: float
    received: list[int]  # deliveries stored
    delivered: list[int]  # calls Millimetric accepted
    dead: list[int]  # calls put into dead letters
