"""Regressions from the adversarial review of session 4: each test is one reproducer's scenario.

- a process that adopted its share of a broker's lease while the broker lived on (A);
- an ended lease key accepted again once many other keys ended since (B);
- a clean close charged for a grant whose answer was lost (C);
- a refused merge, merge_back or close that settled lease reports anyway (D);
- merge_back of a child with a reservation waiting, which lost the child's expected use (E).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fakes import FakeClock
from system_world import POLICY
from system_world import World as SystemWorld
from test_broker_core import CLAIM, TTL, Node, Proc, World, capacity, concurrency

import ray_quota._core.ledger as ledger_module
from ray_quota._core.credentials import adoption_suffix, holder_id
from ray_quota._core.holder import LeaseSet
from ray_quota._core.protocol import HOLDER_MEMORY_S, Grant, Report
from ray_quota._core.scheduler import Policy, Scheduler
from ray_quota._core.service import ExecutorService
from ray_quota._errors import LeaseEndedError, TokenClosedError, TokenStateError
from ray_quota._spec import Enforcement, Kind, ResourceSpec

# ------------------------------------------------------------ A: adoption, broker still alive


def _adopt(w: World, proc: Proc) -> None:
    """The process takes its share of the broker's lease over at the executor (as routing does
    when its call to the broker fails), and from then on renews there."""
    s = proc.lease.totals()
    assert proc.lease.via is not None
    # A grant names the broker's lease by its adoption secret, not its key (credentials).
    source = w.sched.lease_key_ending(proc.token_id, adoption_suffix(proc.lease.via))
    assert source is not None
    assert w.sched.adopt(proc.token_id, source, proc.lease.key, proc.lease.held,
                         s.returned, s.used, s.debt)
    proc.lease.via = None


def _renew_direct(w: World, proc: Proc) -> None:
    s = proc.lease.totals()
    w.sched.settle(proc.token_id, proc.lease.key, s.returned, s.used, s.debt)
    assert w.sched.renew_lease(proc.token_id, proc.lease.key) is not None


def _outlive_the_sub_lease(w: World, node: Node, p1: Proc, p2: Proc,
                           after: Callable[[], None] = lambda: None) -> None:
    """Time passes, everyone renewing (p2 directly, after its adoption), until p2's stale
    sub-lease has expired at the broker; ``after`` runs after each second."""
    for _ in range(int(TTL) + 3):
        w.clock.advance(1.0)
        p1.renew()
        _renew_direct(w, p2)
        node.renew_upstream()
        w.sched.poll()
        after()


def test_a_broker_that_expires_an_adopted_sub_lease_frees_no_slot_another_process_holds() -> None:
    w = World(concurrency(2))
    node = Node(w, "b1")
    token = w.token()
    p1, p2 = Proc(node, token, "p1"), Proc(node, token, "p2")
    assert p1.reserve(1) and p2.reserve(1)
    _adopt(w, p2)  # the broker was only out of reach: it lives on, and keeps p2's sub-lease
    _outlive_the_sub_lease(w, node, p1, p2)
    assert w.status().in_use == 2  # both slots are still held, by p1 and p2
    other = w.sched.open_token("conn", 1, claimant="q").id
    assert w.sched.acquire(other, 0, "q", "q:0", 1).outcome is None  # so a third one waits


def test_an_adopted_sub_lease_expiring_at_the_broker_clips_no_other_return() -> None:
    """Capacity: the broker charges the expired sub-lease as used; those units were moved out
    already, so another process's unused units still come back to the pool."""
    w = World(capacity(1000))
    node = Node(w, "b1")
    token = w.token()
    p1, p2 = Proc(node, token, "p1"), Proc(node, token, "p2")
    assert p1.reserve(100) and p2.reserve(100)
    _adopt(w, p2)
    _outlive_the_sub_lease(w, node, p1, p2)
    p1.commit(10)  # p1 used 10 of its 100: 90 go back
    p1.close()
    p2.lease.settle(100, 40)  # p2 used 40 of its 100
    p2.lease.release_all()
    s = p2.lease.totals()
    w.sched.settle(token, p2.lease.key, s.returned, s.used, s.debt, final=True)
    node.renew_upstream()  # the broker's lease has no sub-lease left: settled as final
    assert w.status().in_use == 10 + 40


# ----------------------------------------------------------------- B: ended keys stay ended


def _churn(sched: Scheduler, times: int) -> str:
    """Other leases start and end, as a busy cluster's do; returns their token."""
    other = sched.open_token("conn", 1, claimant="Q").id
    for i in range(times):
        sched.acquire(other, 0, "Q", f"Q:{i}", 1)
        sched.settle(other, f"Q:{i}", 1, 0, 0, final=True)
    return other


