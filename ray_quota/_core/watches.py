"""Recall watches: recalls waiting for their holders, each holder keeping at most one watch open.

A recall tells a holder (a process, or a node's broker) that others now wait for a token it holds
units of, so it gives its spare back and serves nothing locally. Recalls posted while the holder
has no watch open wait for its next one. The rule is the same wherever a watch waits, so it is
kept here once, over any kind of watch: the actors' recall board keeps asyncio futures in it,
the scale model its simulated replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

W = TypeVar("W")


class Watches(Generic[W]):
    """Open watches by holder, and recalls posted for holders with none open.

    Example:
        >>> watches: Watches[str] = Watches()
        >>> watches.watch("proc-1", "call-1")      # nothing posted: the watch stays open
        (None, None)
        >>> watches.post("proc-1", {"t2", "t1"})   # answer the open watch with these ids
        ('call-1', ['t1', 't2'])
        >>> watches.post("proc-1", {"t3"})         # no watch open: kept for the next
        >>> watches.watch("proc-1", "call-2")
        (['t3'], None)

    Args:
        is_open: whether a watch can still be answered (an asyncio future that is not done, say);
            a watch that cannot is treated as absent.
    """

    __slots__ = ("_is_open", "_open", "_posted")

    def __init__(self, is_open: Callable[[W], bool] = lambda _: True) -> None:
        self._open: dict[str, W] = {}
        self._posted: dict[str, set[str]] = {}
        self._is_open = is_open

    def watch(self, holder: str, watch: W) -> tuple[list[str] | None, W | None]:
        """``holder`` opens ``watch``.

        Returns the token ids already posted for the holder (answer ``watch`` with them now; it
        is not kept open) or None, and the watch this one replaces, if still open (answer it
        with ``[]``: a holder keeps one watch open).
        """
        if holder in self._posted:
            return sorted(self._posted.pop(holder)), None
        replaced = self._open.pop(holder, None)
        self._open[holder] = watch
        return None, replaced if replaced is not None and self._is_open(replaced) else None

    def post(self, holder: str, token_ids: Iterable[str]) -> tuple[W, list[str]] | None:
        """Recall ``token_ids`` from ``holder``: its open watch and the ids to answer it with, or
        None if none is open (the ids wait for its next watch)."""
        watch = self._open.pop(holder, None)
        if watch is not None and self._is_open(watch):
            return watch, sorted(token_ids)
        self._posted.setdefault(holder, set()).update(token_ids)
        return None

    def close(self, holder: str, watch: W) -> bool:
        """``watch`` ended unanswered (it timed out, or its caller left): forget it if it is still
        the holder's open watch. Returns whether it was."""
        if self._open.get(holder) is watch:
            del self._open[holder]
            return True
        return False
