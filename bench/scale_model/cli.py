"""The command line: ``python -m bench.scale_model [--quick] [--sweep ...]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.scale_model.params import Params, quick
from bench.scale_model.report import chart, markdown
from bench.scale_model.runs import VARIANTS, run_all, sweep
from bench.scale_model.summary import check_runs

OUT_DIR = Path(__file__).resolve().parent.parent  # bench/


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    import bench.scale_model as package

    parser = argparse.ArgumentParser(prog="python -m bench.scale_model",
                                     description=(package.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 nodes x 8 processes, 150 measured seconds (a few s of wall)")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--procs", type=int, help="processes per node")
    parser.add_argument("--seconds", type=float, help="measured simulated seconds")
    parser.add_argument("--warmup", type=float, help="simulated seconds before measuring")
    parser.add_argument("--overload", type=float, help="demand / limit, contended variant")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--variants", default="contended,uncontended",
                        help="comma-separated: contended, uncontended")
    parser.add_argument("--sweep", default="",
                        help="comma-separated node counts to run as well, e.g. 2,5,10,20")
    parser.add_argument("--sweep-seconds", type=float, default=30.0,
                        help="measured simulated seconds at each sweep size (default 30)")
    parser.add_argument("--drain", type=float, help="simulated seconds allowed for the drain")
    parser.add_argument("--executor-call-us", type=float,
                        help="the executor's fixed cost per call (default 300)")
    parser.add_argument("--core-time-us", type=float,
                        help="a fixed core time per call instead of the measured one")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time (default: 2, or 1 on one core)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--render", type=Path,
                        help="redraw the table and chart from a scale_results.json, no run")
    parser.add_argument("--out", type=Path,
                        help="where to write scale_results.json, scale_model.md and "
                             "scale_model.png (default: bench/, or nowhere with --quick)")
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> Params:
    params = quick(Params()) if args.quick else Params()
    changes = {"nodes": args.nodes, "procs": args.procs, "seconds": args.seconds,
               "warmup_s": args.warmup, "drain_s": args.drain, "overload": args.overload,
               "seed": args.seed,
               "executor_call_s": None if args.executor_call_us is None
               else args.executor_call_us * 1e-6,
               "core_time_s": None if args.core_time_us is None else args.core_time_us * 1e-6}
    params = replace(params, **{k: v for k, v in changes.items() if v is not None})
    return replace(params, verbose=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the model, print the table, and write the results, chart and table."""
    args = parse(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        write(report, args.out or args.render.parent, results=False)
        return 0
    params = params_from(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.sweep.split(",") if n.strip()]
    started = time.perf_counter()
    swept = sweep(params, sizes, variants, seconds=args.sweep_seconds, jobs=args.jobs)
    main_started = time.perf_counter()
    runs = run_all(params, variants, jobs=args.jobs)
    main_wall_s = time.perf_counter() - main_started
    checks = {variant: check_runs(runs[variant], fairness=VARIANTS[variant] is None)
              for variant in variants}
    command = "python -m bench.scale_model" + ("" if argv is None and len(sys.argv) <= 1
                                               else " " + " ".join(argv or sys.argv[1:]))
    report = {"command": command, "params": asdict(params), "jobs": args.jobs, "runs": runs,
              "checks": checks,
              "sweep": swept, "sweep_seconds": args.sweep_seconds, "main_wall_s": main_wall_s,
              "wall_s": time.perf_counter() - started}
    out = args.out if args.out is not None else (None if args.quick else OUT_DIR)
    if out is None:
        print(markdown(report))
    else:
        write(report, out, results=True)
    return 0


def write(report: dict[str, Any], out: Path, *, results: bool) -> None:
    """Print the table and write it, the chart and (if ``results``) the JSON into ``out``."""
    text = markdown(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    if results:
        (out / "scale_results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "scale_model.md").write_text(text)
    chart(report, out / "scale_model.png")
