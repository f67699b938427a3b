"""One rx.State module per page, plus the telemetry rail's state shared by every page."""
