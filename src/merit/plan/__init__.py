"""merit.plan: see docs/architecture.md."""
