"""merit.report: see docs/architecture.md."""
