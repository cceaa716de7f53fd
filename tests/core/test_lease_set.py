"""A process's leases of one token: renewal reports, retired and moved-away leases settled as
final once idle, final reports, a renewal's answer, recall and broker failover. Explicit ``now``."""

from __future__ import annotations

import itertools

from ray_quota._core.holder import LeaseSet, LocalLease
from ray_quota._core.protocol import TRUST, Adoption, Grant, LeaseAnswer, Report
from ray_quota._spec import Kind

TTL = 10.0


def new_set(kind: Kind = Kind.RATE, max_prefetch: int = 64) -> LeaseSet:
    keys = itertools.count()
    return LeaseSet("tok", kind, max_prefetch=max_prefetch, new_key=lambda: f"proc:{next(keys)}")


def grant(leases: LeaseSet, amount: int, units: int, *, sent_at: float = 0.0,
          contended: bool = False, via: str | None = None) -> LocalLease:
    """Ask for ``amount`` under the current lease and have ``units`` granted; the lease."""
    lease = leases.current
    assert leases.granted(lease, amount, Grant(units, TTL, contended, via), sent_at=sent_at)
    return lease


def test_a_new_set_asks_the_executor_under_a_fresh_key() -> None:
    leases = new_set()
    assert leases.current.key == "proc:0"
    assert leases.take(1, now=0.0) is None
    # Nothing the executor knows of yet: a name only asks it to keep the idle token.
    assert leases.reports(now=1.0, live=True) == [Report("tok", "proc:named", 0, 0, 0, False)]
    assert leases.reports(now=1.0, live=False) == []  # moved away: not this process's to keep


def test_granted_units_serve_later_reservations_locally() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30)
    assert leases.take(15, now=1.0) is lease
    assert leases.take(10, now=1.0) is None  # 5 spare left
    assert leases.reserved == 25


def test_renewal_reports_running_totals_and_keeps_spare_while_busy() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30)
    assert leases.settle(lease, 10, used=10) is None  # nothing urgent
    assert leases.reports(now=1.0, live=True) == [Report("tok", "proc:0", 0, 10, 0, False)]
    assert lease.spare == 20  # busy, alone and trusted: kept
    # Idle since that renewal: the spare goes back at the next.
    assert leases.reports(now=2.0, live=True) == [Report("tok", "proc:0", 20, 10, 0, False)]


def test_what_a_commit_gives_back_is_reported_at_once() -> None:
    """Issue 13, item 11: reserve(100), commit(20): the 80 go back now, not at a renewal."""
    leases = new_set(max_prefetch=5)
    lease = grant(leases, 100, 100)
    assert leases.settle(lease, 100, used=20) == Report("tok", "proc:0", 80, 20, 0, False)
    slots = new_set(Kind.CONCURRENCY, max_prefetch=0)
    slot = grant(slots, 1, 1)
    assert slots.settle(slot, 1, used=1) == Report("tok", "proc:0", 1, 0, 0, False)


def test_overuse_is_reported_at_once() -> None:
    leases = new_set()
    lease = grant(leases, 10, 10)
    assert leases.settle(lease, 10, used=15) == Report("tok", "proc:0", 0, 10, 5, False)


def test_under_contention_spare_goes_back_at_settle() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30, contended=True)
    assert leases.settle(lease, 10, used=10) == Report("tok", "proc:0", 20, 10, 0, False)


def test_a_grant_into_a_lease_settled_as_final_is_refused() -> None:
    leases = new_set()
    lease = grant(leases, 1, 1)
    leases.settle(lease, 1, used=1)
    leases.final_reports()  # the token closed while a second request waited
    assert not leases.granted(lease, 10, Grant(30, TTL, False), sent_at=1.0)
    assert lease.held == 0


def test_a_lost_answer_retires_the_lease_until_its_reservations_close() -> None:
    leases = new_set()
    old = grant(leases, 10, 10)
    leases.lost(old)
    assert leases.current is not old and leases.current.key == "proc:1"
    # Still reserved: reported, not final.
    assert leases.reports(now=1.0, live=True) == [Report("tok", "proc:0", 0, 0, 0, False)]
    leases.settle(old, 10, used=7)
    assert leases.reports(now=2.0, live=True) == [Report("tok", "proc:0", 3, 7, 0, True),
                                                    Report("tok", "proc:named", 0, 0, 0, False)]
    # Settled once, then forgotten: only the name that keeps the idle token is left.
    assert leases.reports(now=3.0, live=True) == [Report("tok", "proc:named", 0, 0, 0, False)]


def test_losing_an_answer_twice_retires_the_lease_once() -> None:
    leases = new_set()
    old = grant(leases, 10, 10)
    leases.lost(old)
    leases.lost(old)  # a second request under the same lease lost its answer too
    assert [lease.key for lease in leases] == ["proc:1", "proc:0"]


def test_an_ended_lease_is_replaced_without_being_settled() -> None:
    leases = new_set()
    old = grant(leases, 10, 10)
    leases.settle(old, 10, used=10)
    leases.ended(old)
    assert leases.current is not old
    assert list(leases) == [leases.current]  # the executor ended it: nothing to report


