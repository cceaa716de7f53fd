"""The messages between processes, node brokers and the executor, and the timing they share.

Every value that crosses a process boundary between the parts of ray_quota is defined here, once,
as a typed immutable value; the sending side builds it and the receiving side checks it (the
executor is a trust boundary: see :mod:`ray_quota._core.service`). Nothing here imports Ray.

The lease protocol in one paragraph: a *holder* (a process, or a node's broker) holds units of a
token under a *lease key* (``holder:n``, never reused). It serves reservations from those units
without asking, and reports *running totals* for the lease (:class:`Report`): units given back,
units used, and debt (use beyond any grant). Totals, never increments, so a report that arrives
twice, late or out of order changes nothing the first did. Each renewal answers, per live lease,
whether others wait and how long the lease may be trusted (:class:`LeaseAnswer`). A lease missing
from the answer has ended; its holder starts a new one under a new key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ray_quota._spec import ResourceSpec

# Where every process finds the executor: one named, detached actor per cluster.
NAMESPACE = "ray_quota"
EXECUTOR_NAME = "ray_quota_executor"

# How often a process (or broker) renews its leases and reports its observations.
RENEW_INTERVAL_S = 1.0
# How long one recall watch stays open. Short, because Ray lets an actor that ends normally finish
# its calls in flight first, and kills it (no last flush) if that takes over ~5 s.
WATCH_TIMEOUT_S = 2.0
# How often the executor looks for expired leases when nothing is due sooner.
IDLE_TICK_S = 0.5
# A lease is trusted locally for this share of its time-to-live, measured from when the request
# that granted or renewed it was *sent*, so the holder always stops before the executor expires it.
TRUST = 0.8
# The most a holder may hold beyond what it asked for, as a share of the resource's ceiling: the
# spare a process (or broker) may lose with its death is at most this.
PREFETCH_FRACTION = 0.05


def prefetch_cap(spec: ResourceSpec) -> int:
    """The most units a holder may ask for beyond a request (none for concurrency slots)."""
    from ray_quota._spec import Kind

    if spec.kind is Kind.CONCURRENCY:
        return 0
    return max(1, int(spec.ceiling * PREFETCH_FRACTION))


def holder_of(key: str) -> str:
    """The holder (a process, or a broker) whose lease key this is: keys are ``holder:n``."""
    return key.rpartition(":")[0] or key


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """Who the running executor is and what it enforces."""

    cluster_id: str
    environment: str
    resources: dict[str, ResourceSpec]
    lease_ttl_s: float
    metrics_address: str | None = None  # host:port of the metrics endpoint, if it serves one
    brokers: bool = False  # processes lease through their node's broker


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What a client learns when it opens or splits a token."""

    id: str
    spec: ResourceSpec
    generation: int


@dataclass(frozen=True, slots=True)
class Grant:
    """Units granted into a holder's lease: the amount asked for plus any prefetch."""

    units: int
    ttl_s: float
    contended: bool  # others were still waiting: give spare units back soon
    via: str | None = None  # a broker's own lease key, when the units were re-leased by a broker
    # How long the request waited before the grant, on the granting side's clock: the lease was
    # renewed that much after the request was sent, so its holder may trust it that much longer.
    waited_s: float = 0.0


class Report(NamedTuple):
    """A lease's running totals, as its holder reports them.

    ``final`` says the holder will never use the lease again: the executor ends it, and gives
    back whatever the holder still holds by the executor's count.
    """

    token_id: str
    key: str  # the holder's lease key
    returned: int  # unused units given back to the pool
    used: int  # units consumed from the lease
    debt: int  # units consumed beyond any grant
    final: bool


class LeaseAnswer(NamedTuple):
    """A renewal's answer for one live lease."""

    contended: bool  # others wait for the resource: give spare back, serve nothing locally
    ttl_s: float  # how long from the renewal's sending the lease may be trusted


# The answer to a renewal: per live lease (token id, key). A lease missing from it has ended.
Renewed = dict[tuple[str, str], LeaseAnswer]


class Adoption(NamedTuple):
    """A process taking over, directly from the executor, its share of a failed broker's lease."""

    token_id: str
    from_key: str  # the broker's lease key
    to_key: str  # the process's own lease key, which becomes a lease at the executor
    units: int  # units the process holds (spare and in open reservations)
    returned: int
    used: int
    debt: int
