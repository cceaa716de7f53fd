"""Turn a benchmark run into ``results.md`` (tables, ratios, targets) and PNG charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.limiters import ACTOR, LOCK, RAY_QUOTA, RAY_QUOTA_EXEC, REDIS_BACKED

CHARTS = {"a": "a_single_process.png", "b": "b_shared_rate.png", "c": "c_fairness.png",
          "d": "d_concurrency.png"}


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _over(value: Any) -> str:
    if value is None:
        return "–"
    return "**0**" if value == 0 else f"**{_f(value)} OVER**"


def _row(name: str, row: dict[str, Any], cells: list[str]) -> str:
    if row.get("status") != "ok":
        return f"| {name} | {row.get('status')} |" + " |" * (len(cells) - 1)
    return "| " + " | ".join([name, *cells]) + " |"


def _table(header: list[str], lines: list[str]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |",
                      "|" + "|".join("---" for _ in header) + "|", *lines])


def _calls(row: dict[str, Any]) -> str:
    value = row.get("executor_calls_per_reservation")
    return "–" if value is None else f"{value:.2g}"


def scenario_tables(doc: dict[str, Any]) -> str:
    res, titles = doc["results"], doc["meta"]["titles"]
    limits = doc["meta"]["limits"]
    parts = []

    header = ["limiter", "reservations/s", "p50 µs", "p99 µs", "over-admission (units)",
              "executor calls / reservation"]
    lines = [_row(r["limiter"], r, [_f(r.get("per_s")), _f(r.get("p50_us")),
                                    _f(r.get("p99_us")), _over(r.get("over_admission")),
                                    _calls(r)]) for r in res.get("a", [])]
    if lines:
        parts.append(f"### {titles['a']}\n\n" + _table(header, lines))

    header = ["limiter", "reservations/s", "units/s", "admitted / (burst + rate·T)",
              "p50 ms", "p99 ms", "over-admission (units)", "executor calls / reservation"]
    for key in ("b1", "b2"):
        if key not in res:
            continue
        lines = [_row(r["limiter"], r, [_f(r.get("per_s")), _f(r.get("units_per_s")),
                                        _f(r.get("admitted_vs_bound")), _f(r.get("p50_ms")),
                                        _f(r.get("p99_ms")), _over(r.get("over_admission")),
                                        _calls(r)]) for r in res[key]]
        extra = ""
        if key == "b2":
            lines = [_row(r["limiter"], r, [_f(r.get("per_s")), _f(r.get("units_per_s")),
                                            _f(r.get("admitted_vs_bound")),
                                            _f(r.get("steady_vs_rate")), _f(r.get("p50_ms")),
                                            _f(r.get("p99_ms")), _over(r.get("over_admission")),
                                            _calls(r)]) for r in res[key]]
            extra = ("\n\n`steady / rate`: units admitted in the second half of the run over "
                     "rate x that time (1.0 = the whole limit used, work-conserving).")
            table = _table(header[:4] + ["steady / rate"] + header[4:], lines)
        else:
            table = _table(header, lines)
        parts.append(f"### {titles[key]}\n\n{table}{extra}")

    header = ["limiter", "share 1 (fair .143)", "share 2 (fair .286)", "share 4 (fair .571)",
              "grants (1/2/4)", "share error", "Jain", "steady / rate", "p99 ms",
              "over-admission (units)"]
    lines = []
    for r in res.get("c", []):
        cells = []
        if r.get("status") == "ok":
            s, g = list(r["shares"].values()), list(r["tenant_grants"].values())
            cells = [f"{s[0]:.3f}", f"{s[1]:.3f}", f"{s[2]:.3f}", "/".join(map(str, g)),
                     f"{100 * r['share_error']:.1f}%", f"{r['jain']:.4f}",
                     _f(r["steady_vs_rate"]), _f(r["p99_ms"]), _over(r["over_admission"])]
        else:
            cells = [""] * (len(header) - 1)
        lines.append(_row(r["limiter"], r, cells))
    if lines:
        parts.append(f"### {titles['c']}\n\nShares over the second half of the run; share error is "
                 "the largest |share / fair share - 1| of the three tenants; Jain's index is of "
                 "the shares over fair shares. Baselines without a notion of weight are reported "
                 "as they are.\n\n" + _table(header, lines))

    header = ["limiter", "holds/s", "utilisation", f"max in use (limit {limits['slots']['slots']})",
              "acquire p50 ms", "acquire p99 ms", "over-admission (slots)",
              "executor calls / reservation"]
    lines = [_row(r["limiter"], r, [_f(r.get("per_s")), _f(r.get("utilisation")),
                                    _f(r.get("max_in_use")), _f(r.get("p50_ms")),
                                    _f(r.get("p99_ms")), _over(r.get("over_admission")),
                                    _calls(r)]) for r in res.get("d", [])]
    if lines:
        parts.append(f"### {titles['d']}\n\nUtilisation: slot-seconds certainly held (from grant "
                 "received to release sent) over slots x time.\n\n" + _table(header, lines))
    return "\n\n".join(parts)


def _ok(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for r in rows:
        if r["limiter"] == name and r.get("status") == "ok":
            return r
    return None


def ratio_table(doc: dict[str, Any]) -> str:
    res = doc["results"]
    header = ["scenario", "baseline", "ray_quota throughput ÷ baseline",
              "baseline p50 ÷ ray_quota p50"]
    lines = []
    for key, p50 in (("a", "p50_us"), ("b1", "p50_ms"), ("b2", "p50_ms"), ("c", "p50_ms"),
                     ("d", "p50_ms")):
        ours = _ok(res.get(key, []), RAY_QUOTA)
        if ours is None:
            continue
        for r in res[key]:
            if r["limiter"] in (RAY_QUOTA, RAY_QUOTA_EXEC):
                continue
            if r.get("status") != "ok":
                lines.append(f"| {key} | {r['limiter']} | not run | |")
                continue
            tp = ours["per_s"] / r["per_s"] if r["per_s"] else math.inf
            lat = r[p50] / ours[p50] if ours[p50] else math.inf
            lines.append(f"| {key} | {r['limiter']} | {tp:.3g}x | {lat:.3g}x |")
    return _table(header, lines)


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each DESIGN §5 target: what was measured and whether it is met."""
    res = doc["results"]
    out: list[dict[str, Any]] = []

    def add(target: str, met: bool | None, measured: str) -> None:
        out.append({"target": target, "met": met, "measured": measured})

    res = {k: res.get(k, []) for k in ("a", "b1", "b2", "c", "d")}
    a, exe, lock = _ok(res["a"], RAY_QUOTA), _ok(res["a"], RAY_QUOTA_EXEC), _ok(res["a"], LOCK)
    if a:
        add("local reserve+commit p50 < 20 µs", a["p50_us"] < 20, f"{a['p50_us']:.2f} µs")
        add("local reserve+commit >= 50,000/s in one process", a["per_s"] >= 50_000,
            f"{a['per_s']:,.0f}/s")
    if a and lock:
        tp, lat = lock["per_s"] / a["per_s"], a["p50_us"] / lock["p50_us"]
        add("within 10x of a bare lock counter (throughput and p50)", tp <= 10 and lat <= 10,
            f"lock counter has {tp:.1f}x the throughput; ray_quota's p50 is {lat:.1f}x its p50")
    if exe:
        add("executor-path p50 < 2 ms", exe["p50_us"] < 2000,
            f"{exe['p50_us'] / 1000:.3f} ms (one process, every reserve an executor call)")
    b1 = _ok(res["b1"], RAY_QUOTA)
    actor = _ok(res["b1"], ACTOR)
    if b1 and actor:
        ratio = b1["per_s"] / actor["per_s"]
        add(">= 20x the plain actor limiter's throughput (b1)", ratio >= 20,
            f"{ratio:.1f}x ({b1['per_s']:,.0f}/s vs {actor['per_s']:,.0f}/s)")
    redis_rows = [r for r in res["b1"] if r["limiter"] in REDIS_BACKED]
    ran = [r for r in redis_rows if r.get("status") == "ok"]
    if b1 and ran:
        worst = max(ran, key=lambda r: r["per_s"])
        ratio = b1["per_s"] / worst["per_s"]
        add("ahead of every Redis-backed limiter (b1 throughput)", ratio > 1,
            f"{ratio:.1f}x the fastest, {worst['limiter']} ({worst['per_s']:,.0f}/s)")
    elif redis_rows:
        add("ahead of every Redis-backed limiter (b1 throughput)", None,
            "not measured: " + redis_rows[0].get("status", ""))
    overs = [(key + ("-exec" if r["limiter"] == RAY_QUOTA_EXEC else ""), r["over_admission"])
             for key in ("a", "b1", "b2", "c", "d") for r in res[key]
             if r["limiter"] in (RAY_QUOTA, RAY_QUOTA_EXEC) and r.get("status") == "ok"]
    add("zero over-admission (ray_quota, every scenario)", all(v == 0 for _, v in overs),
        ", ".join(f"{k}: {_f(v)}" for k, v in overs))
    c = _ok(res["c"], RAY_QUOTA)
    if c:
        add("weighted fairness within 5% (c)", c["share_error"] <= 0.05,
            f"share error {100 * c['share_error']:.1f}% over "
            f"{min(c['tenant_grants'].values())}+ grants per tenant")
        add("Jain's index of normalised shares >= 0.99 (c)", c["jain"] >= 0.99,
            f"{c['jain']:.4f}")
    return out


