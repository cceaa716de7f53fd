"""A node's broker is a trust boundary too: what a process that knows only another's token id
can make it do (the third adversary's findings, issue 14).

Each test drives the real :class:`BrokerActor` without Ray, its calls upstream served by an
:class:`ExecutorService` on a fake clock (as the broker part of ``test_edge_fuzz.py`` does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fakes import FakeClock

from ray_quota._core.credentials import holder_id, make_claim
from ray_quota._core.fair_queue import Ticket
from ray_quota._core.protocol import ExecutorInfo, Grant, Report
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import LeaseEndedError, ProtocolError, QuotaError
from ray_quota._spec import MAX_UNITS, Enforcement, Kind, ResourceSpec

SPECS = {
    "r": ResourceSpec("r", Kind.RATE, value=1000, period_s=1.0, burst=1000),
    "k": ResourceSpec("k", Kind.CONCURRENCY, value=2, enforcement=Enforcement.THROTTLE),
    "c": ResourceSpec("c", Kind.CAPACITY, value=100, enforcement=Enforcement.REJECT),
    # max_overuse defaults to the limit: two sub-leases' debt together pass MAX_UNITS
    "big": ResourceSpec("big", Kind.CAPACITY, value=2**51, enforcement=Enforcement.REJECT),
}


class Proc:
    """A process: its secret, holder id, claim, and lease keys."""

    def __init__(self, name: str) -> None:
        self.secret = f"{name}-secret-0123456789abcdef"
        self.holder = holder_id(name, self.secret)
        self.claim = make_claim(f"task:{name}", f"{name}-claimkey-0123456789")
        self._keys = 0

    def key(self) -> str:
        self._keys += 1
        return f"{self.holder}:{self._keys}"


class Upstream:
    """The executor behind the broker. A request that would wait waits (until cancelled, when
    it is withdrawn, as the executor actor does), unless ``waits`` is off."""

    def __init__(self, service: ExecutorService) -> None:
        self.service = service
        self.waits = False

    async def call_async(self, method: str, *args: Any, retry: bool = True) -> Any:
        answer = getattr(self.service, method)(*args)
        if isinstance(answer, Ticket):
            if answer.outcome is None:
                if not self.waits:
                    self.service.cancel(answer.id)
                    raise QuotaError("this executor does not wait")
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    self.service.cancel(answer.id)
                    raise
            answer = answer.outcome
        self.service.drain()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def send(self, method: str, *args: Any) -> None:
        getattr(self.service, method)(*args)
        self.service.drain()


class Node:
    """An executor, a broker in front of it, and an event loop to call the broker on."""

    def __init__(self, make: Callable[[ExecutorService], Any]) -> None:
        self.clock = FakeClock(100.0)
        self.service = ExecutorService(SPECS, clock=self.clock, policy=Policy(lease_ttl_s=10.0))
        self.broker = make(self.service)
        self.core = self.broker._core
        self.loop = asyncio.new_event_loop()

    def call(self, method: str, *args: Any) -> Any:
        return self.loop.run_until_complete(getattr(self.broker, method)(*args))

    def token(self, resource: str, owner: Proc) -> str:
        info = self.service.open_token(resource, 10, owner.claim, None)
        return str(info.id)

    def spent(self, resource: str) -> int:
        return int(self.service.scheduler.pool(resource).spent)


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    from ray_quota._actors import broker as broker_module
    from ray_quota._core.broker import BrokerCore
    from ray_quota._runtime import identity

    monkeypatch.setattr(identity._Role, "broker", identity._Role.broker)  # restored after

    def make(service: ExecutorService) -> Any:
        upstream = Upstream(service)
        monkeypatch.setattr(broker_module.rpc, "call_async", upstream.call_async)
        monkeypatch.setattr(broker_module.rpc, "send", upstream.send)
        actor = broker_module.BrokerActor("node-1")
        actor._core = BrokerCore(holder=identity.HOLDER, ttl_s=10.0)
        actor._info = ExecutorInfo("cluster", "test", dict(SPECS), 10.0)
        actor.upstream = upstream
        return actor

    world = Node(make)
    yield world
    world.loop.close()


# ------------------------------------------------------------------------- lease kind (08)


@pytest.mark.parametrize("already_leased", [False, True])
def test_naming_another_resource_for_a_token_cannot_change_how_the_broker_leases_it(
        node: Node, already_leased: bool) -> None:
    """The broker took the lease's kind from the caller's resource: a hostile naming a victim's
    capacity token as a concurrency one made the broker give back every unit the victim used."""
    victim, hostile = Proc("victim"), Proc("hostile")
    token = node.token("c", victim)
    key, used = victim.key(), 0
    if already_leased:
        assert isinstance(node.call("acquire", "c", token, 0, victim.claim, key, 10, 0, None,
                                    victim.secret), Grant)
        used = 10
        assert node.call("settle", [Report(token, key, 0, used, 0, False)], victim.secret) \
            is None
    answer = node.call("acquire", "k", token, 0, hostile.claim, hostile.key(), 1, 0, None,
                       hostile.secret)
    assert isinstance(answer, QuotaError)
    if already_leased:  # the broker knows the token's resource: refused at its edge
        assert isinstance(answer, ProtocolError) and "resource" in str(answer)
    total = used
    for _ in range(20):  # the victim spends its budget, 10 at a time
        grant = node.call("acquire", "c", token, 0, victim.claim, key, 10, 0, None,
                          victim.secret)
        if isinstance(grant, LeaseEndedError):
            key, used = victim.key(), 0
            grant = node.call("acquire", "c", token, 0, victim.claim, key, 10, 0, None,
                              victim.secret)
        if not isinstance(grant, Grant):
            break
        total += 10
        used += 10
        node.call("settle", [Report(token, key, 0, used, 0, False)], victim.secret)
    assert total <= 100
    assert node.spent("c") >= total
    assert node.core._ups[token].lease.kind is Kind.CAPACITY


# ------------------------------------------------------------ refused forwards, debt (07)


def test_a_refused_forward_leaves_no_sub_lease_to_charge_debt_on(node: Node) -> None:
    """A hostile's refused acquire on a victim's token left it a sub-lease in the victim's
    lease, on which it then settled debt without bound."""
    victim, hostile = Proc("victim"), Proc("hostile")
    token = node.token("c", victim)
    assert isinstance(node.call("acquire", "c", token, 0, victim.claim, victim.key(), 5, 0,
                                None, victim.secret), Grant)
    spent = node.spent("c")
    key = hostile.key()
    refused = node.call("acquire", "c", token, 0, hostile.claim, key, 1, 0, None,
                        hostile.secret)
    assert isinstance(refused, QuotaError)
    assert (token, key) not in node.core._subs and (token, key) not in node.core._ended
    for n in range(1, 6):
        node.call("settle", [Report(token, key, 0, 0, 100 * n, n == 5)], hostile.secret)
    node.call("settle", [Report(token, key, 0, 0, 1000, False)], hostile.secret)  # late
    assert node.spent("c") == spent
    assert isinstance(node.call("acquire", "c", token, 0, victim.claim, victim.key(), 1, 0,
                                None, victim.secret), Grant)


def test_debt_a_report_adds_at_the_broker_is_capped_by_max_overuse(node: Node) -> None:
    """As at the executor: one report adds at most the resource's max_overuse, live or late."""
    owner = Proc("owner")
    token = node.token("c", owner)  # max_overuse: the limit, 100
    key = owner.key()
    assert isinstance(node.call("acquire", "c", token, 0, owner.claim, key, 5, 0, None,
                                owner.secret), Grant)
    node.call("settle", [Report(token, key, 0, 5, 500, False)], owner.secret)
    assert node.core._subs[(token, key)].debt == 100
    node.call("settle", [Report(token, key, 0, 5, 500, True)], owner.secret)
    node.call("settle", [Report(token, key, 0, 5, 900, False)], owner.secret)  # late
    assert node.core._ended[(token, key)].applied == 300


