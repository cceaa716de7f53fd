"""Tokens: who may use one after a move, forged and closed ids, split and merge keep credit."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_world import (
    HOLDER,
    ME,
    Backlog,
    Env,
    capacity,
    granted,
    rate,
)

from ray_quota._core.credentials import claim_value, make_claim
from ray_quota._core.scheduler import Policy
from ray_quota._errors import (
    AccessDeniedError,
    ForgedTokenError,
    InvalidAmountError,
    TokenClosedError,
    TokenMovedError,
    TokenStateError,
    UnknownResourceError,
)

# ================================================================================= transfers


def moved(token: str, who: str, key: str) -> str:
    """The claim of a process (claim secret ``key``) that unpickled a token ME moved: with the
    proof the pickled bytes carry."""
    return make_claim(who, key, [claim_value(ME, token, 0)])


def test_token_moved_to_another_process_refuses_the_old_owner() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, moved(token, "receiver", "k2"), "proc-2", 1))
    before = env.snapshot([token], holders=(HOLDER, "proc-2"))
    with pytest.raises(TokenMovedError):
        env.sched.acquire(token, 0, ME, HOLDER, 1)
    with pytest.raises(TokenMovedError):
        env.sched.split(token, 0, ME, 1)
    with pytest.raises(TokenMovedError):
        env.sched.close_token(token, 0, ME)
    assert env.snapshot([token], holders=(HOLDER, "proc-2")) == before


def test_retry_by_the_same_claimant_may_take_the_token_up_again() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, moved(token, "task:7", "k2"), "proc-2", 1))
    # Ray retried task 7 in another process (another claim secret), with the same bytes.
    granted(env.sched.acquire(token, 1, moved(token, "task:7", "k3"), "proc-3", 1))


def test_a_higher_generation_without_the_proof_takes_nothing_up() -> None:
    """Knowing a token's id (and guessing a generation) is not enough to take it over."""
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    before = env.snapshot([token], holders=(HOLDER, "proc-2"))
    for claim in ("task:8#k8", make_claim("task:8", "k8", ["not-the-proof"]),
                  make_claim("task:8", "k8", [claim_value("other-key", token, 0)])):
        for generation in (1, 2, 10**6):
            with pytest.raises(AccessDeniedError, match="proof"):
                env.sched.acquire(token, generation, claim, "proc-2", 1)
    assert env.snapshot([token], holders=(HOLDER, "proc-2")) == before
    granted(env.sched.acquire(token, 0, ME, HOLDER, 1))  # the owner is unaffected


def test_a_proof_is_spent_once_the_token_moves_on() -> None:
    """The bytes of an earlier move take nothing up after the token moved again."""
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, moved(token, "task:7", "k2"), "proc-2", 1))
    again = make_claim("task:9", "k9", [claim_value("k2", token, 1)])
    granted(env.sched.acquire(token, 2, again, "proc-3", 1))
    with pytest.raises(AccessDeniedError):
        env.sched.acquire(token, 3, moved(token, "task:7", "k2"), "proc-2", 1)

def test_another_claimant_of_the_same_generation_is_refused() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, moved(token, "task:7", "k2"), "proc-2", 1))
    before = env.snapshot([token], holders=("proc-2", "proc-3"))
    with pytest.raises(TokenMovedError):  # another task, even with the same bytes
        env.sched.acquire(token, 1, moved(token, "task:8", "k3"), "proc-3", 1)
    assert env.snapshot([token], holders=("proc-2", "proc-3")) == before


def test_token_opened_for_one_claimant_is_refused_to_another() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    with pytest.raises(TokenMovedError):
        env.sched.acquire(token, 0, "someone-else", HOLDER, 1)


def test_forged_token_is_refused_and_changes_nothing() -> None:
    env = Env(capacity(value=100))
    real = env.token("c", 10)
    before = env.snapshot([real])
    forged = secrets.token_urlsafe(16)
    for call in (lambda: env.sched.acquire(forged, 0, ME, HOLDER, 1),
                 lambda: env.sched.split(forged, 0, ME, 1),
                 lambda: env.sched.merge(real, 0, ME, forged, 0),
                 lambda: env.sched.close_token(forged, 0, ME)):
        with pytest.raises(ForgedTokenError):
            call()
    assert env.snapshot([real]) == before


def test_closed_or_merged_token_says_closed_not_forged() -> None:
    env = Env(capacity(value=100))
    a, b, c = env.token("c", 10), env.token("c", 10), env.token("c", 10)
    env.sched.close_token(a, 0, ME)
    env.sched.merge(b, 0, ME, c, 0)
    for gone in (a, c):
        with pytest.raises(TokenClosedError):
            env.sched.acquire(gone, 0, ME, HOLDER, 1)
        with pytest.raises(TokenClosedError):
            env.sched.close_token(gone, 0, ME)


def test_token_ids_are_unguessable() -> None:
    env = Env(capacity(value=100))
    ids = {env.token("c", 1) for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) >= 22 for i in ids)  # 16 random bytes, url-safe base64


