"""Runs: one mode, both modes of each variant, and a sweep over cluster sizes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from bench.scale_model.cluster import Cluster
from bench.scale_model.params import Params
from bench.scale_model.summary import summarise


def run(params: Params, *, brokers: bool) -> dict[str, Any]:
    """Run one mode of the model and summarise it (see :func:`summarise`)."""
    started = time.perf_counter()
    cluster = Cluster(params, brokers=brokers)
    cluster.run()
    return summarise(cluster, wall_s=time.perf_counter() - started)


MODES = ("direct", "brokers")
VARIANTS = {"contended": None, "uncontended": 0.5}  # overload; None keeps the run's own


def variant_params(params: Params, variant: str) -> Params:
    """``uncontended`` sets the limit at twice the demand; ``contended`` keeps ``params``."""
    overload = VARIANTS[variant]
    return params if overload is None else replace(params, overload=overload)


def _run_one(job: tuple[Params, str, str]) -> tuple[str, str, dict[str, Any]]:
    params, variant, mode = job
    return variant, mode, run(variant_params(params, variant), brokers=mode == "brokers")


def run_all(params: Params, variants: Sequence[str], *, jobs: int = 1
            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Both modes of every variant, with the same seed; ``jobs`` runs at a time."""
    work = [(params, variant, mode) for variant in variants for mode in MODES]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(_run_one, work))
    else:
        done = [_run_one(job) for job in work]
    runs: dict[str, dict[str, dict[str, Any]]] = {variant: {} for variant in variants}
    for variant, mode, result in done:
        runs[variant][mode] = result
    return runs


def sweep(params: Params, nodes: Sequence[int], variants: Sequence[str], *, seconds: float,
          jobs: int = 1) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """The same model at other node counts, each measured for ``seconds``: where each mode
    saturates the executor."""
    return {str(count): run_all(replace(params, nodes=count, seconds=seconds), variants,
                                jobs=jobs)
            for count in nodes}
