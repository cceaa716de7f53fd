"""Secrets, not ids (issue 14), on a real Ray: a hostile driver of the cluster calls the executor
(and a node's broker) directly, knowing every id of an honest process: its holder id, its lease
keys, its token's id and generation. Each call is refused with AccessDeniedError (or, for a token
call without the token's claim, TokenMovedError), nothing changes, and the honest process carries
on. The pure rules are in tests/core/test_credentials.py.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray
from conftest import TEST_MANIFEST

import ray_quota
from ray_quota import AccessDeniedError, QuotaToken, TokenMovedError
from ray_quota._actors.broker import broker_name
from ray_quota._core.credentials import claim_value, holder_id, make_claim
from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE, Adoption, Report
from ray_quota._runtime import identity, renewer

HOSTILE_SECRET = "a-hostile-drivers-own-secret"
HOSTILE = holder_id("666", HOSTILE_SECRET)


def snapshot() -> list[tuple[Any, ...]]:
    """What a refused call must not change (rate pools refill, so their level is left out)."""
    return [(s.name, s.waiters, s.tokens, s.leases, s.leased_units,
             None if s.kind == "rate" else s.in_use) for s in ray_quota.status()]


class Victim:
    """An honest process (this driver's own ray_quota side) holding a budget lease and a slot,
    and everything about it a hostile driver could know."""

    def __init__(self) -> None:
        self.budget = QuotaToken("budget", expected_use=100)
        self.open = self.budget.reserve(40)  # held open: 40 units in its lease
        self.conn = QuotaToken("conn", expected_use=1)
        self.slot = self.conn.reserve(1)
        renewer.flush()
        self.holder = identity.HOLDER
        self.budget_key = self.budget._leases.current.key
        self.conn_key = self.conn._leases.current.key
        self.claimant_guess = f"process:{identity.HOLDER}"  # what main's claimant was

    def still_works(self) -> None:
        self.open.commit(40)
        self.slot.commit(1)
        with self.budget.reserve(10) as reservation:
            reservation.commit(10)
        renewer.flush()  # a renewal with the honest secret goes through
        self.budget.close()
        self.conn.close()


@pytest.fixture
def victim(executor: Any) -> Iterator[Victim]:
    made = Victim()
    yield made


def hostile(method: str, *args: Any) -> Any:
    """Call the executor as any driver of the cluster can: by its name, with no client."""
    handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    return ray.get(getattr(handle, method).remote(*args), timeout=60)


def hostile_calls(v: Victim) -> dict[str, Callable[[Any], Any]]:
    """Every lease call a hostile driver could make about the victim, given a secret (or none)."""
    budget, conn = v.budget._id, v.conn._id
    give_back = Report(budget, v.budget_key, 40, 0, 0, True)  # "returned" all: a refund
    end_slot = Report(conn, v.conn_key, 0, 0, 0, True)
    return {
        "watch": lambda s: hostile("watch", v.holder, 0.5, s),
        "settle": lambda s: hostile("settle", [give_back], s),
        "renew": lambda s: hostile("renew", v.holder, [give_back, end_slot], None, s),
        "renew under its own holder": lambda s: hostile("renew", HOSTILE, [end_slot], None, s),
        "adopt": lambda s: hostile("adopt", [Adoption(budget, "guess", v.budget_key, 40,
                                                      0, 0, 0)], s),
        "acquire into the victim's lease": lambda s: hostile(
            "acquire", budget, 0, v.claimant_guess, v.budget_key, 1, 0, 0.1, s),
        "close with the victim's totals": lambda s: hostile(
            "close", conn, 0, v.claimant_guess, [end_slot], s),
    }


@pytest.mark.parametrize("secret", [None, "wrong", HOSTILE_SECRET])
def test_a_hostile_driver_with_known_ids_but_no_secret_is_refused_and_changes_nothing(
        victim: Victim, secret: Any) -> None:
    before = snapshot()
    for name, call in hostile_calls(victim).items():
        answer = call(secret)
        assert isinstance(answer, AccessDeniedError), (name, answer)
        assert snapshot() == before, name
    victim.still_works()


def test_a_hostile_watch_neither_sees_nor_steals_the_victims_recalls(victim: Victim) -> None:
    # Someone queues for the slot the victim holds: the executor recalls it from the victim.
    waiter = QuotaToken("conn", expected_use=1)
    slots = [waiter.reserve(1) for _ in range(3)]  # conn has 4 slots; the victim holds one
    ref = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE).watch.remote(
        victim.holder, 2.0, HOSTILE_SECRET)
    assert isinstance(ray.get(ref, timeout=60), AccessDeniedError)
    for slot in slots:
        slot.commit(1)
    waiter.close()
    victim.still_works()


def test_knowing_a_tokens_id_and_generation_takes_nothing_over(victim: Victim) -> None:
    budget = victim.budget
    before = snapshot()
    for generation in (1, 2, 10**6):
        for claim in ("task:thief#k", make_claim("task:thief", "k", ["guess"]),
                      make_claim("task:thief", "k", [claim_value("k", budget._id, 0)])):
            answer = hostile("acquire", budget._id, generation, claim, f"{HOSTILE}:0", 1, 0,
                             0.1, HOSTILE_SECRET)
            assert isinstance(answer, AccessDeniedError), answer
            assert isinstance(hostile("describe", budget._id, generation, claim),
                              AccessDeniedError)
    # At the token's own generation, a guessed claim is someone else's.
    for claim in (victim.claimant_guess, make_claim(identity.who(), "guess")):
        assert isinstance(hostile("split", budget._id, 0, claim, 10), TokenMovedError)
        assert isinstance(hostile("close", budget._id, 0, claim, [], HOSTILE_SECRET),
                          TokenMovedError)
    assert snapshot() == before
    victim.still_works()


@ray.remote(max_retries=0)
def use(token: QuotaToken) -> int:
    with token.reserve(5) as reservation:
        reservation.commit(5)
    token.close()
    return 5


def test_a_moved_token_is_taken_up_by_its_bytes_and_not_by_its_id(executor: Any) -> None:
    token = QuotaToken("budget", expected_use=100)
    with token.reserve(1) as reservation:
        reservation.commit(1)
    data = pickle.dumps(token)  # moved: only whoever has these bytes may take it up
    answer = hostile("acquire", token._id, token._generation + 1, "task:thief#k",
                     f"{HOSTILE}:0", 1, 0, 0.1, HOSTILE_SECRET)
    assert isinstance(answer, AccessDeniedError)
    assert ray.get(use.remote(pickle.loads(data)), timeout=60) == 5


@pytest.fixture
def brokered(ray_cluster: None) -> Iterator[Any]:
    ray_quota.shutdown()
    info = ray_quota.init(manifest=TEST_MANIFEST, environment="test", brokers=True,
                          policy=ray_quota.Policy(lease_ttl_s=3.0), metrics_port=None)
    yield info
    renewer.flush()
    ray_quota.shutdown()


@ray.remote(num_cpus=0)
class Behind:
    """A process behind the node's broker: what it learns from its grants."""

    def lease(self) -> tuple[str, str, str | None, str]:
        token = QuotaToken("budget", expected_use=100)
        reservation = token.reserve(10)
        lease = token._leases.current
        renewer.flush()
        self.keep = (token, reservation)
        return identity.HOLDER, lease.key, lease.via, token._id


def test_behind_a_broker_processes_learn_no_broker_key_and_ids_open_nothing(
        brokered: Any) -> None:
    behind = Behind.remote()
    holder, key, via, token_id = ray.get(behind.lease.remote(), timeout=120)
    broker = ray.get_actor(broker_name(ray.get_runtime_context().get_node_id()),
                           namespace=NAMESPACE)
    # The grant named the broker's lease by an adoption secret, never by its key.
    assert via is not None
    leases = [s.leases for s in ray_quota.status() if s.name == "budget"]
    assert leases == [1]  # the broker's one lease
    assert ":" not in via
    before = snapshot()
    give_back = Report(token_id, key, 10, 0, 0, True)
    for call in (broker.watch.remote(holder, 0.5, HOSTILE_SECRET),
                 broker.settle.remote([give_back], None),
                 broker.renew.remote(holder, [give_back], None, "wrong"),
                 broker.close.remote(token_id, 0, "task:thief#k", [give_back], None)):
        assert isinstance(ray.get(call, timeout=60), AccessDeniedError)
    assert snapshot() == before
    ray.kill(behind)