def test_an_ended_lease_with_open_reservations_is_reported_until_they_close() -> None:
    """A broker refused more under a lease it retired but keeps: the process goes on renewing
    it while it holds a slot of it, so the broker never frees that slot under it."""
    leases = new_set(Kind.CONCURRENCY, max_prefetch=0)
    old = grant(leases, 1, 1)
    leases.ended(old)
    assert leases.current is not old
    assert leases.reports(now=1.0, live=True) == [Report("tok", "proc:0", 0, 0, 0, False)]
    leases.settle(old, 1, used=1)
    assert leases.reports(now=2.0, live=True) == [Report("tok", "proc:0", 1, 0, 0, True),
                                                    Report("tok", "proc:named", 0, 0, 0, False)]
    assert list(leases) == [leases.current]


def test_final_reports_count_open_reservations_in_full() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30)
    assert leases.take(5, now=1.0) is lease  # 15 reserved, 15 spare
    leases.lost(lease)
    grant(leases, 4, 4, sent_at=1.0)
    assert leases.final_reports() == [Report("tok", "proc:1", 0, 4, 0, True),
                                      Report("tok", "proc:0", 15, 15, 0, True)]
    assert leases.reserved == 0
    assert leases.final_reports() == [Report("tok", "proc:1", 0, 4, 0, True)]  # no retired


def test_final_reports_skip_a_lease_the_executor_never_knew() -> None:
    assert new_set().final_reports() == []


def test_a_moved_away_tokens_idle_lease_goes_final() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30)
    leases.settle(lease, 10, used=10)
    assert leases.reports(now=1.0, live=False) == [Report("tok", "proc:0", 20, 10, 0, True)]
    assert leases.current is not lease and not leases.current.active


def test_a_moved_away_tokens_busy_lease_waits_for_its_reservations() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30)
    # Not final while reserved, but the spare goes back: it is not ours to serve any more.
    assert leases.reports(now=1.0, live=False) == [Report("tok", "proc:0", 20, 0, 0, False)]
    leases.settle(lease, 10, used=10)
    assert leases.reports(now=2.0, live=False) == [Report("tok", "proc:0", 20, 10, 0, True)]


def test_a_renewal_answer_extends_trust_from_when_it_was_sent() -> None:
    leases = new_set()
    lease = grant(leases, 1, 30)
    leases.reports(now=5.0, live=True)
    leases.renewed({("tok", "proc:0"): LeaseAnswer(False, TTL)}, sent_at=5.0)
    assert lease.valid_until == 5.0 + TTL * TRUST
    assert leases.current is lease


def test_a_lease_missing_from_the_renewal_answer_is_replaced() -> None:
    leases = new_set()
    lease = grant(leases, 1, 30)
    leases.reports(now=1.0, live=True)
    leases.renewed({("tok", "other:0"): LeaseAnswer(False, TTL)}, sent_at=1.0)
    assert leases.current is not lease and leases.current.key == "proc:1"


def test_a_renewal_sent_before_the_first_grant_does_not_end_the_lease() -> None:
    leases = new_set()
    assert leases.reports(now=0.0, live=True) == [Report("tok", "proc:named", 0, 0, 0, False)]
    lease = grant(leases, 1, 30)  # granted while that renewal (a name only) was out
    leases.renewed({}, sent_at=0.0)
    assert leases.current is lease


def test_a_renewal_answer_leaves_a_lease_the_executor_never_knew() -> None:
    leases = new_set()
    lease = leases.current
    leases.renewed({}, sent_at=1.0)
    assert leases.current is lease


def test_a_contended_renewal_answer_stops_local_service() -> None:
    leases = new_set()
    grant(leases, 1, 30)
    leases.reports(now=1.0, live=True)
    leases.renewed({("tok", "proc:0"): LeaseAnswer(True, TTL)}, sent_at=1.0)
    assert leases.take(1, now=1.5) is None


def test_recall_gives_the_spare_back_once() -> None:
    leases = new_set()
    grant(leases, 10, 30)
    assert leases.recall() == Report("tok", "proc:0", 20, 0, 0, False)
    assert leases.recall() is None  # nothing left to give back
    assert leases.take(1, now=1.0) is None  # and nothing served locally


def test_adoption_lists_brokered_live_leases_with_their_totals() -> None:
    leases = new_set()
    old = grant(leases, 10, 30, via="broker:7")
    leases.settle(old, 10, used=6)
    leases.lost(old)
    grant(leases, 5, 5, sent_at=1.0, via="broker:8")
    assert leases.adoptions() == [Adoption("tok", "broker:7", "proc:0", 20, 4, 6, 0),
                                  Adoption("tok", "broker:8", "proc:1", 5, 0, 0, 0)]


def test_adoption_skips_direct_and_final_leases() -> None:
    leases = new_set()
    grant(leases, 10, 30)
    assert leases.adoptions() == []
    brokered = new_set()
    grant(brokered, 10, 30, via="broker:7")
    brokered.final_reports()
    assert brokered.adoptions() == []


def test_adopted_leases_carry_on_directly_and_the_rest_start_afresh() -> None:
    leases = new_set()
    lease = grant(leases, 10, 30, via="broker:7")
    leases.adopted({("tok", "proc:0")})
    assert leases.current is lease and lease.via is None
    assert leases.take(5, now=1.0) is lease
    refused = new_set()
    gone = grant(refused, 10, 30, via="broker:7")
    refused.adopted(set())
    assert refused.current is not gone and gone.via is None
