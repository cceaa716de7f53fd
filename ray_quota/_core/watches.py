"""Recall watches: recalls waiting for their holders, each holder keeping at most one watch open.

A recall tells a holder (a process, or a node's broker) that others now wait for a token it holds
units of, so it gives its spare back and serves nothing locally. Recalls posted while the holder
has no watch open wait for its next one, but not for ever: a holder that opens no watch for
:data:`POSTED_KEEP_S` is gone (a live one reopens its watch at once after each answer), and its
recalls are forgotten, as its leases soon are. The rule is the same wherever a watch waits, so it is
kept here once, over any kind of watch: the actors' recall board keeps asyncio futures in it,
the scale model its simulated replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from ray_quota._core.protocol import RENEW_INTERVAL_S, WATCH_TIMEOUT_S

W = TypeVar("W")

# How long recalls wait for a holder's next watch. A live holder keeps one open nearly always,
# reopening it after each answer or timeout, or after a renewal interval when the call failed;
# and a recall is only a hint to give back early (renewals say "contended" too), so forgetting
# one for a holder that did not come back in time loses nothing.
POSTED_KEEP_S = 4 * (WATCH_TIMEOUT_S + RENEW_INTERVAL_S)


class Watches(Generic[W]):
    """Open watches by holder, and recalls posted for holders with none open.

    Example:
        >>> watches: Watches[str] = Watches()
        >>> watches.watch("proc-1", "call-1")      # nothing posted: the watch stays open
        (None, None)
        >>> watches.post("proc-1", {"t2", "t1"}, now=0.0)  # answer the open watch with these
        ('call-1', ['t1', 't2'])
        >>> watches.post("proc-1", {"t3"}, now=1.0)  # no watch open: kept for the next
        >>> watches.watch("proc-1", "call-2")
        (['t3'], None)

    Args:
        is_open: whether a watch can still be answered (an asyncio future that is not done, say);
            a watch that cannot is treated as absent.
    """

    __slots__ = ("_is_open", "_open", "_posted")

    def __init__(self, is_open: Callable[[W], bool] = lambda _: True) -> None:
        self._open: dict[str, W] = {}
        # holder -> (token ids, when first posted); in the order first posted, so the oldest
        # are swept from the front
        self._posted: dict[str, tuple[set[str], float]] = {}
        self._is_open = is_open

    def watch(self, holder: str, watch: W) -> tuple[list[str] | None, W | None]:
        """``holder`` opens ``watch``.

        Returns the token ids already posted for the holder (answer ``watch`` with them now; it
        is not kept open) or None, and the watch this one replaces, if still open (answer it
        with ``[]``: a holder keeps one watch open).
        """
        if holder in self._posted:
            return sorted(self._posted.pop(holder)[0]), None
        replaced = self._open.pop(holder, None)
        self._open[holder] = watch
        return None, replaced if replaced is not None and self._is_open(replaced) else None

    def post(self, holder: str, token_ids: Iterable[str],
             now: float) -> tuple[W, list[str]] | None:
        """Recall ``token_ids`` from ``holder`` at ``now``: its open watch and the ids to answer
        it with, or None if none is open (the ids wait for its next watch, for a while)."""
        self.sweep(now)
        watch = self._open.pop(holder, None)
        if watch is not None and self._is_open(watch):
            return watch, sorted(token_ids)
        self._posted.setdefault(holder, (set(), now))[0].update(token_ids)
        return None

    def sweep(self, now: float) -> bool:
        """Forget recalls posted :data:`POSTED_KEEP_S` or more before ``now`` that no watch took
        up; returns whether any are left (to sweep again later)."""
        posted = self._posted
        while posted:
            holder, (_, posted_at) = next(iter(posted.items()))
            if posted_at > now - POSTED_KEEP_S:
                break
            del posted[holder]
        return bool(posted)

    def sizes(self) -> dict[str, int]:
        """How many holders have a watch open, and how many have recalls waiting (for tests of
        memory)."""
        return {"open": len(self._open), "posted": len(self._posted)}

    def close(self, holder: str, watch: W) -> bool:
        """``watch`` ended unanswered (it timed out, or its caller left): forget it if it is still
        the holder's open watch. Returns whether it was."""
        if self._open.get(holder) is watch:
            del self._open[holder]
            return True
        return False
