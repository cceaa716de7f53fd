"""Write first, refuse a lost state, refill on purpose: the executor class with its SQLite store,
without Ray (failures are injected into the store's connection)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_MANIFEST

from ray_quota import Policy
from ray_quota._actors import executor as executor_module
from ray_quota._actors.durable import Markers
from ray_quota._actors.executor import ExecutorActor
from ray_quota._core.credentials import holder_id
from ray_quota._core.protocol import Grant, Report
from ray_quota._core.service import ExecutorService
from ray_quota._errors import StateMissingError, StateWriteError, UnknownResourceError
from ray_quota._manifest import load_manifest


def key(holder: str, n: int) -> str:
    """Lease key ``n`` of the holder whose secret is its name (see credentials)."""
    return f"{holder_id(holder, holder)}:{n}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def start(path: Path, manifest: dict[str, Any] = TEST_MANIFEST) -> ExecutorActor:
    return ExecutorActor(manifest, "test", Policy(lease_ttl_s=10.0), state_path=str(path))


def stopped(path: Path) -> None:
    """What ray_quota.shutdown() does to the marker: the next start is a deliberate one."""
    Markers().clear(str(path))


class FailingDb:
    """The store's connection, whose COMMIT fails with ``error`` while it is set."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.error: str | None = None

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.error is not None:
            raise sqlite3.OperationalError(self.error)
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def failing(executor: ExecutorActor) -> FailingDb:
    db = FailingDb(executor._store._db)  # noqa: SLF001 - the injection point
    executor._store._db = db  # type: ignore[assignment]  # noqa: SLF001
    return db


def in_use(executor: ExecutorActor, name: str) -> int:
    return next(s.in_use for s in run(executor.status()) if s.name == name)


def available(executor: ExecutorActor, name: str) -> int:
    return next(s.available for s in run(executor.status()) if s.name == name)


# ------------------------------------------------------------------------------- write first


@pytest.mark.parametrize("error", ["database or disk is full", "database is locked"])
def test_a_grant_whose_write_fails_is_refused_and_changes_nothing(tmp_path: Path,
                                                                  error: str) -> None:
    state = tmp_path / "state.sqlite"
    executor = start(state)
    token = run(executor.open_token("conn", 4, "me", None))

    async def scenario() -> tuple[Any, Any, Any]:
        first = await executor.acquire(token.id, 0, "me", key("p", 0), 1, 0, None, "p")
        db = failing(executor)
        db.error = error
        lost = await executor.acquire(token.id, 0, "me", key("p", 1), 2, 0, None, "p")
        db.error = None
        after = await executor.acquire(token.id, 0, "me", key("p", 2), 3, 0, None, "p")
        return first, lost, after

    first, lost, after = run(scenario())
    assert isinstance(first, Grant)
    assert isinstance(lost, StateWriteError) and error in str(lost)
    assert isinstance(after, Grant) and after.units == 3  # the 2 lost were never taken
    assert in_use(executor, "conn") == 4
    del executor
    assert in_use(start(state), "conn") == 4  # memory was what the file says


