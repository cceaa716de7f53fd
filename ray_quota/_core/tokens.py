"""The token registry: live tokens by id, who may use each, and the ids of closed ones.

A token is used by one process at a time. Passing it to another process raises its generation;
the first use at the new generation takes it up with the proof that the pickled bytes carried (see
:mod:`~ray_quota._core.credentials`): the claim changes, and from then on the old owner is
refused. A generation alone takes nothing up. Tokens whose every lease expired belong to processes
presumed gone: the registry keeps them as orphans for a grace period, in which a Ray retry of
their task may take them up.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

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
    # The token it was split from: the only one a merge back may add it to. Not stored: after
    # an executor restart a child merging back is simply closed, as if its parent were gone.
    parent: str | None = None

    def saved(self) -> SavedToken:
        # Both digests in the one claimant column: "claim" or "claim took-up".
        claim = self.claimant if self.taken_with is None or self.claimant is None \
            else f"{self.claimant} {self.taken_with}"
        return SavedToken(self.id, self.resource, self.expected_use, self.pass_, self.generation,
                          claim, self.label)

    @classmethod
    def from_saved(cls, saved: SavedToken) -> Token:
        claimant, _, taken_with = (saved.claimant or "").partition(" ")
        return cls(id=saved.id, resource=saved.resource, expected_use=saved.expected_use,
                   pass_=saved.pass_, claimant=claimant or None, label=saved.label,
                   generation=saved.generation, taken_with=taken_with or None)


class TokenRegistry(Mapping[str, Token]):
    """Live tokens by id; closed ids (so late use says "closed", not "forged"); orphans.

    Example:
        >>> from ray_quota._core.credentials import claim_value, make_claim
        >>> tokens = TokenRegistry(new_id=iter(["t1", "t2"]).__next__)
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

    __slots__ = ("_changes", "_closed", "_new_id", "_orphans", "_tokens")

    def __init__(self, new_id: Callable[[], str], changes: ChangeLog | None = None) -> None:
        self._tokens: dict[str, Token] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._orphans: dict[str, float] = {}  # token id -> when to release it
        self._new_id = new_id
        self._changes = changes if changes is not None else ChangeLog()

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

    def live(self, token_id: str, generation: int, claimant: str | None) -> Token:
        """The token, if the claim ``claimant`` at ``generation`` may use it; taken up on
        first use after a move, with a proof from the pickled bytes.

        Raises:
            TokenClosedError, ForgedTokenError: no such live token.
            TokenMovedError: the token belongs to another process now.
            AccessDeniedError: a higher generation without the proof that takes it up.
        """
        token, taken = self._checked(token_id, generation, claimant)
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
            if token_id in self._closed:
                raise TokenClosedError("the token was closed or merged into another")
            raise ForgedTokenError("this executor never issued that token")
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
            if token.taken_with is None or not any(
                    claim.took_up(proof) == token.taken_with for proof in claim.proofs):
                raise TokenMovedError("the token was already taken up by another process")
        else:
            # First use after a move: whoever has the pickled bytes has the proof.
            proof = claim.proof_for(token.claimant)
            if proof is None:
                # The generation alone is not enough: anyone may know it, and the id.
                raise AccessDeniedError("taking up a moved token needs its bytes' proof")
            taken_with = claim.took_up(proof)
        return token, (generation, claim.value(token_id, generation), taken_with)

    def close(self, token: Token) -> None:
        """Remove the token and remember its id as closed."""
        del self._tokens[token.id]
        self._changes.tokens.add(token.id)
        self._closed[token.id] = None
        if len(self._closed) > TOMBSTONES:
            self._closed.popitem(last=False)

    def orphaned(self, token_id: str, release_at: float) -> None:
        """The token's last lease expired: release it at ``release_at`` unless taken up."""
        self._orphans[token_id] = release_at

    def orphans_due(self, now: float) -> Iterator[Token]:
        """Orphans whose grace ran out, each forgotten as an orphan as it is yielded; the caller
        releases those still without lease or waiter."""
        for token_id, due in list(self._orphans.items()):
            token = self._tokens.get(token_id)
            if token is None:
                del self._orphans[token_id]
            elif due <= now:
                del self._orphans[token_id]
                yield token

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

    Raises:
        IncompatibleTokensError: ``parent_id`` names another token than the child's parent.
            (A child whose parent is not known, restored after a restart, is merged nowhere:
            the caller closes it.)
    """
    child = tokens.get(child_id)
    if child is not None and child.parent not in (None, parent_id):
        raise IncompatibleTokensError("a token merges back only into the token it was split "
                                      "from")
