"""The Grafana dashboard: rows of panels whose queries name metrics from ``_metrics``, built with
grafana-foundation-sdk's typed builders so the JSON is a Grafana dashboard by construction.

``python -m ray_quota._observability.dashboard [path]`` writes ``dashboards/ray_quota.json``; a
test fails when the committed file is stale, and another runs every query against a real
Prometheus. ``ray-quota dashboard export|install`` write :func:`render`'s text.

Example:
    >>> [row.title for row in ROWS][:2]
    ['Overview', 'Latency']
    >>> dashboard()["templating"]["list"][0]["name"]
    'datasource'
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common, prometheus, timeseries
from grafana_foundation_sdk.builders import dashboard as grafana
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as model

from ray_quota._observability.metrics import (
    AVAILABLE,
    EFFECTIVE_LIMIT,
    EXECUTOR_CALLS,
    EXPECTED_USE,
    IN_USE,
    LEASE_EXPIRIES,
    LEASED_UNITS,
    LEASES,
    LIMIT,
    LIVE_TOKENS,
    REJECTIONS,
    RESERVE_LATENCY,
    TERMINATIONS,
    THROTTLED_SECONDS,
    UNITS_COMMITTED,
    UNITS_OVERUSED,
    UNITS_REFUNDED,
    UNITS_RESERVED,
    WAITERS,
)

PATH = Path(__file__).resolve().parents[2] / "dashboards" / "ray_quota.json"
UID = "ray-quota"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE_WINDOW = "$__rate_interval"
PANEL_HEIGHT = 8


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression of a panel, and how its series are named in the legend."""

    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class Panel:
    """One time-series panel: its queries share a unit; ``width`` is in grid columns (of 24)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 8


@dataclass(frozen=True, slots=True)
class Row:
    """A titled row of panels, laid out left to right, wrapping at the grid's width."""

    title: str
    panels: tuple[Panel, ...]


def select(*matchers: str, resource: bool = True) -> str:
    """A selector on the dashboard's variables, plus ``matchers``."""
    parts = ['environment=~"$environment"']
    if resource:
        parts.append('resource=~"$resource"')
    return "{" + ", ".join([*parts, *matchers]) + "}"


def rate(name: str, *matchers: str, resource: bool = True) -> str:
    return f"rate({name}{select(*matchers, resource=resource)}[{RATE_WINDOW}])"


def _quantiles(path: str) -> tuple[Query, ...]:
    buckets = rate(f"{RESERVE_LATENCY}_bucket", f'path="{path}"', 'outcome="granted"')
    return tuple(Query(f"histogram_quantile({q}, sum by (le) ({buckets}))", f"p{round(q * 100)}")
                 for q in (0.5, 0.95, 0.99))


def _by_resource(name: str, legend: str = "{{resource}}") -> Query:
    return Query(f"sum by (resource) ({name}{select()})", legend)


def _rate_by_resource(name: str, legend: str = "{{resource}}") -> Query:
    return Query(f"sum by (resource) ({rate(name)})", legend)


_USE_BY_LABEL = f"sum by (resource, label) ({rate(UNITS_COMMITTED)})"
# Each label's share of its resource's expected use, applied to the resource's actual use.
_FAIR_BY_LABEL = (f"sum by (resource, label) ({EXPECTED_USE}{select()})"
                  f" / on (resource) group_left () sum by (resource) ({EXPECTED_USE}{select()})"
                  f" * on (resource) group_left () sum by (resource) ({rate(UNITS_COMMITTED)})")

