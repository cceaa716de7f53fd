"""What a commit gives back is usable by others at once (issue 13, item 11), end to end.

A process's lease set, directly or through a node's broker core, against the executor service on
a fake clock, with the messages the client sends: after ``reserve(100)`` and ``commit(20)`` on a
capacity of 100, another token's ``reject`` reservation of 80 is granted at once, a freed slot
likewise, ``status()`` counts only what was used, and a holder that dies then loses nothing more.
"""

from __future__ import annotations

import itertools

import pytest
from fakes import FakeClock

from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.credentials import holder_id
from ray_quota._core.fair_queue import Ticket
from ray_quota._core.holder import LeaseSet
from ray_quota._core.protocol import RECALL_GRACE_S, Grant, Report, prefetch_cap
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._spec import Enforcement, Kind, ResourceSpec

TTL = 10.0
SPECS = {
    "budget": ResourceSpec("budget", Kind.CAPACITY, value=100, enforcement=Enforcement.REJECT),
    "conn": ResourceSpec("conn", Kind.CONCURRENCY, value=1, enforcement=Enforcement.REJECT),
}


class Holder:
    """One process's leases of one token, sending what the client sends: the acquire, and at
    commit the report :meth:`LeaseSet.settle` says is urgent; through a broker if given."""

    def __init__(self, service: ExecutorService, clock: FakeClock, resource: str, name: str,
                 broker: BrokerCore | None) -> None:
        self.service, self.clock, self.broker = service, clock, broker
        self.spec = SPECS[resource]
        self.claim = (0, name)
        info = service.open_token(resource, 100, name, None)
        assert not isinstance(info, Exception), info
        self.token_id = info.id
        keys = itertools.count()
        holder = holder_id(name, name)  # the secret is the name: tests need no randomness
        self.leases = LeaseSet(info.id, self.spec.kind, max_prefetch=prefetch_cap(self.spec),
                               new_key=lambda: f"{holder}:{next(keys)}")
        # Calls to the executor carry the secret of the holder of the keys they name.
        self.secret = name if broker is None else BROKER

    def reserve(self, amount: int) -> bool:
        """Granted at once (True) or refused (False): a reject request left waiting for spare
        recalled from others fails when the recall grace ends, since nobody answers here."""
        lease = self.leases.current
        key, prefetch = lease.key, lease.prefetch()
        if self.broker is not None:
            ask = self.broker.acquire(self.token_id, self.spec.kind, key, amount,
                                      prefetch=prefetch, max_prefetch=prefetch_cap(self.spec),
                                      now=self.clock.now, claim=self.claim)
            if isinstance(ask, Grant):
                return self.leases.granted(lease, amount, ask, sent_at=self.clock.now)
            assert isinstance(ask, Forward)
            key, amount_up, prefetch = ask.key, ask.amount, ask.prefetch
        else:
            amount_up = amount
        ticket = self.service.acquire(self.token_id, *self.claim, key, amount_up, prefetch,
                                      None, self.secret)
        assert isinstance(ticket, Ticket), ticket
        if ticket.outcome is None:  # it waits for spare recalled from others: none answer here
            self.clock.advance(RECALL_GRACE_S)
            self.service.tick()
        if not isinstance(ticket.outcome, Grant):
            if self.broker is not None:
                self.broker.refused(self.token_id, lease.key, self.clock.now)
            return False
        grant = ticket.outcome
        if self.broker is not None:
            grant = self.broker.granted(self.token_id, lease.key, amount, lease.prefetch(),
                                        grant, sent_at=self.clock.now, now=self.clock.now,
                                        claim=self.claim)
        return self.leases.granted(lease, amount, grant, sent_at=self.clock.now)

    def commit(self, amount: int, used: int) -> None:
        report = self.leases.settle(self.leases.current, amount, used)
        if report is not None:  # QuotaToken._settle sends it at once
            self._send([report])

    def _send(self, reports: list[Report]) -> None:
        if self.broker is None:
            self.service.settle(reports, self.secret)
        elif self.broker.settle(reports, self.clock.now):  # the broker actor's _send_now
            self.service.settle(self.broker.report_of(self.token_id), self.secret)


World = tuple[ExecutorService, FakeClock, BrokerCore | None]
BROKER = "b1"  # the broker's secret


@pytest.fixture(params=["direct", "broker"])
def world(request: pytest.FixtureRequest) -> World:
    clock = FakeClock(100.0)
    service = ExecutorService(SPECS, clock=clock, policy=Policy(lease_ttl_s=TTL))
    broker = BrokerCore(holder=holder_id("b1", BROKER), ttl_s=TTL) \
        if request.param == "broker" else None
    return service, clock, broker


def open_holder(world: World, resource: str, name: str) -> Holder:
    service, clock, broker = world
    return Holder(service, clock, resource, name, broker)


def in_use(service: ExecutorService, resource: str) -> int:
    return next(row.in_use for row in service.status() if row.name == resource)


def test_an_under_commits_rest_is_for_another_tokens_reject_request_at_once(world: World) -> None:
    service, clock, _ = world
    first, second = open_holder(world, "budget", "p1"), open_holder(world, "budget", "p2")
    assert first.reserve(100)
    first.commit(100, 20)
    assert in_use(service, "budget") == 20  # the 80 are not counted as in use
    assert second.reserve(80), "the rest of an under-commit was not usable by others at once"
    assert in_use(service, "budget") == 100


def test_a_holder_that_dies_after_an_under_commit_is_charged_only_what_it_used(world: World) -> None:
    service, clock, _ = world
    holder = open_holder(world, "budget", "p1")
    assert holder.reserve(100)
    holder.commit(100, 20)
    clock.advance(3 * TTL)  # it dies: nothing renews its lease (nor, here, the broker's)
    service.tick()
    assert in_use(service, "budget") == 20


def test_a_freed_slot_is_for_another_tokens_reject_request_at_once(world: World) -> None:
    service, _clock, _ = world
    first, second = open_holder(world, "conn", "p1"), open_holder(world, "conn", "p2")
    assert first.reserve(1)
    assert not second.reserve(1)  # the one slot is taken
    first.commit(1, 1)
    assert in_use(service, "conn") == 0
    assert second.reserve(1), "a freed slot was not usable by others at once"
