"""One run's parameters (cluster, workload, costs) and what it records."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from bench.scale_model.sim import Window
from ray_quota._spec import Enforcement, Kind, ResourceSpec

RESOURCE = "llm-tokens"


@dataclass(frozen=True, slots=True)
class Params:
    """One run's cluster, workload and costs.

    The limit is set from the workload: ``overload`` is the nominal demand (every process
    reserving back to back, ``mean amount / mean think`` units per second) over the limit, so
    4.0 means four times more is asked for than the limit allows.
    """

    nodes: int = 100
    procs: int = 64  # per node
    seconds: float = 60.0  # measured, after the warm-up
    warmup_s: float = 15.0
    ramp_s: float = 10.0  # processes start at random times over this first stretch
    drain_s: float = 20.0  # at most, after the measured window: tasks end, tokens close
    overload: float = 4.0
    seed: int = 1
    weights: tuple[int, ...] = (1, 2, 4)  # per tenant; processes are dealt to tenants in turn
    weight_unit: int = 1000  # a task token's expected use per unit of tenant weight
    amount: tuple[int, int] = (200, 2000)  # units per reservation (LLM tokens)
    think_s: tuple[float, float] = (0.5, 3.0)  # the LLM call a reservation covers
    used_fraction: tuple[float, float] = (0.8, 1.0)  # of the reservation, really used
    reservations_per_task: tuple[int, int] = (3, 8)
    burst_s: float = 2.0  # the bucket holds this many seconds of refill
    executor_call_s: float = 0.3e-3  # per call, on top of the measured core time
    broker_call_s: float = 0.2e-3
    reply_s: float = 0.1e-3  # answering a parked call, or handling an answer it waited for
    tick_s: float = 0.05e-3  # one turn of the executor's ticker loop
    node_hop_s: float = 0.1e-3  # process -> broker, one way
    cluster_hop_s: float = 0.5e-3  # anything -> executor, one way
    core_time_s: float | None = None  # a fixed core time per call instead of the measured one
    batch_renewals: bool = True  # False: brokers renew upstream on every process renewal
    verbose: bool = False  # progress on stderr every 10 simulated seconds

    @property
    def processes(self) -> int:
        return self.nodes * self.procs

    @property
    def demand_per_s(self) -> float:
        """Units per second all processes would reserve if nothing ever made them wait."""
        mean_amount = sum(self.amount) / 2
        mean_think = sum(self.think_s) / 2
        return self.processes * mean_amount / mean_think

    def spec(self) -> ResourceSpec:
        """The rate resource: a tokens-per-minute limit, ``burst_s`` seconds of refill."""
        per_minute = max(60, round(self.demand_per_s * 60 / self.overload, -3))
        burst = max(self.amount[1], int(per_minute / 60 * self.burst_s))
        return ResourceSpec(RESOURCE, Kind.RATE, value=int(per_minute), period_s=60.0,
                            burst=burst, enforcement=Enforcement.THROTTLE, unit="token")


def quick(params: Params) -> Params:
    """The small model the tests run: 4 nodes x 8 processes, 150 measured seconds.

    Shorter windows measure luck, not fairness: under contention a weight-1 process is
    granted a reservation only every ~16 s, so 20 s would hold about one per process and the
    tenants' shares would be off by 20-35% whatever the scheduler did (seeds 2-6).
    """
    return replace(params, nodes=4, procs=8, seconds=150.0, warmup_s=10.0, ramp_s=2.0,
                   drain_s=45.0)


# ------------------------------------------------------------------------------ statistics


@dataclass(slots=True)
class Stats:
    """What one run records: calls, reservations, and samples for the safety checks."""

    window: Window
    calls: Counter[str] = field(default_factory=Counter)  # executor calls in the window
    broker_calls: Counter[str] = field(default_factory=Counter)
    ticks: int = 0
    # One row per reservation: tenant, asked at, admitted at, amount, used, path.
    tenant: list[int] = field(default_factory=list)
    asked: list[float] = field(default_factory=list)
    admitted: list[float] = field(default_factory=list)
    amount: list[int] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    path: list[int] = field(default_factory=list)  # LOCAL, NODE or EXECUTOR
    net_out: list[tuple[float, float]] = field(default_factory=list)  # (time, units out)
    waiters: list[int] = field(default_factory=list)  # requests queued at the core, sampled
    held_over_leased: int = 0  # samples where holders held more than the executor leased
    tasks: int = 0
    lease_restarts: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # calls answered with an error

    def executor_call(self, method: str, now: float) -> None:
        if self.window.holds(now):
            self.calls[method] += 1

    def broker_call(self, method: str, now: float) -> None:
        if self.window.holds(now):
            self.broker_calls[method] += 1

    def reservation(self, tenant: int, asked: float, admitted: float, amount: int,
                    path: int) -> int:
        self.tenant.append(tenant)
        self.asked.append(asked)
        self.admitted.append(admitted)
        self.amount.append(amount)
        self.used.append(-1)  # until committed
        self.path.append(path)
        return len(self.used) - 1


LOCAL, NODE, EXECUTOR = 0, 1, 2  # where a reservation was served: process, broker, executor
PATHS = ("local", "node", "executor")