# ----------------------------------------------------------------- refused close (01)


@pytest.mark.parametrize("method", ["close", "merge", "merge_back"])
def test_a_token_call_the_executor_refuses_changes_nothing_at_the_broker(
        node: Node, method: str) -> None:
    """The broker retired the named token's lease before the executor checked the caller's
    claim: a hostile's refused close took a victim's token off its node's local path."""
    victim, hostile = Proc("victim"), Proc("hostile")
    token = node.token("r", victim)
    own = node.token("r", hostile)
    key = victim.key()
    assert isinstance(node.call("acquire", "r", token, 0, victim.claim, key, 10, 0, None,
                                victim.secret), Grant)
    for _ in range(4):  # the broker's lease grows spare, then serves on the node
        assert isinstance(node.call("acquire", "r", token, 0, victim.claim, key, 5, 0, None,
                                    victim.secret), Grant)
    up = node.core._ups[token]
    spare, local = up.lease.spare, node.core.local_grants
    assert spare and local
    args = {"close": (token, 0, hostile.claim, []),
            "merge": (own, 0, hostile.claim, token, 0, []),
            "merge_back": (token, 0, hostile.claim, own, [])}[method]
    assert isinstance(node.call(method, *args, hostile.secret), QuotaError)
    assert node.core._ups[token] is up and not up.retired and up.lease.spare == spare
    assert isinstance(node.call("acquire", "r", token, 0, victim.claim, key, 5, 0, None,
                                victim.secret), Grant)
    assert node.core.local_grants == local + 1


