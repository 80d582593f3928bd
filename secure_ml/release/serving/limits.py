"""The server's limits: a token bucket per client, a daily query budget per token, and authentication
failures counted per client address, limited, and summarised (a bounded number of audit entries).

    limiter = RateLimiter(120)                   # per_minute, bursts up to the same number
    allowed, wait = limiter.allow("frontend")
    budget = DailyBudget(10_000)                 # instances per token per UTC day
    allowed, left = budget.charge("frontend", 32)
    failures = AuthFailures(window_s=60, max_per_window=20)
    entries = failures.fail("203.0.113.9")          # entries: summaries of windows that ended
    blocked, wait, entries = failures.blocked("203.0.113.9")
    failures.drain(force=True)                   # at shutdown: the summaries of the open window

Everything is in memory and bounded: a bucket or counter per client up to ``max_clients``; beyond that
the fullest buckets are dropped and addresses share one ``other`` counter, so an attacker rotating
addresses cannot grow memory or the audit log.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from secure_ml.errors import ConfigurationError

OTHER = "other"


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests a minute, bursts up to the same number."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        if per_minute < 1:
            raise ConfigurationError("rate limit must be at least 1 request a minute")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> tuple[bool, float]:
        """(allowed, seconds until the next request would be)."""
        now = self._clock()
        with self._lock:
            if client not in self._buckets and len(self._buckets) >= self.max_clients:
                self._prune(now)
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return True, 0.0
            self._buckets[client] = (tokens, now)
            return False, (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        # A bucket that has refilled holds no state worth keeping; if none has, drop the oldest half.
        full = [c for c, (tokens, last) in self._buckets.items()
                if tokens + (now - last) * self.rate >= self.capacity]
        for client in full or sorted(self._buckets, key=lambda c: self._buckets[c][1])[: len(self._buckets) // 2]:
            del self._buckets[client]


class DailyBudget:
    """Instances a token may ask about per UTC day (model extraction needs many answers)."""

    def __init__(self, per_day: int, *, today: Callable[[], str] | None = None) -> None:
        if per_day < 1:
            raise ConfigurationError("the daily query budget must be at least 1")
        self.per_day = per_day
        self._today = today or (lambda: datetime.now(UTC).date().isoformat())
        self._used: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def charge(self, client: str, instances: int) -> tuple[bool, int]:
        """(allowed, instances left today). A request that would go over is refused whole."""
        day = self._today()
        with self._lock:
            seen, used = self._used.get(client, (day, 0))
            used = used if seen == day else 0
            if used + instances > self.per_day:
                self._used[client] = (day, used)
                return False, self.per_day - used
            self._used[client] = (day, used + instances)
            return True, self.per_day - used - instances


@dataclass(frozen=True)
class AuthSummary:
    """One audit entry: ``failures`` bad-token requests from ``address`` in one window."""

    address: str
    failures: int
    refused: int
    window_start: str
    window_seconds: float

    def details(self) -> dict[str, Any]:
        return {"failures": self.failures, "refused_over_limit": self.refused,
                "window_start": self.window_start, "window_seconds": self.window_seconds}


class AuthFailures:
    """Authentication failures per client address in fixed windows.

    ``fail`` counts one; ``blocked`` says whether the address is over ``max_per_window`` (its next
    bad tokens get 429, counted as refused). Entries for the audit log come out only as one summary
    per address per ended window (at most ``max_addresses`` + 1), never per request: 300 bad tokens
    are one line, not 300, and a hostile client cannot fill the log's volume.
    """

    def __init__(self, *, window_s: float = 60.0, max_per_window: int = 20, max_addresses: int = 1024,
                 clock: Callable[[], float] = time.time) -> None:
        if window_s <= 0 or max_per_window < 1 or max_addresses < 1:
            raise ConfigurationError("auth failure limits must be positive")
        self.window_s = float(window_s)
        self.max_per_window = max_per_window
        self.max_addresses = max_addresses
        self._clock = clock
        self._window = math.floor(clock() / self.window_s)
        self._counts: dict[str, list[int]] = {}       # address -> [failures, refused]
        self._lock = threading.Lock()

    def blocked(self, address: str) -> tuple[bool, float, list[AuthSummary]]:
        """(over the limit in this window, seconds until the window ends, ended windows' summaries)."""
        with self._lock:
            ended = self._roll()
            counts = self._counts.get(self._key(address))
            over = counts is not None and counts[0] >= self.max_per_window
            if over and counts is not None:
                counts[1] += 1
            return over, (self._window + 1) * self.window_s - self._clock(), ended

    def fail(self, address: str) -> list[AuthSummary]:
        """Count one failure; returns the summaries of windows that have ended (to write now)."""
        with self._lock:
            ended = self._roll()
            key = self._key(address)
            self._counts.setdefault(key, [0, 0])[0] += 1
            return ended

    def drain(self, *, force: bool = False) -> list[AuthSummary]:
        """Summaries of ended windows; with ``force`` (shutdown) the open window's too."""
        with self._lock:
            ended = self._roll()
            if force and self._counts:
                ended += self._summaries(self._window)
                self._counts = {}
            return ended

    def _key(self, address: str) -> str:
        if address in self._counts or len(self._counts) < self.max_addresses:
            return address
        return OTHER

    def _roll(self) -> list[AuthSummary]:
        window = math.floor(self._clock() / self.window_s)
        if window == self._window:
            return []
        ended = self._summaries(self._window)
        self._window, self._counts = window, {}
        return ended

    def _summaries(self, window: int) -> list[AuthSummary]:
        start = datetime.fromtimestamp(window * self.window_s, UTC).isoformat(timespec="seconds")
        return [AuthSummary(address, failures, refused, start, self.window_s)
                for address, (failures, refused) in sorted(self._counts.items())]
