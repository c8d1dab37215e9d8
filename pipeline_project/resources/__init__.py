"""Everything that talks to the outside: the DuckDB warehouse, the landing folder, alert sinks."""

from pipeline_project.resources.alerts import AlertSink
from pipeline_project.resources.landing import LandingZone
from pipeline_project.resources.warehouse import Warehouse

__all__ = ["AlertSink", "LandingZone", "Warehouse"]
