"""The overview's rate chart: the last hour, a point a minute, drawn as inline SVG."""

from __future__ import annotations

from typing import Final

import msgspec

from bridge.store.views import Rates

__all__ = ["Chart", "chart"]

WIDTH: Final = 600
HEIGHT: Final = 120
TOP: Final = 8  # room above the highest point for its stroke


class Line(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    css: str  # its class in console.css
    points: str  # the polyline's "x,y x,y ..."
    total: int


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    x: float
    y: float
    width: float
    height: float


class Chart(msgspec.Struct, frozen=True, kw_only=True):
    """Deliveries received as a bar a minute, calls delivered and dead as lines over them."""

    width: int
    height: int
    peak: int  # the top of the scale, a bucket's count
    minutes: int
    bars: list[Bar]
    lines: list[Line]  # the first is the bars' (its points unused): the legend lists all

    @property
    def summary(self) -> str:
        """What the chart shows, in words (its `<title>`, for screen readers)."""
        said = ", ".join(f"{line.total} {line.name}" for line in self.lines)
        return f"Last {self.minutes} minutes: {said}; at most {self.peak} a minute"


def chart(rates: Rates) -> Chart:
    """A line each for deliveries received, calls delivered and calls dead."""
    series = [
        ("deliveries received", "received", rates.received),
        ("calls delivered", "delivered", rates.delivered),
        ("calls dead", "dead", rates.dead),
    ]
    peak = max([1, *(max(counts, default=0) for _, _, counts in series)])
    slot = WIDTH / max(1, len(rates.received))

    def y(n: int) -> float:
        return HEIGHT - (HEIGHT - TOP) * n / peak

    def points(counts: list[int]) -> str:
        return " ".join(f"{(i + 0.5) * slot:.1f},{y(n):.1f}" for i, n in enumerate(counts))

    bars = [
        Bar(
            x=round(i * slot + 1, 1),
            y=round(y(n), 1),
            width=round(slot - 2, 1),
            height=round(HEIGHT - y(n), 1),
        )
        for i, n in enumerate(rates.received)
        if n
    ]

    return Chart(
        width=WIDTH,
        height=HEIGHT,
        peak=peak,
        minutes=round(len(rates.received) * rates.step / 60),
        bars=bars,
        lines=[
            Line(name=name, css=css, points=points(counts), total=sum(counts))
            for name, css, counts in series
        ],
    )
