"""merit.evaluate: see docs/architecture.md."""
