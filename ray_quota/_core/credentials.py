"""Who may call what: secrets that prove a holder, and claims that prove who owns a token.

The executor is a trust boundary: any driver of the Ray cluster can call its methods, and ids
travel (lease keys are stored and shown, token ids are answered in recalls), so an id alone
proves nothing. Two proofs, both checked without anything stored beyond a digest:

**Holders.** A process makes a 128-bit random *secret* when it starts and takes as its holder id a
name followed by the secret's digest (``1234-<digest>``). Every call that names a holder or one of
its lease keys (``acquire``, ``settle``, ``renew``, ``watch``, ``adopt``, and the token calls that
carry lease totals) carries that secret, and the executor (or a node's broker) checks the digest.
Nothing is bound at first use, so nobody can bind a holder id before its process does, and a
restarted executor checks exactly as before.

**Token claims.** A process also makes a claim secret ``k``. Every token call carries a *claim*
string, ``who#k`` followed by ``!proof`` for each proof its handle carries (see below). The
executor keeps, per token, only the digest of ``claim_value(k, token id, generation)``, so a
claim on one token says nothing about another. Moving a token (pickling it) puts
``claim_value(k, token id, generation)`` of the sender into the pickled bytes as a *proof*, with
the generation raised. Whoever has those bytes takes the token up with the proof: its own claim
becomes the token's, and the sender's proof is spent. A Ray retry of the same task (same ``who``,
same bytes) may take it up again: the executor keeps the digest of the proof and ``who`` that
last took the token up. A caller who knows only ids has no proof and is refused.

Example:
    >>> secret = "s" * 32
    >>> holder = holder_id("proc", secret)
    >>> check_keys([f"{holder}:0"], secret)      # the holder's own key: allowed
    >>> check_keys([f"{holder}:0"], "wrong")
    Traceback (most recent call last):
    ...
    ray_quota._errors.AccessDeniedError: this call names holder proc-... without its secret
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

from ray_quota._errors import AccessDeniedError

SECRET_BYTES = 16  # 128 bits of randomness in every secret
DIGEST_CHARS = 32  # 128 bits of a SHA-256 digest, as hex


def new_secret() -> str:
    """A fresh random secret (a holder's, a claim's, a broker lease's adoption secret)."""
    return secrets.token_hex(SECRET_BYTES)


def digest(text: str) -> str:
    """The one-way digest by which secrets are checked and kept."""
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# ------------------------------------------------------------------------------------- holders


def holder_id(name: str, secret: str) -> str:
    """The holder id that ``secret`` proves: ``name`` (for people: a pid, say) and its digest."""
    return f"{name}-{digest(secret)}"


def _holder_of(key: str) -> str:
    return key.rpartition(":")[0] or key  # as protocol.holder_of: keys are ``holder:n``


def check_holder(holder: str, secret: object) -> None:
    """``secret`` proves ``holder``.

    Raises:
        AccessDeniedError: it does not (missing, not a string, or another holder's). The message
            names the holder, never a secret.
    """
    if not isinstance(secret, str) or not _same(holder.rpartition("-")[2], digest(secret)):
        raise AccessDeniedError(f"this call names holder {_short(holder)} without its secret")


def check_keys(keys: Iterable[str], secret: object) -> None:
    """Every lease key in ``keys`` belongs to the holder that ``secret`` proves."""
    for holder in {_holder_of(key) for key in keys}:
        check_holder(holder, secret)


def _short(holder: str) -> str:
    name, _, rest = holder.rpartition("-")
    return f"{name}-..." if name else f"{holder[:12]}..."


# -------------------------------------------------------------------------------- token claims


def claim_value(key: str, token_id: str, generation: int) -> str:
    """The claim secret ``key`` makes on one token at one generation: what a proof carries."""
    return digest(f"claim|{key}|{token_id}|{generation}")


def make_claim(who: str, key: str, proofs: Iterable[str] = ()) -> str:
    """The claim string a process sends with its token calls."""
    return f"{who}#{key}" + "".join(f"!{proof}" for proof in proofs)


def add_proofs(claim: str, proofs: Iterable[str]) -> str:
    """``claim`` with more proofs (a merge takes up the other token too)."""
    return claim + "".join(f"!{proof}" for proof in proofs)


class Claim:
    """A claim string, parsed: ``who`` (a task, actor or process; public), the claim secret,
    and proofs from pickled bytes.

    A string without ``#`` is a claim secret with no ``who`` (the core's tests use such).
    """

    __slots__ = ("key", "proofs", "who")

    def __init__(self, text: str) -> None:
        head, *proofs = text.split("!")
        who, sep, key = head.rpartition("#")
        self.who = who if sep else ""
        self.key = key
        self.proofs = tuple(proofs)

    def value(self, token_id: str, generation: int) -> str:
        """The digest a token keeps for this claim."""
        return digest(claim_value(self.key, token_id, generation))

    def proof_for(self, kept: str) -> str | None:
        """The proof whose digest is ``kept``, if this claim carries it."""
        for proof in self.proofs:
            if _same(digest(proof), kept):
                return proof
        return None

    def took_up(self, proof: str) -> str:
        """What a token keeps of the proof that took it up, and of who did: a retry of the same
        task (same ``who``, same proof) may take it up again."""
        return digest(f"took|{proof}|{self.who}")


# --------------------------------------------------------------------------------- adoptions


def adoption_suffix(adoption: str) -> str:
    """A broker's lease key ends with this, so that processes holding the lease's adoption
    secret (and nothing else of the broker's) can take their share over when it dies.
    ``adoption`` is that secret, or a via (see :func:`adoption_via`) that carries it."""
    return "." + digest(f"adopt|{parse_via(adoption)[0]}")


def adoption_via(adoption_secret: str, claim: str, token_id: str, generation: int) -> str:
    """What a broker hands a process with its units (``Grant.via``): its lease's adoption
    secret, bound to the claim the process uses the token with. It adopts only while that
    claim is the token's: a process the token moved away from cannot take over, from a
    broker that still lives, the units of the one it moved to."""
    return f"{adoption_secret}@{claim_value(Claim(claim).key, token_id, generation)}"


def parse_via(via: str) -> tuple[str, str]:
    """The adoption secret in ``via``, and the claim value it is bound to ('' if none)."""
    adoption_secret, _, value = via.partition("@")
    return adoption_secret, value


def claims(kept: str | None, value: str) -> bool:
    """Whether the claim value ``value`` is the one a token keeps (``kept``: its digest, or
    None for a token anyone may use)."""
    return kept is None or _same(digest(value), kept)
