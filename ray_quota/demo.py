"""The demo: three teams share a simulated LLM provider's limits on a local Ray.

Run with ``python -m ray_quota.demo`` (or ``make demo``). No network: the "model" sleeps and
returns a random token count. Teams A, B and C hold tokens with expected use 1:2:4 and fan out
tasks that reserve, call the fake model, and commit what it really used, under a tokens-per-minute
limit and a limit on requests in flight. It ends with each team's share against its fair share,
reservation latency percentiles, and a PNG chart of usage over time per team.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

import ray_quota
from ray_quota import QuotaToken

MANIFEST = Path(__file__).resolve().parent.parent / "examples" / "quota.yaml"
TEAMS = {"team-a": 1, "team-b": 2, "team-c": 4}
PROMPT_TOKENS = 400  # units reserved per call: the most one call may use


class _Worker:
    """One worker process of a team: reserve, call the fake model, commit its real usage."""

    def ready(self) -> bool:
        return True

    def run(self, tokens: QuotaToken, requests: QuotaToken, calls: int,
            seed: int) -> list[tuple[float, int, float]]:
        rng = random.Random(seed)
        records = []
        for _ in range(calls):
            started = time.monotonic()
            with requests.reserve(1), tokens.reserve(PROMPT_TOKENS) as reservation:
                waited = time.monotonic() - started
                time.sleep(rng.uniform(0.005, 0.02))  # the "model"
                used = rng.randint(PROMPT_TOKENS // 2, PROMPT_TOKENS)
                reservation.commit(used)
            records.append((time.time(), used, waited))
        return records


Worker: Any = ray.remote(num_cpus=0)(_Worker)


def run(duration_s: float, workers_per_team: int, chart: Path) -> dict[str, list[tuple]]:
    """Run the workload and return each team's records: (wall time, units used, wait)."""
    # A state file of its own: a demo must not spend (or find spent) the user's real budgets.
    state = Path(tempfile.mkdtemp(prefix="ray_quota_demo_")) / "state.sqlite"
    spec = ray_quota.init(manifest=MANIFEST, environment="local",
                          state_path=state).resources["llm-tokens"]
    calls = max(1, int(duration_s * spec.refill_per_s / PROMPT_TOKENS / 2))
    parents = {team: (QuotaToken("llm-tokens", expected_use=w * 1000 * workers_per_team,
                                 label=team),
                      QuotaToken("llm-requests", expected_use=w * workers_per_team, label=team))
               for team, w in TEAMS.items()}
    workers = {team: [Worker.remote() for _ in range(workers_per_team)] for team in TEAMS}
    ray.get([w.ready.remote() for ws in workers.values() for w in ws])  # all start together
    futures: dict[str, list] = {team: [] for team in TEAMS}
    for i in range(workers_per_team):  # round-robin, so no team gets a head start
        for team, (tokens, requests) in parents.items():
            weight = TEAMS[team]
            futures[team].append(workers[team][i].run.remote(
                tokens.split(weight * 1000), requests.split(weight), calls, seed=hash((team, i))))
    results = {team: [r for batch in ray.get(refs) for r in batch]
               for team, refs in futures.items()}
    _report(results)
    _chart(results, chart)
    return results


def _report(results: dict[str, list[tuple]]) -> None:
    # Shares are measured while every team was still busy: after the first team finishes, the
    # others rightly take the whole limit.
    end = min(max(r[0] for r in records) for records in results.values())
    used = {team: sum(r[1] for r in records if r[0] <= end) for team, records in results.items()}
    total = sum(used.values()) or 1
    weights = sum(TEAMS.values())
    print(f"\n{'team':8} {'weight':>6} {'units':>9} {'share':>7} {'fair':>7}")
    for team, units in used.items():
        print(f"{team:8} {TEAMS[team]:>6} {units:>9} {units / total:>7.1%} "
              f"{TEAMS[team] / weights:>7.1%}")
    waits = sorted(r[2] * 1000 for records in results.values() for r in records)
    q = statistics.quantiles(waits, n=100)
    print(f"\nreservation latency (ms): p50 {q[49]:.2f}  p95 {q[94]:.2f}  p99 {q[98]:.2f}  "
          f"over {len(waits)} reservations")


def _chart(results: dict[str, list[tuple]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(r[0] for records in results.values() for r in records)
    fig, ax = plt.subplots(figsize=(8, 4))
    for team, records in results.items():
        records = sorted(records)
        times = [r[0] - start for r in records]
        cumulative = []
        total = 0
        for r in records:
            total += r[1]
            cumulative.append(total)
        ax.plot(times, cumulative, label=f"{team} (weight {TEAMS[team]})")
    ax.set_xlabel("seconds")
    ax.set_ylabel("LLM tokens used (cumulative)")
    ax.set_title("ray_quota demo: usage per team under one tokens-per-minute limit")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    print(f"chart written to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="rough seconds to run")
    parser.add_argument("--workers", type=int, default=3, help="tasks per team")
    parser.add_argument("--chart", type=Path, default=Path("out/demo_usage.png"))
    args = parser.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        run(args.duration, args.workers, args.chart)
    finally:
        ray_quota.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
