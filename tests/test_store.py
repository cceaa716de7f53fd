"""Durable executor state, on the executor class itself (no Ray): what survives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from conftest import TEST_MANIFEST

from ray_quota import FailedReservation, Policy
from ray_quota._actors.executor import ExecutorActor
from ray_quota._core.credentials import holder_id
from ray_quota._core.protocol import Grant, Report
from ray_quota._spec import Kind, ResourceSpec
from ray_quota._store import StateStore

SECRET = "test-secret"  # proves every test holder


def H(name: str) -> str:  # short, as the literal keys it stands in for
    """A test holder id."""
    return holder_id(name, SECRET)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def start(path: Path, ttl: float = 10.0) -> ExecutorActor:
    return ExecutorActor(TEST_MANIFEST, "test", Policy(lease_ttl_s=ttl), state_path=str(path))


async def acquire(executor: ExecutorActor, token_id: str, amount: int,
                  key: str = f"{H('holder')}:0") -> Grant | Exception:
    return await executor.acquire(token_id, 0, "me", key, amount, 0, None, SECRET)


def test_spent_capacity_tokens_and_cluster_id_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    first = start(state)
    token = run(first.open_token("budget", 100, "me", "team-a"))
    assert isinstance(run(acquire(first, token.id, 7000)), Grant)
    cluster = run(first.info()).cluster_id
    del first  # the process dies: nothing is flushed or closed on purpose

    second = start(state)
    assert run(second.info()).cluster_id == cluster
    refused = run(acquire(second, token.id, 3001))  # the same token still works
    assert isinstance(refused, FailedReservation)
    assert isinstance(run(acquire(second, token.id, 3000)), Grant)
    budget = next(s for s in run(second.status()) if s.name == "budget")
    assert budget.in_use == 10_000


def test_a_limit_changed_at_run_time_stays_changed(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    first = start(state)
    run(first.set_limit(ResourceSpec("conn", Kind.CONCURRENCY, 2)))
    second = start(state)
    assert run(second.info()).resources["conn"].value == 2
    assert run(second.manifest())[0]["environments"]["test"]["conn"]["limit"]["value"] == 2


def test_a_drained_rate_pool_is_not_full_again_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    first = start(state)
    token = run(first.open_token("tok-reject", 10, "me", None))
    assert isinstance(run(acquire(first, token.id, 50)), Grant)  # the whole burst
    second = start(state)
    refused = run(acquire(second, token.id, 50))
    assert isinstance(refused, FailedReservation)
    assert refused.estimated_wait_s is not None and refused.estimated_wait_s > 0.3


def test_restored_leases_expire_unless_their_holder_renews(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    first = start(state, ttl=0.3)
    token = run(first.open_token("conn", 1, "me", None))
    for key in (f"{H('dead')}:0", f"{H('alive')}:0"):
        assert isinstance(run(acquire(first, token.id, 1, key)), Grant)

    async def after_restart() -> tuple[int, int]:
        second = start(state, ttl=0.3)
        held = next(s for s in await second.status() if s.name == "conn").in_use
        for _ in range(4):  # only "alive" renews
            await asyncio.sleep(0.15)
            await second.renew(H("alive"), [Report(token.id, f"{H('alive')}:0", 0, 0, 0, False)],
                               None, SECRET)
        await second.renew(H("alive"), [], None, SECRET)  # let the expiry run
        left = next(s for s in await second.status() if s.name == "conn").in_use
        return held, left

    assert run(after_restart()) == (2, 1)


def test_a_new_environment_on_old_state_starts_afresh(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    store = StateStore(state)
    store.start("old-cluster", "other-env")
    store.close()
    fresh = start(state)
    assert run(fresh.info()).cluster_id != "old-cluster"


def test_a_state_file_written_by_0_1_is_read_with_its_leases(tmp_path: Path) -> None:
    import sqlite3

    state = tmp_path / "state.sqlite"
    first = start(state)
    token = run(first.open_token("budget", 100, "me", None))
    assert isinstance(run(acquire(first, token.id, 70, key=f"{H('proc')}:3")), Grant)
    del first
    db = sqlite3.connect(state)  # 0.1 called the lease key column "holder"
    db.execute("ALTER TABLE leases RENAME COLUMN lease_key TO holder")
    db.commit()
    db.close()
    saved = StateStore(state).load()
    assert saved is not None
    assert [(lease.token_id, lease.key, lease.units) for lease in saved.leases] == [
        (token.id, f"{H('proc')}:3", 70)]


def test_a_lease_key_that_ended_stays_ended_after_a_restart(tmp_path: Path) -> None:
    """A holder's totals for an ended key would not match a fresh lease under it: returning
    'unused' units it still holds would let the pool grant them twice (issue 13, item 4)."""
    from ray_quota._errors import LeaseEndedError

    state = tmp_path / "state.sqlite"
    first = start(state)
    token = run(first.open_token("budget", 100, "me", None))
    assert isinstance(run(acquire(first, token.id, 40, key=f"{H('proc')}:0")), Grant)
    # Ended, as final.
    run(first.settle([Report(token.id, f"{H('proc')}:0", 10, 30, 0, True)], SECRET))
    del first

    second = start(state)
    refused = run(acquire(second, token.id, 40, key=f"{H('proc')}:0"))
    assert isinstance(refused, LeaseEndedError)
    assert isinstance(run(acquire(second, token.id, 40, key=f"{H('proc')}:1")), Grant)


def test_a_state_file_written_before_adoptions_were_stored_is_read(tmp_path: Path) -> None:
    import sqlite3

    state = tmp_path / "state.sqlite"
    first = start(state)
    token = run(first.open_token("budget", 100, "me", None))
    assert isinstance(run(acquire(first, token.id, 70, key=f"{H('proc')}:3")), Grant)
    del first
    db = sqlite3.connect(state)
    db.execute("ALTER TABLE leases DROP COLUMN moved_out")
    db.commit()
    db.close()
    saved = StateStore(state).load()
    assert saved is not None
    assert [(lease.key, lease.units, lease.moved_out) for lease in saved.leases] == [
        (f"{H('proc')}:3", 70, 0)]
def test_a_split_childs_parent_survives_a_restart(tmp_path: Path) -> None:
    """Stored, so that a child released as an orphan (or merged back) after a restart gives its
    share back to its parent rather than being closed."""
    state = tmp_path / "state.sqlite"
    first = start(state)
    parent = run(first.open_token("budget", 100, "me", None)).id
    child = run(first.split(parent, 0, "me", 40))[0].id
    del first

    second = start(state)
    assert run(second.merge_back(child, 0, "me", parent, [], SECRET)) is True
    assert run(second.describe(parent, 0, "me"))[0] == 100
