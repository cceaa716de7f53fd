"""Memory is bounded by live work (DESIGN §6): after a churn of tokens, waiters, leases, labels,
holders and brokers stops and the clock passes every grace, the executor service's and the
brokers' structures are back to their size before it. Pure, on a fake clock.

Ended lease keys and closed token ids are kept on purpose (a late report must find its lease
ended), as tombstones: those are checked against their cap, made small here so that the churn
reaches it.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from fakes import FakeClock

from ray_quota._core import broker as broker_module
from ray_quota._core import ledger as ledger_module
from ray_quota._core import tokens as tokens_module
from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.credentials import holder_id
from ray_quota._core.fair_queue import STALE_SLACK
from ray_quota._core.protocol import HOLDER_MEMORY_S, Grant, Report
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._core.watches import POSTED_KEEP_S, Watches
from ray_quota._spec import Enforcement, Kind, ResourceSpec

TTL, GRACE, CAP = 4.0, 6.0, 40
SPECS = {spec.name: spec for spec in (
    ResourceSpec("reject", Kind.RATE, 20, period_s=1.0, burst=10,
                 enforcement=Enforcement.REJECT, wait_limit_s=2.0),
    ResourceSpec("throttle", Kind.RATE, 20, period_s=1.0, burst=10, wait_limit_s=3.0),
    ResourceSpec("slots", Kind.CONCURRENCY, 3),
)}
TOMBSTONE_KEYS = {"ledger._recent", "tokens._closed", "broker._ended"}
PER_RESOURCE = {"ledger._by_resource"}  # one entry per resource: its sets' sizes are checked


def sizes(service: ExecutorService, brokers: list[BrokerCore],
          watches: Watches[Any]) -> dict[str, int]:
    """``len()`` of every dict, list, heap and set the service and the brokers keep."""
    sched = service.scheduler
    out: dict[str, int] = {}

    def add(prefix: str, obj: object, names: list[str]) -> None:
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, dict) and value and isinstance(next(iter(value.values())), set):
                out[f"{prefix}.{name}[*]"] = sum(len(v) for v in value.values())
            out[f"{prefix}.{name}"] = len(value)

    add("service", service, ["_waiting", "_changes", "_resolved", "_recalls"])
    add("scheduler", sched, ["_resolved"])
    add("ledger", sched._leases, ["_leases", "_by_key", "_by_resource", "_count",
                                  "_expiries", "_recalls"])
    ended = sched._leases._ended
    add("ledger", ended, ["_recent", "_idle", "_closing"])
    out["ledger._marks[*]"] = sum(len(holders) for holders in ended._marks.values())
    add("tokens", sched._tokens, ["_tokens", "_closed", "_orphans"])
    add("changes", sched._changes, ["resources", "tokens", "leases", "ended"])
    for name, res in sched._resources.items():
        add(f"{name}", res, ["_deadlines"])
        add(f"{name}.queue", res.queue, ["_heap"])
        add(f"{name}.virtual", res.queue.virtual,
            ["_counted", "_placed", "_ahead", "_behind"])
    for i, core in enumerate(brokers):
        add("broker", core, ["_ups", "_retired", "_subs", "_ended", "_owed"])
        out[f"broker{i}.subs_of_ups"] = sum(len(up.subs) for up in core._ups.values())
    for name, size in watches.sizes().items():
        out[f"watches.{name}"] = size
    return out


def secret_of(holder: str) -> str:
    """The churn's holders use their name as their secret."""
    return holder.rpartition("-")[0]