def test_a_close_the_executor_accepts_still_settles_the_broker_lease_as_final(
        node: Node) -> None:
    owner = Proc("owner")
    token = node.token("c", owner)
    key = owner.key()
    assert isinstance(node.call("acquire", "c", token, 0, owner.claim, key, 10, 5, None,
                                owner.secret), Grant)
    node.call("settle", [Report(token, key, 0, 4, 2, False)], owner.secret)
    up_key = node.core._ups[token].lease.key
    assert node.call("close", token, 0, owner.claim, [Report(token, key, 6, 4, 2, True)],
                     owner.secret) is None
    assert token not in node.core._ups
    assert node.spent("c") == 6  # 4 used and 2 of debt; the rest came back
    assert node.service.scheduler.held(token, up_key) == 0


# --------------------------------------------------------- cancelled brokered reserve (09)


def test_a_reserve_cancelled_while_it_waits_through_a_broker_leaves_nothing_held(
        node: Node) -> None:
    """A cancelled forward left its sub-lease marked as waiting for ever: it never expired,
    and a dead process's slot never came back."""
    from ray_quota._runtime import identity

    proc, other = Proc("p"), Proc("o")
    token = node.token("k", proc)
    key = proc.key()
    assert isinstance(node.call("acquire", "k", token, 0, proc.claim, key, 1, 0, None,
                                proc.secret), Grant)
    theirs = node.token("k", other)
    ticket = node.service.acquire(theirs, 0, other.claim, other.key(), 1, 0, None,
                                  other.secret)
    assert isinstance(ticket.outcome, Grant)
    node.broker.upstream.waits = True
    task = node.loop.create_task(node.broker.acquire("k", token, 0, proc.claim, key, 1, 0,
                                                     None, proc.secret))
    node.loop.run_until_complete(asyncio.sleep(0.01))  # it waits at the executor
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        node.loop.run_until_complete(task)
    assert node.core._subs[(token, key)].pending == 0
    assert node.service.status()[1].waiters == 0  # withdrawn upstream
    # The process dies; the other gives its slot back; the broker renews, long after.
    node.service.settle([Report(theirs, f"{other.holder}:1", 1, 0, 0, True)], other.secret)
    core = node.core
    start = time.monotonic()  # the broker actor dates its sub-leases by this clock
    for step in range(1, 4):
        node.clock.advance(5.0)
        now = start + 10_000.0 * step
        core.expire(now)
        reports = core.upstream_reports(now)
        core.upstream_renewed(reports, node.service.renew(identity.HOLDER, reports,
                                                          identity.SECRET), now)
        node.service.tick()
        node.service.drain()
    assert (token, key) not in core._subs
    assert node.service.status()[1].in_use == 0


# ---------------------------------------------------------- adoption by a former owner (02)