def target_table(doc: dict[str, Any]) -> str:
    lines = []
    for t in targets(doc):
        met = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    return _table(["target (DESIGN §5)", "result", "measured"], lines)


def fanout_section(doc: dict[str, Any]) -> str:
    """Scenario f's table (issue 15), if it ran."""
    f = doc["results"].get("f")
    if not f:
        return ""
    from bench.exec_path import PLAIN, RESERVE
    from bench.fanout import table

    p50 = f["exec_path_p50_ms"]
    return (f"\n## f. Fan-out and the executor path (ray_quota only)\n\n"
            f"@quota tasks against plain Ray tasks; an executor-path reservation against one "
            f"plain actor call (`python -m bench.fanout`, `python -m bench.exec_path`).\n\n"
            f"{table(f['fanout'])}\n"
            f"| executor-path reserve p50 / plain actor call p50 | "
            f"{p50[RESERVE]:.2f} / {p50[PLAIN]:.2f} ms = {f['exec_path_ratio']:.2f}x |\n")


def markdown(doc: dict[str, Any], charts: list[str]) -> str:
    meta = doc["meta"]
    m = meta["machine"]
    lim = meta["limits"]
    notes = []
    if meta.get("redis"):
        notes.append(f"- {meta['redis']}")
    head = f"""# Benchmark results{' (quick mode: tiny sizes, figures are not meaningful)'
                                 if meta['quick'] else ''}

Produced by `{meta['command']}` in {meta['seconds']:.0f} s on {m['nproc']} cores ({m['cpu']}),
Python {m['python']}, Ray {m['ray']}. Every figure comes from this one run; ratios compare
limiters measured back to back on the same machine. Load average (1 min) was
{meta['load']['before'][0]:.1f} before and {meta['load']['after'][0]:.1f} after the run: the
machine is shared, so absolute figures move from run to run; the ratios move less.

ray_quota measured: {m.get('ray_quota')}; its Ray workers and executor imported
`{meta.get('worker_ray_quota')}`.

Limits: "far above demand" = {lim['open']['rate']:,.0f} units/s (burst {lim['open']['burst']:,});
"binding" = {lim['saturated']['rate']:,.0f} units/s, burst {lim['saturated']['burst']:,}
(window-based limiters: {lim['saturated']['burst']:,} per
{lim['saturated']['burst'] / lim['saturated']['rate']:g} s); concurrency = {lim['slots']['slots']}
slots. Over-admission is the largest excess, over any time window, of units the workers
themselves recorded as certainly granted inside it, beyond burst + rate x window (zero means
safe); for concurrency, slots certainly held at once beyond the limit. Multi-process scenarios
run {meta['sizes']['workers']} Ray actor processes; the lock counter cannot span processes, so
it runs the same number of threads in one process.
{chr(10).join(notes)}

## Targets

{target_table(doc)}

## Scenarios

{scenario_tables(doc)}

## ray_quota against each baseline

{ratio_table(doc)}
{fanout_section(doc)}

## Charts

""" + "\n".join(f"![{c}]({c})" for c in charts) + "\n"
    return head


