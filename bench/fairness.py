"""Fairness through the whole sans-IO system, per workload, against fair shares (issue 13).

``python -m bench.fairness`` runs the workloads that broke 0.1 on the whole system (executor
service, SQLite store, processes' lease sets) on a fake clock, and writes ``bench/fairness.md``:
per workload, each token's share, its fair share, the largest relative error, Jain's index of
share / fair share, and the longest wait of a backlogged token. ``--quick`` simulates 60 s per
workload (what ``tests/core/test_system_fairness.py`` runs) instead of 300 s. No Ray, no real
time: a full run takes seconds.

It reuses the test harness, ``tests/core/system_world.py`` (``World``, ``backlog``), rather than a
copy of it. That module and its siblings import each other (and ``tests/fakes.py``) as top-level
modules, which pytest arranges by putting ``tests`` and ``tests/core`` on ``sys.path`` (rootdir
conftest, prepend import mode); this module puts the same two directories on ``sys.path`` before
importing it.

Shares are of what the scheduler charges: units for a rate, slot-seconds (slots x hold) for
concurrency, so a token holding each slot twice as long is fair at half the grants.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "tests", ROOT / "tests" / "core"):  # as pytest does for the tests
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from system_world import World, backlog

from bench.check import jain

QUICK_S = 60.0
FULL_S = 300.0
OUT = ROOT / "bench" / "fairness.md"


@dataclass(frozen=True)
class Result:
    """One workload's outcome: per token (or stream), its name, share and fair share."""

    workload: str
    names: tuple[str, ...]
    shares: tuple[float, ...]
    fair: tuple[float, ...]
    longest_wait_s: float

    @property
    def max_error(self) -> float:
        """The largest relative error of a share against its fair share."""
        return max(abs(got - fair) / fair for got, fair in zip(self.shares, self.fair))

    @property
    def jain(self) -> float:
        """Jain's index of share / fair share: 1.0 when every token got exactly its due."""
        return jain(got / fair for got, fair in zip(self.shares, self.fair))


def _normalise(values: list[float]) -> tuple[float, ...]:
    total = sum(values)
    return tuple(value / total for value in values)


def backlogged(workload: str, resource: str, weights: list[int], *, seconds: float,
               amount: int | list[int] | None = None, hold_s: float | list[float] = 0.0,
               parallel: int = 1) -> Result:
    """Backlogged tokens of ``weights`` on a fresh world: charged usage against the weights."""
    with tempfile.TemporaryDirectory(prefix="ray_quota_fairness_") as tmp:
        world = World(Path(tmp) / "state.sqlite")
        units, longest, _ = backlog(world, resource, weights, seconds=seconds, amount=amount,
                                    hold_s=hold_s, parallel=parallel)
    holds = hold_s if isinstance(hold_s, list) else [hold_s] * len(weights)
    # Concurrency is charged by slot-seconds; a rate by units.
    usage = [u * h for u, h in zip(units, holds)] if resource == "conc" else list(units)
    return Result(workload, tuple(f"w{w}" for w in weights), _normalise(usage),
                  _normalise(list(map(float, weights))), max(longest))


def one_shot(stream: int, *, seconds: float, weight: int = 20, stream_weight: int = 2) -> Result:
    """A token of ``weight`` backlogged against ``stream`` fresh one-shot tokens of
    ``stream_weight`` waiting at any time (``@quota`` with no token in scope): the backlogged
    token against the stream as a whole."""
    with tempfile.TemporaryDirectory(prefix="ray_quota_fairness_") as tmp:
        world = World(Path(tmp) / "state.sqlite")
        units, longest, served = backlog(world, "rate", [weight], seconds=seconds,
                                         one_shot=(stream, stream_weight))
    return Result(f"rate: backlogged w{weight} vs {stream} one-shot w{stream_weight}",
                  (f"w{weight}", f"stream x{stream}"),
                  _normalise([float(units[0]), float(stream_weight * served)]),
                  _normalise([float(weight), float(stream * stream_weight)]), longest[0])


def workloads(seconds: float) -> list[Callable[[], Result]]:
    """Every workload, as the tests in ``tests/core/test_system_fairness.py`` set them up."""
    return [
        lambda: backlogged("rate 1:2:4, requests sized by weight", "rate", [5, 10, 20],
                           seconds=seconds),
        lambda: backlogged("rate 1:2:4, equal requests (5)", "rate", [5, 10, 20],
                           seconds=seconds, amount=5),
        lambda: backlogged("concurrency 1:2:4, equal holds (0.1 s, 4 threads each)", "conc",
                           [1, 2, 4], seconds=seconds, amount=1, hold_s=0.1, parallel=4),
        lambda: backlogged("concurrency 1:1, holds 0.1 s vs 0.2 s (6 threads each)", "conc",
                           [2, 2], seconds=seconds, amount=1, hold_s=[0.1, 0.2], parallel=6),
        lambda: backlogged("rate 1:1, requests of 20 vs 2", "rate", [10, 10], seconds=seconds,
                           amount=[20, 2]),
        *[(lambda n=n: one_shot(n, seconds=seconds)) for n in (1, 2, 4)],
    ]


def run(seconds: float) -> list[Result]:
    """Run every workload for ``seconds`` of simulated time."""
    return [workload() for workload in workloads(seconds)]


def table(results: list[Result], seconds: float) -> str:
    """The results as a markdown table, one row per workload."""
    def pct(values: tuple[float, ...]) -> str:
        return " / ".join(f"{value:.1%}" for value in values)

    command = "python -m bench.fairness" + (" --quick" if seconds == QUICK_S else "")
    lines = [
        f"Simulated {seconds:g} s per workload (`{command}`).",
        "",
        "| workload | tokens | share | fair share | max relative error | Jain | longest wait |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.workload} | {' / '.join(r.names)} | {pct(r.shares)} | "
                     f"{pct(r.fair)} | {r.max_error:.1%} | {r.jain:.4f} | "
                     f"{r.longest_wait_s:.2f} s |")
    return "\n".join(lines) + "\n"


def report(seconds: float, out: Path) -> list[Result]:
    """Run every workload, print the table and write it to ``out``; returns the results."""
    results = run(seconds)
    text = table(results, seconds)
    print(text, end="")
    out.write_text("# Fairness through the whole system\n\n" + text)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__
                                     and __doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"simulate {QUICK_S:g} s per workload instead of {FULL_S:g} s")
    parser.add_argument("--out", type=Path, default=OUT, help="markdown file to write")
    args = parser.parse_args(argv)
    report(QUICK_S if args.quick else FULL_S, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