def test_unknown_resource_is_refused() -> None:
    env = Env(capacity(value=100))
    with pytest.raises(UnknownResourceError, match="nope"):
        env.sched.open_token("nope", 1, claimant=ME)


# ============================================================================ split and merge


def test_split_moves_the_same_share_of_credit() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(credit_factor=10.0))
    rich, poor = env.token("r", 40), env.token("r", 10)
    env.commit(poor, granted(env.acquire(poor, 50)))
    env.commit(poor, granted(env.acquire(poor, 50)))  # vtime moves on; rich builds credit
    total = env.sched.credit(rich)
    assert total > 0
    child = env.sched.split(rich, 0, ME, 10)
    assert env.sched.credit(child.id) == pytest.approx(total * 10 / 40)
    assert env.sched.credit(rich) == pytest.approx(total * 30 / 40)
    assert env.status("r").tokens == 3


def test_split_moves_the_same_share_of_debt() -> None:
    env = Env(rate(value=10, burst=100))
    token = env.token("r", 20)
    env.acquire(token, 10)
    env.sched.give_back(token, HOLDER, used=10, debt=90)
    total = env.sched.credit(token)
    assert total < 0
    child = env.sched.split(token, 0, ME, 5)
    assert env.sched.credit(child.id) == pytest.approx(total / 4)
    assert env.sched.credit(token) == pytest.approx(total * 3 / 4)


def test_merge_adds_credit_and_expected_use() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(credit_factor=10.0))
    a, b, busy = env.token("r", 10), env.token("r", 30), env.token("r", 10)
    env.commit(a, granted(env.acquire(a, 5)))
    env.commit(busy, granted(env.acquire(busy, 50)))
    env.commit(busy, granted(env.acquire(busy, 45)))
    ca, cb = env.sched.credit(a), env.sched.credit(b)
    assert ca > 0 and cb > 0
    env.sched.merge(a, 0, ME, b, 0)
    assert env.sched.credit(a) == pytest.approx(ca + cb)
    assert env.status("r").tokens == 2
    # The merged weight: a now competes as 40 against busy's 10.
    backlog = Backlog(env)
    backlog.add(a, 10)
    backlog.add(busy, 10)
    backlog.run_for(50.0)
    settled = env.now
    backlog.run_for(200.0)
    ratio = backlog.units(a, settled) / backlog.units(busy, settled)
    assert ratio == pytest.approx(4.0, rel=0.05)


# ===================================================================== property: split/merge


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    return draw(st.lists(st.tuples(st.sampled_from(["grant", "debt", "refund", "idle"]),
                                   st.integers(0, 2), st.integers(1, 60)),
                         min_size=0, max_size=25))


def _play(env: Env, tokens: list[str], history: list[tuple[str, int, int]]) -> None:
    for what, who, n in history:
        token = tokens[who]
        if what == "grant":
            try:
                ticket = env.acquire(token, n)
            except TokenStateError:  # no expected use left after a split
                continue
            if ticket.outcome is None:
                env.sched.cancel(ticket)
            else:
                env.commit(token, granted(ticket))
        elif what == "debt":
            env.sched.give_back(token, HOLDER, debt=n)
        elif what == "refund":
            try:
                ticket = env.acquire(token, n, prefetch=n)
            except TokenStateError:
                continue
            if ticket.outcome is None:
                env.sched.cancel(ticket)
            else:
                env.sched.give_back(token, HOLDER, granted(ticket))
        else:
            env.clock.advance(n / 10)
            env.sched.poll()


@settings(max_examples=200, deadline=None)
@given(history=histories(), weights=st.lists(st.integers(1, 50), min_size=3, max_size=3),
       child=st.integers(1, 50), credit_factor=st.sampled_from([0.5, 1.0, 3.0]))
def test_split_and_merge_conserve_credit(history: list[tuple[str, int, int]],
                                         weights: list[int], child: int,
                                         credit_factor: float) -> None:
    # Leases never expire here, nor are idle tokens released: this is about credit, not
    # about holders going away.
    env = Env(rate(value=20, burst=100),
              policy=Policy(credit_factor=credit_factor, lease_ttl_s=1e9, orphan_grace_s=1e9))
    tokens = [env.token("r", w) for w in weights]
    _play(env, tokens, history)
    parent = tokens[0]
    total = env.sched.credit(parent)
    if child > weights[0]:
        with pytest.raises(InvalidAmountError):
            env.sched.split(parent, 0, ME, child)
        assert env.sched.credit(parent) == total
        return
    kid = env.sched.split(parent, 0, ME, child).id
    assert env.sched.credit(parent) + env.sched.credit(kid) == pytest.approx(total, abs=1e-6)
    assert env.sched.credit(kid) <= credit_factor * child + 1e-9  # never above the cap
    _play(env, [parent, kid, tokens[1]], history[::-1])
    parts = env.sched.credit(parent) + env.sched.credit(kid) + env.sched.credit(tokens[1])
    env.sched.merge(parent, 0, ME, kid, 0)
    env.sched.merge(parent, 0, ME, tokens[1], 0)
    assert env.sched.credit(parent) == pytest.approx(parts, abs=1e-6)
