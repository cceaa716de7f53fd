"""The whole system, driven at random as its sans-IO parts: executor service and store, processes'
lease sets, one fake clock, with faults: frozen and killed processes, executor restarts, failed
writes. Every promise is checked from the processes' own records (see ``system_world``).

A short run is in the default suite; ``-m slow`` runs it long.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from system_world import (
    CAP,
    backlog,
    CONC,
    EPS,
    POLICY,
    RATE,
    SPECS,
    Handle,
    Process,
    World,
    consumed,
    rate_excess,
    slots_in_use,
)

from ray_quota._core.credentials import Claim, claim_value
from ray_quota._errors import QuotaError

PICK = st.integers(0, 10**6)


class SystemMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self.world = World(Path(self._dir.name) / "state.sqlite")
        self.expected_use: dict[str, int] = {}  # live tokens, by our own count
        self.owner: dict[str, Process] = {}  # who holds each live token now
        self.steps = 0

    def _fault_due(self) -> bool:
        """Faults on one step in four, so that work happens between them."""
        return self.steps % 4 == 3

    def teardown(self) -> None:
        self.world.executor.store.close()
        self._dir.cleanup()

    # ------------------------------------------------------------------------------ helpers

    def _process(self, pick: int) -> Process | None:
        live = list(self.world.live_processes())
        return live[pick % len(live)] if live else None

    def _handle(self, pick: int, resource: str | None = None) -> tuple[Process, Handle] | None:
        handles = [(p, h) for p in self.world.live_processes() for h in p.handles
                   if h.live and self.owner.get(h.token_id) is p
                   and (resource is None or h.resource == resource)]
        return handles[pick % len(handles)] if handles else None

    def _ended(self, handle: Handle) -> None:
        self.expected_use.pop(handle.token_id, None)
        self.owner.pop(handle.token_id, None)

    # ------------------------------------------------------------------------------- tokens

    @rule(pick=PICK, resource=st.sampled_from(sorted(SPECS)), expected_use=st.integers(1, 40))
    def open_token(self, pick: int, resource: str, expected_use: int) -> None:
        process = self._process(pick)
        if process is None:
            return
        info = self.world.token_call("open_token", resource, expected_use, process.claimant, None)
        process.adopt_handle(info.id, resource, 0, expected_use, None)
        self.expected_use[info.id] = expected_use
        self.owner[info.id] = process

    @rule(pick=PICK, share=st.floats(0.0, 1.0))
    def split(self, pick: int, share: float) -> None:
        found = self._handle(pick)
        if found is None:
            return
        process, handle = found
        child_use = max(1, round(self.expected_use[handle.token_id] * share))
        sched = self.world.executor.service.scheduler
        before = sched.credit(handle.token_id)
        try:
            child, left = self.world.token_call("split", handle.token_id, handle.generation,
                                                process.claim(handle), child_use)
        except QuotaError as exc:
            event(f"split refused: {type(exc).__name__}")
            return
        self.expected_use[handle.token_id] -= child_use
        assert left == self.expected_use[handle.token_id]
        self.expected_use[child.id] = child_use
        self.owner[child.id] = process
        process.adopt_handle(child.id, handle.resource, 0, child_use, handle.token_id)
        if self.world.executor.service.scheduler is sched:  # else: restarted, and said nothing
            after = sched.credit(handle.token_id) + sched.credit(child.id)
            assert math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-6), "split moved credit"

    @rule(pick=PICK, to=PICK)
    def move(self, pick: int, to: int) -> None:
        """Pass the token to another process (pickling it moves it)."""
        found = self._handle(pick)
        receiver = self._process(to)
        if found is None or receiver is None:
            return
        sender, handle = found
        handle.live = False  # the sender's handle stops; its leases end at its next renewal
        # The pickled bytes carry the sender's proof, and those the handle came with.
        proof = claim_value(Claim(sender.claimant).key, handle.token_id, handle.generation)
        moved = receiver.adopt_handle(handle.token_id, handle.resource, handle.generation + 1,
                                      handle.expected_use, handle.parent,
                                      (proof, *handle.proofs))
        self.owner[moved.token_id] = receiver

    @rule(pick=PICK, other=PICK)
    def merge(self, pick: int, other: int) -> None:
        found, second = self._handle(pick), self._handle(other)
        if found is None or second is None:
            return
        (process, handle), (other_process, other_handle) = found, second
        if other_process is not process or other_handle is handle \
                or other_handle.resource != handle.resource or other_handle.leases.reserved:
            return
        # The other's last totals first (the client sends them with the merge, and the
        # executor applies them first): refunds and debt move its credit before it is added.
        self.world.send("settle", process.final_reports(other_handle), process.secret)
        sched = self.world.executor.service.scheduler
        before = sched.credit(handle.token_id) + sched.credit(other_handle.token_id)
        try:
            self.world.token_call("merge", handle.token_id, handle.generation,
                                  process.claim(handle, other_handle), other_handle.token_id,
                                  other_handle.generation, [])
        except QuotaError as exc:
            event(f"merge refused: {type(exc).__name__}")
            other_handle.live = True
            return
        self.expected_use[handle.token_id] += self.expected_use.pop(other_handle.token_id)
        self.owner.pop(other_handle.token_id)
        if self.world.executor.service.scheduler is not sched:
            return  # the executor restarted on the way: credit was restored as last saved
        assert math.isclose(sched.credit(handle.token_id), min(
            before, POLICY.credit_factor * self.expected_use[handle.token_id]),
            rel_tol=1e-6, abs_tol=1e-6), "merge lost or made credit"

    @rule(pick=PICK)
    def give_back_to_parent(self, pick: int) -> None:
        found = self._handle(pick)
        if found is None or found[1].parent is None:
            return
        process, handle = found
        reports = process.final_reports(handle)
        try:
            merged = self.world.token_call("merge_back", handle.token_id, handle.generation,
                                           process.claim(handle), handle.parent, reports,
                                           process.secret)
        except QuotaError as exc:
            event(f"merge_back refused: {type(exc).__name__}")
            return
        use = self.expected_use.pop(handle.token_id)
        self.owner.pop(handle.token_id)
        if merged:
            self.expected_use[handle.parent] += use

    @rule(pick=PICK)
    def close(self, pick: int) -> None:
        found = self._handle(pick)
        if found is None:
            return
        process, handle = found
        reports = process.final_reports(handle)
        self.world.token_call("close", handle.token_id, handle.generation, process.claim(handle),
                              reports, process.secret)
        self._ended(handle)

    # ------------------------------------------------------------------------- reservations

    @rule(pick=PICK, share=st.floats(0.01, 1.0))
    def reserve(self, pick: int, share: float) -> None:
        found = self._handle(pick)
        if found is None:
            return
        process, handle = found
        amount = max(1, round(SPECS[handle.resource].ceiling * share * 0.5))
        event(f"reserve: {process.reserve(handle, amount)}")

    @rule(pick=PICK, rounds=st.integers(1, 12), share=st.floats(0.01, 0.6),
          used=st.sampled_from(["none", "some", "all", "over"]))
    def work(self, pick: int, rounds: int, share: float, used: str) -> None:
        """A process busy for a while: reserve on each of its tokens, time passes, commit."""
        process = self._process(pick)
        if process is None:
            return
        for _ in range(rounds):
            for handle in [h for h in process.handles if h.live and self.owner.get(h.token_id)
                           is process]:
                amount = max(1, round(SPECS[handle.resource].ceiling * share))
                event(f"work: {process.reserve(handle, amount)}")
            self.world.advance(0.2)
            if process.dead or process.frozen:
                return
            while process.held:
                amount = process.held[0][0].amount
                process.commit(0, {"none": 0, "some": amount // 2, "all": amount,
                                   "over": amount + 3}[used])

    @rule(pick=PICK, used=st.sampled_from(["none", "some", "all", "over"]))
    def commit(self, pick: int, used: str) -> None:
        process = self._process(pick)
        if process is None or not process.held:
            return
        amount = process.held[pick % len(process.held)][0].amount
        units = {"none": 0, "some": amount // 3, "all": amount, "over": amount + 7}[used]
        process.commit(pick, units)

    # ------------------------------------------------------------------------- time, faults

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0, 7.0]))
    def advance(self, seconds: float) -> None:
        self.world.advance(seconds)
        self._forget_released()

    @precondition(_fault_due)
    @rule(pick=PICK, seconds=st.sampled_from([1.0, 5.0, 9.0]))
    def freeze(self, pick: int, seconds: float) -> None:
        """The process stops for a while (a long GC pause, a stalled node): no renewals."""
        process = self._process(pick)
        if process is not None:
            process.frozen_until = self.world.clock.now + seconds
            # Renewals come once a second: a freeze of two seconds less than a lease lives
            # may already let it expire.
            process.cut_off |= seconds + 2.0 >= POLICY.lease_ttl_s

    @precondition(lambda self: self._fault_due()
                  and sum(not p.dead for p in self.world.processes) > 1)
    @rule(pick=PICK)
    def kill(self, pick: int) -> None:
        """SIGKILL: the process reports nothing more; a new one takes its place."""
        process = self._process(pick)
        if process is None:
            return
        process.dead = True
        self.world.processes.append(Process(process.name + "'", self.world))

    @precondition(_fault_due)
    @rule()
    def restart_executor(self) -> None:
        self.world.executor.restart()

    @precondition(_fault_due)
    @rule()
    def fail_the_next_write(self) -> None:
        self.world.executor.store.fail_next = True

    def _forget_released(self) -> None:
        """Tokens of dead processes (and of processes cut off for longer than a lease lives,
        which look dead) are released by the executor after their leases expire."""
        sched = self.world.executor.service.scheduler
        for token_id, process in list(self.owner.items()):
            if (process.dead or process.cut_off) and sched.token_key(token_id) is None:
                del self.owner[token_id]
                del self.expected_use[token_id]

    # ---------------------------------------------------------------------------- fairness

    @precondition(lambda self: self.steps % 10 == 9)
    @rule(stream=st.sampled_from([0, 1, 3]), weights=st.sampled_from([[5, 10, 20], [7, 7]]))
    def backlogged_tokens_get_their_shares(self, stream: int, weights: list[int]) -> None:
        """Whatever came before: tokens kept backlogged on the rate resource share it by
        expected use (within 5 %), none waits beyond a bound set by its weight, and a stream
        of fresh one-shot tokens takes no more than its weight."""
        if sum(not p.dead and not p.frozen for p in self.world.processes) < 2:
            return
        one_shot = (stream, 2) if stream else None
        units, longest, served = backlog(self.world, RATE.name, weights, seconds=40.0,
                                         one_shot=one_shot)
        total_weight = sum(weights) + 2 * stream
        share = [u / sum(units) for u in units]
        fair = [w / sum(weights) for w in weights]
        assert all(abs(s - f) <= 0.05 * f for s, f in zip(share, fair)), (units, weights)
        for weight, waited in zip(weights, longest):
            bound = 2 * weight * (total_weight / weight) / RATE.refill_per_s + POLICY.lease_ttl_s
            assert waited <= bound, (weight, waited, bound)
        if stream:
            # The newcomers, entering at virtual time, take no more than their weight (within
            # 5 %), whatever tokens earlier steps left holding units or idle: those count as
            # active only until their credit is full (see test_system_fairness.py).
            mine = sum(units) / (sum(units) + 2 * served)
            fair_mine = sum(weights) / total_weight
            assert mine >= 0.95 * fair_mine, (units, served)

    # ---------------------------------------------------------------------------- promises

    @invariant()
    def count_steps(self) -> None:
        self.steps += 1

    @invariant()
    def rate_never_admits_beyond_burst_plus_refill(self) -> None:
        assert rate_excess(self.world.records, RATE) <= EPS

    @invariant()
    def capacity_never_exceeds_the_budget(self) -> None:
        records = self.world.records
        assert consumed(records, CAP.name) <= CAP.value + records.debt[CAP.name]

    @invariant()
    def slots_in_use_never_exceed_the_limit(self) -> None:
        assert slots_in_use(self.world) <= CONC.value

    @invariant()
    def expected_use_is_conserved(self) -> None:
        self._forget_released()
        totals: dict[str, int] = defaultdict(int)
        for (resource, _), (_, use) in \
                self.world.executor.service.scheduler.expected_use_by_label().items():
            totals[resource] += use
        ours: dict[str, int] = defaultdict(int)
        for token_id, use in self.expected_use.items():
            process = self.owner[token_id]
            ours[self._resource_of(token_id, process)] += use
        theirs = {k: v for k, v in totals.items() if v}
        sched = self.world.executor.service.scheduler
        gone = [(token_id, process.name, process.dead, process.frozen, process.cut_off)
                for token_id, process in self.owner.items() if sched.token_key(token_id) is None]
        assert theirs == {k: v for k, v in ours.items() if v}, (theirs, dict(ours), gone)

    def _resource_of(self, token_id: str, process: Process) -> str:
        return next(h.resource for h in process.handles if h.token_id == token_id)


MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


def test_the_system_keeps_every_promise_under_faults() -> None:
    run_state_machine_as_test(SystemMachine, settings=MACHINE_SETTINGS)


@pytest.mark.slow
def test_the_system_keeps_every_promise_under_faults_long() -> None:
    run_state_machine_as_test(SystemMachine, settings=settings(
        MACHINE_SETTINGS, max_examples=1000, stateful_step_count=80))
