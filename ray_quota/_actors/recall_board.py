"""Recalls waiting for their holders, in an actor: each holder keeps one ``wait`` call open.

A recall tells a holder (a process, or a node's broker) that others now wait for a token it holds
units of, so it gives its spare back and serves nothing locally. The executor posts the recalls
its service addresses to holders; a broker passes those of its node on to its processes. The rule
is :class:`Watches`'; this board only waits on asyncio futures, on the loop's clock, and sweeps
the recalls of holders that never came back.
"""

from __future__ import annotations

import asyncio

from ray_quota._core.watches import POSTED_KEEP_S, Watches


class RecallBoard:
    """Recalls waiting for their holders: each holder keeps one ``wait`` call open."""

    def __init__(self) -> None:
        # A future already done (cancelled with its caller, say) can take no answer.
        self._watches: Watches[asyncio.Future[list[str]]] = Watches(
            is_open=lambda future: not future.done())
        self._sweep: asyncio.TimerHandle | None = None  # armed while recalls wait

    def post(self, holder: str, token_ids: set[str] | frozenset[str]) -> None:
        """Tell ``holder`` that others wait for these tokens' resources."""
        loop = asyncio.get_running_loop()
        answer = self._watches.post(holder, token_ids, loop.time())
        if answer is not None:
            future, ids = answer
            future.set_result(ids)
        elif self._sweep is None:
            self._sweep = loop.call_later(POSTED_KEEP_S, self._swept)

    def _swept(self) -> None:
        """Forget recalls nobody came for; again later while some are left."""
        loop = asyncio.get_running_loop()
        left = self._watches.sweep(loop.time())
        self._sweep = loop.call_later(POSTED_KEEP_S, self._swept) if left else None

    def sizes(self) -> dict[str, int]:
        """Holders with a watch open or recalls waiting (for tests of memory)."""
        return self._watches.sizes()

    async def wait(self, holder: str, timeout_s: float) -> list[str]:
        """The token ids recalled from ``holder``, at once if any are posted, else when one is;
        an empty list after ``timeout_s``."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        posted, replaced = self._watches.watch(holder, future)
        if posted is not None:
            return posted
        if replaced is not None:
            replaced.set_result([])
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return []
        finally:
            self._watches.close(holder, future)
