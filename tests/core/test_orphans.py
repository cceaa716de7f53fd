"""Tokens nobody holds (issue 14, "bounded memory"; issue 18 item 3): one that holds nothing is
released once no renewal named it for the orphan grace, a split child's expected use and credit
going back to its parent if that is still live. A live process keeps its idle tokens by naming
them, and the tokens it sent (pickled) until they are taken up, so a token waiting in Ray's queue
for a task that has not started is kept however long it waits; names pass through node brokers;
the grace and the parent link survive a restart. Pure, on a fake clock."""

from __future__ import annotations

from fakes import FakeClock

from ray_quota._core.broker import BrokerCore
from ray_quota._core.credentials import claim_value, holder_id, make_claim
from ray_quota._core.protocol import NAMED, Report, name_key
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._core.state import SavedResource
from ray_quota._spec import Kind, ResourceSpec

TTL, GRACE, STEP = 4.0, 6.0, 0.5
SPECS = {"rate": ResourceSpec("rate", Kind.RATE, 20, period_s=1.0, burst=10)}
SECRET = "s" * 32
HOLDER = holder_id("p", SECRET)  # the process that opens and splits
TASK_SECRET = "t" * 32
TASK = holder_id("task", TASK_SECRET)  # the process a token is sent to


def new_service(clock: FakeClock) -> ExecutorService:
    return ExecutorService(SPECS, clock=clock, policy=Policy(lease_ttl_s=TTL, orphan_grace_s=GRACE))


def idle(token_id: str, holder: str = HOLDER) -> Report:
    """The name of a token its process holds idle."""
    return Report(token_id, name_key(holder), 0, 0, 0, False)


def sent(token_id: str, generation: int) -> Report:
    """The name of a token this process sent away, its bytes at ``generation``."""
    return Report(token_id, name_key(HOLDER, generation), 0, 0, 0, False)


def run(service: ExecutorService, clock: FakeClock, seconds: float, *,
        naming: tuple[Report, ...] = ()) -> dict:
    """Let ``seconds`` pass, renewing every STEP with the names ``naming``; the last answer."""
    answer: dict = {}
    for _ in range(int(seconds / STEP)):
        clock.advance(STEP)
        if naming:
            answer = service.renew(HOLDER, list(naming), SECRET)
        service.tick()
    return answer


def live(service: ExecutorService, token_id: str) -> bool:
    return service.scheduler.token_key(token_id) is not None


def test_an_idle_token_its_process_names_is_kept_and_released_once_it_stops() -> None:
    clock = FakeClock()
    service = new_service(clock)
    token = service.open_token("rate", 5, "p", None).id
    answer = run(service, clock, 3 * GRACE, naming=(idle(token),))
    assert live(service, token) and answer == {(token, name_key(HOLDER)): NAMED}
    run(service, clock, GRACE - 2 * STEP)  # the process died: not yet a whole grace
    assert live(service, token)
    run(service, clock, 3 * STEP)  # a grace passed since it was last named
    assert not live(service, token)
    assert service.renew(HOLDER, [idle(token)], SECRET) == {}  # gone: not answered


def test_a_token_on_its_way_to_a_task_is_kept_while_its_sender_names_it() -> None:
    clock = FakeClock()
    service = new_service(clock)
    parent = service.open_token("rate", 10, "k", None).id
    child = service.split(parent, 0, "k", 4)[0].id
    # Pickled into a task's arguments at generation 1; the task waits in Ray's queue, long.
    answer = run(service, clock, 10 * GRACE, naming=(idle(parent), sent(child, 1)))
    assert live(service, child) and (child, name_key(HOLDER, 1)) in answer
    # The task starts and takes the child up: the sender's name no longer keeps it ...
    proof = claim_value("k", child, 0)
    assert service.describe(child, 1, make_claim("task:1", "k1", [proof])) == (4, 0.0)
    answer = service.renew(HOLDER, [idle(parent), sent(child, 1)], SECRET)
    assert (child, name_key(HOLDER, 1)) not in answer  # so its sender stops naming it
    run(service, clock, GRACE - 2 * STEP, naming=(idle(parent), sent(child, 1)))
    assert live(service, child)  # (taken up within a grace: the orphan's clock ran from then)
    # ... and its receiver, which names it, dies: it is released, its share back to the parent.
    run(service, clock, 2 * GRACE, naming=(idle(parent), sent(child, 1)))
    assert not live(service, child)
    assert service.describe(parent, 0, "k")[0] == 10


def test_a_token_sent_to_a_task_that_never_starts_is_released_once_its_sender_stops() -> None:
    clock = FakeClock()
    service = new_service(clock)
    parent = service.open_token("rate", 10, "k", None).id
    child = service.split(parent, 0, "k", 4)[0].id
    run(service, clock, 3 * GRACE, naming=(idle(parent), sent(child, 1)))
    assert live(service, child)
    run(service, clock, 2 * GRACE, naming=(idle(parent),))  # the task was cancelled
    assert not live(service, child) and service.describe(parent, 0, "k")[0] == 10