class Churn:
    """Processes and brokers doing everything, and dying, against one executor service."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.service = ExecutorService(SPECS, clock=self.clock,
                                       policy=Policy(lease_ttl_s=TTL, orphan_grace_s=GRACE))
        self.service.drain()
        # Every holder's secret is its name here; its holder id is what that secret proves.
        self.brokers = [BrokerCore(holder=holder_id(f"b{i}", f"b{i}"), ttl_s=TTL)
                        for i in range(2)]
        self.watches: Watches[str] = Watches()
        self.keys = 0
        self.tickets: dict[int, str] = {}  # waiting ticket -> its token
        self.leased: set[str] = set()  # tokens that were ever granted units (for the report)
        # live processes: holder -> {token id: (resource, lease key)}
        self.procs: dict[str, dict[str, tuple[str, str]]] = {}

    def key(self, holder: str) -> str:
        self.keys += 1
        return f"{holder}:{self.keys}"

    def round(self, n: int) -> None:
        rng, service, now = self.rng, self.service, self.clock.now
        for p in range(3):  # processes appear, with tokens of changing labels
            holder = holder_id(f"p{n}-{p}", f"p{n}-{p}")
            tokens = self.procs.setdefault(holder, {})
            for resource in rng.sample(sorted(SPECS), 2):
                info = service.open_token(resource, rng.randint(1, 5), holder,
                                          f"label-{n % 7}-{rng.randint(0, 3)}")
                assert not isinstance(info, Exception)
                tokens[info.id] = (resource, self.key(holder))
        for holder, tokens in list(self.procs.items()):
            for token_id, (resource, key) in list(tokens.items()):
                ticket = service.acquire(token_id, 0, holder, key, rng.randint(1, 4),
                                         rng.randint(0, 3), rng.choice([None, 0.5, 5.0]),
                                         secret_of(holder))
                self.track(token_id, ticket)
                if rng.random() < 0.3 and not isinstance(ticket, Exception) \
                        and ticket.outcome is None:
                    service.cancel(ticket.id)
            fate = rng.random()
            if fate < 0.25:  # dies without a word: its leases expire, its tokens are orphans
                del self.procs[holder]
            elif fate < 0.5:  # ends cleanly: final totals, tokens closed
                for token_id, (_, key) in tokens.items():
                    service.close(token_id, 0, holder,
                                  [Report(token_id, key, 0, 0, 0, True)], secret_of(holder))
                del self.procs[holder]
            else:  # lives on: renews, gives back
                service.renew(holder, [Report(t, k, 0, 0, 0, False)
                                       for t, (_, k) in tokens.items()], secret_of(holder))
        for i, core in enumerate(self.brokers):
            self.broker_round(core, n, i)
        for recall in self.drain().recalls:  # recalls for holders that may be gone
            self.watches.post(recall.holder, recall.token_ids, now)
        if n % 3 == 0:  # some holders watch, once
            for holder in list(self.procs)[:2]:
                watch = f"{holder}/w{n}"
                posted, _ = self.watches.watch(holder, watch)
                if posted is None:  # it times out unanswered
                    assert self.watches.close(holder, watch)
        self.clock.advance(rng.choice([0.2, 0.7, 1.5]))
        service.tick()
        self.drain()

    def track(self, token_id: str, ticket: object) -> None:
        outcome = getattr(ticket, "outcome", None)
        if isinstance(outcome, Grant):
            self.leased.add(token_id)
        elif outcome is None and not isinstance(ticket, Exception):
            self.tickets[ticket.id] = token_id  # type: ignore[attr-defined]

    def drain(self) -> Any:
        outbox = self.service.drain()
        for resolved in outbox.resolved:
            token_id = self.tickets.pop(resolved.ticket, None)
            if token_id is not None and isinstance(resolved.outcome, Grant):
                self.leased.add(token_id)
        return outbox

    def broker_round(self, core: BrokerCore, n: int, i: int) -> None:
        """A broker forwards for short-lived processes; some forwards fail (the executor
        unreachable), some are refused, the rest granted; its processes vanish."""
        rng, service, now = self.rng, self.service, self.clock.now
        info = service.open_token("throttle", 3, f"bp{n}-{i}", None)
        assert not isinstance(info, Exception)
        key = self.key(holder_id(f"bp{n}-{i}", f"bp{n}-{i}"))
        answer = core.acquire(info.id, Kind.RATE, key, 2, prefetch=1, max_prefetch=4, now=now,
                              claim=(0, f"bp{n}-{i}"))
        if isinstance(answer, Forward):
            if rng.random() < 0.4:  # the executor did not answer
                core.refused(info.id, key, now)
            else:
                ticket = service.acquire(info.id, 0, f"bp{n}-{i}", answer.key, answer.amount,
                                         answer.prefetch, 0.0, secret_of(core._holder))
                self.track(info.id, ticket)
                if not isinstance(ticket, Exception) and isinstance(ticket.outcome, Grant):
                    core.granted(info.id, key, 2, 1, ticket.outcome, sent_at=now, now=now,
                                 claim=(0, f"bp{n}-{i}"))
                else:
                    core.refused(info.id, key, now)
        self.broker_renews(core, now)
        if rng.random() < 0.5:  # the process leaves its token behind, cleanly or not
            service.close(info.id, 0, f"bp{n}-{i}", [], secret_of(core._holder))

    def broker_renews(self, core: BrokerCore, now: float) -> None:
        """The broker expires its sub-leases and renews its own leases upstream."""
        core.expire(now)
        reports = core.upstream_reports(now)
        if reports:
            alive = self.service.renew(core._holder, reports, secret_of(core._holder))
            assert not isinstance(alive, Exception)
            core.upstream_renewed(reports, alive, now)

    def settle_down(self) -> None:
        """The churn stops: the survivors end cleanly, and the clock passes every grace."""
        service, now = self.service, self.clock.now
        for holder, tokens in self.procs.items():
            for token_id, (_, key) in tokens.items():
                service.close(token_id, 0, holder, [Report(token_id, key, 0, 0, 0, True)],
                              secret_of(holder))
        self.procs.clear()
        # Waiters of dead processes with no wait limit are granted as slots come back, into
        # leases that expire in turn: long enough for all of them, then every grace.
        for _ in range(int((40 * TTL + GRACE + POSTED_KEEP_S) / 0.5)):
            self.clock.advance(0.5)
            now = self.clock.now
            service.tick()
            self.drain()
            for core in self.brokers:
                self.broker_renews(core, now)
            self.watches.sweep(now)
        # A holder's newest lease key of a token still open is kept for HOLDER_MEMORY_S.
        self.clock.advance(HOLDER_MEMORY_S + 1.0)
        service.tick()
        self.drain()


@pytest.fixture
def small_tombstones(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (ledger_module, tokens_module, broker_module):
        monkeypatch.setattr(module, "TOMBSTONES", CAP)


@pytest.mark.parametrize("seed", range(3))
def test_structures_return_to_their_baseline_after_a_churn(seed: int,
                                                          small_tombstones: None) -> None:
    churn = Churn(seed)
    baseline = sizes(churn.service, churn.brokers, churn.watches)
    for n in range(40):
        churn.round(n)
    during = sizes(churn.service, churn.brokers, churn.watches)
    churn.settle_down()
    after = sizes(churn.service, churn.brokers, churn.watches)
    # Tokens whose processes died holding nothing (no lease ever, or the last one settled as
    # final, as a broker does) went too, once nothing named them for a grace.
    assert after["tokens._tokens"] == 0
    # Virtual time keeps no token now, and heap entries within a fixed slack of the tokens it
    # had when it last pushed one (stale ones are swept at a push): bounded by the live tokens
    # of the churn, not by the churn's length.
    for name in [n for n in after if ".virtual." in n]:
        bound = 0 if name.endswith(("_placed", "_counted")) \
            else 2 * during["tokens._tokens"] + STALE_SLACK
        assert after.pop(name) <= bound, (name, bound)
    grown = {name: (baseline.get(name, 0), size) for name, size in after.items()
             if name not in TOMBSTONE_KEYS | PER_RESOURCE and size != baseline.get(name, 0)}
    assert not grown, f"still held after the churn (baseline, now): {grown}; during: {during}"
    for name in TOMBSTONE_KEYS:
        assert after[name] <= CAP, (name, after[name])
    assert during["ledger._leases"] > 0 and during["tokens._tokens"] > 0  # it did churn


def test_a_broker_forgets_a_token_whose_only_forward_failed() -> None:
    core = BrokerCore(holder="b", ttl_s=TTL)
    answer = core.acquire("t1", Kind.RATE, "p:1", 1, prefetch=0, max_prefetch=0, now=0.0)
    assert isinstance(answer, Forward)
    core.refused("t1", "p:1", 0.0)  # the executor was unreachable
    core.expire(TTL)  # the process is gone
    assert core.upstream_reports(TTL) == []
    assert core.upstream_leases() == 0 and core.sub_leases() == 0


def test_recalls_for_a_holder_that_never_watches_again_are_forgotten() -> None:
    watches: Watches[str] = Watches()
    assert watches.post("gone", {"t1"}, 0.0) is None
    assert watches.post("alive", {"t2"}, POSTED_KEEP_S - 1) is None
    assert watches.sweep(POSTED_KEEP_S) is True  # the older one went, the newer waits
    assert watches.sizes() == {"open": 0, "posted": 1}
    assert watches.watch("alive", "w") == (["t2"], None)
    assert watches.watch("gone", "w") == (None, None)  # nothing kept for it


def test_a_token_never_reserved_is_released_after_its_process_died() -> None:
    clock = FakeClock()
    service = ExecutorService(SPECS, clock=clock,
                              policy=Policy(lease_ttl_s=TTL, orphan_grace_s=GRACE))
    service.open_token("slots", 1, "p", None)  # then the process dies without a word
    for _ in range(int((TTL + GRACE) / 0.5) + 2):
        clock.advance(0.5)
        service.tick()
    assert len(service.scheduler._tokens) == 0
