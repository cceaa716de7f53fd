"""The broker's core between the scheduler and processes' leases, on a fake clock.

A small world runs the three tiers as the actors do (executor scheduler, node broker, process
leases) but synchronously, so every property of a direct lease can be checked through a broker:
safety, conservation of units, trust that never outlasts the level above, expiry, recalls,
fairness across brokers, and processes taking over their leases when a broker dies.
"""

from __future__ import annotations

import random

import pytest
from fakes import FakeClock

from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.credentials import adoption_suffix
from ray_quota._core.holder import LocalLease
from ray_quota._core.protocol import TRUST, Grant, Report
from ray_quota._core.scheduler import Policy, ResourceStatus, Scheduler
from ray_quota._errors import InvalidAmountError
from ray_quota._spec import Enforcement, Kind, ResourceSpec

TTL = 10.0
CLAIM = (0, "c")


class World:
    """One resource, its scheduler, and any number of brokers and processes."""

    def __init__(self, spec: ResourceSpec) -> None:
        self.spec = spec
        self.clock = FakeClock()
        self.sched = Scheduler({spec.name: spec}, clock=self.clock,
                               policy=Policy(lease_ttl_s=TTL))

    @property
    def now(self) -> float:
        return self.clock.now

    def token(self, expected_use: int = 100) -> str:
        return self.sched.open_token(self.spec.name, expected_use, claimant="c").id

    def up_key(self, token_id: str, via: str | None) -> str:
        """The broker's lease key that a grant's adoption secret names (as the service finds
        it); processes are never told it."""
        assert via is not None
        key = self.sched.lease_key_ending(token_id, adoption_suffix(via))
        assert key is not None
        return key

    def status(self) -> ResourceStatus:
        return self.sched.status()[0]


