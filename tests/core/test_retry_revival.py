"""A Ray exception retry of a task whose token argument was closed (issue 18, item 2, for a
plain token argument): the first attempt's worker drops the token when the attempt ends,
which closes it; the retry unpickles the same bytes and takes the token up again. Only those
bytes revive it, at the generation it was sent at, and a revived token carries what it had:
its expected use, its debt, its parent. Merged or released tokens are never revived (their
expected use went to another token). Pure, on a fake clock."""

from __future__ import annotations

import pytest
from fakes import FakeClock

from ray_quota._core.credentials import claim_value, holder_id, make_claim
from ray_quota._core.protocol import Grant, Report
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import AccessDeniedError, TokenClosedError
from ray_quota._spec import Kind, ResourceSpec

SECRET = "s" * 32
SPECS = {"rate": ResourceSpec("rate", Kind.RATE, 20, period_s=1.0, burst=10)}


def new_service() -> ExecutorService:
    return ExecutorService(SPECS, clock=FakeClock(), policy=Policy(lease_ttl_s=4.0,
                                                                   orphan_grace_s=6.0))


def sent_child(service: ExecutorService) -> tuple[str, str, str]:
    """A parent of 10 and a child of 4 sent to a task: (parent, child, the bytes' proof)."""
    parent = service.open_token("rate", 10, "k", None).id
    child = service.split(parent, 0, "k", 4)[0].id
    return parent, child, claim_value("k", child, 0)


def attempt(number: int, proof: str, task: str = "task:1") -> str:
    """The claim of the worker running attempt ``number`` of ``task`` (each attempt in a
    process of its own), holding the pickled bytes."""
    return make_claim(task, f"key{number}", [proof])


def total_expected_use(service: ExecutorService, *ids: str) -> int:
    return sum(service.describe(token_id, generation, claim)[0]
               for token_id, generation, claim in ids)


def raises(error: type[Exception], result: object) -> bool:
    return isinstance(result, error)


def test_a_retry_takes_up_again_a_token_its_first_attempt_closed() -> None:
    service = new_service()
    parent, child, proof = sent_child(service)
    assert service.describe(child, 1, attempt(1, proof)) == (4, 0.0)  # taken up
    assert service.close(child, 1, attempt(1, proof), []) is None  # dropped as the attempt ends
    assert service.scheduler.token_key(child) is None
    # The retry, in another worker, with the same bytes: the token is back, as it was.
    assert service.describe(child, 1, attempt(2, proof)) == (4, 0.0)
    assert service.scheduler.token_key(child) == ("rate", None)
    # The parent did not get the child's share twice: closing takes weight out.
    assert service.describe(parent, 0, "k")[0] == 6
    assert service.merge_back(child, 1, attempt(2, proof), parent, []) is True
    assert service.describe(parent, 0, "k")[0] == 10


def test_only_the_sent_bytes_revive_a_closed_token() -> None:
    service = new_service()
    _, child, proof = sent_child(service)
    service.describe(child, 1, attempt(1, proof))
    service.close(child, 1, attempt(1, proof), [])
    # Knowing the id and generation grants nothing; nor does another generation.
    assert raises(TokenClosedError, service.describe(child, 1, attempt(2, "")))
    assert raises(TokenClosedError, service.describe(child, 1, attempt(2, "x" * 43)))
    assert raises(TokenClosedError, service.describe(child, 2, attempt(2, proof)))
    # Nor do the bytes in another task (only a retry of the task that took it up may).
    assert raises(TokenClosedError, service.describe(child, 1, attempt(2, proof, "task:9")))
    assert service.scheduler.token_key(child) is None  # and nothing changed


@pytest.mark.parametrize("ending", ["merge_back", "merge"])
def test_a_token_whose_expected_use_went_elsewhere_is_not_revived(ending: str) -> None:
    service = new_service()
    parent, child, proof = sent_child(service)
    claim = attempt(1, proof)
    service.describe(child, 1, claim)
    if ending == "merge_back":
        assert service.merge_back(child, 1, claim, parent, []) is True
    else:
        other = service.split(child, 1, claim, 1)[0].id
        assert service.merge(other, 0, claim, child, 1, []) is None
    assert raises(TokenClosedError, service.describe(child, 1, attempt(2, proof)))


def test_a_token_closed_by_its_opener_is_not_revived() -> None:
    """Revival is for a token taken up after a move; one never sent is closed for good."""
    service = new_service()
    token = service.open_token("rate", 5, "k", None).id
    service.close(token, 0, "k", [])
    with_proof = make_claim("k", "k", [claim_value("k", token, 0)])
    assert raises(TokenClosedError, service.describe(token, 0, with_proof))
    assert raises(AccessDeniedError | TokenClosedError, service.describe(token, 1, with_proof))