def _two_resources(clock: FakeClock) -> Scheduler:
    specs = {"cap": ResourceSpec("cap", Kind.CAPACITY, value=100,
                                 enforcement=Enforcement.REJECT),
             "conn": ResourceSpec("conn", Kind.CONCURRENCY, value=4)}
    # No renewals here name the idle tokens (see test_orphans.py): none is released.
    return Scheduler(specs, clock=clock, policy=Policy(lease_ttl_s=10.0,
                                                       orphan_grace_s=float("inf")))


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> int:
    """Remember only a few ended keys one by one, so that churn outruns them quickly."""
    monkeypatch.setattr(ledger_module, "TOMBSTONES", 5)
    return 5


@pytest.mark.parametrize("suffix", ["", ".9f86d081884c7d65"], ids=["process", "broker"])
def test_an_ended_key_stays_ended_however_many_keys_end_since(
        small_window: int, suffix: str) -> None:
    """A broker's keys end with its lease's adoption suffix (``holder:n.digest``): they are
    marked per holder too, not only remembered in the window churn outruns."""
    clock = FakeClock()
    sched = _two_resources(clock)
    token = sched.open_token("cap", 50, claimant="P").id
    assert isinstance(sched.acquire(token, 0, "P", f"P:0{suffix}", 50).outcome, Grant)
    sched.settle(token, f"P:0{suffix}", 30, 20, 0)
    clock.advance(11.0)
    sched.poll()  # P was frozen past its lease: P:0 expired
    _churn(sched, 4 * small_window)
    with pytest.raises(LeaseEndedError):
        sched.acquire(token, 0, "P", f"P:0{suffix}", 60)
    assert isinstance(sched.acquire(token, 0, "P", f"P:1{suffix}", 40).outcome, Grant)


def test_a_holder_with_no_lease_is_forgotten_after_the_horizon_and_with_its_token(
        small_window: int) -> None:
    clock = FakeClock()
    sched = _two_resources(clock)
    token = sched.open_token("cap", 50, claimant="P").id
    sched.acquire(token, 0, "P", "P:3", 10)
    sched.settle(token, "P:3", 0, 10, 0, final=True)
    churner = _churn(sched, 2 * small_window)
    marks = sched._leases._ended._marks  # the memory: per token, per holder
    assert set(marks) == {token, churner}
    sched.close_token(churner, 0, "Q")
    assert set(marks) == {token}  # a closed token takes no leases: its marks go with it
    clock.advance(HOLDER_MEMORY_S - 1.0)
    sched.poll()
    with pytest.raises(LeaseEndedError):
        sched.acquire(token, 0, "P", "P:2", 10)
    clock.advance(2.0)
    sched.poll()
    assert not marks  # P held no lease of the token for a whole horizon


def test_a_restarted_executor_refuses_an_ended_key_however_many_ended_since(
        small_window: int, tmp_path: Path) -> None:
    from ray_quota._store import StateStore

    clock = FakeClock()
    sched = _two_resources(clock)
    store = StateStore(tmp_path / "state.db")
    store.start("c", "e")
    token = sched.open_token("cap", 50, claimant="P").id
    sched.acquire(token, 0, "P", "P:7", 10)
    sched.settle(token, "P:7", 0, 10, 0, final=True)
    _churn(sched, 4 * small_window)
    store.write(sched.drain_changes())
    saved = store.load()
    assert saved is not None
    assert len(saved.ended) <= small_window + 2  # the window, and one key per holder
    again = _two_resources(clock)
    again.restore(saved.resources, saved.tokens, saved.leases, 0.0, saved.ended)
    with pytest.raises(LeaseEndedError):
        again.acquire(token, 0, "P", "P:7", 10)
    with pytest.raises(LeaseEndedError):
        again.acquire(token, 0, "P", "P:6", 10)


# ------------------------------------------------------ C: a lost first grant, then a close


def test_a_lease_whose_first_answer_was_lost_is_reported_final_at_close() -> None:
    keys = iter(["p:0", "p:1"])
    leases = LeaseSet("t1", Kind.CAPACITY, max_prefetch=0, new_key=keys.__next__)
    lost = leases.current
    leases.lost(lost)  # its first grant's answer was lost: it never became active here
    assert [(r.key, r.final) for r in leases.final_reports()] == [("p:0", True)]


def test_a_clean_close_after_a_lost_first_grant_charges_only_what_was_used(
        tmp_path: Path) -> None:
    world = SystemWorld(tmp_path / "state.db", layout=(None,))
    ex, p = world.executor, world.processes[0]
    info = world.token_call("open_token", "cap", 50, p.claimant, None)
    h = p.adopt_handle(info.id, "cap", 0, 50, None)
    lease = h.leases.current
    ticket = ex.call("acquire", h.token_id, 0, p.claim(h), lease.key, 30, 0, None, p.secret)
    assert isinstance(ticket.outcome, Grant)
    ex.restart()  # the grant was written, its answer never went out
    h.leases.lost(lease)
    assert p.reserve(h, 10) == "granted"
    p.commit(0, 10)
    world.token_call("close", h.token_id, 0, p.claim(h), p.final_reports(h), p.secret)
    p.handles.remove(h)
    world.advance(POLICY.lease_ttl_s + 1.0)
    assert ex.service.scheduler.pool("cap").spent == 10