def test_a_process_the_token_moved_away_from_cannot_adopt_its_new_owners_units() -> None:
    """P1 kept the adoption secret of the broker's lease after moving the token to P2 on the
    same node, and adopted P2's slot while the broker lived: 3 slots held against 2."""
    from ray_quota._core.broker import BrokerCore, Forward
    from ray_quota._core.credentials import claim_value
    from ray_quota._core.protocol import Adoption

    clock = FakeClock(100.0)
    service = ExecutorService(SPECS, clock=clock, policy=Policy(lease_ttl_s=10.0))
    broker, p1, p2 = Proc("broker"), Proc("p1"), Proc("p2")
    core = BrokerCore(holder=broker.holder, ttl_s=10.0)
    token = str(service.open_token("k", 1, p1.claim, None).id)

    def via_broker(key: str, claim: tuple[int, str]) -> Grant:
        ask = core.acquire(token, Kind.CONCURRENCY, key, 1, prefetch=0, max_prefetch=0,
                           now=clock.now, claim=claim)
        assert isinstance(ask, Forward)
        ticket = service.acquire(token, *claim, ask.key, ask.amount, ask.prefetch, None,
                                 broker.secret)
        assert isinstance(ticket.outcome, Grant)
        return core.granted(token, key, 1, 0, ticket.outcome, sent_at=clock.now,
                            now=clock.now, claim=claim)

    p1_key = p1.key()
    old_via = via_broker(p1_key, (0, p1.claim)).via
    # P1 moves the token to P2 (the bytes carry P1's proof); P2 takes it up with a slot.
    p2_claim = make_claim("task:p2", "p2-claimkey-0123456789",
                          [claim_value("p1-claimkey-0123456789", token, 0)])
    new_via = via_broker(p2.key(), (1, p2_claim)).via
    core.settle([Report(token, p1_key, 1, 0, 0, True)], clock.now)  # P1 is done with its slot
    reports = core.upstream_reports(clock.now)
    core.upstream_renewed(reports, service.renew(broker.holder, reports, broker.secret),
                          clock.now)
    assert old_via is not None and new_via is not None
    assert service.adopt([Adoption(token, old_via, p1.key(), 2, 0, 0, 0)], p1.secret) == []
    assert service.status()[1].in_use == 1  # P2's slot, still in the broker's lease
    # The token's owner still may (its broker died, say).
    adopted = service.adopt([Adoption(token, new_via, f"{p2.holder}:1", 1, 0, 0, 0)],
                            p2.secret)
    assert adopted == [(token, f"{p2.holder}:1")]


# ----------------------------------------------------- debt totals past MAX_UNITS (adv4 09)


def _broker_renews(node: Node) -> Any:
    from ray_quota._runtime import identity

    reports = node.core.upstream_reports(node.clock.now)
    alive = node.service.renew(identity.HOLDER, reports, identity.SECRET)
    if not isinstance(alive, QuotaError):
        node.core.upstream_renewed(reports, alive, node.clock.now)
    return alive


