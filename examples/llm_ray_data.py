"""Rate-limit LLM calls made from a Ray Data pipeline.

Each ``map_batches`` worker is a callable class: ``__init__`` opens a QuotaToken on the provider's
tokens-per-minute limit, ``__call__`` reserves the most one batch may use, calls the (fake) model
and commits what it really used, so the unused part goes back to everyone. However many workers
Ray Data runs, together they never go over the limit.

    python examples/llm_ray_data.py            # 400 rows
    python examples/llm_ray_data.py 2000
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

import ray_quota
from ray_quota import QuotaToken, ResourceSpec

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
RESOURCE = "llm-tokens"  # rate: 60,000 tokens per minute, burst 2,000 (examples/quota.yaml)
BATCH_SIZE = 16
MAX_TOKENS_PER_ROW = 60  # what one prompt and its answer may use at most


class FakeLLM:
    """A Ray Data worker: one token for the worker's life, one reservation per batch."""

    def __init__(self, label: str = "ray-data") -> None:
        self.token = QuotaToken(RESOURCE, expected_use=BATCH_SIZE * MAX_TOKENS_PER_ROW,
                                label=label)
        self.rng = random.Random()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        with self.token.reserve(rows * MAX_TOKENS_PER_ROW) as reservation:
            time.sleep(0.01)  # the "model call"
            used = np.array([self.rng.randint(10, MAX_TOKENS_PER_ROW) for _ in range(rows)])
            reservation.commit(int(used.sum()))  # the real count is only known afterwards
        return {"id": batch["id"], "answer": np.array([f"answer {i}" for i in batch["id"]]),
                "tokens": used}


def run(size: int, spec: ResourceSpec) -> dict[str, Any]:
    started = time.monotonic()
    # A few large blocks: each block is a task, and the work here is the calls, not the reads.
    dataset = ray.data.range(size, override_num_blocks=4).map_batches(
        FakeLLM, batch_size=BATCH_SIZE, concurrency=2, num_cpus=0.5)
    rows = dataset.take_all()
    elapsed = time.monotonic() - started
    used = sum(int(row["tokens"]) for row in rows)
    allowed = spec.burst + spec.refill_per_s * elapsed  # the most the limit lets through
    print(f"{len(rows)} rows, {used:,} LLM tokens in {elapsed:.1f}s "
          f"({used / elapsed:,.0f}/s; the limit allows at most {allowed:,.0f} in that time)")
    return {"rows": len(rows), "tokens_used": used, "elapsed_s": elapsed, "allowed": allowed}


def main(size: int = 400) -> dict[str, Any]:
    """Run ``size`` rows through the rate-limited fake model; returns what was used and allowed."""
    ray_was_running = ray.is_initialized()
    info = ray_quota.init(manifest=MANIFEST, environment="local")  # starts a Ray if none runs
    try:
        return run(size, info.resources[RESOURCE])
    finally:
        if not ray_was_running:
            ray.shutdown()  # a local Ray takes its executor with it


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
