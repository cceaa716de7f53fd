"""The Grafana dashboard as Grafana reads it: the committed JSON parses into grafana-foundation-sdk's
typed dashboard model and back unchanged, and its panels tile the grid. (Its queries are checked
against the metric names in test_metrics.py and against a real Prometheus in
tests/ray/test_prometheus_e2e.py.)"""

from __future__ import annotations

import json

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from ray_quota._observability import dashboard as _dashboard
from ray_quota._observability import metrics as _metrics

GRID_COLUMNS = 24


def test_committed_dashboard_round_trips_through_grafanas_typed_model() -> None:
    committed = json.loads(_dashboard.PATH.read_text())
    parsed = model.Dashboard.from_json(committed)
    assert json.loads(json.dumps(parsed, cls=JSONEncoder)) == committed
    assert committed["uid"] == _dashboard.UID and committed["schemaVersion"] >= 36


def test_panels_tile_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in _dashboard.dashboard()["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= GRID_COLUMNS, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"])
                 for dy in range(pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_the_effective_limit_has_a_panel_beside_the_configured_one() -> None:
    (panel,) = [p for p in _dashboard.dashboard()["panels"] if p["title"] == "Effective limit"]
    exprs = [t["expr"] for t in panel["targets"]]
    assert any(_metrics.EFFECTIVE_LIMIT in e for e in exprs)
    assert any(f"{_metrics.LIMIT}{{" in e for e in exprs)
