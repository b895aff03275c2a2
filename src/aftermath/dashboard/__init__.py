"""The live dashboard the coordinator serves (routes and snapshot), and the run history it shares with reports."""

from aftermath.dashboard.history import MetricsTail, RunHistory, tier_label
from aftermath.dashboard.server import Dashboard, add_dashboard_routes, checkpoint_view

__all__ = ["Dashboard", "MetricsTail", "RunHistory", "add_dashboard_routes", "checkpoint_view", "tier_label"]
