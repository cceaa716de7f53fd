"""A caller with a valid secret of its own and only ids of another process's leases: subclasses
of our message types or of ``str`` must not pass a check as one thing and act as another (an
adversarial review of session 4 ended and drained an honest lease, and took its recalls, so)."""

from __future__ import annotations

import pytest
from fakes import FakeClock

from ray_quota._core.credentials import holder_id, make_claim
from ray_quota._core.protocol import Grant, Report
from ray_quota._core.scheduler import Policy, Ticket
from ray_quota._core.service import ExecutorService
from ray_quota._errors import QuotaError
from ray_quota._spec import Enforcement, Kind, ResourceSpec

SPECS = {"budget": ResourceSpec("budget", Kind.CAPACITY, value=100,
                                enforcement=Enforcement.REJECT)}
SECRET, HOSTILE_SECRET = "honest-secret", "hostile-secret"
HONEST, HOSTILE = holder_id("1", SECRET), holder_id("2", HOSTILE_SECRET)
KEY, HOSTILE_KEY = f"{HONEST}:0", f"{HOSTILE}:0"


class TwoFaced(str):
    """Equal to (and hashing as) the honest id, but splitting as the hostile's."""

    def rpartition(self, sep: str) -> tuple[str, str, str]:  # type: ignore[override]
        return str.rpartition(HOSTILE_KEY if ":" in self else HOSTILE, sep)


class KeyedReport(Report):
    """Its ``key`` attribute names the hostile's key; its tuple, the honest one."""

    @property
    def key(self) -> str:  # type: ignore[override]
        return HOSTILE_KEY


@pytest.fixture
def world() -> tuple[ExecutorService, str]:
    service = ExecutorService(SPECS, clock=FakeClock(100.0), policy=Policy(lease_ttl_s=10.0))
    claim = make_claim("task:honest", "honest-claim")
    token = service.open_token("budget", 10, claim, None)
    assert not isinstance(token, QuotaError)
    ticket = service.acquire(token.id, 0, claim, KEY, 10, 0, None, SECRET)
    assert isinstance(ticket, Ticket) and isinstance(ticket.outcome, Grant)
    service.drain()
    return service, token.id


@pytest.mark.parametrize("report", ["subclass", "str-subclass key"])
def test_a_report_that_names_one_key_and_carries_another_is_refused(
        world: tuple[ExecutorService, str], report: str) -> None:
    service, token_id = world
    sent = (KeyedReport(token_id, KEY, 10, 0, 0, True) if report == "subclass"
            else Report(token_id, TwoFaced(KEY), 10, 0, 0, True))
    answer = service.settle([sent], HOSTILE_SECRET)
    assert isinstance(answer, QuotaError)
    assert service.scheduler.held(token_id, KEY) == 10  # the honest lease is untouched


def test_a_watch_under_a_two_faced_holder_id_is_refused(
        world: tuple[ExecutorService, str]) -> None:
    service, _ = world
    assert isinstance(service.watch(TwoFaced(HONEST), 1.0, HOSTILE_SECRET), QuotaError)
