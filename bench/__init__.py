"""Benchmarks of ray_quota against the limiters people use instead; run ``python -m bench``."""

import os
import tempfile


def scratch_state(name: str) -> str:
    """A fresh state file for one benchmark run: the executor's state is durable by default,
    and a run must neither start on budgets a previous run spent nor spend a user's own."""
    return os.path.join(tempfile.mkdtemp(prefix=f"ray_quota_{name}_"), "state.sqlite")
