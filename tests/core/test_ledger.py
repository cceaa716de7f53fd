"""The lease ledger alone: add, renew and expiry order, ended keys, counts and recalls."""

from __future__ import annotations

from ray_quota._core.ledger import TOMBSTONES, Lease, LeaseLedger
from ray_quota._core.state import ChangeLog


def lease(token: str = "t1", key: str = "p1", resource: str = "r", units: int = 5,
          expires_at: float = 10.0) -> Lease:
    return Lease(token, key, resource, units, expires_at)


def test_leases_are_addressed_by_token_and_lease_key() -> None:
    ledger = LeaseLedger()
    a = ledger.add(lease("t1", "p1"))
    b = ledger.add(lease("t1", "p2"))
    c = ledger.add(lease("t2", "p1"))
    assert ledger[("t1", "p1")] is a and ledger[("t1", "p2")] is b and ledger[("t2", "p1")] is c
    assert ledger.get(("t2", "p2")) is None
    assert len(ledger) == 3 and set(ledger) == {("t1", "p1"), ("t1", "p2"), ("t2", "p1")}


def test_due_yields_expired_leases_earliest_first_and_only_once() -> None:
    ledger = LeaseLedger()
    late = ledger.add(lease("t1", expires_at=7.0))
    early = ledger.add(lease("t2", expires_at=3.0))
    ledger.add(lease("t3", expires_at=20.0))
    assert list(ledger.due(now=2.9)) == []
    assert ledger.next_expiry() == 3.0
    assert list(ledger.due(now=7.0)) == [early, late]
    assert list(ledger.due(now=7.0)) == []  # taken off the expiry order
    assert ledger.next_expiry() == 20.0


def test_a_renewed_lease_expires_at_its_new_time_not_the_old_one() -> None:
    ledger = LeaseLedger()
    renewed = ledger.add(lease(expires_at=5.0))
    ledger.extend(renewed, 12.0)
    assert list(ledger.due(now=11.0)) == []  # the entry at 5.0 is stale
    assert list(ledger.due(now=12.0)) == [renewed]


def test_extend_key_renews_every_lease_of_one_key() -> None:
    ledger = LeaseLedger()
    mine = [ledger.add(lease("t1", "p1")), ledger.add(lease("t2", "p1"))]
    theirs = ledger.add(lease("t1", "p2"))
    assert sorted(held.token_id for held in ledger.extend_key("p1", 30.0)) == ["t1", "t2"]
    assert [held.expires_at for held in mine] == [30.0, 30.0] and theirs.expires_at == 10.0
    assert list(ledger.due(now=10.0)) == [theirs]
    assert ledger.extend_key("nobody", 30.0) == []


def test_a_lease_added_while_expiring_is_seen_by_the_same_pass() -> None:
    ledger = LeaseLedger()
    ledger.add(lease("t1", expires_at=1.0))
    seen = []
    for expired in ledger.due(now=5.0):
        seen.append(expired.token_id)
        ledger.end(expired)
        if expired.token_id == "t1":
            ledger.add(lease("t2", expires_at=2.0))  # granted while the first one expired
    assert seen == ["t1", "t2"]


def test_ended_keys_are_remembered_with_their_debt() -> None:
    ledger = LeaseLedger()
    ended = ledger.add(lease())
    ended.debt = 4
    ledger.end(ended)
    assert ("t1", "p1") not in ledger
    assert ledger.is_ended(("t1", "p1")) and ledger.ended_debt(("t1", "p1")) == 4
    ledger.mark_ended(("t1", "p1"), 9)  # overuse declared after the end
    assert ledger.ended_debt(("t1", "p1")) == 9
    assert not ledger.is_ended(("t1", "p2")) and ledger.ended_debt(("t1", "p2")) is None


def test_the_oldest_ended_keys_are_forgotten_first() -> None:
    ledger = LeaseLedger()
    for i in range(TOMBSTONES + 1):
        ledger.end(ledger.add(lease(f"t{i}")))
    assert not ledger.is_ended(("t0", "p1"))
    assert ledger.is_ended(("t1", "p1")) and ledger.is_ended((f"t{TOMBSTONES}", "p1"))


def test_counts_per_token_and_leases_per_holder() -> None:
    ledger = LeaseLedger()
    a = ledger.add(lease("t1", "p1"))
    ledger.add(lease("t1", "p2"))
    ledger.add(lease("t2", "p1"))
    assert ledger.leases_of("t1") == 2 and ledger.has_leases("t2")
    assert set(ledger.tokens_of("p1")) == {"t1", "t2"}
    ledger.end(a)
    assert ledger.leases_of("t1") == 1
    assert set(ledger.tokens_of("p1")) == {"t2"}
    ledger.end(ledger[("t2", "p1")])
    assert set(ledger.tokens_of("p1")) == set() and not ledger.has_leases("t2")


def test_recalls_address_every_lease_key_of_the_resource_and_drain() -> None:
    ledger = LeaseLedger()
    ledger.add(lease("t1", "p1", resource="r"))
    ledger.add(lease("t2", "p1", resource="r"))
    ledger.add(lease("t1", "p2", resource="r"))
    ledger.add(lease("t3", "p3", resource="other"))
    ledger.end(ledger[("t1", "p2")])  # ended: nothing left to give back
    ledger.recall("r")
    assert ledger.take_recalls() == {"p1": {"t1", "t2"}}
    assert ledger.take_recalls() == {}
    ledger.recall("nothing-leased")
    assert ledger.take_recalls() == {}


def test_adding_and_dropping_leases_is_recorded_for_the_store() -> None:
    changes = ChangeLog()
    ledger = LeaseLedger(changes)
    kept, ended = ledger.add(lease("t1")), ledger.add(lease("t2", resource="r2"))
    ledger.end(ended)
    assert changes.resources == {"r2"}  # its pool and leased units change with the drop
    rows = changes.drain(lambda name: None, lambda token_id: None,
                         lambda key: ledger[key].saved() if key in ledger else None)
    assert [row.token_id for row in rows.leases] == [kept.token_id]
    assert rows.dropped_leases == [("t2", "p1")]
    assert not changes.leases and not changes.resources  # drained
