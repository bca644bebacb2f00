"""Rows scored as trained: θ0, joint training for 1 and 2 epochs, MERIT-rD, random splits and
merit's gain planner (paper §5)."""

from __future__ import annotations

from merit.compare.rows import ROWS, RowKind, Unit
from merit.config import RunConfig


def _seed(seed: int) -> dict:
    return {"training.seed": seed}


def _random(cfg: RunConfig, seed: int) -> list[Unit]:
    c = cfg.compare
    return [
        Unit("random", f"random-d{d}-s{seed}", seed, "merged",
             {**_seed(seed), "planning.splitter": "random", "planning.k": c.random_k,
              "planning.seed": 1000 * seed + d})
        for d in range(c.random_draws)
    ]  # fmt: skip


def _merit(r: int) -> RowKind:
    plan = {"planning.splitter": "median", "planning.rank": r, "planning.k": None}
    return RowKind(
        f"merit-{r}d",
        lambda _cfg: f"MERIT-{r}D (K={2**r})",
        lambda _cfg, s: [
            Unit(f"merit-{r}d", f"merit-{r}d-s{s}", s, "merged", {**_seed(s), **plan})
        ],
        order=70 + r,
    )


ROWS.register(
    RowKind("base", lambda _cfg: "θ0", lambda _cfg, s: [Unit("base", "base", s, "base")],
            budget=0.0, once=True, order=10)
)  # fmt: skip
ROWS.register(
    RowKind("joint", lambda _cfg: "Joint (1 epoch)",
            lambda _cfg, s: [Unit("joint", f"joint-s{s}", s, "joint", _seed(s))], order=20)
)  # fmt: skip
ROWS.register(
    RowKind(
        "joint-2ep",
        lambda _cfg: "Joint (2 epochs)",
        lambda cfg, s: [
            Unit(
                "joint-2ep",
                f"joint-2ep-s{s}",
                s,
                "joint",
                {**_seed(s), "training.epochs": 2 * cfg.training.epochs},
            )
        ],
        budget=2.0,
        order=30,
    )
)
ROWS.register(
    RowKind(
        "random",
        lambda cfg: f"Random split (K={cfg.compare.random_k}, {cfg.compare.random_draws} draws)",
        _random,
        order=60,
    )
)
for _r in (1, 2, 3):
    ROWS.register(_merit(_r))
ROWS.register(
    RowKind(
        "gain",
        lambda cfg: f"merit gain planner (K={cfg.compare.gain_k})",
        lambda cfg, s: [
            Unit(
                "gain",
                f"gain-s{s}",
                s,
                "merged",
                {**_seed(s), "planning.splitter": "gain", "planning.k": cfg.compare.gain_k},
            )
        ],
        order=80,
    )
)
