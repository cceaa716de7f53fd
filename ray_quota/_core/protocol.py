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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ray_quota._errors import InvalidAmountError, ProtocolError
from ray_quota._spec import MAX_UNITS, ResourceSpec, check_name, check_seconds, check_units

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
# How long a request of a reject (or terminate) resource with no wait limit of its own may wait
# for spare units that other holders' leases may hold (prefetched, or just freed and not yet
# reported) while the executor recalls them. A watching holder answers a recall with two actor
# calls (its open watch returns, it settles): a few ms; through a node's broker, four calls. Half a
# renewal interval leaves room for a loaded node. A holder that has not answered by then is not watching
# (frozen, or between executors) and gives spare back only when it renews, up to RENEW_INTERVAL_S
# later: waiting for that would make every refusal of a full pool cost a renewal interval.
RECALL_GRACE_S = 0.5
# The longest id a message may carry (token id, lease key, holder, claimant): ours are under 64
# characters; a longer one is garbage that would only take memory and disk.
MAX_ID = 256
# The largest generation: how many times a token moved, stored as SQLite's 64-bit integer.
MAX_GENERATION = MAX_UNITS
# The most a holder may hold beyond what it asked for, as a share of the resource's ceiling: the
# spare a process (or broker) may lose with its death is at most this.
PREFETCH_FRACTION = 0.05
# How long the executor remembers a holder's highest lease key of a token once the holder holds
# no lease of it (keys below it never start a lease again; see ray_quota._core.ended). Forgotten
# after that, an old key could start a lease afresh only from a process that stayed frozen for
# all of this time and then woke up under it: a day is far beyond what Ray waits before it
# declares a silent worker dead.
HOLDER_MEMORY_S = 86_400.0


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
    # When a broker re-leased the units: the adoption secret of its lease, with which its
    # processes take their share over if it dies (never the broker's lease key).
    via: str | None = None
    # How long the request waited before the grant, on the granting side's clock: the lease was
    # renewed that much after the request was sent, so its holder may trust it that much longer.
    waited_s: float = 0.0
    # The resource of the token, as the executor knows it: a broker leases the token by this
    # resource's kind, never by the one a caller names.
    resource: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderSignal:
    """What the provider behind a resource said about one reservation's request (DESIGN 8).

    ``refused``: it refused (HTTP 429), and may say when to try again (``retry_after_s``).
    ``remaining``: the units it says are left in its window, which resets in ``reset_s``.
    """

    refused: bool = False
    retry_after_s: float | None = None
    remaining: int | None = None
    reset_s: float | None = None


MAX_HOLD_S = 86400.0  # the longest a provider's retry-after or reset is believed


