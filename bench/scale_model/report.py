"""The results table, the sweep table and the chart."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from bench.scale_model.params import PATHS
from bench.scale_model.runs import MODES, VARIANTS


def _fmt(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table_rows(result: dict[str, Any], *, contended: bool) -> dict[str, str]:
    """One column of the results table; shares are only judged in a contended run."""
    executor, tenants = result["executor"], result["tenants"]
    calls, latency = executor["calls_per_s"], result["latency_ms"]
    core = executor["core_ms_per_call"]
    paths = result["reservations"]
    served = sum(paths.values()) or 1
    brokers = result["brokers"]
    rows = {"executor calls/s (total)": _fmt(calls["total"])}
    for method in ("acquire", "renew", "watch", "settle", "split", "merge_back"):
        rows[f"  {method}"] = _fmt(calls.get(method, 0.0))
    rows.update({
        "executor calls per reservation": _fmt(executor["calls_per_reservation"], 2),
        "executor utilisation": f"{executor['utilisation']:.0%}",
        "  of which core time": f"{executor['core_share']:.0%}",
        "core ms per acquire / renew / settle": " / ".join(
            _fmt(core.get(m, math.nan), 2) for m in ("acquire", "renew", "settle")),
        "requests waiting in the core (mean)": _fmt(executor["mean_waiters"], 0),
        "executor queue: mean wait (ms) / max calls":
            f"{_fmt(executor['mean_queue_wait_ms'])} / {executor['max_backlog']}",
        "broker calls/s, each": _fmt(brokers["calls_per_s_each"]) if brokers else "-",
        "broker utilisation, busiest": f"{brokers['utilisation_max']:.1%}" if brokers else "-",
        "reservations: process / node / executor":
            " / ".join(f"{paths[p] / served:.0%}" for p in PATHS),
        "reserve p50 / p99, all (ms)":
            f"{_fmt(latency['all']['p50'])} / {_fmt(latency['all']['p99'])}",
        "reserve p50 / p99, left the process (ms)":
            f"{_fmt(latency['left_process']['p50'])} / {_fmt(latency['left_process']['p99'])}",
        "units used / limit": f"{tenants['limit_use']:.2f}",
        "tenant shares (target)": " / ".join(
            f"{s:.3f} ({t:.3f})" for s, t in zip(tenants["shares"], tenants["targets"])),
        "share error / Jain": (f"{tenants['share_error']:.1%} / {tenants['jain']:.4f}"
                               if contended else "n/a: nobody waits for long"),
        "over-admission (units over the bound)": _fmt(max(0.0, result["admission"]["excess"]),
                                                      0),
        "lease restarts / lease expiries": f"{result['lease_restarts']} / "
                                           f"{result['accounting']['lease_expiries']}",
        "units charged, not used": _fmt(result["accounting"]["units_out"]
                                        - result["accounting"]["units_used"], 0),
        "all processes finished (drain)": "yes" if result["accounting"]["drained"] else "no",
        "wall time (s)": _fmt(result["wall_s"]),
    })
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The results table, the model's assumptions, and the command that produced them."""
    runs = report["runs"]
    columns = [(variant, mode) for variant in runs for mode in MODES]
    tables = [table_rows(runs[v][m], contended=VARIANTS[v] is None) for v, m in columns]
    rows = {key: [table[key] for table in tables] for key in tables[0]}
    params = report["params"]
    lines = [
        "# Scale model: the executor with and without node brokers",
        "",
        (f"`{report['command']}` - {params['nodes']} nodes x {params['procs']} processes, "
         f"{params['seconds']:.0f} s measured after {params['warmup_s']:.0f} s of warm-up. "
         f"Wall time on {os.cpu_count()} cores, {report['jobs']} runs at a time: "
         f"{report['main_wall_s']:.0f} s for the runs in this table"
         + (f", {report['wall_s']:.0f} s with the sweep below." if report.get("sweep")
            else ".")),
        "",
        "| | " + " | ".join(f"{v}, {m}" for v, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {key} | " + " | ".join(values) + " |" for key, values in rows.items()]
    limits = ", ".join(f"{v}: {runs[v]['direct']['limit_per_minute']:,} tokens/min "
                       f"(burst {runs[v]['direct']['burst']:,})" for v in runs)
    lines += ["", f"Limits: {limits}.", ""]
    if report.get("sweep"):
        lines += sweep_markdown(report) + [""]
    lines += [_assumptions(params), ""]
    if report["checks"]:
        lines += ["Checks (tests/core/test_scale_model.py asserts them on `--quick`):", ""]
        lines += [f"- {variant}: " + ("all hold" if not failures else "; ".join(failures))
                  for variant, failures in report["checks"].items()]
    return "\n".join(lines) + "\n"


SWEEP_COLUMNS = ("processes", "variant", "brokers", "executor calls/s", "busy",
                 "calls per reservation", "queue wait (ms)",
                 "reserve p50 / p99, left the process (ms)", "share error", "lease restarts")


def sweep_markdown(report: dict[str, Any]) -> list[str]:
    """A table row per size, variant and mode: the sweep's sizes, then the full run."""
    lines = [
        (f"Other sizes (`--sweep`, {report['sweep_seconds']:g} s measured each; the last "
         f"rows are the run above):"),
        "",
        "| " + " | ".join(SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(SWEEP_COLUMNS),
    ]
    for runs in [*report["sweep"].values(), report["runs"]]:
        for variant, pair in runs.items():
            for mode in MODES:
                cells = _sweep_row(pair[mode], variant)
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep_row(result: dict[str, Any], variant: str) -> list[str]:
    executor, latency = result["executor"], result["latency_ms"]["left_process"]
    contended = VARIANTS[variant] is None
    return [
        f"{result['processes']:,}", variant, "on" if result["mode"] == "brokers" else "off",
        _fmt(executor["calls_per_s"]["total"], 0), f"{executor['utilisation']:.0%}",
        _fmt(executor["calls_per_reservation"], 2), _fmt(executor["mean_queue_wait_ms"]),
        f"{_fmt(latency['p50'])} / {_fmt(latency['p99'])}",
        f"{result['tenants']['share_error']:.1%}" if contended else "n/a",
        str(result["lease_restarts"]),
    ]


def _assumptions(params: dict[str, Any]) -> str:
    """The model's assumptions, in five sentences."""
    ms = {key: params[key] * 1e3 for key in ("executor_call_s", "broker_call_s", "reply_s",
                                             "tick_s", "node_hop_s", "cluster_hop_s")}
    low, high = params["reservations_per_task"]
    return (
        "The model drives the real `ExecutorService`, `BrokerCore` and `LeaseSet` on a "
        "simulated clock with the calls the executor actor, broker actor and client make: per "
        "process "
        "a renewal 1 s after the last one returned, one recall watch (answered after 2 s at "
        "the latest), and `acquire`/`settle`/`split`/`merge_back` as the workload needs them; "
        "with brokers, processes call their node's broker, which renews and watches once per "
        "node. "
        f"The executor and every broker serve calls one at a time in arrival order, each call "
        f"costing {ms['executor_call_s']:.2f} ms at the executor "
        f"({ms['broker_call_s']:.2f} ms at a broker) plus the CPU time the real core took for "
        f"it here (`time.thread_time`); answering a parked call costs "
        f"{ms['reply_s']:.2f} ms, a ticker turn {ms['tick_s']:.2f} ms plus core time, and a "
        f"hop {ms['node_hop_s']:.1f} ms on a node or {ms['cluster_hop_s']:.1f} ms to the "
        f"executor. "
        f"Processes start over the first {params['ramp_s']:g} s, are dealt in turn to tenants "
        f"weighing {':'.join(map(str, params['weights']))}, and run tasks back to back, each "
        f"with a token split from its tenant's (expected use {params['weight_unit']} x "
        f"weight, merged back at the end) making {low}-{high} reservations of "
        f"{params['amount'][0]}-{params['amount'][1]} tokens, each held through an LLM call of "
        f"{params['think_s'][0]}-{params['think_s'][1]} s and committed at "
        f"{params['used_fraction'][0]:.0%}-{params['used_fraction'][1]:.0%} of its size. "
        f"The contended limit is what the processes would reserve if they never waited, "
        f"divided by {params['overload']:g}; the uncontended limit is twice it. "
        f"Ray's serialisation, the SQLite write and the network are in the fixed costs only, "
        f"and the measured core time moves a little from run to run with the machine."
    )


METHODS = ("acquire", "renew", "watch", "settle", "split", "merge_back")


def chart(report: dict[str, Any], path: Path) -> None:
    """Executor calls/s by method in each variant, reserve latency and tenant shares; with a
    sweep, the executor's busy fraction and the reserve latency against the cluster's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    rows = 3 if report.get("sweep") else 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows))
    for ax, variant in zip(axes[0], list(runs)[:2]):
        _calls_panel(ax, variant, runs[variant])
    _latency_panel(axes[1][0], runs)
    _shares_panel(axes[1][1], report)
    if rows == 3:
        _sweep_panels(axes[2][0], axes[2][1], report)
    fig.suptitle(f"ray_quota scale model: {report['params']['nodes']} nodes x "
                 f"{report['params']['procs']} processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(mode: str) -> str:
    return f"brokers {'on' if mode == 'brokers' else 'off'}"


def _calls_panel(ax: Any, variant: str, pair: dict[str, Any]) -> None:
    for offset, mode in ((-0.2, "direct"), (0.2, "brokers")):
        executor = pair[mode]["executor"]
        heights = [max(executor["calls_per_s"].get(m, 0.0), 0.1) for m in METHODS]
        ax.bar([i + offset for i in range(len(METHODS))], heights, width=0.4,
               label=f"{_label(mode)} (executor busy {executor['utilisation']:.0%})")
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_ylabel("executor calls / s")
    ax.set_title(f"{variant}: executor calls by method")
    ax.legend()


def _latency_panel(ax: Any, runs: dict[str, Any]) -> None:
    labels, p50, p99 = [], [], []
    for variant, pair in runs.items():
        for mode in MODES:
            latency = pair[mode]["latency_ms"]["left_process"]
            labels.append(f"{variant}\n{_label(mode)}")
            p50.append(0.0 if math.isnan(latency["p50"]) else latency["p50"])
            p99.append(0.0 if math.isnan(latency["p99"]) else latency["p99"])
    ax.bar([i - 0.2 for i in range(len(labels))], p50, width=0.4, label="p50")
    ax.bar([i + 0.2 for i in range(len(labels))], p99, width=0.4, label="p99")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("reserve latency, reservations that left the process")
    ax.legend()


def _shares_panel(ax: Any, report: dict[str, Any]) -> None:
    variant = next(iter(report["runs"]))
    pair = report["runs"][variant]
    weights = report["params"]["weights"]
    for offset, mode in ((-0.25, "direct"), (0.0, "brokers")):
        ax.bar([i + offset for i in range(len(weights))], pair[mode]["tenants"]["shares"],
               width=0.25, label=_label(mode))
    ax.bar([i + 0.25 for i in range(len(weights))], pair["direct"]["tenants"]["targets"],
           width=0.25, label="target", color="grey")
    ax.set_xticks(range(len(weights)), [f"weight {w}" for w in weights])
    ax.set_ylabel("share of units used")
    ax.set_title(f"{variant}: tenant shares")
    ax.legend()


def _sweep_panels(busy: Any, latency: Any, report: dict[str, Any]) -> None:
    sizes = [*report["sweep"].values(), report["runs"]]
    for variant in report["runs"]:
        for mode in MODES:
            points = [runs[variant][mode] for runs in sizes if variant in runs]
            procs = [point["processes"] for point in points]
            style = {"color": "C1" if mode == "brokers" else "C0", "marker": "o",
                     "linestyle": "-" if VARIANTS[variant] is None else ":",
                     "label": f"{variant}, {_label(mode)}"}
            busy.plot(procs, [point["executor"]["utilisation"] for point in points], **style)
            latency.plot(procs, [point["latency_ms"]["left_process"]["p50"] for point in points],
                         **style)
    counts = sorted({runs[variant]["direct"]["processes"] for runs in sizes
                     for variant in runs})
    for ax in (busy, latency):
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{count:,}" for count in counts])
        ax.minorticks_off()
        ax.set_xlabel("processes")
        ax.legend(fontsize=8)
    busy.set_ylim(0.0, 1.05)
    busy.set_ylabel("executor busy fraction")
    busy.set_title("executor utilisation against cluster size")
    latency.set_yscale("log")
    latency.set_ylabel("ms")
    latency.set_title("reserve p50, reservations that left the process")
