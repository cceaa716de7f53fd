"""The scheduler's durable state: the rows a store writes, and which of them changed since the
last write (so that only those are written, before replies go out)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ray_quota._spec import ResourceSpec

LeaseKey = tuple[str, str]  # (token id, lease key): how the scheduler and the store address a lease


@dataclass(frozen=True, slots=True)
class SavedResource:
    """A resource's durable state: its definition, pool level and virtual time."""

    spec: ResourceSpec
    pool: float
    vtime: float


@dataclass(frozen=True, slots=True)
class SavedToken:
    id: str
    resource: str
    expected_use: int
    pass_: float
    generation: int
    claimant: str | None
    label: str | None
    parent: str | None = None  # the token it was split from


@dataclass(frozen=True, slots=True)
class SavedLease:
    token_id: str
    key: str
    resource: str
    units: int
    returned: int
    used: int
    debt: int
    # Units adoption moved out of a broker's lease that the broker still counts (see
    # ``Lease.absorb_moved``): forgetting them at a restart would free them twice.
    moved_out: int = 0


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the last drain: rows to write and keys to delete."""

    resources: list[SavedResource]
    tokens: list[SavedToken]
    closed_tokens: list[str]
    leases: list[SavedLease]
    dropped_leases: list[LeaseKey]
    # Lease keys that ended, with the debt applied by then: never to be used again, so a
    # restarted executor must know them too.
    ended: list[tuple[str, str, int]] = field(default_factory=list)
    # Ended keys no longer remembered one by one (see ray_quota._core.ended): to delete.
    forgotten: list[LeaseKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.resources or self.tokens or self.closed_tokens or self.leases
                    or self.dropped_leases or self.ended or self.forgotten)


class ChangeLog:
    """The keys of resources, tokens and leases changed since the last :meth:`drain`.

    Callers add a key whenever they change what its row holds; the drain reads the rows as they
    are then, so a key added twice is written once.

    Example:
        >>> log = ChangeLog()
        >>> log.tokens.add("t1")
        >>> changes = log.drain(lambda name: None, lambda token_id: None, lambda key: None)
        >>> changes.closed_tokens, bool(log.drain(*[lambda _: None] * 3))
        (['t1'], False)
    """

    __slots__ = ("ended", "forgotten", "leases", "resources", "tokens")

    def __init__(self, resources: Iterable[str] = ()) -> None:
        self.resources: set[str] = set(resources)
        self.tokens: set[str] = set()
        self.leases: set[LeaseKey] = set()
        self.ended: dict[LeaseKey, int] = {}  # -> debt applied by the end
        self.forgotten: set[LeaseKey] = set()  # ended keys dropped from memory

    def drain(
        self,
        resource_row: Callable[[str], SavedResource | None],
        token_row: Callable[[str], SavedToken | None],
        lease_row: Callable[[LeaseKey], SavedLease | None],
    ) -> Changes:
        """The changes as rows, forgotten once returned.

        Each ``*_row`` gives the current row of a key, or None when it is gone: a token that is
        gone was closed and a lease that is gone was dropped (both to delete); a resource that
        is gone is skipped.
        """
        resources = [row for name in self.resources if (row := resource_row(name)) is not None]
        tokens, closed = [], []
        for token_id in self.tokens:
            token = token_row(token_id)
            if token is None:
                closed.append(token_id)
            else:
                tokens.append(token)
        leases, dropped = [], []
        for key in self.leases:
            lease = lease_row(key)
            if lease is None:
                dropped.append(key)
            else:
                leases.append(lease)
        ended = [(token_id, key, debt) for (token_id, key), debt in self.ended.items()]
        forgotten = list(self.forgotten)
        self.resources.clear()
        self.tokens.clear()
        self.leases.clear()
        self.ended.clear()
        self.forgotten.clear()
        return Changes(resources, tokens, closed, leases, dropped, ended, forgotten)