def test_a_revived_token_keeps_its_debt() -> None:
    """Dropping a token in debt and taking it up again does not wipe the debt."""
    service = new_service()
    _, child, proof = sent_child(service)
    claim = attempt(1, proof)
    key = holder_id("task:1", SECRET) + ":lease"
    ticket = service.acquire(child, 1, claim, key, 5, 0, None, SECRET)
    assert ticket.outcome is not None and not isinstance(ticket.outcome, Exception)
    # The attempt used 25 of its 5 units: 20 of debt, charged to the token as it ends.
    assert service.close(child, 1, claim, [Report(child, key, 0, 25, 20, True)], SECRET) is None
    service.describe(child, 1, attempt(2, proof))
    assert service.scheduler.credit(child) < -10


def test_a_retry_whose_first_call_splits_revives_the_token_it_splits() -> None:
    """The split comes out of the revived token (one object, not a copy): nothing is made."""
    service = new_service()
    parent, child, proof = sent_child(service)
    service.describe(child, 1, attempt(1, proof))
    service.close(child, 1, attempt(1, proof), [])
    grandchild, left = service.split(child, 1, attempt(2, proof), 3)
    assert left == 1
    assert total_expected_use(service, (parent, 0, "k"), (child, 1, attempt(2, proof)),
                              (grandchild.id, 0, attempt(2, proof))) == 10


def test_a_retry_whose_first_call_merges_keeps_the_merged_share() -> None:
    service = new_service()
    parent, child, proof = sent_child(service)
    service.describe(child, 1, attempt(1, proof))
    service.close(child, 1, attempt(1, proof), [])
    other = service.open_token("rate", 5, "key2", None).id
    claim = make_claim("task:1", "key2", [proof])  # the retry's process opened ``other``
    assert service.merge(child, 1, claim, other, 0, []) is None
    assert service.describe(child, 1, claim)[0] == 9


def test_a_waiting_reservation_of_a_revived_token_fails_when_it_closes_again() -> None:
    clock = FakeClock()
    service = ExecutorService(SPECS, clock=clock, policy=Policy(lease_ttl_s=4.0,
                                                                orphan_grace_s=6.0))
    _, child, proof = sent_child(service)
    hog = service.open_token("rate", 10, "h", None).id
    assert isinstance(service.acquire(hog, 0, "h", holder_id("hog", SECRET) + ":0", 10, 0,
                                      None, SECRET).outcome, Grant)  # the burst is taken
    service.describe(child, 1, attempt(1, proof))
    service.close(child, 1, attempt(1, proof), [])
    key = holder_id("task:1#2", SECRET) + ":0"
    ticket = service.acquire(child, 1, attempt(2, proof), key, 5, 0, None, SECRET)
    assert ticket.outcome is None  # the retry's first call waits
    service.close(child, 1, attempt(2, proof), [])  # and the retry gives up
    assert isinstance(ticket.outcome, TokenClosedError)
    clock.advance(2.0)
    service.tick()
    assert isinstance(ticket.outcome, TokenClosedError)  # not granted later


def test_a_token_another_process_still_leases_is_closed_for_good() -> None:
    """Debt that process reports while the token is closed is charged to the pool alone; a
    revived token would come back without it, so such a token is not revivable."""
    service = new_service()
    _, child, proof = sent_child(service)
    sender_key = holder_id("sender", SECRET) + ":0"
    assert isinstance(service.acquire(child, 0, "k", sender_key, 2, 0, None, SECRET).outcome,
                      Grant)  # the sender holds units of it as it sends it
    service.describe(child, 1, attempt(1, proof))
    service.close(child, 1, attempt(1, proof), [])
    assert raises(TokenClosedError, service.describe(child, 1, attempt(2, proof)))


def test_close_and_revive_cycles_keep_the_late_debt_cap() -> None:
    """Late overuse under an ended key is charged at most ``max_overuse`` per token and
    holder; closing and reviving the token must not start that count again."""
    specs = {"rate": ResourceSpec("rate", Kind.RATE, 20, period_s=1.0, burst=10,
                                  max_overuse=5)}

    def late_debt_charged(cycles: int) -> float:
        service = ExecutorService(specs, clock=FakeClock(),
                                  policy=Policy(lease_ttl_s=4.0, orphan_grace_s=6.0))
        _, child, proof = sent_child(service)
        key = holder_id("sender", SECRET) + ":0"
        service.acquire(child, 0, "k", key, 2, 0, None, SECRET)
        service.settle([Report(child, key, 0, 2, 0, True)], SECRET)  # the sender's lease ends
        service.describe(child, 1, attempt(1, proof))
        start, debt = service.scheduler.credit(child), 0
        for n in range(cycles + 1):
            debt += 100  # the former owner keeps declaring overuse under its ended key
            service.settle([Report(child, key, 0, 2, debt, True)], SECRET)
            if n < cycles:
                service.close(child, 1, attempt(n + 1, proof), [])
                service.describe(child, 1, attempt(n + 2, proof))  # the retry revives it
        return start - service.scheduler.credit(child)

    assert late_debt_charged(3) == pytest.approx(late_debt_charged(0))