# ------------------------------------------------------- D: refused calls settle nothing


# Each holder proves its id with its secret (ray_quota._core.credentials).
P_SECRET, C_SECRET, X_SECRET = "p-secret", "c-secret", "x-secret"
P, C, X = holder_id("p", P_SECRET), holder_id("c", C_SECRET), holder_id("x", X_SECRET)


def _service() -> tuple[ExecutorService, FakeClock]:
    clock = FakeClock()
    specs = {"cap": ResourceSpec("cap", Kind.CAPACITY, value=100),
             "rate": ResourceSpec("rate", Kind.RATE, value=100, period_s=1.0, burst=100)}
    return ExecutorService(specs, clock=clock), clock


def _cap(svc: ExecutorService) -> tuple[int, int, int]:
    row = next(r for r in svc.status() if r.name == "cap")
    return row.available, row.leased_units, row.leases


@pytest.mark.parametrize("call", ["merge_incompatible", "merge_not_owner", "merge_waiting",
                                  "merge_back_not_owner", "close_not_owner"])
def test_a_refused_call_settles_none_of_the_reports_it_carries(call: str) -> None:
    svc, _ = _service()
    other = svc.open_token("cap", 10, "me", None).id
    target = svc.open_token("rate" if call == "merge_incompatible" else "cap", 10, "me",
                            None).id
    assert isinstance(svc.acquire(other, 0, "me", f"{P}:0", 40, 0, None, P_SECRET).outcome, Grant)
    if call == "merge_waiting":
        svc.acquire(other, 0, "me", f"{P}:1", 100, 0, 5.0, P_SECRET)  # too large to fit now: it waits
    before = _cap(svc)
    finals = [Report(other, f"{P}:0", 40, 0, 0, True)]
    answer = {
        "merge_incompatible": lambda: svc.merge(target, 0, "me", other, 0, finals, P_SECRET),
        "merge_not_owner": lambda: svc.merge(target, 0, "intruder", other, 0, finals, P_SECRET),
        "merge_waiting": lambda: svc.merge(target, 0, "me", other, 0, finals, P_SECRET),
        "merge_back_not_owner": lambda: svc.merge_back(other, 0, "intruder", target, finals, P_SECRET),
        "close_not_owner": lambda: svc.close(other, 0, "intruder", finals, P_SECRET),
    }[call]()
    assert isinstance(answer, Exception)
    assert _cap(svc) == before
    assert svc.scheduler.held(other, f"{P}:0") == 40  # the lease did not end


def test_a_broker_settles_a_released_lease_at_its_next_renewal_if_the_call_was_refused() -> None:
    """The broker releases the token's lease into the call that ends it; if the executor
    refuses that call (and so settles nothing), the next renewal still settles it: its spare
    is not charged by expiry."""
    w = World(capacity(1000))
    node = Node(w, "b1")
    token = w.token()
    proc = Proc(node, token, "p1")
    assert proc.reserve(100)
    proc.commit(30)
    proc.close()
    refused = node.core.release(token)  # the executor refused the call carrying these
    assert [r.final for r in refused] == [True]
    node.renew_upstream()
    for _ in range(int(TTL) + 2):
        w.clock.advance(1.0)
        node.renew_upstream()
        w.sched.poll()
    assert w.status().in_use == 30
    assert node.core.upstream_leases() == 0


# ---------------------------------------------------- E: merge_back with a waiter still there


def test_merge_back_with_a_reservation_waiting_gives_the_expected_use_back() -> None:
    clock = FakeClock()
    svc = ExecutorService({"conn": ResourceSpec("conn", Kind.CONCURRENCY, value=1)},
                          clock=clock)
    parent = svc.open_token("conn", 100, "me", None).id
    split = svc.split(parent, 0, "me", 40)
    assert not isinstance(split, Exception)
    child = split[0].id
    other = svc.open_token("conn", 1, "x", None).id
    assert isinstance(svc.acquire(other, 0, "x", f"{X}:0", 1, 0, None, X_SECRET).outcome, Grant)
    waiting = svc.acquire(child, 0, "me", f"{C}:0", 1, 0, None, C_SECRET)
    assert not isinstance(waiting, Exception) and waiting.outcome is None
    assert svc.merge_back(child, 0, "me", parent, []) is True
    assert isinstance(waiting.outcome, TokenClosedError)  # the task gave its token back
    assert svc.describe(parent, 0, "me")[0] == 100  # (it was 60 + 40 before the fix: 60)


