"""Token buckets: the sink enforces Millimetric's published limits with them, and the
forwarder paces itself with the same ones so it never provokes a 429."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import msgspec

__all__ = ["BATCH_LIMIT", "TRACK_LIMIT", "RateLimit", "TokenBucket"]


class RateLimit(msgspec.Struct, frozen=True, kw_only=True):
    """`rate` tokens a second, at most `burst` saved up."""

    rate: float
    burst: float


#: Millimetric's published per-key limits.
TRACK_LIMIT: Final = RateLimit(rate=50, burst=200)
BATCH_LIMIT: Final = RateLimit(rate=5, burst=20)


class TokenBucket:
    """A bucket that refills continuously. It starts full, or with one token when
    `start_full` is off (a client that restarts does not know how much of the server's burst
    its previous run used)."""

    def __init__(
        self,
        limit: RateLimit,
        clock: Callable[[], float] = time.monotonic,
        *,
        start_full: bool = True,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._tokens = limit.burst if start_full else min(1.0, limit.burst)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.limit.burst, self._tokens + (now - self._stamp) * self.limit.rate)
        self._stamp = now

    def give_back(self, n: float = 1.0) -> None:
        """Return tokens taken for a request that was not sent."""
        self._refill()
        self._tokens = min(self.limit.burst, self._tokens + n)

    def try_take(self, n: float = 1.0) -> float:
        """Take `n` tokens if there are enough and return 0; otherwise take nothing and
        return how many seconds until there will be."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self.limit.rate