def test_a_failed_write_answers_the_waiter_it_would_have_granted(tmp_path: Path) -> None:
    """The returned slot's grant to a waiter was in the failed write: the waiter hears the
    failure, the holder still holds its slot (as on disk), nothing is freed twice."""
    state = tmp_path / "state.sqlite"
    executor = start(state)
    token = run(executor.open_token("solo", 1, "me", None))

    async def scenario() -> tuple[Any, Any, Any]:
        assert isinstance(await executor.acquire(token.id, 0, "me", key("a", 0), 1, 0, None, "a"), Grant)
        waiter = asyncio.ensure_future(executor.acquire(token.id, 0, "me", key("b", 0), 1, 0, 30.0, "b"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        db = failing(executor)
        db.error = "database or disk is full"
        settled = await executor.settle([Report(token.id, key("a", 0), 1, 0, 0, True)], "a")
        answered = await asyncio.wait_for(waiter, 2.0)
        db.error = None
        return settled, answered, await executor.acquire(token.id, 0, "me", key("c", 0), 1, 0, 0.0, "c")

    settled, answered, third = run(scenario())
    assert isinstance(settled, StateWriteError)
    assert isinstance(answered, StateWriteError) and "ask again" in str(answered)
    assert not isinstance(third, Grant)  # a's slot is still held, as the file says
    assert in_use(executor, "solo") == 1
    del executor
    assert in_use(start(state), "solo") == 1


def test_a_failed_write_whose_reload_fails_too_serves_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory then holds changes the file does not: serving on would let the two part ways
    (a slot freed in memory, still held on disk, freed twice after a restart). Inside Ray the
    process also ends, so that Ray restarts it from the file (adversary 3, finding 04)."""
    state = tmp_path / "state.sqlite"
    executor = start(state)
    token = run(executor.open_token("conn", 4, "me", None))
    assert isinstance(run(executor.acquire(token.id, 0, "me", key("a", 0), 1, 0, None, "a")),
                      Grant)
    db = failing(executor)
    db.error = "disk I/O error"

    def unreadable() -> None:
        raise StateMissingError("cannot read the executor's state file: disk I/O error")

    monkeypatch.setattr(executor._store, "load", unreadable)  # noqa: SLF001
    with pytest.raises(StateMissingError):
        run(executor.settle([Report(token.id, key("a", 0), 1, 0, 0, True)], "a"))
    db.error = None
    for call in (executor.status(), executor.open_token("conn", 1, "me", None)):
        with pytest.raises(StateMissingError, match="stopped serving"):
            run(call)
    del executor
    assert in_use(start(state), "conn") == 1  # the file still holds a's slot


def test_the_ticker_outlives_a_tick_that_fails(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_module, "TICKER_PAUSE_S", 0.05)
    executor = start(tmp_path / "state.sqlite")
    token = run(executor.open_token("tok", 100, "me", None))

    async def scenario() -> Any:
        assert isinstance(await executor.acquire(token.id, 0, "me", key("p", 0), 200, 0, None, "p"), Grant)
        db = failing(executor)
        db.error = "database is locked"  # the ticker's writes fail for a while
        waiter = asyncio.ensure_future(executor.acquire(token.id, 0, "me", key("p", 1), 50, 0, None, "p"))
        await asyncio.sleep(0.3)
        ticks = [0]
        real_tick = ExecutorService.tick

        def tick_once(service: ExecutorService) -> None:  # and one tick raises outright
            ticks[0] += 1
            if ticks[0] == 1:
                raise RuntimeError("a bug in a tick")
            real_tick(service)

        monkeypatch.setattr(ExecutorService, "tick", tick_once)
        executor._kick.set()  # type: ignore[union-attr]  # noqa: SLF001
        await asyncio.sleep(0.1)
        assert ticks[0] >= 1
        db.error = None
        dropped = await asyncio.wait_for(waiter, 2.0)  # refilled in a failed write: dropped
        again = await executor.acquire(token.id, 0, "me", key("p", 2), 150, 0, None, "p")  # waits
        assert not executor._ticker_task.done()  # noqa: SLF001
        return dropped, again

    dropped, again = run(scenario())
    assert isinstance(dropped, StateWriteError)
    assert isinstance(again, Grant) and again.units >= 150  # the ticker granted the refill


# ---------------------------------------------------------------------- a state that is lost


def test_a_corrupt_state_file_refuses_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    state.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(StateMissingError, match="cannot read the executor's state file"):
        start(state)
    assert state.read_bytes().startswith(b"this is not a database")  # left for the operator


def test_a_restart_that_does_not_find_its_state_refuses_to_start_afresh(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    executor = start(state)
    token = run(executor.open_token("budget", 100, "me", None))
    assert isinstance(run(executor.acquire(token.id, 0, "me", key("p", 0), 9000, 0, None, "p")), Grant)
    del executor
    for suffix in ("", "-wal", "-shm"):  # as on another node, or a file deleted under it
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StateMissingError, match="restarted by Ray but found no saved state"):
        start(state)
    stopped(state)  # a deliberate stop: starting afresh is then what was asked for
    assert available(start(state), "budget") == 10_000


def test_the_state_file_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    start(state)
    assert state.stat().st_mode & 0o777 == 0o600


def test_the_default_state_path_is_per_environment_in_a_private_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_quota._actors.durable import STATE_DIR_VARIABLE, default_state_path

    monkeypatch.setenv(STATE_DIR_VARIABLE, str(tmp_path / "states"))
    assert default_state_path("prod") == str(tmp_path / "states" / "prod.sqlite")
    assert (tmp_path / "states").stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------- deliberate starts, resets, limits


def test_a_deliberate_start_keeps_what_was_spent_under_the_manifests_limits(
        tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    executor = start(state)
    token = run(executor.open_token("budget", 100, "me", None))
    assert isinstance(run(executor.acquire(token.id, 0, "me", key("p", 0), 7000, 0, None, "p")), Grant)
    del executor
    stopped(state)
    bigger = json.loads(json.dumps(TEST_MANIFEST))
    bigger["environments"]["test"]["budget"]["limit"]["value"] = 20_000
    restarted = start(state, bigger)
    assert available(restarted, "budget") == 13_000
    assert run(restarted.manifest())[0] == load_manifest(bigger).to_dict()


def test_reset_refills_what_was_spent_and_keeps_what_is_leased(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    executor = start(state)
    token = run(executor.open_token("budget", 100, "me", None))
    assert isinstance(run(executor.acquire(token.id, 0, "me", key("p", 0), 6000, 0, None, "p")), Grant)
    run(executor.settle([Report(token.id, key("p", 0), 0, 6000, 0, True)], "p"))  # spent
    assert isinstance(run(executor.acquire(token.id, 0, "me", key("p", 1), 1000, 0, None, "p")), Grant)
    assert available(executor, "budget") == 3000

    refused = run(executor.reset(["budget", "nope"]))
    assert isinstance(refused, UnknownResourceError) and "'nope'" in str(refused)
    assert available(executor, "budget") == 3000  # nothing was refilled

    lines = run(executor.reset(["budget"]))
    assert lines == ["budget: 6,000 refilled, 9,000 available"]
    del executor
    assert available(start(state), "budget") == 9000  # the reset is saved


def test_reset_of_every_resource_fills_a_drained_rate_pool(tmp_path: Path) -> None:
    executor = start(tmp_path / "state.sqlite")
    token = run(executor.open_token("tok-reject", 10, "me", None))
    assert isinstance(run(executor.acquire(token.id, 0, "me", key("p", 0), 50, 0, None, "p")), Grant)
    lines = run(executor.reset(None))
    assert len(lines) == len(TEST_MANIFEST["environments"]["test"])
    assert available(executor, "tok-reject") == 50


def test_change_limit_changes_only_the_value(tmp_path: Path) -> None:
    """ray_quota.set_limit once sent a whole cached spec, undoing an `apply` made since."""
    executor = start(tmp_path / "state.sqlite")
    applied = json.loads(json.dumps(TEST_MANIFEST))
    applied["environments"]["test"]["conn"]["wait_limit"] = "5s"
    assert run(executor.apply(applied, "test")) == ["conn: wait_limit_s 20.0 -> 5.0"]
    assert run(executor.change_limit("conn", 6)) is None
    spec = run(executor.info()).resources["conn"]
    assert (spec.value, spec.wait_limit_s) == (6, 5.0)
    assert run(executor.manifest())[0]["environments"]["test"]["conn"]["limit"]["value"] == 6
    assert isinstance(run(executor.change_limit("nope", 6)), UnknownResourceError)
