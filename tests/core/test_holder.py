"""The holder's side of a lease: local service, trust, overuse, prefetch, recalls, totals."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ray_quota._core.holder import LocalLease, Settlement
from ray_quota._core.protocol import TRUST
from ray_quota._spec import Kind

TTL = 10.0


def new_lease(kind: Kind = Kind.RATE, max_prefetch: int = 64) -> LocalLease:
    return LocalLease(kind, key="proc-1:0", max_prefetch=max_prefetch)


def granted_lease(kind: Kind = Kind.RATE, *, amount: int = 10, units: int = 30,
                  sent_at: float = 0.0, contended: bool = False,
                  max_prefetch: int = 64) -> LocalLease:
    lease = new_lease(kind, max_prefetch)
    lease.granted(amount, units=units, sent_at=sent_at, ttl_s=TTL, contended=contended)
    return lease


def test_empty_lease_asks_the_executor() -> None:
    lease = new_lease()
    assert lease.take(1, now=0.0) is False
    assert lease.held == 0
    assert not lease.active
    assert lease.totals() == Settlement(0, 0, 0)


def test_lease_serves_reservations_locally_from_spare_units() -> None:
    lease = granted_lease(amount=10, units=30)
    assert lease.active
    assert (lease.spare, lease.reserved) == (20, 10)
    assert lease.take(15, now=1.0) is True
    assert (lease.spare, lease.reserved) == (5, 25)
    assert lease.take(6, now=1.0) is False  # not enough spare: nothing changes
    assert (lease.spare, lease.reserved, lease.held) == (5, 25, 30)


def test_lease_stops_serving_when_no_longer_trusted() -> None:
    lease = granted_lease(amount=10, units=30, sent_at=2.0)
    trusted_until = 2.0 + TTL * TRUST
    assert TRUST < 1.0  # the holder stops before the executor's TTL runs out
    assert lease.take(1, now=trusted_until - 1e-6) is True
    assert lease.take(1, now=trusted_until) is False


def test_lease_does_not_serve_locally_under_contention() -> None:
    lease = granted_lease(amount=10, units=30, contended=True)
    assert lease.spare == 20
    assert lease.take(1, now=1.0) is False  # others wait: go through the fair queue


def test_untrusted_lease_lets_its_spare_go_at_report() -> None:
    lease = granted_lease(amount=10, units=30)
    lease.settle(10, 10)
    settlement = lease.report(now=TTL * TRUST, keep_spare=True)
    # Never served again, and reported returned: an executor that still holds the lease frees
    # the units; one that expired it ignores the report.
    assert settlement == Settlement(returned=20, used=10, debt=0)
    assert lease.spare == 0


def test_grant_after_trust_ran_out_lets_the_old_spare_go() -> None:
    lease = granted_lease(amount=10, units=30)
    lease.granted(5, units=5, sent_at=TTL, ttl_s=TTL, contended=False)
    assert lease.spare == 0  # the 20 old spare units are never served again ...
    assert lease.totals().returned == 20  # ... and are reported returned
    assert lease.reserved == 15


def test_grant_while_trusted_adds_to_spare() -> None:
    lease = granted_lease(amount=10, units=30)
    lease.granted(5, units=9, sent_at=1.0, ttl_s=TTL, contended=False)
    assert (lease.spare, lease.reserved) == (24, 15)


def test_renewal_extends_trust_from_when_it_was_sent() -> None:
    lease = granted_lease(amount=10, units=30, sent_at=0.0)
    lease.renewed(contended=False, sent_at=5.0, ttl_s=TTL)
    assert lease.take(1, now=5.0 + TTL * TRUST - 1e-6) is True
    assert lease.take(1, now=5.0 + TTL * TRUST) is False


def test_under_use_goes_back_to_the_pool_at_once() -> None:
    """What a commit gives back is for others at once, not spare (issue 13, item 11)."""
    lease = granted_lease(amount=100, units=100)
    assert lease.settle(100, 20) is True  # to report at once
    assert (lease.spare, lease.reserved) == (0, 0)
    assert lease.totals() == Settlement(returned=80, used=20, debt=0)
    assert lease.report(now=1.0, keep_spare=True) == Settlement(returned=80, used=20, debt=0)


def test_a_commit_keeps_the_prefetched_spare_up_to_the_prefetch_limit() -> None:
    lease = granted_lease(amount=10, units=15, max_prefetch=8)
    assert lease.settle(10, 10) is False  # nothing given back: nothing to report
    assert lease.spare == 5  # prefetched, within the limit: serves the next reservation
    over = granted_lease(amount=10, units=30, max_prefetch=8)
    assert over.settle(10, 10) is True
    assert (over.spare, over.returned) == (8, 12)  # spare beyond the limit went back


def test_overuse_is_drawn_from_spare_first_then_debt() -> None:
    lease = granted_lease(amount=10, units=15)
    assert lease.settle(10, 12) is False  # 2 over: covered by spare, no debt
    assert (lease.spare, lease.reserved) == (3, 0)
    assert lease.take(3, now=1.0) is True
    assert lease.settle(3, 10) is True  # 7 over, no spare left: debt, to report at once
    assert lease.spare == 0
    assert lease.totals() == Settlement(returned=0, used=15, debt=7)


def test_overuse_partly_covered_by_spare() -> None:
    lease = granted_lease(amount=10, units=13)
    assert lease.settle(10, 20) is True
    assert lease.spare == 0
    assert lease.totals() == Settlement(returned=0, used=13, debt=7)


def test_report_carries_running_totals_not_increments() -> None:
    lease = granted_lease(amount=10, units=10)
    lease.settle(10, 8)
    first = lease.report(now=1.0, keep_spare=False)
    assert first == Settlement(returned=2, used=8, debt=0)
    assert lease.report(now=2.0, keep_spare=False) == first  # sending it again is harmless
    assert lease.take(1, now=2.0) is False
    lease.granted(5, units=5, sent_at=2.0, ttl_s=TTL, contended=False)
    lease.settle(5, 9)
    assert lease.report(now=3.0, keep_spare=False) == Settlement(returned=2, used=13, debt=4)


def test_report_keeps_spare_only_while_busy_alone_and_trusted() -> None:
    lease = granted_lease(amount=10, units=30)
    assert lease.report(now=1.0, keep_spare=True).returned == 0  # busy since the grant
    assert lease.spare == 20
    # Nothing served since that renewal: the spare is idle and goes back.
    assert lease.report(now=2.0, keep_spare=True).returned == 20
    assert lease.spare == 0


def test_report_gives_spare_back_under_contention() -> None:
    lease = granted_lease(amount=10, units=30, contended=True)
    assert lease.report(now=1.0, keep_spare=True).returned == 20


def test_report_gives_spare_back_when_not_asked_to_keep_it() -> None:
    lease = granted_lease(amount=10, units=30)
    assert lease.report(now=1.0, keep_spare=False).returned == 20


def test_recall_gives_spare_back_and_stops_local_service() -> None:
    lease = granted_lease(amount=10, units=30)
    assert lease.recall() is True
    assert lease.spare == 0
    assert lease.totals().returned == 20
    assert lease.contended
    assert lease.take(1, now=1.0) is False
    assert lease.recall() is False  # nothing more to give


def test_release_all_counts_open_reservations_as_used_in_full() -> None:
    lease = granted_lease(amount=10, units=30)
    lease.release_all()
    assert (lease.spare, lease.reserved, lease.held) == (0, 0, 0)
    assert lease.totals() == Settlement(returned=20, used=10, debt=0)


def test_prefetch_doubles_while_alone_up_to_the_maximum() -> None:
    lease = new_lease(max_prefetch=50)
    assert lease.prefetch() == 0
    sizes = []
    for t in range(6):
        lease.granted(5, units=5 + lease.prefetch(), sent_at=float(t), ttl_s=TTL, contended=False)
        sizes.append(lease.prefetch() + lease.spare)  # the spare it wants to hold
        lease.settle(5, 5)  # used as asked: the spare stays
    assert sizes == [5, 10, 20, 40, 50, 50]


def test_prefetch_never_asks_beyond_the_cap_with_the_spare_held() -> None:
    """A request the spare cannot cover asks only for what keeps the spare within the cap: the
    spare held counts (the system machine's spare-cap invariant found 40 against a cap of 20)."""
    lease = new_lease(max_prefetch=20)
    for t in range(4):
        lease.granted(5, units=5 + lease.prefetch(), sent_at=float(t), ttl_s=TTL, contended=False)
        assert lease.spare <= 20
    lease.granted(30, units=30 + lease.prefetch(), sent_at=5.0, ttl_s=TTL, contended=False)
    assert lease.spare <= 20


def test_prefetch_is_zero_under_contention() -> None:
    lease = new_lease(max_prefetch=64)
    lease.granted(8, units=8, sent_at=0.0, ttl_s=TTL, contended=False)
    lease.granted(8, units=16, sent_at=1.0, ttl_s=TTL, contended=False)
    assert lease.prefetch() == 16 - lease.spare  # what it wants, less the spare it holds
    lease.granted(8, units=8, sent_at=2.0, ttl_s=TTL, contended=True)
    assert lease.prefetch() == 0
    lease.renewed(contended=True, sent_at=3.0, ttl_s=TTL)
    assert lease.prefetch() == 0
    lease.renewed(contended=False, sent_at=4.0, ttl_s=TTL)
    assert lease.prefetch() > 0


def test_concurrency_settle_returns_the_slot_at_once_whatever_was_used() -> None:
    lease = granted_lease(Kind.CONCURRENCY, amount=2, units=2, max_prefetch=0)
    assert lease.settle(2, 0) is True  # a freed slot is for others at once: report it now
    assert (lease.spare, lease.reserved) == (0, 0)
    assert lease.totals() == Settlement(returned=2, used=0, debt=0)
    lease.granted(2, units=2, sent_at=1.0, ttl_s=TTL, contended=False)
    assert lease.settle(2, 5) is True  # "overuse" of a slot takes no extra slot; only debt
    assert (lease.spare, lease.reserved) == (0, 0)
    settlement = lease.report(now=1.0, keep_spare=False)
    assert settlement.returned == 4
    assert settlement.used == 0  # slots are returned, never consumed


OPS = st.lists(st.tuples(st.sampled_from(["reserve", "commit", "report", "recall", "renew",
                                          "wait"]),
                         st.integers(1, 20), st.integers(0, 40), st.booleans()),
               max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, kind=st.sampled_from([Kind.RATE, Kind.CAPACITY, Kind.CONCURRENCY]))
def test_every_granted_unit_is_held_returned_used_or_forfeited(
        ops: list[tuple[str, int, int, bool]], kind: Kind) -> None:
    lease = new_lease(kind, max_prefetch=16)
    now, granted, forfeited, total_used = 0.0, 0, 0, 0
    open_: list[int] = []
    last = lease.totals()
    for op, amount, used, flag in ops:
        if op == "reserve":
            if not lease.take(amount, now):
                units = amount + lease.prefetch()
                before, returned = lease.spare, lease.totals().returned
                lease.granted(amount, units=units, sent_at=now, ttl_s=TTL, contended=flag)
                forfeited += (before + units - amount - lease.spare
                              - (lease.totals().returned - returned))
                granted += units
            open_.append(amount)
        elif op == "commit" and open_:
            amount = open_.pop(amount % len(open_))
            lease.settle(amount, used)
            total_used += used
        elif op == "report":
            before = lease.spare
            returned = lease.totals().returned
            lease.report(now, keep_spare=flag)
            forfeited += before - lease.spare - (lease.totals().returned - returned)
        elif op == "recall":
            lease.recall()
        elif op == "renew":
            lease.renewed(contended=flag, sent_at=now, ttl_s=TTL)
        else:
            now += amount / 2
        totals = lease.totals()
        # Running totals never go back.
        assert totals.returned >= last.returned and totals.used >= last.used
        assert totals.debt >= last.debt
        last = totals
        assert lease.spare >= 0 and lease.reserved == sum(open_)
        if kind is not Kind.CONCURRENCY:
            assert granted == lease.held + totals.returned + totals.used + forfeited
            assert totals.used + totals.debt == total_used


def test_a_grant_after_a_long_wait_is_trusted_from_when_it_was_granted() -> None:
    lease = new_lease()
    lease.granted(5, units=10, sent_at=0.0, ttl_s=TTL, contended=False, waited_s=9.0)
    assert lease.valid_until == 9.0 + TTL * TRUST  # not 8 s after sending: 1 s before the grant


def test_trust_never_moves_back() -> None:
    lease = granted_lease(sent_at=5.0)
    lease.granted(1, units=1, sent_at=1.0, ttl_s=TTL, contended=False)  # an older request
    assert lease.valid_until == 5.0 + TTL * TRUST
    lease.renewed(contended=False, sent_at=2.0, ttl_s=TTL)  # an older renewal
    assert lease.valid_until == 5.0 + TTL * TRUST
