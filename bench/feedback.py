"""Limits that learn from the provider (issue 16, DESIGN 8), measured against a real HTTP server.

``python -m bench.feedback`` starts a local Ray and the executor, and a fake OpenAI-style provider
(:class:`ray_quota.testing.FakeProvider`, 127.0.0.1) whose hidden true limit is half the
manifest's. Limits are per second (a provider's per-minute limit, time-scaled sixty-fold), so a
run takes about a minute. Two runs, one after the other, on fresh providers:

- **feedback**: threads send chat completions through :class:`ray_quota.httpx.QuotaTransport`,
  which reserves, commits the reported usage and reports 429s and remaining tokens; the
  executor learns the effective limit.
- **static + backoff** (what users do today): the same threads reserve from a resource at the
  manifest's limit that learns nothing (the transport is not used), and retry a 429 after its
  ``Retry-After``, or an exponential backoff with jitter.

It writes ``bench/feedback.md`` (the figures) and ``bench/feedback.png`` (the effective limit
and the refusals over time). Figures: when the effective limit entered, for good, the band of
10 % around the true limit; the fraction of requests refused after that; the goodput (tokens
the provider served per second) after that, as a fraction of the true limit. The static run is
measured over the same window.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

import ray_quota
from ray_quota.httpx import QuotaTransport, parse_seconds
from ray_quota.testing import FakeProvider

OUT = Path(__file__).resolve().parent
TRUE_RATE = 4000  # tokens per second the provider really allows
MANIFEST_RATE = 2 * TRUE_RATE
THREADS = 8
PROMPT = "x" * 200  # 50 tokens
MAX_TOKENS = 200  # the fake answers with half: 150 tokens a request
BAND = 0.10


def manifest(interval_s: float) -> dict[str, Any]:
    rate = {"type": "rate", "value": MANIFEST_RATE, "period": "second"}
    return {"environments": {"bench": {
        "learned": {"limit": rate, "feedback": {"interval": interval_s}},
        "static": {"limit": rate},
    }}}


@dataclass
class Run:
    """One run's samples: (t, effective limit) and the provider's answers, t from its start."""

    name: str
    limits: list[tuple[float, float]] = field(default_factory=list)
    answers: list[tuple[float, bool, int]] = field(default_factory=list)
    seconds: float = 0.0


def _body() -> dict[str, Any]:
    return {"model": "fake", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT}]}


def _feedback_worker(url: str, token: ray_quota.QuotaToken, stop: threading.Event) -> None:
    with httpx.Client(transport=QuotaTransport(token), timeout=30) as client:
        while not stop.is_set():
            response = client.post(url, json=_body())
            if response.status_code == 429:
                # The transport has reported it; the next reserve waits out the hold.
                continue


def _backoff_worker(url: str, token: ray_quota.QuotaToken, stop: threading.Event) -> None:
    rng = random.Random()
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            attempt = 0
            while not stop.is_set():
                with token.reserve(MAX_TOKENS + len(PROMPT) // 4) as reservation:
                    response = client.post(url, json=_body())
                    if response.status_code != 429:
                        reservation.commit(response.json()["usage"]["total_tokens"])
                        break
                    reservation.commit(0)
                retry = parse_seconds(response.headers.get("retry-after"))
                backoff = min(4.0, 0.1 * 2 ** attempt) * rng.uniform(0.5, 1.5)
                time.sleep(max(backoff, retry or 0.0))
                attempt += 1


def measure(name: str, resource: str, seconds: float) -> Run:
    provider = FakeProvider(TRUE_RATE, burst_s=1.0).start()
    url = provider.base_url + "/chat/completions"
    token = ray_quota.QuotaToken(resource, expected_use=MAX_TOKENS)
    stop = threading.Event()
    worker = _feedback_worker if resource == "learned" else _backoff_worker
    threads = [threading.Thread(target=worker, args=(url, token, stop), daemon=True)
               for _ in range(THREADS)]
    run = Run(name, seconds=seconds)
    start = time.monotonic()
    for thread in threads:
        thread.start()
    while (now := time.monotonic()) - start < seconds:
        status = {s.name: s for s in ray_quota.status()}[resource]
        limit = status.effective_limit if resource == "learned" else status.limit
        run.limits.append((now - start, float(limit or 0.0)))
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    provider.stop()
    run.answers = [(a.at - start, a.served, a.tokens) for a in provider.answers
                   if a.at - start <= seconds]
    token.close()
    return run


def converged_at(run: Run) -> float | None:
    """When the effective limit entered the band around the true limit and stayed."""
    at = None
    for t, limit in run.limits:
        inside = abs(limit - TRUE_RATE) <= BAND * TRUE_RATE
        at = (at if at is not None else t) if inside else None
    return at


def window(run: Run, since: float) -> tuple[float, float, int]:
    """Refused fraction, goodput as a fraction of the true limit, and requests, from ``since``."""
    answers = [a for a in run.answers if a[0] >= since]
    if not answers or run.seconds <= since:
        return float("nan"), float("nan"), 0
    refused = sum(not served for _, served, _ in answers) / len(answers)
    goodput = sum(tokens for *_, tokens in answers) / (run.seconds - since) / TRUE_RATE
    return refused, goodput, len(answers)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for run in runs:
        top.plot([t for t, _ in run.limits], [v for _, v in run.limits], label=run.name)
        per_s: dict[int, int] = {}
        for t, served, _ in run.answers:
            if not served:
                per_s[int(t)] = per_s.get(int(t), 0) + 1
        xs = list(range(int(run.seconds) + 1))
        bottom.step(xs, [per_s.get(x, 0) for x in xs], where="post", label=run.name)
    top.axhline(TRUE_RATE, color="k", linestyle="--", linewidth=1, label="true limit (hidden)")
    top.axhspan((1 - BAND) * TRUE_RATE, (1 + BAND) * TRUE_RATE, color="k", alpha=0.08)
    top.set_ylabel("limit granted against\n(tokens / s)")
    top.set_ylim(0, MANIFEST_RATE * 1.05)
    top.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("429s per second")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right", fontsize=8)
    fig.suptitle("Manifest limit 2x the provider's: learning from 429s vs static + backoff")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(runs: list[Run], command: str) -> str:
    learned = runs[0]
    at = converged_at(learned)
    since = at if at is not None else learned.seconds / 2
    lines = ["# Provider feedback (issue 16)", "",
             f"`{command}`: true limit {TRUE_RATE} tokens/s (hidden), manifest {MANIFEST_RATE}, "
             f"{THREADS} threads, {learned.seconds:.0f} s per run.", "",
             "| run | converged (s) | requests after | refused after | goodput after / true "
             "| refused, whole run | goodput, whole run |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        refused, goodput, count = window(run, since)
        all_refused, all_goodput, _ = window(run, 0.0)
        conv = converged_at(run)
        lines.append(f"| {run.name} | {'-' if conv is None else f'{conv:.1f}'} | {count} | "
                     f"{refused:.2%} | {goodput:.1%} | {all_refused:.2%} | {all_goodput:.1%} |")
    lines += ["", f"'after': from {since:.1f} s (the feedback run's convergence) to the end; "
              "'converged': the effective limit stays within 10 % of the true limit from then on.",
              "", "![effective limit and refusals](feedback.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="per run (default 30)")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="the feedback's quiet interval (manifest 'feedback.interval')")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as state:
        ray_quota.init(manifest(args.interval), "bench", state_path=Path(state) / "bench.db",
                       metrics_port=None)
        try:
            runs = [measure("feedback", "learned", args.seconds),
                    measure("static + backoff", "static", args.seconds)]
        finally:
            ray_quota.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.out / "feedback.png")
    command = "python -m bench.feedback" + (f" --seconds {args.seconds:g}"
                                            if args.seconds != 30.0 else "")
    text = report(runs, command)
    (args.out / "feedback.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