def check_signal(value: object) -> ProviderSignal:
    """A :class:`ProviderSignal` whose fields are what it says: a bool, seconds from 0 (or
    None), whole units from 0 (or None); and it says something (a refusal or what remains).

    Raises:
        ProtocolError: not a ProviderSignal, or ``refused`` not a bool.
        InvalidAmountError: a value out of range, or nothing said.
    """
    if type(value) is not ProviderSignal:
        raise ProtocolError(f"signal must be a ProviderSignal, not {type(value).__name__}")
    if not isinstance(value.refused, bool):
        raise ProtocolError(f"signal.refused must be a bool, not {type(value.refused).__name__}")
    if value.remaining is not None and type(value.remaining) is not int:  # (no subclass)
        raise ProtocolError(f"signal.remaining must be an int, not "
                            f"{type(value.remaining).__name__}")
    waits = {}
    for what in ("retry_after_s", "reset_s"):
        if (given := getattr(value, what)) is not None:
            # Every field checked here, before anything moves (the controller's own checks
            # came after the refusal had cut the limit).
            seconds = check_seconds(what, given)
            if seconds > MAX_HOLD_S:
                raise InvalidAmountError(f"{what} must be at most {MAX_HOLD_S:g} seconds, "
                                         f"not {seconds}")
            waits[what] = seconds
    if value.remaining is not None:
        check_units("remaining", value.remaining, allow_zero=True)
    elif not value.refused:
        raise InvalidAmountError("a provider signal says it refused, or what remains, or both")
    # Rebuilt from plain values: nothing of the caller's objects reaches the controller.
    return ProviderSignal(value.refused, waits.get("retry_after_s"), value.remaining,
                          waits.get("reset_s"))


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

    @classmethod
    def checked(cls, value: object, what: str = "report") -> Report:
        """``value`` as a Report, if it is one: ids are strings, totals whole numbers from 0,
        ``final`` a bool.

        Raises:
            ProtocolError: not a six-field report, or a field of the wrong type.
            InvalidAmountError: a total that is not a whole number from 0.
        """
        fields = _fields(cls, value, what)
        token_id, key, returned, used, debt, final = fields
        check_id(f"{what}.token_id", token_id)
        check_id(f"{what}.key", key)
        for name, total in (("returned", returned), ("used", used), ("debt", debt)):
            check_units(f"{what}.{name}", total, allow_zero=True)
        if not isinstance(final, bool):
            raise ProtocolError(f"{what}.final must be a bool, not {type(final).__name__}")
        return cls(*fields)  # always our own type: a subclass could answer fields otherwise


class LeaseAnswer(NamedTuple):
    """A renewal's answer for one live lease."""

    contended: bool  # others wait for the resource: give spare back, serve nothing locally
    ttl_s: float  # how long from the renewal's sending the lease may be trusted


# The answer to a renewal: per live lease (token id, key). A lease missing from it has ended.
Renewed = dict[tuple[str, str], LeaseAnswer]

# ------------------------------------------------------------------------- naming idle tokens
# A token that holds no lease is kept by the executor only while some renewal *names* it (see
# ray_quota._core.tokens): a holder names each token it holds idle, and each it sent away
# (pickled) that nobody has taken up yet, with an all-zero report under a *name key* instead of
# a lease key. Name keys never hold a lease: ``holder:named`` keeps the token while it lives;
# ``holder:sent.<g>`` keeps it only until it is taken up at generation ``g`` (the one its bytes
# carry), after which its receiver names it. The answer keeps a name (:data:`NAMED`) while it
# still keeps the token; a name missing from it may stop.
NAMED_SUFFIX = "named"
SENT_PREFIX = "sent."
NAMED = LeaseAnswer(contended=False, ttl_s=0.0)  # a name answered: no lease, nothing to trust


def name_key(holder: str, sent: int | None = None) -> str:
    """The key under which ``holder`` names a token it holds idle, or (``sent``) one it sent
    away at the generation ``sent`` and that is not taken up yet."""
    return f"{holder}:{NAMED_SUFFIX if sent is None else f'{SENT_PREFIX}{sent}'}"


def read_name(report: Report) -> tuple[bool, int | None]:
    """Whether ``report`` is a name (all zeros, not final, under a name key), and the
    generation a sent token's name waits for (None: an idle token's)."""
    if report.returned or report.used or report.debt or report.final:
        return False, None
    tail = report.key.rpartition(":")[2]
    if tail == NAMED_SUFFIX:
        return True, None
    digits = tail.removeprefix(SENT_PREFIX)
    if tail.startswith(SENT_PREFIX) and 0 < len(digits) <= 18 and digits.isascii() \
            and digits.isdigit():
        return True, int(digits)
    return False, None


