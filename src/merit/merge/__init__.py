"""merit.merge: see docs/architecture.md."""
