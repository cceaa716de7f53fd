"""The asyncio twins of a token's operations, for async actors and Ray Serve replicas.

Each operation is written once, in :mod:`ray_quota._token`, as steps (see
:mod:`ray_quota._runtime.steps`); the sync methods drive them by blocking, these by awaiting,
so no call to Ray waits on the event loop (Ray's blocking lookups run in a worker thread).

An operation that changes what the executor keeps (open, split, merge, close) runs to its end
even if the awaiting coroutine is cancelled: only the waiting stops. A call cancelled half-way
could have opened a token nobody holds, or closed this handle while the executor still counts
the token.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, TypeVar

from ray_quota._runtime.steps import Steps, run_async

if TYPE_CHECKING:
    from ray_quota._token import QuotaToken

T = TypeVar("T")

# Operations under way whose caller stopped waiting (asyncio keeps only weak references to tasks).
_UNDER_WAY: set[asyncio.Task[Any]] = set()


async def to_the_end(steps: Steps[T]) -> T:
    """Await ``steps``; if this coroutine is cancelled, they still run to their end."""
    task = asyncio.ensure_future(run_async(steps))
    _UNDER_WAY.add(task)
    task.add_done_callback(_finished)
    return await asyncio.shield(task)


def _finished(task: asyncio.Task[Any]) -> None:
    _UNDER_WAY.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: nobody may be waiting for it any more


class AsyncTokenOps:
    """A :class:`~ray_quota.QuotaToken`'s asyncio twins (a mixin of it)."""

    __slots__ = ()

    @classmethod
    async def open_async(cls, resource: str, expected_use: int, *,
                         label: str | None = None) -> QuotaToken:
        """The asyncio twin of ``QuotaToken(resource, expected_use, label=label)``.

        Example:
            >>> token = await QuotaToken.open_async("llm-tokens", expected_use=1000)
        """
        token: QuotaToken = cls.__new__(cls)  # type: ignore[assignment]
        await to_the_end(token._opening(resource, expected_use, label))
        return token

    async def describe_async(self: QuotaToken) -> tuple[int, float]:  # type: ignore[misc]
        """The asyncio twin of :meth:`~ray_quota.QuotaToken.describe`."""
        return await run_async(self._describing())

    async def split_async(self: QuotaToken,  # type: ignore[misc]
                          child_expected_use: int) -> QuotaToken:
        """The asyncio twin of :meth:`~ray_quota.QuotaToken.split`."""
        return await to_the_end(self._splitting(child_expected_use))

    async def merge_async(self: QuotaToken, other: QuotaToken) -> None:  # type: ignore[misc]
        """The asyncio twin of :meth:`~ray_quota.QuotaToken.merge`."""
        await to_the_end(self._merging(other))

    async def return_to_parent_async(self: QuotaToken) -> bool:  # type: ignore[misc]
        """The asyncio twin of :meth:`~ray_quota.QuotaToken.return_to_parent`."""
        return await to_the_end(self._returning())

    async def close_async(self: QuotaToken) -> None:  # type: ignore[misc]
        """The asyncio twin of :meth:`~ray_quota.QuotaToken.close`."""
        await to_the_end(self._closing())

    async def __aenter__(self: QuotaToken) -> QuotaToken:  # type: ignore[misc]
        """``async with token:`` puts it in scope, as ``with`` does, and closes it with
        :meth:`close_async` at the end."""
        return self.__enter__()

    async def __aexit__(self: QuotaToken, *exc: object) -> None:  # type: ignore[misc]
        from ray_quota._context import leave_scope

        if self._scope is not None:
            leave_scope(self._scope)
            self._scope = None
        await self.close_async()