def test_merge_still_refuses_a_token_with_a_reservation_waiting() -> None:
    svc, _ = _service()
    a = svc.open_token("cap", 10, "me", None).id
    b = svc.open_token("cap", 10, "me", None).id
    svc.acquire(a, 0, "me", f"{P}:0", 100, 0, None, P_SECRET)
    svc.acquire(a, 0, "me", f"{P}:1", 100, 0, 5.0, P_SECRET)
    assert isinstance(svc.merge(b, 0, "me", a, 0, []), TokenStateError)


def test_a_process_adopts_its_older_leases_first_so_that_none_is_refused() -> None:
    """Retired leases have older keys than the current one: adopted first, since the executor
    refuses a new lease under a key older than the holder's newest (finding B's rule)."""
    w = World(capacity(1000))
    token = w.token()
    keys = iter(["p:0", "p:1"])
    leases = LeaseSet(token, Kind.CAPACITY, max_prefetch=0, new_key=keys.__next__)

    def grant_via_broker() -> None:
        assert isinstance(w.sched.acquire(token, *CLAIM, "b1:1", 10).outcome, Grant)
        leases.granted(leases.current, 10, Grant(10, TTL, False, via="b1:1"), sent_at=w.now)

    grant_via_broker()
    leases.ended(leases.current)  # its reservation still open: retired, carried on
    grant_via_broker()
    adopted = {(a.token_id, a.to_key) for a in leases.adoptions()
               if w.sched.adopt(a.token_id, a.via, a.to_key, a.units, a.returned, a.used,
                                a.debt)}
    assert adopted == {(token, "p:0"), (token, "p:1")}


def test_units_moved_by_an_adoption_stay_moved_across_an_executor_restart(tmp_path: Path) -> None:
    """The broker lives on and later gives back the adopted process's slot; a restart in
    between must not forget that the slot moved, or it would be freed while still held."""
    from ray_quota._store import StateStore

    w = World(concurrency(2))
    store = StateStore(tmp_path / "state.db")
    store.start("c", "e")
    node = Node(w, "b1")
    token = w.token()
    p1, p2 = Proc(node, token, "p1"), Proc(node, token, "p2")
    assert p1.reserve(1) and p2.reserve(1)
    _adopt(w, p2)
    store.write(w.sched.drain_changes())
    saved = store.load()
    assert saved is not None
    w.sched = Scheduler({w.spec.name: w.spec}, clock=w.clock, policy=Policy(lease_ttl_s=TTL))
    w.sched.restore(saved.resources, saved.tokens, saved.leases, 0.0, saved.ended)
    _outlive_the_sub_lease(w, node, p1, p2, after=lambda: store.write(w.sched.drain_changes()))
    assert w.status().in_use == 2  # both slots are still held, by p1 and p2
    other = w.sched.open_token("conn", 1, claimant="q").id
    assert w.sched.acquire(other, 0, "q", "q:0", 1).outcome is None  # so a third one waits


def test_late_debt_under_an_ended_key_is_capped_in_all_not_per_report() -> None:
    """A holder frozen past its lease may still declare the overuse it committed meanwhile, up
    to ``max_overuse``; a former owner repeating that report with ever larger totals (it no
    longer owns the token, but its ended key is its own) adds nothing more (adversary 3, 05)."""
    clock = FakeClock()
    sched = _two_resources(clock)  # capacity 100: max_overuse defaults to the limit
    token = sched.open_token("cap", 50, claimant="P").id
    assert isinstance(sched.acquire(token, 0, "P", "P:0", 5).outcome, Grant)
    sched.settle(token, "P:0", 0, 5, 0, final=True)
    spent = sched.pool("cap").spent
    sched.settle(token, "P:0", 0, 5, 30, final=True)  # late overuse: charged
    assert sched.pool("cap").spent == spent + 30
    for n in range(2, 20):  # and more, report after report
        sched.settle(token, "P:0", 0, 5, 100 * n, final=True)
    assert sched.pool("cap").spent == spent + 100


def test_late_debt_is_capped_per_holder_not_per_ended_key() -> None:
    """A former owner that ended many small leases of the token declares max_overuse under
    each of its ended keys: charged max_overuse in all (adversary 4, 06)."""
    clock = FakeClock()
    sched = _two_resources(clock)
    token = sched.open_token("cap", 50, claimant="P").id
    for n in range(5):
        assert isinstance(sched.acquire(token, 0, "P", f"P:{n}", 1).outcome, Grant)
        sched.settle(token, f"P:{n}", 0, 1, 0, final=True)
    spent = sched.pool("cap").spent
    for n in range(5):
        sched.settle(token, f"P:{n}", 0, 1, 40, final=True)
    assert sched.pool("cap").spent == spent + 100
