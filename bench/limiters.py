"""ray_quota and the baselines behind one small interface: ``acquire`` blocks, ``release`` settles.

Every limiter gets the same work from :mod:`bench.workers`. The baselines are written the way a
user would write them by hand, each in its plainest correct form:

- ``lock counter``: a token bucket (or slot counter) under a ``threading.Lock`` in one process, the
  floor for any Python limiter; it cannot span processes, so several workers are threads.
- ``ray actor``: a plain Ray actor holding a token bucket (or a slot counter), one actor call per
  reservation; the caller sleeps for the wait the actor reports and asks again.
- ``limits``: the ``limits`` package on a real redis-server, moving window (exact) or fixed window
  (cheaper, admits up to twice the limit across a window edge); the caller polls.
- ``pyrate-limiter``: its Redis bucket (a sliding-window log in a sorted set); the caller polls.
"""

from __future__ import annotations

import importlib.util
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

RAY_QUOTA = "ray_quota"
RAY_QUOTA_EXEC = "ray_quota (executor path)"
LOCK = "lock counter"
ACTOR = "ray actor"
LIMITS_MOVING = "limits moving-window (redis)"
LIMITS_FIXED = "limits fixed-window (redis)"
PYRATE = "pyrate-limiter (redis)"
TOKEN_THROTTLE = "token-throttle"

BASELINES = [LOCK, ACTOR, LIMITS_MOVING, LIMITS_FIXED, PYRATE, TOKEN_THROTTLE]
REDIS_BACKED = [LIMITS_MOVING, LIMITS_FIXED, PYRATE]
ALL = [RAY_QUOTA, *BASELINES]


@dataclass(frozen=True)
class Limit:
    """One limit every limiter enforces: a rate (``rate`` units/s, ``burst`` units) or ``slots``.

    Window-based limiters enforce ``burst`` units per ``burst / rate`` seconds: at most ``burst``
    in any such window, which keeps them inside the same token-bucket bound.
    """

    kind: str  # "rate" or "concurrency"
    rate: float = 0.0
    burst: int = 0
    slots: int = 0

    @property
    def window_s(self) -> float:
        return self.burst / self.rate


def unavailable(name: str, limit: Limit, redis_url: str | None) -> str | None:
    """Why ``name`` cannot run this limit here, or None when it can."""
    if name == TOKEN_THROTTLE:
        if importlib.util.find_spec("token_throttle") is None:
            return ("not installed: `pip install token-throttle` finds no release for Python "
                    "3.11 (every release requires Python >= 3.12)")
        return "installed, but no adapter written yet"
    if name in REDIS_BACKED:
        if redis_url is None:
            return "skipped: no redis-server binary on this machine"
        if limit.kind == "concurrency":
            return "not supported: the library has no concurrency (slot) limit"
        if name.startswith("limits") and limit.window_s != int(limit.window_s):
            return "not supported: limits windows are whole seconds"
    return None


# ------------------------------------------------------------------------------- ray_quota


class RayQuotaClient:
    """``token.reserve`` / ``reservation.commit``: the API under test."""

    def __init__(self, token: Any) -> None:
        self.token = token

    def acquire(self, amount: int) -> Any:
        return self.token.reserve(amount)

    def release(self, handle: Any, amount: int, used: int) -> None:
        handle.commit(used)

    def close(self) -> None:
        self.token.close()


# ---------------------------------------------------------------------------- lock counter


class LockBucket:
    """A token bucket and a slot counter under one lock: the floor for a Python limiter."""

    def __init__(self, limit: Limit) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rate = limit.rate
        self._burst = limit.burst
        self._level = float(limit.burst)
        self._stamp = time.monotonic()
        self._free = limit.slots

    def take(self, amount: int) -> float:
        """Take ``amount`` units now and return 0.0, or return the seconds until they could be."""
        with self._lock:
            now = time.monotonic()
            level = min(self._burst, self._level + (now - self._stamp) * self._rate)
            self._stamp = now
            if level >= amount:
                self._level = level - amount
                return 0.0
            self._level = level
            return (amount - level) / self._rate

    def refund(self, units: int) -> None:
        with self._lock:
            self._level = min(self._burst, self._level + units)

    def hold(self, slots: int) -> None:
        with self._cond:
            while self._free < slots:
                self._cond.wait()
            self._free -= slots

    def free(self, slots: int) -> None:
        with self._cond:
            self._free += slots
            self._cond.notify()


class LockClient:
    def __init__(self, bucket: LockBucket, limit: Limit) -> None:
        self.bucket = bucket
        self.kind = limit.kind

    def acquire(self, amount: int) -> None:
        if self.kind == "concurrency":
            self.bucket.hold(amount)
            return
        while (wait := self.bucket.take(amount)) > 0:
            time.sleep(wait)

    def release(self, handle: Any, amount: int, used: int) -> None:
        if self.kind == "concurrency":
            self.bucket.free(amount)
        else:
            self.bucket.refund(amount - used)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------ plain Ray actor