def test_debt_summed_from_sub_leases_never_takes_a_broker_lease_past_max_units(
        node: Node) -> None:
    """Each sub-lease's debt is capped per report, but the broker's lease summed two of them
    past MAX_UNITS: the executor then refused the broker's every renewal, and every process
    on the node lost its leases."""
    victim, hostile = Proc("victim"), Proc("hostile")
    token = node.token("r", victim)
    assert isinstance(node.call("acquire", "r", token, 0, victim.claim, victim.key(), 5, 0,
                                None, victim.secret), Grant)
    own = node.token("big", hostile)
    keys = [hostile.key(), hostile.key()]
    for key in keys:
        assert isinstance(node.call("acquire", "big", own, 0, hostile.claim, key, 1, 0, None,
                                    hostile.secret), Grant)
    cap = node.service.scheduler.pool("big").spec.overuse_cap
    for key in keys:
        for n in range(1, MAX_UNITS // cap + 1):
            node.call("settle", [Report(own, key, 0, 1, n * cap, False)], hostile.secret)
    assert node.core._ups[own].lease.debt == MAX_UNITS  # saturated
    up_key = node.core._ups[token].lease.key
    for _ in range(3):
        node.clock.advance(4.0)
        assert not isinstance(_broker_renews(node), QuotaError)
        node.service.tick()
        node.service.drain()
    assert node.service.scheduler.held(token, up_key) == 5  # the victim's lease lives on


# ----------------------------------------- a stranger's cancelled forward (adv4 05)


@pytest.mark.parametrize("how", ["cancelled", "unavailable"])
def test_a_strangers_lost_forward_does_not_retire_the_owners_broker_lease(
        node: Node, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Any process that knows a token id asked the broker for it under a made-up claim and
    cancelled its call while the forward was out (or its answer was lost): the broker retired
    the owner's lease, whose next reservation then failed with LeaseEndedError."""
    from ray_quota._actors import broker as broker_module
    from ray_quota._errors import ExecutorUnavailableError

    victim, hostile = Proc("victim"), Proc("hostile")
    token = node.token("r", victim)
    key = victim.key()
    for _ in range(4):
        assert isinstance(node.call("acquire", "r", token, 0, victim.claim, key, 10, 5, None,
                                    victim.secret), Grant)
    up = node.core._ups[token]
    real = broker_module.rpc.call_async

    async def upstream(method: str, *args: Any, retry: bool = True) -> Any:
        if method == "acquire" and args[2] == hostile.claim:
            if how == "unavailable":
                raise ExecutorUnavailableError("the answer was lost")
            await asyncio.sleep(3600)
        return await real(method, *args, retry=retry)

    monkeypatch.setattr(broker_module.rpc, "call_async", upstream)
    task = node.loop.create_task(node.broker.acquire("r", token, 0, hostile.claim,
                                                     hostile.key(), 1, 0, None,
                                                     hostile.secret))
    node.loop.run_until_complete(asyncio.sleep(0.01))
    task.cancel()
    try:
        node.loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    assert node.core._ups.get(token) is up and not up.retired
    assert isinstance(node.call("acquire", "r", token, 0, victim.claim, key, 5, 0, None,
                                victim.secret), Grant)


# ------------------------------------- late debt under an ended sub-lease, in all (adv4 07)


def test_late_debt_under_an_ended_sub_lease_is_capped_in_all(node: Node) -> None:
    """As the executor caps late debt under an ended direct lease: max_overuse in all, however
    many reports declare more (a former owner could charge the token's lease with each)."""
    owner = Proc("owner")
    token = node.token("c", owner)  # max_overuse: 100
    ended, kept = owner.key(), owner.key()
    for key in (ended, kept):  # the second keeps the broker's lease alive
        assert isinstance(node.call("acquire", "c", token, 0, owner.claim, key, 5, 0, None,
                                    owner.secret), Grant)
    node.call("settle", [Report(token, ended, 0, 5, 0, True)], owner.secret)
    lease = node.core._ups[token].lease
    debt = lease.debt
    for n in range(1, 9):
        node.call("settle", [Report(token, ended, 0, 5, 100 * n, False)], owner.secret)
    assert lease.debt - debt <= 100
    assert node.core._ended[(token, ended)].late == 100


# ------------------------------------------- a close whose answer was lost (adv4 04)


def test_a_strangers_close_during_an_outage_does_not_retire_the_owners_lease(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the executor not answering, a close naming only a victim's token id was taken as
    accepted: the broker retired the victim's lease. Only the caller's own final totals apply;
    an owner's close whose answer was lost still ends its own sub-lease."""
    from ray_quota._actors import broker as broker_module
    from ray_quota._errors import ExecutorUnavailableError

    victim, hostile = Proc("victim"), Proc("hostile")
    token = node.token("r", victim)
    key = victim.key()
    for _ in range(4):
        assert isinstance(node.call("acquire", "r", token, 0, victim.claim, key, 10, 5, None,
                                    victim.secret), Grant)
    up = node.core._ups[token]

    async def outage(method: str, *args: Any, retry: bool = True) -> Any:
        raise ExecutorUnavailableError(f"the executor did not answer {method}")

    monkeypatch.setattr(broker_module.rpc, "call_async", outage)
    answer = node.call("close", token, 0, hostile.claim, [], hostile.secret)
    assert isinstance(answer, ExecutorUnavailableError)
    assert node.core._ups.get(token) is up and not up.retired
    other = victim.key()
    assert isinstance(node.call("acquire", "r", token, 0, victim.claim, other, 5, 0, None,
                                victim.secret), Grant)
    answer = node.call("close", token, 0, victim.claim, [Report(token, key, 0, 40, 0, True)],
                       victim.secret)
    assert isinstance(answer, ExecutorUnavailableError)
    assert (token, key) not in node.core._subs and (token, other) in node.core._subs
