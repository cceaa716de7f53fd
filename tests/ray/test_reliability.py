"""What survives what, on a real Ray: executor restarts, killed holders, limits changed live.

Every check reads the workers' own records or the pool's size, never the executor's word alone.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import ray
from records import max_overlap

import ray_quota
from ray_quota import FailedReservation, QuotaToken
from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE

pytestmark = pytest.mark.usefixtures("executor")
TTL_S = 3.0  # the executor fixture's lease time-to-live


def status(resource: str) -> ray_quota.ResourceStatus:
    return next(s for s in ray_quota.status() if s.name == resource)


def wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@ray.remote(num_cpus=0)
class Spender:
    def pid(self) -> int:
        return os.getpid()

    def spend_budget(self, token: QuotaToken, seed: int) -> list[int]:
        rng = random.Random(seed)
        spent = []
        while True:
            try:
                with token.reserve(50) as reservation:
                    used = rng.randint(1, 50)
                    reservation.commit(used)
                    spent.append(used)
            except FailedReservation:
                return spent
            time.sleep(0.002)

    def hold(self, conn: QuotaToken, budget: QuotaToken, slots: int) -> int:
        """Open reservations and keep them: the process is about to be killed."""
        self.held = [conn.reserve(1) for _ in range(slots)] + [budget.reserve(100)]
        return slots

    def hammer_conn(self, conn: QuotaToken, duration_s: float) -> list[tuple[float, float, int]]:
        intervals = []
        stop = time.monotonic() + duration_s
        while time.monotonic() < stop:
            with conn.reserve(1):
                start = time.monotonic()
                time.sleep(0.005)
                intervals.append((start, time.monotonic(), 1))
        return intervals


def test_killing_the_executor_mid_stream_never_charges_beyond_the_budget() -> None:
    budget = status("budget").limit
    spenders = [Spender.remote() for _ in range(2)]
    refs = [s.spend_budget.remote(QuotaToken("budget", expected_use=50), seed)
            for seed, s in enumerate(spenders)]
    wait_until(lambda: status("budget").in_use >= 0.7 * budget, 120, "70% of the budget spent")
    executor = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    ray.kill(executor, no_restart=False)  # Ray restarts it; it reloads its state
    spent = [sum(r) for r in ray.get(refs, timeout=180)]
    assert sum(spent) <= budget
    assert status("budget").in_use <= budget
    # The workers kept going after the restart: the budget is used up to the last reservation.
    assert sum(spent) >= 0.7 * budget
    for s in spenders:
        ray.kill(s)


def test_a_killed_holder_frees_its_slots_and_is_charged_its_open_reservations() -> None:
    victims = [Spender.remote() for _ in range(3)]
    limit = status("conn").limit
    ray.get([v.hold.remote(QuotaToken("conn", expected_use=1), QuotaToken("budget", 100), 1)
             for v in victims], timeout=60)
    assert status("conn").in_use == 3
    pids = ray.get([v.pid.remote() for v in victims])
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: status("conn").in_use == 0, 4 * TTL_S, "slots of killed holders back")
    assert status("conn").available == limit
    assert status("budget").in_use == 300  # open capacity reservations are charged in full


def test_after_a_storm_of_random_kills_the_pool_is_back_to_full_size() -> None:
    rng = random.Random(7)
    for _ in range(3):
        crowd = [Spender.remote() for _ in range(4)]
        for s in crowd:
            s.hammer_conn.remote(QuotaToken("conn", expected_use=1), 30.0)
        time.sleep(2.0)
        for s in rng.sample(crowd, 3):
            os.kill(ray.get(s.pid.remote()), signal.SIGKILL)
        for s in crowd:
            ray.kill(s)  # the rest die too, mid-reservation
    wait_until(lambda: status("conn").in_use == 0, 4 * TTL_S, "every slot back")
    assert status("conn").available == status("conn").limit


def test_lowering_a_limit_binds_running_tasks_within_a_renewal_interval() -> None:
    workers = [Spender.remote() for _ in range(4)]
    refs = [w.hammer_conn.remote(QuotaToken("conn", expected_use=1), 6.0) for w in workers]
    time.sleep(2.0)
    ray_quota.set_limit("conn", 2)
    changed_at = time.monotonic()
    intervals = [iv for r in ray.get(refs, timeout=120) for iv in r]
    settled = changed_at + 1.5  # one renewal interval, plus the slots already open
    assert max_overlap(iv for iv in intervals if iv[0] >= settled) <= 2
    assert max_overlap(iv for iv in intervals if iv[1] < changed_at) <= 4


def test_raising_a_limit_wakes_waiters() -> None:
    holder = QuotaToken("solo", expected_use=1)
    held = holder.reserve(1)
    waiter = Spender.remote()
    ref = waiter.hammer_conn.remote(QuotaToken("solo", expected_use=1), 0.1)
    wait_until(lambda: status("solo").waiters == 1, 60, "the waiter to queue")
    ray_quota.set_limit("solo", 2)
    assert ray.get(ref, timeout=30)
    held.commit()
    holder.close()


def test_a_spent_budget_is_never_refilled_by_a_lower_or_equal_limit() -> None:
    token = QuotaToken("budget", expected_use=100)
    token.reserve(6000).commit(6000)
    ray_quota.set_limit("budget", 5000)
    with pytest.raises(FailedReservation):
        token.reserve(1)
    ray_quota.set_limit("budget", 6000)
    with pytest.raises(FailedReservation):
        token.reserve(1)
    ray_quota.set_limit("budget", 6500)
    token.reserve(500).commit(500)
    with pytest.raises(FailedReservation):
        token.reserve(1)
    token.close()
