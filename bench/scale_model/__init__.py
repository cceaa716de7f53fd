"""A scale model: the real scheduling core under a simulated cluster, with and without brokers.

No Ray. A discrete-event simulation on a fake clock drives the real :class:`ExecutorService`,
:class:`BrokerCore` and :class:`LeaseSet` objects the way the executor actor
(``ray_quota/_actors/executor.py``), the node broker (``_actors/broker.py``) and each process
(``_token.py``, ``_runtime/renewer.py``) drive them, and counts what reaches the executor.

Example:
    >>> results = run(quick(Params()), brokers=True)  # 4 nodes x 8 processes
    >>> round(results["executor"]["calls_per_s"]["renew"])  # one per node per second
    4

Time is modelled, not measured on a wall clock:

- The executor and each broker are single-threaded servers that take calls in arrival order.
  A call costs a fixed overhead (the Ray call, asyncio, the SQLite write) plus the CPU time the
  real core took for it here, measured with ``time.thread_time`` around the core calls (CPU
  time of this thread, so other jobs on a shared machine do not inflate it).
- A call that parks (a waiting ``acquire``, a ``watch``) costs a smaller reply overhead when it
  is answered; the executor's ticker (refills, expiries) costs a small loop overhead plus its
  core time.
- Every message crosses a hop: process to broker on the same node, anything to the executor
  across nodes.

Run ``python -m bench.scale_model --help`` for the knobs; ``--quick`` is 4 nodes x 8 processes.

Modules: :mod:`~bench.scale_model.sim` (the clock, servers, replies), ``params`` (a run's knobs
and records), ``actor``, ``executor`` and ``broker`` (the actors around the real core),
``process`` (a worker process), ``cluster`` (the wiring), ``runs`` and ``summary`` (runs, their
figures and checks), ``report`` (table and chart) and ``cli``.
"""

from bench.scale_model.actor import Actor, LeaseService
from bench.scale_model.broker import BrokerModel
from bench.scale_model.cli import main, params_from, parse, write
from bench.scale_model.cluster import Cluster
from bench.scale_model.executor import ExecutorModel
from bench.scale_model.params import EXECUTOR, LOCAL, NODE, PATHS, RESOURCE, Params, Stats, quick
from bench.scale_model.process import Process, SimulationError
from bench.scale_model.report import chart, markdown, sweep_markdown, table_rows
from bench.scale_model.runs import MODES, VARIANTS, run, run_all, sweep, variant_params
from bench.scale_model.sim import CoreTimer, Reply, Server, Sim, Window
from bench.scale_model.summary import admission, check_runs, summarise

__all__ = [
    "EXECUTOR", "LOCAL", "MODES", "NODE", "PATHS", "RESOURCE", "VARIANTS", "Actor",
    "BrokerModel", "Cluster", "CoreTimer", "ExecutorModel", "LeaseService", "Params", "Process",
    "Reply", "Server", "Sim", "SimulationError", "Stats", "Window", "admission", "chart",
    "check_runs", "main", "markdown", "params_from", "parse", "quick", "run", "run_all",
    "summarise", "sweep", "sweep_markdown", "table_rows", "variant_params", "write",
]
