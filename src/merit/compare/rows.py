"""The rows of the comparison (paper §5, Table 1) and the runs that make them.

A *row* is one line of the table (``joint``, ``merit-2d``, ...); a *unit* is one model that a
row averages over (a seed, a random split's draw). Every unit is an ordinary run config — the
compare config with a few settings changed — trained and merged by the same stage functions as
``merit train`` / ``merit merge``. A unit whose experiment equals the compare config's own shares
its run directory; the others live in ``compare/runs/<unit>/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merit.config import ConfigError, RunConfig, apply_overrides, config_from_dict

# How a row turns its units into one model: scored as trained, or made from them afterwards.
_LABELS = {
    "base": "θ0",
    "joint": "Joint (1 epoch)",
    "joint-2ep": "Joint (2 epochs)",
    "joint-lr": "Joint (LR on validation)",
    "shrink": "θ0 + α(θ_joint − θ0), α on validation",
    "random": "Random split",
    "soup": "Uniform soup",
    "gain": "merit gain planner",
}


@dataclass(frozen=True)
class Unit:
    """One trained (or selected) model of a row: a run config and which of its models."""

    row: str
    key: str  # unique: row, seed, draw
    seed: int
    model: str  # "base", "joint" or "merged": what the run's stages produce
    overrides: dict[str, Any] = field(default_factory=dict)
    role: str = "scored"  # scored | candidate (joint-lr grid) | member (soup)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    budget: float  # training tokens as a multiple of joint training's (1 epoch)
    units: tuple[Unit, ...]


def row_label(name: str, cfg: RunConfig) -> str:
    c = cfg.compare
    if name.startswith("merit-"):
        r = int(name[6])
        return f"MERIT-{r}D (K={2**r})"
    extra = {
        "random": f" (K={c.random_k}, {c.random_draws} draws)",
        "soup": f" ({c.soup_runs} runs × 1/{c.soup_runs})",
        "gain": f" (K={c.gain_k})",
    }
    return _LABELS[name] + extra.get(name, "")


def _units(name: str, cfg: RunConfig, seed: int) -> list[Unit]:
    c, t = cfg.compare, cfg.training
    s = {"training.seed": seed}
    key = f"{name}-s{seed}"
    if name == "base":
        return [Unit(name, name, seed, "base")]
    if name in ("joint", "shrink"):  # the shrinkage control is made from the joint model
        return [Unit(name, f"joint-s{seed}", seed, "joint", s)]
    if name == "joint-2ep":
        return [Unit(name, key, seed, "joint", {**s, "training.epochs": 2 * t.epochs})]
    if name == "joint-lr":
        return [
            Unit(
                name,
                f"joint-s{seed}" if m == 1 else f"joint-lr{m:g}-s{seed}",
                seed,
                "joint",
                {**s, "training.learning_rate": t.learning_rate * m} if m != 1 else s,
                "candidate",
            )
            for m in c.learning_rates
        ]
    if name == "random":
        return [
            Unit(
                name,
                f"random-d{d}-s{seed}",
                seed,
                "merged",
                {**s, "planning.splitter": "random", "planning.k": c.random_k,
                 "planning.seed": 1000 * seed + d},
            )
            for d in range(c.random_draws)
        ]  # fmt: skip
    if name == "soup":
        return [
            Unit(
                name,
                f"soup-m{m}-s{seed}",
                seed,
                "joint",
                {"training.seed": 1000 * seed + m + 1, "training.epochs": t.epochs / c.soup_runs},
                "member",
            )
            for m in range(c.soup_runs)
        ]
    if name.startswith("merit-"):
        plan = {"planning.splitter": "median", "planning.rank": int(name[6]), "planning.k": None}
        return [Unit(name, key, seed, "merged", {**s, **plan})]
    if name == "gain":
        plan = {"planning.splitter": "gain", "planning.k": c.gain_k}
        return [Unit(name, key, seed, "merged", {**s, **plan})]
    raise ValueError(f"unknown row {name!r}")


# Training tokens as a multiple of joint training's (1 epoch); every other row: 1.
_BUDGET = {"base": 0.0, "joint-2ep": 2.0}


def rows(cfg: RunConfig) -> list[Row]:
    """The rows of ``compare.rows``, each with its units for every seed (θ0 once)."""
    seeds = cfg.compare.seeds or [cfg.training.seed]
    out = []
    for name in cfg.compare.rows:
        units = [u for s in (seeds[:1] if name == "base" else seeds) for u in _units(name, cfg, s)]
        out.append(Row(name, row_label(name, cfg), _BUDGET.get(name, 1.0), tuple(units)))
    return out


def unit_config(cfg: RunConfig, unit: Unit, root: Path) -> RunConfig:
    """The unit's run config: the compare config with the unit's settings, evaluating only its
    model; its run directory is the compare's own when the experiment is the same."""
    raw = cfg.model_dump(mode="json")
    models = {"base": ["base"], "joint": ["joint"], "merged": ["merged"]}[unit.model]
    over = [f"{k}={_yaml(v)}" for k, v in unit.overrides.items()]
    over += [f"evaluation.models={_yaml(models)}"]
    over += [f"training.baselines={_yaml(['joint'] if unit.model == 'joint' else [])}"]
    out = config_from_dict(apply_overrides(raw, over))
    if out.settings("train") != cfg.settings("train"):
        out.run_dir = str(root / "compare" / "runs" / unit.key)
    return out


def _yaml(v: Any) -> str:
    import json

    return json.dumps(v)  # JSON is YAML: lists, floats and null parse back as written


def check_rows(cfg: RunConfig, n_datasets: int) -> None:
    """Refuse, in one line and before any training, a row the mixture cannot hold; every unit's
    config is validated on the way."""
    for row in rows(cfg):
        for u in row.units:
            k = unit_config(cfg, u, Path(cfg.run_dir)).planning.groups
            if u.model == "merged" and k > n_datasets:
                raise ConfigError(
                    f"compare row {row.name} needs K={k} groups but the mixture has only "
                    f"{n_datasets} datasets (drop it from compare.rows or add datasets)"
                )
    wants = [r for r in ("joint-lr", "shrink") if r in cfg.compare.rows]
    if wants and cfg.data.split.validation == 0:
        raise ConfigError(
            f"compare rows {', '.join(wants)} choose on a validation split: set "
            "data.split.validation (examples per dataset carved from the training examples)"
        )
    if "shrink" in cfg.compare.rows and "joint" not in cfg.compare.rows:
        raise ConfigError("compare row shrink is made from the joint row: add joint to rows")
