"""Metrics: what workers observe, what the executor exports, and the Grafana dashboard."""
