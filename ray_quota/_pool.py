"""A ``concurrent.futures``-style pool that runs callables as Ray tasks under one budget.

Not to be confused with the executor (the named actor that hosts the scheduler): this pool only
submits tasks, each holding a child token split off the pool's token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import ray

from ray_quota._context import enter_scope, leave_scope
from ray_quota._decorate import child_tokens, give_back, QuotaSpec
from ray_quota._token import QuotaToken


@ray.remote
def _pool_task(tokens: dict[str, QuotaToken], fn: Callable[..., Any], *args: Any,
               **kwargs: Any) -> Any:
    reset = enter_scope(*tokens.values())
    try:
        return fn(*args, **kwargs)
    finally:
        leave_scope(reset)
        give_back(tokens.values())


class QuotaExecutor:
    """Run callables as Ray tasks under one budget, a child token split off per task.

    Example:
        >>> budget = ray_quota.QuotaToken("llm-tokens", expected_use=8000)
        >>> with ray_quota.QuotaExecutor(budget, expected_use=1000) as pool:
        ...     summaries = list(pool.map(summarize, docs))    # summarize uses current_token()

    Args:
        token: the parent token; children are split off it and give back what they leave.
        expected_use: each task's share of the parent's expected use.
        progress: show a progress bar; by default only when writing to a terminal.
        ray_options: Ray task options for every task (``num_cpus=...``).
    """

    def __init__(self, token: QuotaToken, expected_use: int, *, progress: bool | None = None,
                 **ray_options: Any) -> None:
        self._token = token
        self._quota = QuotaSpec(token.resource, expected_use, token.label)
        self._task = _pool_task.options(**ray_options) if ray_options else _pool_task
        self._progress = sys.stderr.isatty() if progress is None else progress
        self._refs: list[Any] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` as a Ray task holding a child token; a Future of its
        result."""
        if self._closed:
            raise RuntimeError("cannot submit to a QuotaExecutor after shutdown")
        reset = enter_scope(self._token)
        try:
            tokens = child_tokens((self._quota,), None)
        finally:
            leave_scope(reset)
        ref = self._task.remote(tokens, fn, *args, **kwargs)
        self._refs.append(ref)
        return ref.future()

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: results in order, tasks running at once."""
        futures = [self.submit(fn, *args) for args in zip(*iterables)]
        return self._results(futures, timeout)

    def _results(self, futures: list[Future[Any]], timeout: float | None) -> Iterator[Any]:
        bar = _progress_bar(len(futures)) if self._progress else None
        try:
            for future in futures:
                yield future.result(timeout)
                if bar is not None:
                    bar.advance(bar.task_ids[0])
        finally:
            if bar is not None:
                bar.stop()

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; with ``wait``, block until every task has finished."""
        self._closed = True
        if wait and self._refs:
            ray.wait(self._refs, num_returns=len(self._refs))

    def __enter__(self) -> QuotaExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)


def _progress_bar(total: int) -> Any:
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.add_task("ray_quota tasks", total=total)
    bar.start()
    return bar
