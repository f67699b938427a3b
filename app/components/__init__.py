"""Small reusable pieces: sparkline, status pill, loss chart, the page layout with navigation and telemetry rail."""
