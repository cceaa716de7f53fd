"""Recalls waiting for their holders, in an actor: each holder keeps one ``wait`` call open.

A recall tells a holder (a process, or a node's broker) that others now wait for a token it holds
units of, so it gives its spare back and serves nothing locally. The executor posts the recalls
its service addresses to holders; a broker passes those of its node on to its processes.
"""

from __future__ import annotations

import asyncio


class RecallBoard:
    """Recalls waiting for their holders: each holder keeps one ``wait`` call open."""

    def __init__(self) -> None:
        self._watchers: dict[str, asyncio.Future[list[str]]] = {}
        self._posted: dict[str, set[str]] = {}

    def post(self, holder: str, token_ids: set[str] | frozenset[str]) -> None:
        """Tell ``holder`` that others wait for these tokens' resources."""
        watcher = self._watchers.pop(holder, None)
        if watcher is not None and not watcher.done():
            watcher.set_result(sorted(token_ids))
        else:
            self._posted.setdefault(holder, set()).update(token_ids)

    async def wait(self, holder: str, timeout_s: float) -> list[str]:
        """The token ids recalled from ``holder``, at once if any are posted, else when one is;
        an empty list after ``timeout_s``."""
        if holder in self._posted:
            return sorted(self._posted.pop(holder))
        previous = self._watchers.pop(holder, None)
        if previous is not None and not previous.done():
            previous.set_result([])
        future = asyncio.get_running_loop().create_future()
        self._watchers[holder] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return []
        finally:
            if self._watchers.get(holder) is future:
                del self._watchers[holder]