class Node:
    """A broker, driven as the broker actor drives it."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.core = BrokerCore(holder=name, ttl_s=TTL)
        self.waiting: list[tuple[object, str, str, int, int, float]] = []
        self.executor_calls = 0

    def acquire(self, token_id: str, key: str, amount: int, prefetch: int) -> Grant | None:
        """A process's request; None while it waits at the executor."""
        w = self.world
        answer = self.core.acquire(token_id, w.spec.kind, key, amount, prefetch=prefetch,
                                   max_prefetch=w.spec.ceiling // 20, now=w.now, claim=CLAIM)
        if isinstance(answer, Grant):
            return answer
        assert isinstance(answer, Forward)
        self.executor_calls += 1
        ticket = w.sched.acquire(token_id, *CLAIM, answer.key, answer.amount,
                                 prefetch=answer.prefetch)
        if ticket.outcome is None:
            self.waiting.append((ticket, token_id, key, amount, prefetch, w.now))
            return None
        assert isinstance(ticket.outcome, Grant)
        return self.core.granted(token_id, key, amount, prefetch, ticket.outcome,
                                 sent_at=w.now, now=w.now, claim=CLAIM)

    def answered(self) -> list[tuple[str, int, Grant | None]]:
        """Requests the executor granted since: (process key, amount asked, grant)."""
        done, still = [], []
        for entry in self.waiting:
            ticket, token_id, key, amount, prefetch, sent_at = entry
            if ticket.outcome is None:  # type: ignore[attr-defined]
                still.append(entry)
            else:
                try:
                    grant = self.core.granted(token_id, key, amount, prefetch,
                                              ticket.outcome,  # type: ignore[attr-defined]
                                              sent_at=sent_at, now=self.world.now, claim=CLAIM)
                except KeyError:  # the sub-lease ended meanwhile: the process asks again
                    grant = None
                done.append((key, amount, grant))
        self.waiting = still
        return done

    def renew_upstream(self) -> None:
        """The broker's renewal: one executor call for the whole node."""
        w = self.world
        self.executor_calls += 1
        self.core.expire(w.now)
        reports = self.core.upstream_reports(w.now)
        alive = {}
        for token_id, key, returned, used, debt, final in reports:
            w.sched.settle(token_id, key, returned, used, debt, final=final)
            if not final and (contended := w.sched.renew_lease(token_id, key)) is not None:
                alive[(token_id, key)] = (contended, TTL)
        self.core.upstream_renewed(reports, alive, sent_at=w.now)

    def recalls(self) -> None:
        recalled = {t for keys in self.world.sched.take_recalls().values() for t in keys}
        reports, _ = self.core.recall(recalled)
        for token_id, key, returned, used, debt, final in reports:
            self.world.sched.settle(token_id, key, returned, used, debt, final=final)


class Proc:
    """A process holding one token's lease through a node's broker."""

    def __init__(self, node: Node, token_id: str, name: str) -> None:
        self.node, self.token_id, self.name = node, token_id, name
        self.lease = LocalLease(node.world.spec.kind, key=f"{name}:0",
                                max_prefetch=node.world.spec.ceiling // 20)
        self.used = 0  # what this process consumed, by its own count
        self.granted = 0  # units it received
        self.open: list[int] = []
        self.died = True  # until it closes

    def reserve(self, amount: int) -> bool:
        w = self.node.world
        if self.lease.take(amount, w.now):
            self.open.append(amount)
            return True
        grant = self.node.acquire(self.token_id, self.lease.key, amount, self.lease.prefetch())
        if grant is None:
            return False
        self.got(amount, grant)
        return True

    def got(self, amount: int, grant: Grant) -> None:
        self.lease.granted(amount, units=grant.units, sent_at=self.node.world.now,
                           ttl_s=grant.ttl_s, contended=grant.contended)
        self.lease.via = grant.via
        self.granted += grant.units
        self.open.append(amount)

    def commit(self, used: int) -> None:
        """As the client does: what is urgent (units back, debt) goes to the broker at once."""
        amount = self.open.pop(0)
        if self.lease.settle(amount, used):
            self.node.core.settle([self.report()], self.node.world.now)
        self.used += used

    def report(self, *, final: bool = False) -> tuple[str, str, int, int, int, bool]:
        totals = self.lease.totals()
        return Report(self.token_id, self.lease.key, totals.returned, totals.used, totals.debt,
                      final)

    def renew(self) -> None:
        w = self.node.world
        if not self.lease.active:
            return  # as the client: nothing to renew before the first grant
        self.lease.report(w.now, keep_spare=True)
        report = self.report()
        self.node.core.settle([report], w.now)
        answer = self.node.core.renew([report], w.now).get((self.token_id, self.lease.key))
        if answer is None and self.lease.active:
            self.lease = LocalLease(w.spec.kind, key=f"{self.name}:{w.now}", max_prefetch=0)
        elif answer is not None:
            self.lease.renewed(contended=answer[0], sent_at=w.now, ttl_s=answer[1])

    def close(self) -> None:
        self.died = False
        self.lease.release_all()
        self.node.core.settle([self.report(final=True)], self.node.world.now)


def capacity(value: int = 10_000) -> ResourceSpec:
    return ResourceSpec("budget", Kind.CAPACITY, value=value, enforcement=Enforcement.THROTTLE)


def rate(value: int = 1000, burst: int = 200) -> ResourceSpec:
    return ResourceSpec("tok", Kind.RATE, value=value, period_s=1.0, burst=burst,
                        enforcement=Enforcement.THROTTLE)


def concurrency(value: int = 4) -> ResourceSpec:
    return ResourceSpec("conn", Kind.CONCURRENCY, value=value, enforcement=Enforcement.THROTTLE)


def one_process(spec: ResourceSpec) -> tuple[World, Node, str, Proc]:
    """A world with one broker, and one process holding a token through it."""
    w = World(spec)
    node = Node(w, "b1")
    token = w.token()
    return w, node, token, Proc(node, token, "p1")


def leave_spare_at_the_broker(proc: Proc) -> None:
    """Reserve until the broker prefetches (its prefetch grows while nobody waits), with the
    process keeping nothing itself."""
    for _ in range(4):
        assert proc.reserve(100)
        proc.commit(100)
        proc.lease.recall()


# ------------------------------------------------------------------------------- local service


def test_a_second_process_is_served_from_the_brokers_spare_without_the_executor() -> None:
    _w, node, token, first = one_process(capacity())
    leave_spare_at_the_broker(first)
    spare = node.core.spare(token)
    assert spare > 0
    calls, local = node.executor_calls, node.core.local_grants
    second = Proc(node, token, "p2")
    assert second.reserve(min(spare, 50))
    assert node.executor_calls == calls
    assert node.core.local_grants == local + 1


def test_the_broker_serves_only_the_claim_the_executor_accepted() -> None:
    w, node, token, proc = one_process(capacity())
    leave_spare_at_the_broker(proc)
    assert node.core.spare(token) > 0
    answer = node.core.acquire(token, Kind.CAPACITY, "p9:0", 1, prefetch=0, max_prefetch=0,
                               now=w.now, claim=(1, "someone-else"))
    assert isinstance(answer, Forward)  # the executor checks who may use the token
    served = node.core.acquire(token, Kind.CAPACITY, "p9:1", 1, prefetch=0, max_prefetch=0,
                               now=w.now, claim=CLAIM)
    assert isinstance(served, Grant)


def test_under_contention_every_request_goes_to_the_executors_fair_queue() -> None:
    w = World(rate(value=100, burst=100))
    node = Node(w, "b1")
    a, b = w.token(), w.token()
    pa, pb = Proc(node, a, "pa"), Proc(node, b, "pb")
    assert pa.reserve(60)
    assert not pb.reserve(60)  # waits at the executor: contention
    node.recalls()
    assert node.core.spare(a) == 0
    before = node.executor_calls
    assert not pa.reserve(1) or node.executor_calls == before + 1
    assert node.core.local_grants == 0


# ---------------------------------------------------------------------------------- trust


def test_a_processs_trust_never_outlasts_the_brokers_which_never_outlasts_the_executors() -> None:
    w, node, token, proc = one_process(capacity())
    w.clock.advance(1.0)
    assert proc.reserve(10)
    up_trust = node.core._ups[token].lease.valid_until
    assert proc.lease.valid_until <= up_trust
    assert up_trust < w.now + TTL  # the executor expires the broker's lease at now + TTL
    w.clock.advance(3.0)
    proc.renew()  # the broker's lease was not renewed since: the process gets less trust
    assert proc.lease.valid_until <= up_trust


def test_when_the_brokers_trust_runs_out_its_processes_serve_nothing_but_keep_their_leases(
        ) -> None:
    w, node, _token, proc = one_process(rate())
    assert proc.reserve(10)
    proc.commit(10)
    w.clock.advance(TTL)  # the broker could not renew (executor unreachable, or restarting)
    old_key = proc.lease.key
    proc.renew()
    assert proc.lease.key == old_key  # still alive: the executor may well keep it
    assert node.core.sub_leases() == 1
    assert not proc.lease.take(1, w.now)  # but not trusted: nothing is served locally


def test_once_the_executor_ended_the_brokers_lease_its_sub_leases_end_at_the_next_renewal(
        ) -> None:
    w, node, _token, proc = one_process(rate())
    assert proc.reserve(10)
    proc.commit(10)
    w.clock.advance(TTL + 1)
    w.sched.poll()  # the broker could not renew for a whole time-to-live: the lease expired
    node.renew_upstream()  # and the executor's answer says so
    old_key = proc.lease.key
    proc.renew()
    assert proc.lease.key != old_key  # a new lease: the old one is gone
    assert node.core.sub_leases() == 0


def test_a_lease_first_granted_while_a_renewal_was_out_is_not_judged_by_it() -> None:
    w, node, token, proc = one_process(capacity())
    w.clock.advance(1.0)
    reports = node.core.upstream_reports(w.now)  # the broker's renewal leaves: nothing yet
    assert proc.reserve(10)  # the first grant lands meanwhile
    node.core.upstream_renewed(reports, {}, sent_at=w.now)  # its answer knows no lease
    assert node.core.upstream_leases() == 1 and node.core.held(token) == 10
    proc.renew()
    assert node.core.sub_leases() == 1  # still the process's


# ------------------------------------------------------------------------- expiry and ends


@pytest.mark.parametrize("spec, charged", [(capacity(), True), (concurrency(), False)])
def test_a_silent_process_s_sub_lease_expires_at_the_broker(spec: ResourceSpec,
                                                           charged: bool) -> None:
    w, node, token, proc = one_process(spec)
    assert proc.reserve(2)  # and the process dies with it open
    for _ in range(int(TTL) + 1):
        w.clock.advance(1.0)
        node.renew_upstream()
    assert node.core.expiries == 1
    node.core.settle([], w.now)
    lease = node.core._ups[token].lease if token in node.core._ups else None
    status = w.status()
    if charged:  # it may have used them: they stay spent
        assert status.in_use == 2
    else:  # the slots are free again at the broker, and go back upstream
        assert lease is None or lease.reserved == 0
        assert status.in_use - status.leased_units <= 0


def test_a_final_report_gives_back_what_the_process_still_held() -> None:
    w, node, _token, proc = one_process(capacity())
    assert proc.reserve(100)
    proc.commit(30)
    proc.close()  # spare and unused units go back
    for _ in range(2):
        w.clock.advance(1.0)
        node.renew_upstream()
    assert node.core.upstream_leases() == 0
    assert w.status().in_use == 30  # exactly what was used is spent


@pytest.mark.parametrize("process_reported", [True, False])
def test_release_settles_the_token_upstream_as_final(process_reported: bool) -> None:
    """With the process's final totals (the normal close) exactly the used units and the open
    reservation are spent. A sub-lease without them lives on while its process renews it (the
    token may have moved away from it); once it stops, expiry charges all it held, since it
    may have used it, and the upstream lease is settled as final."""
    w, node, token, proc = one_process(capacity())
    assert proc.reserve(100)
    proc.commit(40)
    assert proc.reserve(10)  # open when the token closes: counted as used
    spent = 50 if process_reported else 40 + proc.lease.held  # used, and all it still held
    if process_reported:
        proc.close()
    reports = node.core.release(token)
    assert [r[5] for r in reports] == [process_reported]
    for token_id, key, returned, used, debt, final in reports:
        w.sched.settle(token_id, key, returned, used, debt, final=final)
    if not process_reported:
        assert node.core.sub_leases() == 1
        for _ in range(int(TTL) + 1):  # the process is silent: its sub-lease expires
            w.clock.advance(1.0)
            node.renew_upstream()
    else:  # kept until the next renewal reports it final again (in case the call was refused)
        node.renew_upstream()
    assert w.status().in_use == spent
    assert w.status().leased_units == 0
    assert node.core.upstream_leases() == 0


def test_overuse_declared_after_a_sub_lease_ended_is_still_owed() -> None:
    w, node, token, proc = one_process(capacity())
    assert proc.reserve(10)
    proc.commit(10)
    proc.close()
    late = Report(token, proc.lease.key, *proc.report()[2:4], 25, True)
    assert node.core.settle([late], w.now)  # debt: send upstream now
    node.renew_upstream()
    assert w.status().in_use >= 35


@pytest.mark.parametrize("sent", ["at once", "at the renewal"])
def test_overuse_declared_after_the_brokers_lease_was_settled_is_still_owed(sent: str) -> None:
    """The broker's lease of the token ended with the process's; debt declared later still
    reaches the executor, once (issue 13, item 7)."""
    w, node, token, proc = one_process(capacity(1000))
    assert proc.reserve(100)
    proc.commit(100)
    proc.close()
    node.renew_upstream()  # nothing of the token is left on the node: settled as final
    assert node.core.upstream_leases() == 0 and w.status().in_use == 100
    late = Report(token, proc.lease.key, *proc.report()[2:4], 50, True)
    for repeated in (False, True):  # a repeated report changes nothing
        assert node.core.settle([late], w.now) is not repeated  # debt: send it upstream now
        if sent == "at once":
            for token_id, key, returned, used, debt, final in node.core.report_of(token):
                w.sched.settle(token_id, key, returned, used, debt, final=final)
        else:
            node.renew_upstream()
        assert w.status().in_use == 150
        assert w.status().leased_units == 0


# ------------------------------------------- a live process keeps what it holds (issue 13, 2)


def slots_in_use(*procs: Proc) -> int:
    """Slots held, by the processes' own records: their open reservations."""
    return sum(sum(proc.open) for proc in procs)


def run_until_quiet(w: World, nodes: list[Node], procs: list[Proc], seconds: int) -> None:
    """Every second: the executor's loop, the brokers' renewals, answers to their processes,
    and the processes' renewals; slots in use never exceed the limit meanwhile."""
    for _ in range(seconds):
        w.clock.advance(1.0)
        w.sched.poll()
        for node in nodes:
            for key, amount, grant in node.answered():
                if grant is not None:
                    next(p for p in procs if p.lease.key == key).got(amount, grant)
            node.renew_upstream()
            node.recalls()
        for proc in procs:
            proc.renew()
        assert slots_in_use(*procs) <= w.spec.value


@pytest.mark.parametrize("spec", [concurrency(1), capacity(100)], ids=["slot", "capacity"])
def test_a_pause_in_the_brokers_renewals_takes_nothing_from_a_process_that_renews(
        spec: ResourceSpec) -> None:
    """The broker's renewals pause past its trust but within the executor's time-to-live (Ray
    restarting the executor, which keeps its leases): its process, renewing all along, keeps
    its slot, and its open reservation's rest comes back when it commits."""
    w = World(spec)
    node, other = Node(w, "b1"), Node(w, "b2")
    holder = Proc(node, w.token(), "pa")
    assert holder.reserve(spec.value)
    for _ in range(int(TTL * TRUST) + 1):  # past the broker's trust; the process renews
        w.clock.advance(1.0)
        holder.renew()
    node.renew_upstream()  # the executor is back, with the broker's lease
    rival = Proc(other, w.token(), "pb")
    asked = 1 if spec.kind is Kind.CONCURRENCY else 80
    assert not rival.reserve(asked)  # it waits: the holder still holds everything
    run_until_quiet(w, [node, other], [holder, rival], 3)
    assert rival.open == [], "a held slot was handed out again"
    holder.commit(20 if spec.kind is Kind.CAPACITY else 1)
    run_until_quiet(w, [node, other], [holder, rival], 3)
    assert rival.open == [asked]  # what the holder gave back went to the rival
    if spec.kind is Kind.CAPACITY:
        rival.commit(80)
        assert w.status().in_use == 100  # 20 + 80: the holder's rest was not charged


@pytest.mark.parametrize("ending", ["close", "merge", "merge_back"])
@pytest.mark.parametrize("spec", [concurrency(1), capacity(100)], ids=["slot", "capacity"])
def test_a_token_ending_on_a_node_leaves_the_open_reservation_of_the_process_it_moved_from(
        spec: ResourceSpec, ending: str) -> None:
    """A token moves from one process to another on the same node, and ends there while the
    first still has a reservation of it open: that process keeps its slot (or its
    reservation's rest), as it would with a direct lease."""
    w = World(spec)
    node, other = Node(w, "b1"), Node(w, "b2")
    kept = w.token()
    token = w.sched.split(kept, 0, "c", 50).id if ending == "merge_back" else w.token()
    sender = Proc(node, token, "pa")
    assert sender.reserve(spec.value)
    receiver = Proc(node, token, "pb")  # the token moved here; it ends without reserving
    receiver.close()
    for token_id, key, returned, used, debt, final in node.core.release(token):
        w.sched.settle(token_id, key, returned, used, debt, final=final)
    if ending == "close":
        w.sched.close_token(token, 0, "c")
    elif ending == "merge":
        w.sched.merge(kept, 0, "c", token, 0)
    else:
        assert w.sched.merge_back(token, 0, "c", kept)
    rival = Proc(other, w.token(), "pr")
    asked = 1 if spec.kind is Kind.CONCURRENCY else 80
    assert not rival.reserve(asked)
    run_until_quiet(w, [node, other], [sender, rival], 3)
    assert rival.open == [], "a held slot was handed out again"
    sender.commit(20 if spec.kind is Kind.CAPACITY else 1)
    sender.close()  # its lease of the moved token is done
    run_until_quiet(w, [node, other], [sender, rival], 3)
    assert rival.open == [asked]
    assert node.core.upstream_leases() == 0 or node.core.held(token) == 0
    if spec.kind is Kind.CAPACITY:
        rival.commit(80)
        assert w.status().in_use == 100  # the sender's rest came back


def test_a_lost_answer_retires_the_brokers_lease_but_its_processes_keep_their_slots() -> None:
    """A forwarded request's answer is lost (the executor restarting): the broker retires its
    lease, but keeps renewing it while processes hold sub-leases of it."""
    w = World(concurrency(2))
    node, other = Node(w, "b1"), Node(w, "b2")
    holder = Proc(node, w.token(), "pa")
    assert holder.reserve(1)
    ask = node.core.acquire(holder.token_id, Kind.CONCURRENCY, "pa:9", 1, prefetch=0,
                            max_prefetch=0, now=w.now, claim=CLAIM)
    assert isinstance(ask, Forward)
    node.core.refused(holder.token_id, "pa:9", w.now)  # ExecutorUnavailableError
    node.core.lost(holder.token_id, ask.key, CLAIM)
    rival = Proc(other, w.token(), "pr")
    assert not rival.reserve(2)
    run_until_quiet(w, [node, other], [holder, rival], int(TTL) + 2)
    assert rival.open == [], "a held slot was handed out again"
    holder.commit(1)
    holder.close()
    run_until_quiet(w, [node, other], [holder, rival], 3)
    assert rival.open == [2]


# ---------------------------------------------------------------------------------- recalls


def test_a_recall_returns_the_brokers_spare_and_names_the_processes_to_tell() -> None:
    _w, node, token, proc = one_process(capacity())
    for _ in range(3):
        assert proc.reserve(100)
        proc.commit(100)
    proc.lease.recall()
    assert node.core.spare(token) > 0
    reports, tell = node.core.recall([token])
    assert reports and node.core.spare(token) == 0
    assert tell == {"p1": {token}}


# ---------------------------------------------------------------------------------- safety


@pytest.mark.parametrize("deaths", [False, True], ids=["clean", "deaths"])
@pytest.mark.parametrize("spec", [capacity(5_000), concurrency(6)], ids=["capacity", "slots"])
@pytest.mark.parametrize("seed", range(4))
def test_units_are_conserved_across_brokers_processes_deaths_and_expiry(
        spec: ResourceSpec, seed: int, deaths: bool) -> None:
    """Random reserves, commits, renewals, closes (and deaths) on 3 nodes x 3 processes.

    At every step no live process holds a unit the executor has not leased out (safety). At
    the end nothing is leased, no slot is lost, and the capacity spent is exactly what the
    processes used, plus at most what dead processes held (expiry charges it: they may have
    used it).
    """
    rng = random.Random(seed)
    w = World(spec)
    nodes = [Node(w, f"b{i}") for i in range(3)]
    procs = [Proc(node, w.token(rng.randint(10, 200)), f"n{i}p{j}")
             for i, node in enumerate(nodes) for j in range(3)]
    alive = set(range(len(procs)))
    waiting: set[str] = set()
    small = spec.kind is Kind.CONCURRENCY
    for _step in range(400):
        i = rng.choice(sorted(alive)) if alive else None
        op = rng.random()
        if i is not None and op < 0.45 and procs[i].lease.key not in waiting:
            proc = procs[i]
            if not proc.reserve(rng.randint(1, 3 if small else 80)):
                waiting.add(proc.lease.key)
        elif i is not None and op < 0.75 and procs[i].open:
            proc = procs[i]
            amount = proc.open[0]
            proc.commit(amount if small else rng.randint(0, amount))
        elif i is not None and op < 0.78 and deaths:
            alive.discard(i)  # dies: stops renewing, whatever it holds
        elif i is not None and op < 0.80 and procs[i].lease.key not in waiting:
            while procs[i].open:
                procs[i].commit(procs[i].open[0])
            procs[i].close()
            alive.discard(i)
        else:
            w.clock.advance(rng.uniform(0.1, 1.5))
            tick(w, nodes, procs, waiting)
            for j in alive:
                procs[j].renew()
        held = sum(p.lease.held for k, p in enumerate(procs) if k in alive)
        assert held <= w.status().leased_units, "a process holds units nobody leased"
    for _ in range(50):  # the live ones finish: commit, close, and let everything settle
        for j in sorted(alive):
            proc = procs[j]
            if proc.lease.key in waiting:
                continue
            while proc.open:
                proc.commit(proc.open[0])
            proc.close()
            alive.discard(j)
        w.clock.advance(1.0)
        tick(w, nodes, procs, waiting)
    status = w.status()
    assert not alive and not waiting, (alive, waiting, w.status(), [p.lease.spare for p in procs])
    assert status.leased_units == 0, "units still leased after everyone left"
    if spec.kind is Kind.CONCURRENCY:
        assert status.in_use == 0, "slots lost"
    else:
        used = sum(p.used for p in procs)
        assert used <= status.in_use, "units used but not charged"
        dead = sum(p.granted for k, p in enumerate(procs) if p.died)
        assert status.in_use <= used + dead, "units charged that nobody used or held"
        if not deaths:
            assert status.in_use == used


def tick(w: World, nodes: list[Node], procs: list[Proc], waiting: set[str]) -> None:
    """The executor's loop and every broker's renewal; answers reach their processes."""
    w.sched.poll()
    for node in nodes:
        for key, amount, grant in node.answered():
            proc = next(p for p in procs if p.lease.key == key)
            if grant is not None:
                proc.got(amount, grant)
            waiting.discard(key)
        node.renew_upstream()
        node.recalls()


# ------------------------------------------------------------------- a broker that dies


def test_adopt_moves_a_processs_share_of_the_brokers_lease_into_its_own() -> None:
    w, _node, token, proc = one_process(capacity())
    assert proc.reserve(100)
    proc.commit(30)
    before = w.status()
    lease = proc.lease
    up_key = w.up_key(token, lease.via)
    entry = (token, up_key, lease.key, lease.held, lease.returned, lease.used, lease.debt)
    assert w.sched.adopt(*entry) is True
    assert w.sched.held(token, lease.key) == lease.held
    assert w.sched.held(token, up_key) == 100 - lease.held  # what the process reported
    assert w.status().leased_units == before.leased_units  # moved, not granted
    assert w.sched.adopt(*entry) is True  # a repeated call moves nothing more
    assert w.sched.held(token, lease.key) == lease.held
    # The process settles directly from now on, with the same running totals.
    lease.settle(lease.reserved, lease.reserved)
    w.sched.settle(token, lease.key, *proc.report()[2:5], final=False)
    assert w.sched.held(token, lease.key) == lease.held


def test_adopt_refuses_once_the_brokers_lease_expired_and_changes_nothing() -> None:
    w, _node, token, proc = one_process(capacity())
    assert proc.reserve(100)
    via = w.up_key(token, proc.lease.via)
    w.clock.advance(TTL + 1)
    w.sched.poll()  # the broker stopped renewing: its lease expired, its units stay charged
    assert w.sched.adopt(token, via, proc.lease.key, 100, 0, 0, 0) is False
    assert w.sched.held(token, proc.lease.key) == 0
    assert w.status().in_use == 100


def test_adopt_charges_declared_debt_and_checks_its_numbers() -> None:
    w, _node, token, proc = one_process(capacity())
    assert proc.reserve(100)
    via = w.up_key(token, proc.lease.via)
    with pytest.raises(InvalidAmountError, match="units"):
        w.sched.adopt(token, via, "p1:9", -1, 0, 0, 0)
    assert w.sched.held(token, via) == 100  # nothing changed
    assert w.sched.adopt(token, via, "p1:9", 100, 0, 0, 7)
    assert w.status().in_use == 107  # charged again: an overcharge is safe, an overgrant not


@pytest.mark.parametrize("seed", range(3))
def test_processes_that_adopt_after_their_broker_died_lose_and_double_grant_nothing(
        seed: int) -> None:
    """The broker dies mid-run; its processes take their leases over and carry on directly.

    Each process holds, directly, exactly what it held through the broker, and spent capacity
    at the end is exactly what the processes used plus what died with the broker.
    """
    rng = random.Random(seed)
    w = World(capacity(5_000))
    node = Node(w, "b1")
    procs = [Proc(node, w.token(100), f"p{i}") for i in range(4)]
    for _ in range(60):
        proc = rng.choice(procs)
        if proc.open and rng.random() < 0.5:
            proc.commit(rng.randint(0, proc.open[0]))
        elif len(proc.open) < 3:
            assert proc.reserve(rng.randint(1, 40))
        if rng.random() < 0.2:
            w.clock.advance(0.5)
            node.renew_upstream()
            for p in procs:
                p.renew()
    # The broker dies. Its spare, and units processes returned that it never passed on, are
    # lost with it: expiry charges them, as for any holder that dies. Nothing else may be.
    lost = sum(up.lease.spare + up.lease.returned
               - w.sched._leases[(token_id, up.lease.key)].returned
               for token_id, up in node.core._ups.items())
    entries = [(p.token_id, w.up_key(p.token_id, p.lease.via), p.lease.key, p.lease.held,
                p.lease.returned, p.lease.used, p.lease.debt) for p in procs if p.lease.via]
    for entry in entries:
        assert w.sched.adopt(*entry)
    for p in procs:
        p.lease.via = None
        assert w.sched.held(p.token_id, p.lease.key) == p.lease.held
    for p in procs:  # carry on directly, then finish
        while p.open:
            p.commit(p.open[0])
        p.lease.release_all()
        w.sched.settle(p.token_id, p.lease.key, *p.report()[2:5], final=True)
    w.clock.advance(TTL + 1)
    w.sched.poll()
    status = w.status()
    assert status.leased_units == 0
    assert status.in_use == sum(p.used for p in procs) + lost