def test_a_released_child_gives_its_expected_use_and_credit_back_to_its_parent() -> None:
    clock = FakeClock()
    service = new_service(clock)
    parent = service.open_token("rate", 10, "p", None).id
    child, parent_use = service.split(parent, 0, "p", 4)
    assert parent_use == 6
    before = service.scheduler.credit(parent) + service.scheduler.credit(child.id)
    run(service, clock, 2 * GRACE, naming=(idle(parent),))  # the child's process died at once
    assert not live(service, child.id)
    expected_use, credit = service.describe(parent, 0, "p")
    assert expected_use == 10
    assert abs(credit - before) < 1e-9


def test_a_child_whose_parent_is_gone_is_simply_released() -> None:
    clock = FakeClock()
    service = new_service(clock)
    parent = service.open_token("rate", 10, "p", None).id
    child = service.split(parent, 0, "p", 4)[0].id
    assert service.close(parent, 0, "p", []) is None
    run(service, clock, 2 * GRACE)
    assert not live(service, child) and len(service.scheduler._tokens) == 0


def test_a_restarted_executor_releases_the_orphans_it_restored_to_their_parents() -> None:
    clock = FakeClock()
    service = new_service(clock)
    parent = service.open_token("rate", 10, "p", None).id
    child = service.split(parent, 0, "p", 4)[0].id
    sched = service.scheduler
    tokens = [sched._tokens[t].saved() for t in (parent, child)]
    resources = [SavedResource(SPECS["rate"], pool=10.0, vtime=0.0)]

    restarted = new_service(clock)
    restarted.restore(resources, tokens, [], elapsed_s=1.0)
    run(restarted, clock, GRACE - 2 * STEP, naming=(idle(parent),))
    assert live(restarted, child)  # its grace starts again at the restore
    run(restarted, clock, 4 * STEP, naming=(idle(parent),))
    assert not live(restarted, child) and live(restarted, parent)
    assert restarted.describe(parent, 0, "p")[0] == 10  # the parent link was saved


def test_a_broker_passes_its_processes_names_on_and_answers_as_the_executor_did() -> None:
    core = BrokerCore(holder="b", ttl_s=TTL)
    named, gone = Report("t1", "p:named", 0, 0, 0, False), Report("t2", "p:sent.3", 0, 0, 0, False)
    assert core.settle([named, gone], 0.0) is False
    assert core.renew([named, gone], 0.0) == {("t1", "p:named"): NAMED, ("t2", "p:sent.3"): NAMED}
    upstream = core.upstream_reports(1.0)
    assert upstream == [Report("t1", "b:named", 0, 0, 0, False),
                        Report("t2", "b:sent.3", 0, 0, 0, False)]  # under the broker's keys
    core.upstream_renewed(upstream, {("t1", "b:named"): NAMED}, 1.0)  # t2 was taken up
    assert core.renew([named, gone], 2.0) == {("t1", "p:named"): NAMED}
    assert core.upstream_reports(3.0) == upstream  # named again as its processes named them
    assert core.upstream_reports(4.0) == []  # and only then


def test_names_through_a_broker_keep_a_token_at_the_executor() -> None:
    clock = FakeClock()
    service = new_service(clock)
    broker_secret = "b" * 32
    core = BrokerCore(holder=holder_id("b", broker_secret), ttl_s=TTL)
    token = service.open_token("rate", 5, "p", None).id
    for _ in range(int(3 * GRACE / STEP)):
        clock.advance(STEP)
        core.renew([idle(token)], clock.now)  # the process renews with its broker
        upstream = core.upstream_reports(clock.now)
        core.upstream_renewed(upstream, service.renew(core._holder, upstream, broker_secret),
                              clock.now)
        service.tick()
    assert live(service, token)


def test_a_chain_of_splits_gives_every_share_back_to_the_root() -> None:
    """A -> B -> C: B's task dies and B is released into A; C's share then goes back to A too,
    whether C is released or merged back naming B, which is gone (adversary 4, 02)."""
    for ending in ("released", "merged back"):
        clock = FakeClock()
        service = new_service(clock)
        a = service.open_token("rate", 1000, "k", None).id
        b = service.split(a, 0, "k", 500)[0].id
        c = service.split(b, 0, "k", 200)[0].id
        run(service, clock, 2 * GRACE, naming=(idle(a), idle(c)))  # nobody names B
        assert not live(service, b) and service.describe(a, 0, "k")[0] == 800
        if ending == "released":
            run(service, clock, 2 * GRACE, naming=(idle(a),))
        else:
            assert service.merge_back(c, 0, "k", b, [], SECRET) is True
        assert not live(service, c)
        assert service.describe(a, 0, "k")[0] == 1000, ending


def test_merge_back_still_refuses_another_live_token_than_the_parent() -> None:
    clock = FakeClock()
    service = new_service(clock)
    a = service.open_token("rate", 100, "k", None).id
    other = service.open_token("rate", 100, "k", None).id
    c = service.split(a, 0, "k", 20)[0].id
    refused = service.merge_back(c, 0, "k", other, [], SECRET)
    assert type(refused).__name__ == "IncompatibleTokensError"
    assert service.describe(other, 0, "k")[0] == 100 and live(service, c)
