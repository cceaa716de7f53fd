"""Who this process is to the executor: its holder id, its lease keys, who uses a token here,
and whether it is a node's broker."""

from __future__ import annotations

import itertools
import os
import secrets

import ray

# One holder id per process: leases belong to processes, not to tasks.
HOLDER = f"{os.getpid()}-{secrets.token_hex(8)}"
_LEASE_KEYS = itertools.count()


class _Role:
    broker = False  # this process is a node's broker: it leases from the executor itself


def lease_key() -> str:
    """A key never used before in this cluster, under which the executor knows one lease."""
    return f"{HOLDER}:{next(_LEASE_KEYS)}"


def claimant() -> str:
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


def become_broker() -> None:
    """Mark this process as a node's broker: every lease call it makes goes to the executor."""
    _Role.broker = True


def is_broker() -> bool:
    return _Role.broker
