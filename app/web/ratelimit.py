"""Request-rate limits (Mate's -rate): token buckets per client and in total."""

from __future__ import annotations

import time


class TokenBucket:
    """`rate` tokens per second, bursts up to one second's worth."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; otherwise the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """A total bucket and one bucket per client key; a rate of 0 disables that limit."""

    MAX_CLIENTS = 100_000

    def __init__(self, total: float, per_client: float) -> None:
        now = time.monotonic()
        self.total = TokenBucket(total, now) if total > 0 else None
        self.per_client = per_client
        self.clients: dict[str, TokenBucket] = {}
        self.throttled = 0

    @property
    def enabled(self) -> bool:
        """True when any limit is set."""
        return self.total is not None or self.per_client > 0

    def check(self, client: str) -> float:
        """0.0 to admit the request; otherwise seconds to wait (the request is refused)."""
        now = time.monotonic()
        if self.per_client > 0:
            bucket = self.clients.get(client)
            if bucket is None:
                if len(self.clients) >= self.MAX_CLIENTS:
                    self.clients.clear()  # forget idle clients rather than grow without bound
                bucket = self.clients[client] = TokenBucket(self.per_client, now)
            wait = bucket.take(now)
            if wait:
                self.throttled += 1
                return wait
        if self.total is not None:
            wait = self.total.take(now)
            if wait:
                self.throttled += 1
                return wait
        return 0.0
