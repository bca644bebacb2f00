"""merit.calibrate: see docs/architecture.md."""
