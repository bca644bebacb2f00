"""merit.data: see docs/architecture.md."""