class PlainLimiterActor:
    """What Ray users write by hand: an actor with a token bucket and a slot counter.

    Made remote by :func:`plain_actor`; one call per reservation (plus one per release of slots).
    """

    def __init__(self, rate: float, burst: int, slots: int) -> None:
        self.reset(rate, burst, slots)

    def reset(self, rate: float, burst: int, slots: int) -> None:
        """Start over with a new limit (the benchmark reuses one actor across runs)."""
        self.rate = rate
        self.burst = burst
        self.level = float(burst)
        self.stamp = time.monotonic()
        self.free = slots

    def acquire(self, amount: int) -> float:
        """0.0 when granted, else the seconds to wait before asking again."""
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def acquire_slots(self, slots: int) -> bool:
        if self.free >= slots:
            self.free -= slots
            return True
        return False

    def release_slots(self, slots: int) -> None:
        self.free += slots


def plain_actor(limit: Limit) -> Any:
    import ray

    return ray.remote(num_cpus=0)(PlainLimiterActor).remote(limit.rate, limit.burst, limit.slots)


class ActorClient:
    SLOT_POLL_S = 0.001

    def __init__(self, handle: Any, limit: Limit) -> None:
        self.handle = handle
        self.kind = limit.kind

    def acquire(self, amount: int) -> None:
        import ray

        if self.kind == "concurrency":
            while not ray.get(self.handle.acquire_slots.remote(amount)):
                time.sleep(self.SLOT_POLL_S)
            return
        while (wait := ray.get(self.handle.acquire.remote(amount))) > 0:
            time.sleep(wait)

    def release(self, handle: Any, amount: int, used: int) -> None:
        import ray

        if self.kind == "concurrency":
            ray.get(self.handle.release_slots.remote(amount))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- Redis-backed


class LimitsClient:
    """The ``limits`` package against redis-server; polls, sleeping the refill time of a request."""

    def __init__(self, redis_url: str, limit: Limit, key: str, moving: bool) -> None:
        from limits import RateLimitItemPerSecond
        from limits.storage import RedisStorage
        from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

        self.storage = RedisStorage(redis_url)
        strategy = MovingWindowRateLimiter if moving else FixedWindowRateLimiter
        self.limiter = strategy(self.storage)
        self.item = RateLimitItemPerSecond(limit.burst, int(limit.window_s), namespace="bench")
        self.key = key
        self.rate = limit.rate

    def acquire(self, amount: int) -> None:
        while not self.limiter.hit(self.item, self.key, cost=amount):
            time.sleep(amount / self.rate)

    def release(self, handle: Any, amount: int, used: int) -> None:
        pass

    def close(self) -> None:
        pass


class PyrateClient:
    """pyrate-limiter's RedisBucket (sliding-window log); polls like :class:`LimitsClient`."""

    def __init__(self, redis_url: str, limit: Limit, key: str) -> None:
        import redis
        from pyrate_limiter import Limiter, Rate, RedisBucket

        self.redis = redis.Redis.from_url(redis_url)
        bucket = RedisBucket.init([Rate(limit.burst, int(limit.window_s * 1000))], self.redis,
                                  key)
        self.limiter = Limiter(bucket)
        self.rate = limit.rate

    def acquire(self, amount: int) -> None:
        while not self.limiter.try_acquire("bench", weight=amount, blocking=False):
            time.sleep(amount / self.rate)

    def release(self, handle: Any, amount: int, used: int) -> None:
        pass

    def close(self) -> None:
        try:
            self.limiter.close()
        finally:
            self.redis.close()


def make_client(name: str, limit: Limit, *, token: Any = None, actor: Any = None,
                bucket: LockBucket | None = None, redis_url: str | None = None,
                key: str | None = None) -> Any:
    """Build the worker-side client of limiter ``name``."""
    key = key or uuid.uuid4().hex
    if name in (RAY_QUOTA, RAY_QUOTA_EXEC):
        return RayQuotaClient(token)
    if name == LOCK:
        return LockClient(bucket or LockBucket(limit), limit)
    if name == ACTOR:
        return ActorClient(actor, limit)
    assert redis_url is not None
    if name == LIMITS_MOVING:
        return LimitsClient(redis_url, limit, key, moving=True)
    if name == LIMITS_FIXED:
        return LimitsClient(redis_url, limit, key, moving=False)
    if name == PYRATE:
        return PyrateClient(redis_url, limit, key)
    raise ValueError(f"no client for {name!r}")