class Adoption(NamedTuple):
    """A process taking over, directly from the executor, its share of a failed broker's lease."""

    token_id: str
    via: str  # the adoption secret of the broker's lease (never the broker's lease key)
    to_key: str  # the process's own lease key, which becomes a lease at the executor
    units: int  # units the process holds (spare and in open reservations)
    returned: int
    used: int
    debt: int

    @classmethod
    def checked(cls, value: object, what: str = "adoption") -> Adoption:
        """``value`` as an Adoption, if it is one: ids are strings, units and totals whole
        numbers from 0.

        Raises:
            ProtocolError: not a seven-field adoption, or a field of the wrong type.
            InvalidAmountError: units or a total that is not a whole number from 0.
        """
        fields = _fields(cls, value, what)
        token_id, via, to_key, *amounts = fields
        for name, text in (("token_id", token_id), ("via", via), ("to_key", to_key)):
            check_id(f"{what}.{name}", text)
        for name, amount in zip(("units", "returned", "used", "debt"), amounts):
            check_units(f"{what}.{name}", amount, allow_zero=True)
        return cls(*fields)  # always our own type: a subclass could answer fields otherwise


# ------------------------------------------------------------------ checks at the receiving edge
# The executor runs them on every message before it changes anything: each raises a QuotaError
# naming the field (ProtocolError for a wrong type or shape, InvalidAmountError for a number).


def check_id(what: str, value: object) -> str:
    """A token id, lease key, holder id, claimant or resource name: a string of at most
    :data:`MAX_ID` characters."""
    if type(value) is not str:  # a subclass could compare, hash or split as another id
        raise ProtocolError(f"{what} must be a str, not {type(value).__name__}")
    if len(value) > MAX_ID:
        raise ProtocolError(f"{what} must be at most {MAX_ID} characters long, not {len(value)}")
    return value


def check_label(value: object) -> str | None:
    """A token's label: None, or a name as long as a resource's may be (it becomes a metric
    label value)."""
    return None if value is None else check_name("label", value)


def check_generation(value: object) -> int:
    """How many times a token moved: a whole number from 0 to :data:`MAX_GENERATION` (a wrong
    one is the executor's to refuse)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"generation must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_GENERATION:
        raise InvalidAmountError(f"generation must be from 0 to {MAX_GENERATION}, not {value}")
    return value


def check_timeout(what: str, value: object) -> float | None:
    """None (wait as the resource says) or a finite number of seconds from 0 (0: do not wait).

    One rule for the client, which checks before it sends, and the executor and brokers, which
    check what they receive."""
    return None if value is None else check_seconds(what, value)


def check_token_call(token_id: object, generation: object, claimant: object) -> None:
    """The three fields every token call starts with."""
    check_id("token_id", token_id)
    check_generation(generation)
    check_id("claimant", claimant)


def check_acquire(token_id: object, generation: object, claimant: object, key: object,
                  amount: object, prefetch: object, timeout: object) -> float | None:
    """An acquire's fields, at the executor or a broker; returns the timeout as checked."""
    check_token_call(token_id, generation, claimant)
    check_id("key", key)
    check_units("amount", amount)
    check_units("prefetch", prefetch, allow_zero=True)
    return check_timeout("timeout", timeout)


def check_reports(value: object) -> list[Report]:
    """A list (or tuple) of :class:`Report`, each checked."""
    return [Report.checked(item, f"reports[{i}]") for i, item in enumerate(_items(value,
                                                                                  "reports"))]


def check_adoptions(value: object) -> list[Adoption]:
    """A list (or tuple) of :class:`Adoption`, each checked."""
    return [Adoption.checked(item, f"entries[{i}]")
            for i, item in enumerate(_items(value, "entries"))]


def _items(value: object, what: str) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{what} must be a list, not {type(value).__name__}")
    return value


def _fields(cls: type[tuple[Any, ...]], value: object, what: str) -> tuple[Any, ...]:
    fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
    # The tuple's own items, read past any override a subclass may have.
    plain = tuple(tuple.__iter__(value)) if isinstance(value, tuple) else None
    if plain is None or len(plain) != len(fields):
        raise ProtocolError(f"{what} must be a {cls.__name__} ({', '.join(fields)}), "
                            f"not {type(value).__name__}")
    return plain
