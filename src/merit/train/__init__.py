"""merit.train: see docs/architecture.md."""
