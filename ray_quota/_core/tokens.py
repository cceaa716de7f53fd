"""The token registry: live tokens by id, who may use each, and the ids of closed ones.

A token is used by one process at a time. Passing it to another process raises its generation;
the first use at the new generation takes it up with the proof that the pickled bytes carried (see
:mod:`~ray_quota._core.credentials`): the claim changes, and from then on the old owner is
refused. A generation alone takes nothing up.

A token with no lease and no waiter is held by nobody the executor knows of: its process may hold
it idle, or have sent it to a task that has not started, or be gone without a word (its last lease
expired, or it never asked for units). The registry keeps such *orphans* while renewals name them
(see :func:`~ray_quota._core.protocol.name_key`): a live process names every token it holds idle
and every token it sent that was not taken up yet. One that nothing named (no call, report or
name) for a whole grace is released, a split child's share going back to its parent.

A token closed by the process that took it up after a move (the task it was passed to dropped
or closed it) may be *revived* by a Ray retry of that task: the retry brings the same bytes, so
the same proof, at the same generation. Its expected use was not given to anyone when it closed
(a close only takes weight out), so taking it back in creates nothing; debt it carried stays.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from ray_quota._core.credentials import Claim
from ray_quota._core.fair_queue import Flow
from ray_quota._core.ledger import TOMBSTONES
from ray_quota._core.state import ChangeLog, SavedToken
from ray_quota._errors import (
    AccessDeniedError,
    ForgedTokenError,
    IncompatibleTokensError,
    TokenClosedError,
    TokenMovedError,
)


# The waiters of every closed token kept for a revival (never added to: it is in no queue).
_NO_WAITERS: deque = deque(maxlen=0)


@dataclass(slots=True, eq=False, kw_only=True)
class Token(Flow):
    """A token: its place in its resource's queue, and who owns it: the digest of its owner's
    claim (None: anyone), and of the proof and ``who`` that last took it up (for retries)."""

    id: str
    resource: str
    claimant: str | None
    label: str | None
    generation: int = 0
    taken_with: str | None = None
    # The token it was split from: the only one a merge back may add it to, and the one its
    # share goes back to if it is released as an orphan. Stored, so both survive a restart.
    parent: str | None = None

    def saved(self) -> SavedToken:
        # Both digests in the one claimant column: "claim" or "claim took-up".
        claim = self.claimant if self.taken_with is None or self.claimant is None \
            else f"{self.claimant} {self.taken_with}"
        return SavedToken(self.id, self.resource, self.expected_use, self.pass_, self.generation,
                          claim, self.label, self.parent)

    @classmethod
    def from_saved(cls, saved: SavedToken) -> Token:
        claimant, _, taken_with = (saved.claimant or "").partition(" ")
        return cls(id=saved.id, resource=saved.resource, expected_use=saved.expected_use,
                   pass_=saved.pass_, claimant=claimant or None, label=saved.label,
                   generation=saved.generation, taken_with=taken_with or None,
                   parent=saved.parent)


class TokenRegistry(Mapping[str, Token]):
    """Live tokens by id; closed ids (so late use says "closed", not "forged"); orphans.

    Example:
        >>> from ray_quota._core.credentials import claim_value, make_claim
        >>> tokens = TokenRegistry(new_id=iter(["t1", "t2"]).__next__, grace_s=10.0)
        >>> token = tokens.open("tok", 5, pass_=0.0, claimant="task:1#k1", label=None)
        >>> proof = claim_value("k1", "t1", 0)      # what the pickled bytes carry
        >>> tokens.live("t1", 1, make_claim("task:2", "k2", [proof])) is token  # taken up
        True
        >>> tokens.live("t1", 2, "task:3#k3")       # a generation alone takes nothing up
        Traceback (most recent call last):
        ...
        ray_quota._errors.AccessDeniedError: taking up a moved token needs its bytes' proof
        >>> tokens.close(token); "t1" in tokens
        False
    """

    __slots__ = ("_changes", "_children", "_closed", "_grace_s", "_new_id", "_on_revive",
                 "_orphans", "_seen", "_tokens")

    def __init__(self, new_id: Callable[[], str], changes: ChangeLog | None = None, *,
                 grace_s: float, on_revive: Callable[[Token], None] = lambda _: None) -> None:
        self._tokens: dict[str, Token] = {}
        # Closed ids; for a token a retry may revive, what it was when it closed.
        self._closed: OrderedDict[str, Token | None] = OrderedDict()
        # Orphan id -> when to release it, in about that order (the grace is the same for all;
        # one named since it became an orphan is queued again at its last name's grace, a little
        # late if that was before orphans queued after it); and when each orphan was last named.
        self._orphans: OrderedDict[str, float] = OrderedDict()
        self._seen: dict[str, float] = {}
        self._children: dict[str, set[str]] = {}  # parent id -> its live children's ids
        self._grace_s = grace_s
        self._new_id = new_id
        self._changes = changes if changes is not None else ChangeLog()
        self._on_revive = on_revive

    def __getitem__(self, token_id: str) -> Token:
        return self._tokens[token_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def open(self, resource: str, expected_use: int, *, pass_: float, claimant: str | None,
             label: str | None, parent: str | None = None) -> Token:
        """A new token under a fresh id, owned by the claim ``claimant`` (None: anyone);
        ``parent`` is the token it was split from."""
        token_id = self._new_id()
        token = Token(id=token_id, resource=resource, expected_use=expected_use, pass_=pass_,
                      claimant=None if claimant is None else Claim(claimant).value(token_id, 0),
                      label=label, parent=parent)
        self.add(token)
        return token

    def add(self, token: Token) -> None:
        self._tokens[token.id] = token
        self._changes.tokens.add(token.id)
        if token.parent is not None:
            self._children.setdefault(token.parent, set()).add(token.id)

    def hand_children(self, from_id: str, to_id: str) -> None:
        """``from_id`` was absorbed into ``to_id``: its live children's share goes back there
        now, or a chain of splits would lose the grandchildren's share once the middle link is
        released."""
        children = self._children.pop(from_id, set())
        for child_id in children:
            self._tokens[child_id].parent = to_id
            self._changes.tokens.add(child_id)
        if children:
            self._children.setdefault(to_id, set()).update(children)

    def live(self, token_id: str, generation: int, claimant: str | None) -> Token:
        """The token, if the claim ``claimant`` at ``generation`` may use it; taken up on
        first use after a move, with a proof from the pickled bytes.

        Raises:
            TokenClosedError, ForgedTokenError: no such live token.
            TokenMovedError: the token belongs to another process now.
            AccessDeniedError: a higher generation without the proof that takes it up.
        """
        token, taken = self._checked(token_id, generation, claimant)
        if token.id not in self._tokens:
            token = self._revive(token)
        if taken is not None:
            token.generation, token.claimant, token.taken_with = taken
            self._changes.tokens.add(token.id)
        return token

    def check(self, token_id: str, generation: int, claimant: str | None) -> Token:
        """The token, if ``claimant`` at ``generation`` may use it, changing nothing: a call
        that may still be refused checks first, and takes the token up with :meth:`live`
        once it goes ahead (a refused call must not have moved the token).

        Raises:
            As :meth:`live`.
        """
        return self._checked(token_id, generation, claimant)[0]

    def _checked(self, token_id: str, generation: int, claimant: str | None
                 ) -> tuple[Token, tuple[int, str | None, str | None] | None]:
        """The token, and what taking it up would set (generation, claim digest, proof
        digest), or None when the claim uses it as it is."""
        token = self._tokens.get(token_id)
        if token is None:
            if token_id not in self._closed:
                raise ForgedTokenError("this executor never issued that token")
            closed = self._closed[token_id]
            if closed is None or generation != closed.generation or not self._took_up(
                    closed, Claim(claimant or "")):
                raise TokenClosedError("the token was closed or merged into another")
            # A Ray retry of the task that took it up and closed it, with the same bytes.
            return closed, (generation, Claim(claimant or "").value(token_id, generation),
                            closed.taken_with)
        if generation < token.generation:
            raise TokenMovedError("the token was passed to another process, which owns it now")
        if token.claimant is None:  # opened for anyone: a move only raises the generation
            moved = generation > token.generation
            return token, (generation, None, token.taken_with) if moved else None
        claim = Claim(claimant or "")
        taken_with = token.taken_with
        if generation == token.generation:
            if claim.value(token_id, generation) == token.claimant:
                return token, None
            # A Ray retry of the task that took the token up, with the same bytes: again.
            if not self._took_up(token, claim):
                raise TokenMovedError("the token was already taken up by another process")
        else:
            # First use after a move: whoever has the pickled bytes has the proof.
            proof = claim.proof_for(token.claimant)
            if proof is None:
                # The generation alone is not enough: anyone may know it, and the id.
                raise AccessDeniedError("taking up a moved token needs its bytes' proof")
            taken_with = claim.took_up(proof)
        return token, (generation, claim.value(token_id, generation), taken_with)

    @staticmethod
    def _took_up(token: Token, claim: Claim) -> bool:
        """Whether ``claim`` carries the proof that last took ``token`` up (a retry's bytes)."""
        return token.taken_with is not None and any(
            claim.took_up(proof) == token.taken_with for proof in claim.proofs)

    def close(self, token: Token, *, revivable: bool = False) -> bool:
        """Remove the token and remember its id as closed; ``revivable``: a retry of the task
        that took it up may take it up again (see the module's docstring), if it was taken up
        after a move. Returns whether it may."""
        del self._tokens[token.id]
        if token.parent is not None and (siblings := self._children.get(token.parent)):
            siblings.discard(token.id)
            if not siblings:
                del self._children[token.parent]
        self._orphans.pop(token.id, None)
        self._seen.pop(token.id, None)
        self._changes.tokens.add(token.id)
        revivable = revivable and token.claimant is not None and token.taken_with is not None
        self._closed[token.id] = replace(token, waiters=_NO_WAITERS, stamp=0) if revivable \
            else None
        if len(self._closed) > TOMBSTONES:
            self._closed.popitem(last=False)
        return revivable

    def _revive(self, closed: Token) -> Token:
        """Take a closed token back in, as it was (a retry proved it may; see :meth:`_checked`)."""
        del self._closed[closed.id]
        token = closed  # the object :meth:`check` handed out: the caller may go on with it
        token.waiters = deque()
        if token.parent not in self._tokens:
            token.parent = None
        self.add(token)
        self._on_revive(token)
        return token

    def orphaned(self, token_id: str, now: float) -> None:
        """The token holds nothing now (no lease, no waiter): release it after a grace unless
        it is named meanwhile."""
        self._queue(token_id, now + self._grace_s)

    def seen(self, token_id: str, now: float) -> None:
        """A renewal named the token at ``now``: if it is an orphan, someone keeps it."""
        if token_id in self._orphans:
            self._seen[token_id] = now

    def _queue(self, token_id: str, release_at: float) -> None:
        self._orphans[token_id] = release_at
        self._orphans.move_to_end(token_id)
        self._seen.pop(token_id, None)

    def orphans_due(self, now: float) -> list[Token]:
        """Orphans nothing named for their whole grace, each forgotten as an orphan; the caller
        releases those still without lease or waiter. Those named meanwhile get another grace."""
        due, orphans = [], self._orphans
        for _ in range(len(orphans)):  # each at most once, though some come back at the end
            token_id, release_at = next(iter(orphans.items()))
            if release_at > now:
                break
            if token_id in self._seen:
                self._queue(token_id, self._seen[token_id] + self._grace_s)
            else:
                del orphans[token_id]
                due.append(self._tokens[token_id])
        return due

    @property
    def has_orphans(self) -> bool:
        return bool(self._orphans)

    def expected_use_by_label(self) -> dict[tuple[str, str | None], tuple[int, int]]:
        """Live tokens and their total expected use, per resource and label (for metrics)."""
        totals: dict[tuple[str, str | None], tuple[int, int]] = {}
        for token in self._tokens.values():
            count, use = totals.get((token.resource, token.label), (0, 0))
            totals[(token.resource, token.label)] = (count + 1, use + token.expected_use)
        return totals



def check_parent(tokens: Mapping[str, Token], child_id: str, parent_id: str) -> None:
    """Refuse to merge the child ``child_id`` back into a token it was not split from.

    The merge goes to the child's parent as the executor knows it: the token it was split from,
    or the token that absorbed that one since (see :meth:`TokenRegistry.hand_children`), so a
    caller may name the token it split from although that is gone.

    Raises:
        IncompatibleTokensError: ``parent_id`` names another live token than the child's
            parent. (A child whose parent is gone is merged nowhere: the caller closes it.)
    """
    child = tokens.get(child_id)
    if child is not None and child.parent not in (None, parent_id) and parent_id in tokens:
        raise IncompatibleTokensError("a token merges back only into the token it was split "
                                      "from")
