"""A broker's final upstream totals survive a failed renewal (found by the system model test)."""

from __future__ import annotations

from ray_quota._core.broker import BrokerCore
from ray_quota._core.protocol import Grant, Report
from ray_quota._spec import Kind


def test_final_totals_lost_with_a_failed_renewal_are_sent_again() -> None:
    """The only sub-lease ends, so the broker's next renewal settles its lease as final. If
    that renewal fails (the executor restarting), the final totals must go with the next one:
    otherwise the lease expires at the executor, which charges what it held, and releases the
    token after its orphan grace though its process is alive."""
    core = BrokerCore(holder="b", ttl_s=10.0)
    core.acquire("t", Kind.CAPACITY, "p:0", 10, prefetch=0, max_prefetch=0, now=0.0)
    core.granted("t", "p:0", 10, 0, Grant(10, 10.0, False), sent_at=0.0, now=0.0)
    core.settle([Report("t", "p:0", 0, 4, 0, True)], now=1.0)

    first = core.upstream_reports(now=1.0)  # sent; the call fails, so no answer is applied
    assert [r.final for r in first] == [True]
    again = core.upstream_reports(now=2.0)
    assert again == first
    core.upstream_renewed(again, {}, sent_at=2.0)  # this one was answered
    assert core.upstream_reports(now=3.0) == []
