"""merit.diagnose: see docs/architecture.md."""
