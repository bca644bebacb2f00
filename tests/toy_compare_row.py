"""A toy compare row, in one short module: joint training at half the learning rate."""

from __future__ import annotations

from merit.compare.rows import ROWS, RowKind, Unit

ROW = ROWS.register(
    RowKind(
        "joint-slow",
        lambda _cfg: "Joint (half the learning rate)",
        lambda cfg, s: [
            Unit(
                "joint-slow",
                f"joint-slow-s{s}",
                s,
                "joint",
                {"training.seed": s, "training.learning_rate": cfg.training.learning_rate / 2},
            )
        ],
        order=25,
    ),
    replace=True,
)
