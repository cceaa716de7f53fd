"""A spending budget shared by many tasks, with ``reject``: spend until the money is gone.

``llm-budget-usd-cents`` in examples/quota.yaml is a capacity (it never refills) enforced by
``reject``. Each task reserves the most a call may cost, "calls" and commits the real cost, and
stops at the first ``FailedReservation``. However the tasks interleave, together they never spend
more than the budget. Run it twice against one executor and the second run finds it spent.

    python examples/shared_budget.py          # 4 tasks
    python examples/shared_budget.py 8
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import ray

import ray_quota
from ray_quota import FailedReservation, QuotaToken

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
RESOURCE = "llm-budget-usd-cents"
MAX_COST = 400  # cents one call may cost at most


@ray.remote(num_cpus=0.5)
def spender(token: QuotaToken, seed: int) -> tuple[int, int]:
    """Spend until the budget says no; returns (cents spent, calls made)."""
    rng = random.Random(seed)
    spent = calls = 0
    with token:  # closed at the end: what this task did not spend goes back at once
        while True:
            try:
                reservation = token.reserve(MAX_COST)
            except FailedReservation:
                return spent, calls
            with reservation:
                cost = rng.randint(MAX_COST // 4, MAX_COST)  # known once the call is done
                reservation.commit(cost)
            spent += cost
            calls += 1


def run(tasks: int) -> dict[str, Any]:
    pool = next(s for s in ray_quota.status() if s.name == RESOURCE)
    with QuotaToken(RESOURCE, expected_use=tasks * MAX_COST, label="shared-budget") as team:
        results = ray.get([spender.remote(team.split(MAX_COST), seed) for seed in range(tasks)])
    spent = sum(s for s, _ in results)
    calls = sum(c for _, c in results)
    print(f"{tasks} tasks made {calls} calls and spent {spent:,} of the {pool.available:,} cents "
          f"left (budget {pool.limit:,}); each stopped at its first FailedReservation")
    return {"budget": pool.limit, "available_before": pool.available, "spent": spent,
            "calls": calls, "per_task": [s for s, _ in results]}


def main(size: int = 4) -> dict[str, Any]:
    """Let ``size`` tasks spend the shared budget; returns what they spent and what was left."""
    ray_was_running = ray.is_initialized()
    ray_quota.init(manifest=MANIFEST, environment="local")  # starts a Ray if none runs
    try:
        return run(size)
    finally:
        if not ray_was_running:
            ray.shutdown()  # a local Ray takes its executor with it


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