def charts(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    written = []

    def ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r.get("status") == "ok"]

    def barh(ax: Any, rows: list[dict[str, Any]], key: str, title: str, log: bool = True,
             scale: float = 1.0) -> None:
        names = [r["limiter"] for r in rows]
        values = [r[key] * scale for r in rows]
        colors = ["tab:orange" if n.startswith(RAY_QUOTA) else "tab:blue" for n in names]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)

    res = {k: res.get(k, []) for k in ("a", "b1", "b2", "c", "d")}
    rows = ok(res["a"])
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        barh(axes[0], rows, "per_s", "a. reservations/s, one process (log)")
        barh(axes[1], rows, "p50_us", "a. p50 latency, µs (log)")
        barh(axes[2], rows, "p99_us", "a. p99 latency, µs (log)")
        fig.tight_layout()
        fig.savefig(out / CHARTS["a"], dpi=90)
        plt.close(fig)
        written.append(CHARTS["a"])

    b1, b2 = ok(res["b1"]), ok(res["b2"])
    if b1 or b2:
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
        if b1:
            barh(axes[0], b1, "per_s", "b1. reservations/s, all processes (log)")
        limit = doc["meta"]["limits"]["saturated"]
        for r in b2:
            t = [p[0] for p in r["timeline"]]
            u = [p[1] for p in r["timeline"]]
            axes[1].plot(t, u, label=r["limiter"], lw=2.5 if r["limiter"] == RAY_QUOTA else 1)
        if b2:
            end = max(p[0] for r in b2 for p in r["timeline"] or [[0, 0]])
            axes[1].plot([0, end], [limit["burst"], limit["burst"] + limit["rate"] * end], "k--",
                         label="bound: burst + rate·t")
            axes[1].set_title("b2. units admitted over time (binding limit)", fontsize=10)
            axes[1].set_xlabel("seconds")
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / CHARTS["b"], dpi=90)
        plt.close(fig)
        written.append(CHARTS["b"])

    rows = ok(res["c"])
    if rows:
        fig, ax = plt.subplots(figsize=(10, 4))
        tenants = list(rows[0]["shares"])
        width = 0.8 / len(tenants)
        for i, tenant in enumerate(tenants):
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [r["shares"][tenant] for r in rows], width, label=tenant)
            for j in range(len(rows)):
                ax.hlines(rows[0]["fair"][tenant], xs[j] - width / 2, xs[j] + width / 2,
                          colors="k", linestyles="--")
        ax.set_xticks([j + width for j in range(len(rows))])
        ax.set_xticklabels([r["limiter"] for r in rows], fontsize=7, rotation=15)
        ax.set_ylabel("share of units (dashes: fair share)")
        ax.set_title("c. three tenants weighted 1:2:4 on one binding rate limit", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / CHARTS["c"], dpi=90)
        plt.close(fig)
        written.append(CHARTS["c"])

    rows = ok(res["d"])
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
        barh(axes[0], rows, "utilisation", "d. utilisation of the slots", log=False)
        barh(axes[1], rows, "max_in_use", "d. max slots certainly in use", log=False)
        axes[1].axvline(doc["meta"]["limits"]["slots"]["slots"], color="k", ls="--")
        barh(axes[2], rows, "p50_ms", "d. acquire p50, ms (log)")
        fig.tight_layout()
        fig.savefig(out / CHARTS["d"], dpi=90)
        plt.close(fig)
        written.append(CHARTS["d"])
    return written


def write(doc: dict[str, Any], out: Path) -> None:
    names = charts(doc, out)
    (out / "results.md").write_text(markdown(doc, names))