ROWS: tuple[Row, ...] = (
    Row("Overview", (
        Panel("In use vs limit", "Units granted and not back (rate resources: taken from the "
              "bucket) against the limit value.", (
                  _by_resource(IN_USE, "{{resource}} in use"),
                  _by_resource(LIMIT, "{{resource}} limit"))),
        Panel("Available", "Units that could be granted now.", (_by_resource(AVAILABLE),)),
        Panel("Waiters", "Reservations queued at the executor.", (_by_resource(WAITERS),)),
        Panel("Units per second", "Reserved, committed as used, refunded (reserved, unused) "
              "and overused (committed beyond the reservation, charged as debt).", (
                  _rate_by_resource(UNITS_RESERVED, "{{resource}} reserved"),
                  _rate_by_resource(UNITS_COMMITTED, "{{resource}} committed"),
                  _rate_by_resource(UNITS_REFUNDED, "{{resource}} refunded"),
                  _rate_by_resource(UNITS_OVERUSED, "{{resource}} overused")), width=16),
        Panel("Effective limit", "The limit the executor enforces now, lowered from the "
              "configured one by the provider's feedback.", (
                  _by_resource(LIMIT, "{{resource}} configured"),
                  _by_resource(EFFECTIVE_LIMIT, "{{resource}} effective"))),
    )),
    Row("Latency", (
        Panel("Reserve latency, local lease", "Granted reservations served from the "
              "process's lease, without a call.", _quantiles("local"), unit="s"),
        Panel("Reserve latency, via the executor", "Granted reservations that asked the "
              "executor, including any wait in its queue.", _quantiles("executor"), unit="s"),
        Panel("Reservations per second", "By outcome and path.", (
            Query(f"sum by (path, outcome) ({rate(f'{RESERVE_LATENCY}_count')})",
                  "{{path}} {{outcome}}"),), unit="reqps"),
    )),
    Row("Enforcement", (
        Panel("Rejections per second", "Reservations refused: a reject resource could not "
              "grant in time, or a wait limit or timeout ran out.",
              (_rate_by_resource(REJECTIONS),), unit="reqps"),
        Panel("Terminations per second", "Reservations on terminate resources that ended "
              "their task or actor.", (_rate_by_resource(TERMINATIONS),), unit="reqps"),
        Panel("Time throttled", "Seconds per second spent waiting in the executor's queue: "
              "on average, how many reservations were waiting.",
              (_rate_by_resource(THROTTLED_SECONDS),), unit="s"),
    )),
    Row("Fairness", (
        Panel("Use by label against fair share", "Units committed per second by token label, "
              "and each label's share of the resource's use in proportion to its expected "
              "use.", (Query(_USE_BY_LABEL, "{{resource}} {{label}} used"),
                       Query(_FAIR_BY_LABEL, "{{resource}} {{label}} fair share")), width=16),
        Panel("Expected use by label", "The open tokens' expected use, the weight of each "
              "label.", (Query(f"sum by (resource, label) ({EXPECTED_USE}{select()})",
                               "{{resource}} {{label}}"),)),
    )),
    Row("Leases", (
        Panel("Leased units", "Units held in processes' leases, and the number of leases.", (
            _by_resource(LEASED_UNITS, "{{resource}} units"),
            _by_resource(LEASES, "{{resource}} leases"))),
        Panel("Lease expiries", "Leases that expired because their process stopped renewing "
              "(all resources).", (Query(
                  f"sum(increase({LEASE_EXPIRIES}{select(resource=False)}[{RATE_WINDOW}]))",
                  "expiries"),)),
        Panel("Live tokens", "Tokens open.", (_by_resource(LIVE_TOKENS),)),
        Panel("Executor calls per second", "Token and lease calls the executor served, by "
              "method (all resources). With node brokers, renewals and watches follow the "
              "number of nodes, not of processes.", (Query(
                  f"sum by (method) ({rate(EXECUTOR_CALLS, resource=False)})",
                  "{{method}}"),)),
    )),
)


def queries() -> list[str]:
    """Every PromQL expression of every panel, in order."""
    return [q.expr for row in ROWS for panel in row.panels for q in panel.queries]


def _variable(name: str, label: str, query: str) -> grafana.QueryVariable:
    return (grafana.QueryVariable(name).label(label).datasource(DATASOURCE)
            .query({"query": query, "refId": f"{name}-variable"})
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
            .sort(model.VariableSort.ALPHABETICAL_ASC))


def _panel(panel: Panel, panel_id: int) -> timeseries.Panel:
    built = (timeseries.Panel().id(panel_id).title(panel.title).description(panel.description)
             .datasource(DATASOURCE).height(PANEL_HEIGHT).span(panel.width).unit(panel.unit)
             .min(0)
             .legend(common.VizLegendOptions().display_mode(common_model.LegendDisplayMode.LIST)
                     .placement(common_model.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common.VizTooltipOptions().mode(common_model.TooltipDisplayMode.MULTI)
                      .sort(common_model.SortOrder.DESCENDING)))
    for i, query in enumerate(panel.queries):
        built.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend)
                          .range().ref_id(chr(ord("A") + i)).datasource(DATASOURCE))
    return built


def build() -> grafana.Dashboard:
    """The dashboard, built with grafana-foundation-sdk's typed builders: every field is one
    Grafana's schema has, and the builder lays the panels out on the grid, row by row."""
    board = (grafana.Dashboard("ray_quota").uid(UID).description(
        "Fair quota tokens for Ray: use, latency, enforcement, fairness and leases, from the "
        "executor's metrics.").tags(["ray", "ray_quota"]).editable()
        .tooltip(model.DashboardCursorSync.CROSSHAIR).refresh("10s").time("now-30m", "now")
        .timezone("").version(1)
        .with_variable(grafana.DatasourceVariable("datasource").label("Data source")
                       .type("prometheus"))
        .with_variable(_variable("environment", "Environment",
                                 f"label_values({LIMIT}, environment)"))
        .with_variable(_variable("resource", "Resource",
                                 f'label_values({LIMIT}{{environment=~"$environment"}}, '
                                 'resource)')))
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        board.with_row(grafana.Row(row.title).id(panel_id))
        for panel in row.panels:
            panel_id += 1
            board.with_panel(_panel(panel, panel_id))
    return board


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    model_json: dict[str, Any] = json.loads(render())
    return model_json


def render() -> str:
    """The dashboard file's text."""
    return json.dumps(build().build(), cls=JSONEncoder, indent=2) + "\n"


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
