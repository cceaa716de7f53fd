"""Secrets, not ids (issue 14): the executor's service and a node's broker core refuse a caller who
knows only ids, change nothing when they do, and answer nothing that carries a secret.

The caller is hostile here: it knows every id (token ids, holder ids, lease keys, generations),
as any driver of the cluster may, but not the honest process's secret, claim secret or the bytes
of a moved token. See :mod:`ray_quota._core.credentials`.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakes import FakeClock

from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.credentials import (
    adoption_suffix,
    check_holder,
    claim_value,
    holder_id,
    make_claim,
)
from ray_quota._core.protocol import Adoption, Grant, Report, TokenInfo
from ray_quota._core.scheduler import Policy, Ticket
from ray_quota._core.service import ExecutorService
from ray_quota._core.tokens import Token
from ray_quota._errors import AccessDeniedError, QuotaError, TokenMovedError
from ray_quota._spec import Enforcement, Kind, ResourceSpec

TTL = 10.0
SPECS = {
    "budget": ResourceSpec("budget", Kind.CAPACITY, value=100, enforcement=Enforcement.REJECT),
    "conn": ResourceSpec("conn", Kind.CONCURRENCY, value=1, wait_limit_s=5.0),
}
SECRET, CLAIM_KEY = "honest-secret-0123456789abcdef", "honest-claim-0123456789abcdef"
HONEST = holder_id("1234", SECRET)
KEY = f"{HONEST}:0"
CLAIM = make_claim("task:honest", CLAIM_KEY)
HOSTILE_SECRET = "hostile-secret"
HOSTILE = holder_id("666", HOSTILE_SECRET)


class Honest:
    """An executor service, and one honest process that holds 10 of the budget and a slot, with
    a recall waiting for it (someone queued for the slot)."""

    def __init__(self) -> None:
        self.clock = FakeClock(100.0)
        self.service = ExecutorService(SPECS, clock=self.clock, policy=Policy(lease_ttl_s=TTL))
        self.budget = self._open("budget")
        self.conn = self._open("conn")
        self._grant(self.budget, 10, prefetch=0)
        self._grant(self.conn, 1, prefetch=0)
        other = self.service.open_token("conn", 1, "task:other#other-key", None)
        assert isinstance(other, TokenInfo)
        waiting = self.service.acquire(other.id, 0, "task:other#other-key",
                                       holder_id("7", "other") + ":0", 1, 0, None, "other")
        assert isinstance(waiting, Ticket) and waiting.outcome is None
        self.recalls = self.service.drain().recalls
        assert [recall.holder for recall in self.recalls] == [HONEST]

    def _open(self, resource: str) -> TokenInfo:
        info = self.service.open_token(resource, 10, CLAIM, None)
        assert isinstance(info, TokenInfo)
        return info

    def _grant(self, info: TokenInfo, amount: int, prefetch: int) -> None:
        ticket = self.service.acquire(info.id, 0, CLAIM, KEY, amount, prefetch, None, SECRET)
        assert isinstance(ticket, Ticket) and isinstance(ticket.outcome, Grant), ticket

    def snapshot(self) -> Any:
        """Everything a refused call must leave alone: pools, leases, tokens, and the outbox."""
        sched = self.service.scheduler
        return (
            [(s.name, s.in_use, s.leases, s.leased_units, s.tokens, s.waiters)
             for s in self.service.status()],
            sorted((tid, key, sched.held(tid, key)) for tid, key in sched._leases),
            sorted((tid, t.generation, t.claimant, t.taken_with)
                   for tid, t in sched._tokens.items()),
        )

    def refused(self, answer: object, error: type[QuotaError] = AccessDeniedError) -> None:
        assert isinstance(answer, error), answer
        assert not self.service.drain(), "a refused call changed something"


@pytest.fixture
def world() -> Honest:
    return Honest()


def report(info: TokenInfo, *, returned: int = 0, used: int = 0, final: bool = False) -> Report:
    return Report(info.id, KEY, returned, used, 0, final)


# ----------------------------------------------------------------- lease calls need the secret


@pytest.mark.parametrize("secret", [None, "", "wrong", HOSTILE_SECRET, HONEST, 7])
def test_lease_calls_naming_anothers_holder_or_keys_are_refused_and_change_nothing(
        world: Honest, secret: Any) -> None:
    service, budget, conn = world.service, world.budget, world.conn
    before = world.snapshot()
    calls = {
        # Units into the honest process's lease, or its lease returned, used up or ended.
        "acquire": lambda: service.acquire(budget.id, 0, CLAIM, KEY, 5, 0, None, secret),
        "settle": lambda: service.settle([report(budget, returned=10)], secret),
        "settle final": lambda: service.settle([report(conn, final=True)], secret),
        "renew": lambda: service.renew(HONEST, [report(budget, used=10)], secret),
        "renew, own holder, anothers keys": lambda: service.renew(
            HOSTILE, [report(budget, final=True)], secret),
        "watch": lambda: service.watch(HONEST, 1.0, secret),
        "adopt": lambda: service.adopt(
            [Adoption(budget.id, "guess", KEY, 10, 0, 0, 0)], secret),
        "close": lambda: service.close(budget.id, 0, CLAIM, [report(budget, returned=10)],
                                       secret),
        "merge_back": lambda: service.merge_back(conn.id, 0, CLAIM, budget.id,
                                                 [report(conn, final=True)], secret),
        "merge": lambda: service.merge(budget.id, 0, CLAIM, conn.id, 0,
                                       [report(conn, final=True)], secret),
    }
    for name, call in calls.items():
        answer = call()
        assert isinstance(answer, AccessDeniedError), (name, answer)
        assert not service.drain(), f"{name}: a refused call changed something"
        assert world.snapshot() == before, name
    # The honest process is unaffected.
    renewed = service.renew(HONEST, [report(budget), report(conn)], SECRET)
    assert isinstance(renewed, dict) and set(renewed) == {(budget.id, KEY), (conn.id, KEY)}
    assert service.watch(HONEST, 1.0, SECRET) is None


def test_a_refusal_names_the_holder_never_a_secret(world: Honest) -> None:
    answer = world.service.settle([report(world.budget, returned=10)], HOSTILE_SECRET)
    assert isinstance(answer, AccessDeniedError)
    assert "1234-" in str(answer) and SECRET not in str(answer)
    assert HOSTILE_SECRET not in str(answer)


def test_the_secret_proves_only_its_own_holder() -> None:
    check_holder(HONEST, SECRET)
    for holder in (HOSTILE, "1234", HONEST + "0", "1234-" + HONEST[-32:-1], HONEST[:-1] + "x"):
        with pytest.raises(AccessDeniedError):
            check_holder(holder, SECRET)


def test_a_hostile_callers_own_keys_grant_it_nothing_of_anothers_token(world: Honest) -> None:
    """With its own secret, over its own lease key, a hostile caller still needs the token's
    claim: the id and generation are not enough."""
    before = world.snapshot()
    for claim in ("task:honest", "task:honest#guess", CLAIM.replace(CLAIM_KEY, "guess")):
        answer = world.service.acquire(world.budget.id, 0, claim, f"{HOSTILE}:0", 5, 0, None,
                                       HOSTILE_SECRET)
        world.refused(answer, TokenMovedError)
    assert world.snapshot() == before


# --------------------------------------------------------------------------- token take-over


def test_a_higher_generation_without_the_bytes_proof_takes_no_token_over(world: Honest) -> None:
    service, budget = world.service, world.budget
    before = world.snapshot()
    for generation in (1, 2, 2**40):
        for claim in ("task:thief#k", make_claim("task:thief", "k", ["not-a-proof"]),
                      make_claim("task:thief", "k", [claim_value("k", budget.id, 0)])):
            world.refused(service.acquire(budget.id, generation, claim, f"{HOSTILE}:0", 1, 0,
                                          None, HOSTILE_SECRET))
            world.refused(service.split(budget.id, generation, claim, 1))
            world.refused(service.describe(budget.id, generation, claim))
            world.refused(service.close(budget.id, generation, claim, []))
    assert world.snapshot() == before
    # The owner is unaffected, and so is a move the owner really made.
    assert isinstance(service.describe(budget.id, 0, CLAIM), tuple)
    moved = make_claim("task:receiver", "receiver-key", [claim_value(CLAIM_KEY, budget.id, 0)])
    assert isinstance(service.describe(budget.id, 1, moved), tuple)
    assert isinstance(service.describe(budget.id, 0, CLAIM), TokenMovedError)


def test_a_retry_of_the_receiving_task_takes_the_token_up_again_another_task_cannot(
        world: Honest) -> None:
    service, budget = world.service, world.budget
    proof = claim_value(CLAIM_KEY, budget.id, 0)  # what the pickled bytes carry
    assert isinstance(service.describe(budget.id, 1, make_claim("task:r", "p1", [proof])), tuple)
    # Ray retries task r in another process (another claim secret), with the same bytes.
    retry = make_claim("task:r", "p2", [proof])
    assert isinstance(service.describe(budget.id, 1, retry), tuple)
    # The same bytes in another task's hands, and the first attempt's stale claim: refused.
    assert isinstance(service.describe(budget.id, 1, make_claim("task:s", "p3", [proof])),
                      TokenMovedError)
    assert isinstance(service.describe(budget.id, 1, make_claim("task:r", "p1", [])),
                      TokenMovedError)


def test_a_tokens_claim_survives_a_restart_as_digests_only(world: Honest) -> None:
    service, budget = world.service, world.budget
    proof = claim_value(CLAIM_KEY, budget.id, 0)
    assert isinstance(service.describe(budget.id, 1, make_claim("task:r", "p1", [proof])), tuple)
    saved = [token.saved() for token in service.scheduler._tokens.values()]
    for row in saved:
        assert CLAIM_KEY not in str(row) and "p1" not in str(row) and proof not in str(row)
    restored = ExecutorService(SPECS, clock=world.clock, policy=Policy(lease_ttl_s=TTL))
    restored.restore([], saved, [], elapsed_s=0.0)
    assert [Token.from_saved(row).saved() for row in saved] == saved
    assert isinstance(restored.describe(budget.id, 1, make_claim("task:r", "p1", [])), tuple)
    assert isinstance(restored.describe(budget.id, 1, make_claim("task:r", "p9", [proof])),
                      tuple)  # a retry, after the restart
    assert isinstance(restored.describe(budget.id, 2, "task:thief#k"), AccessDeniedError)


# ------------------------------------------------------------------------------ nothing leaks


def test_nothing_answered_or_written_carries_a_secret(world: Honest) -> None:
    service = world.service
    answers: list[object] = [service.status(), world.recalls, service.counts]
    answers.append(service.renew(HONEST, [report(world.budget)], SECRET))
    answers.append(service.settle([report(world.budget, returned=3)], SECRET))
    answers.append(service.split(world.budget.id, 0, CLAIM, 2))
    answers.append(service.drain())
    answers.append([token.saved() for token in service.scheduler._tokens.values()])
    text = repr(answers)
    for secret in (SECRET, CLAIM_KEY, claim_value(CLAIM_KEY, world.budget.id, 0)):
        assert secret not in text


# ---------------------------------------------------------------------------------- brokers


def test_a_brokers_grants_carry_an_adoption_secret_never_its_lease_key() -> None:
    clock = FakeClock(100.0)
    service = ExecutorService(SPECS, clock=clock, policy=Policy(lease_ttl_s=TTL))
    broker_secret = "broker-secret"
    core = BrokerCore(holder=holder_id("b", broker_secret), ttl_s=TTL)
    token = service.open_token("budget", 10, CLAIM, None)
    assert isinstance(token, TokenInfo)
    ask = core.acquire(token.id, Kind.CAPACITY, KEY, 5, prefetch=5, max_prefetch=5,
                       now=clock.now, claim=(0, CLAIM))
    assert isinstance(ask, Forward)
    up = service.acquire(token.id, 0, CLAIM, ask.key, ask.amount, ask.prefetch, None,
                         broker_secret)
    assert isinstance(up, Ticket) and isinstance(up.outcome, Grant)
    # The process gets 5 and the broker keeps 5 spare, to serve on the node.
    grant = core.granted(token.id, KEY, 5, 0, up.outcome, sent_at=clock.now, now=clock.now,
                         claim=(0, CLAIM))
    local = core.acquire(token.id, Kind.CAPACITY, f"{holder_id('2', 's2')}:0", 1, prefetch=0,
                         max_prefetch=5, now=clock.now, claim=(0, CLAIM))
    for answer in (grant, local):
        assert isinstance(answer, Grant) and answer.via is not None
        assert ask.key not in repr(answer) and ask.key.partition(".")[0] not in repr(answer)
        assert ask.key.endswith(adoption_suffix(answer.via))
    # The adoption secret names the broker's lease for adoption only: a settle or renewal of
    # the broker's lease still needs the broker's secret, which processes never get.
    assert isinstance(service.settle([Report(token.id, ask.key, 10, 0, 0, True)], SECRET),
                      AccessDeniedError)
    assert isinstance(service.renew(holder_id("b", broker_secret), [], grant.via),
                      AccessDeniedError)
    # A guessed adoption secret adopts nothing; the real one moves the process's share.
    assert service.adopt([Adoption(token.id, "guess", KEY, 5, 0, 0, 0)], SECRET) == []
    assert service.scheduler.held(token.id, KEY) == 0
    assert grant.via is not None
    assert service.adopt([Adoption(token.id, grant.via, KEY, 5, 0, 0, 0)], SECRET) == \
        [(token.id, KEY)]
    assert service.scheduler.held(token.id, KEY) == 5
