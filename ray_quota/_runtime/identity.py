"""Who this process is to the executor: its holder id and the secret that proves it, its lease
keys, the claim its token calls carry, and whether it is a node's broker.

Ids travel and are stored, so they prove nothing; the secrets never leave this process except in
calls to the executor and to this node's broker (see :mod:`ray_quota._core.credentials`).
"""

from __future__ import annotations

import itertools
import os

import ray

from ray_quota._core.credentials import holder_id, make_claim, new_secret

# One holder per process: leases belong to processes, not to tasks. The holder id is the pid and
# the digest of the secret, so only this process can prove it, and nothing needs binding first.
SECRET = new_secret()
HOLDER = holder_id(str(os.getpid()), SECRET)
# The secret this process's token calls carry; the executor keeps only digests of what it makes
# per token, and a moved token's bytes carry one such per-token value, never this.
CLAIM_KEY = new_secret()
_LEASE_KEYS = itertools.count()


class _Role:
    broker = False  # this process is a node's broker: it leases from the executor itself


def lease_key() -> str:
    """A key never used before in this cluster, under which the executor knows one lease."""
    return f"{HOLDER}:{next(_LEASE_KEYS)}"


def who() -> str:
    """Who is using a token here: the actor, else the task (stable across Ray retries), else us."""
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        actor_id = ctx.get_actor_id()
        if actor_id:
            return f"actor:{actor_id}"
        if ctx.worker.mode == ray.WORKER_MODE:
            task_id = ctx.get_task_id()
            if task_id:
                return f"task:{task_id}"
    return f"process:{HOLDER}"


def claimant(proofs: tuple[str, ...] = ()) -> str:
    """The claim this process's token calls carry: who uses the token, the claim secret, and
    the proofs a moved token's bytes brought (see :class:`~ray_quota._core.credentials.Claim`)."""
    return make_claim(who(), CLAIM_KEY, proofs)


def become_broker() -> None:
    """Mark this process as a node's broker: every lease call it makes goes to the executor."""
    _Role.broker = True


def is_broker() -> bool:
    return _Role.broker
