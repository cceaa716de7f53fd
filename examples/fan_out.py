"""Fan out under one budget: split a token per child task, and again per grandchild.

A parent holds one QuotaToken. It splits a child token off for each task it starts (passing a
token to a task moves it there); each child splits again for its own subtasks. When a task is done
it hands its token back with ``return_to_parent()``, so expected use and unused credit flow back
up and the parent ends with what it started with. The second half does the same with the
``@ray_quota.quota`` decorator, which splits and gives back for you.

    python examples/fan_out.py          # 4 children with 3 grandchildren each
    python examples/fan_out.py 8
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import ray

import ray_quota
from ray_quota import QuotaToken, current_token, quota

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
RESOURCE = "llm-tokens"
FAN = 3  # grandchildren per child
PROMPT = 100  # the most one call uses
GRANDCHILD_USE = PROMPT
CHILD_USE = FAN * GRANDCHILD_USE


def fake_call(token: QuotaToken) -> int:
    with token.reserve(PROMPT) as reservation:
        used = random.randint(PROMPT // 2, PROMPT)
        reservation.commit(used)
    return used


# ------------------------------------------------------------------------- explicit splits


@ray.remote(num_cpus=0.5)
def grandchild(token: QuotaToken) -> int:
    used = fake_call(token)
    token.return_to_parent()  # expected use and spare credit go back to the child's token
    return used


@ray.remote(num_cpus=0.5)
def child(token: QuotaToken) -> int:
    parts = [grandchild.remote(token.split(GRANDCHILD_USE)) for _ in range(FAN)]
    used = sum(ray.get(parts))  # ray.get gives this task's CPU back while it waits
    token.return_to_parent()
    return used


def explicit(children: int) -> dict[str, int]:
    with QuotaToken(RESOURCE, expected_use=children * CHILD_USE, label="fan-out") as parent:
        before = parent.describe()[0]
        used = sum(ray.get([child.remote(parent.split(CHILD_USE)) for _ in range(children)]))
        after = parent.describe()[0]
    print(f"explicit splits: {children} children x {FAN} grandchildren used {used:,} units; "
          f"parent's expected use {before:,} before, {after:,} after")
    return {"calls": children * FAN, "used": used, "expected_use_before": before,
            "expected_use_after": after}


# --------------------------------------------------------------------------- the decorator


@quota(RESOURCE, expected_use=GRANDCHILD_USE)
@ray.remote(num_cpus=0.5)
def summarize_part(part: int) -> int:
    return fake_call(current_token())


@quota(RESOURCE, expected_use=CHILD_USE)
@ray.remote(num_cpus=0.5)
def summarize(doc: int) -> int:
    # Called with this task's token in scope, each part gets a split of it.
    return sum(ray.get([summarize_part.remote(part) for part in range(FAN)]))


def decorated(children: int) -> dict[str, int]:
    with QuotaToken(RESOURCE, expected_use=children * CHILD_USE, label="fan-out") as parent:
        before = parent.describe()[0]
        used = sum(ray.get([summarize.remote(doc) for doc in range(children)]))
        after = parent.describe()[0]
    print(f"@quota: {children} documents x {FAN} parts used {used:,} units; "
          f"parent's expected use {before:,} before, {after:,} after")
    return {"calls": children * FAN, "used": used, "expected_use_before": before,
            "expected_use_after": after}


def main(size: int = 4) -> dict[str, Any]:
    """Fan out ``size`` children both ways; returns each way's units used and expected use."""
    ray_was_running = ray.is_initialized()
    ray_quota.init(manifest=MANIFEST, environment="local")  # starts a Ray if none runs
    try:
        return {"explicit": explicit(size), "decorated": decorated(size)}
    finally:
        if not ray_was_running:
            ray.shutdown()  # a local Ray takes its executor with it


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
