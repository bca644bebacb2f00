"""The rows of the comparison (paper §5, Table 1) and the runs that make them.

A *row* is one line of the table (``joint``, ``merit-2d``, ...); a *unit* is one model that a
row averages over (a seed, a random split's draw). Every unit is an ordinary run config — the
compare config with a few settings changed — trained and merged by the same stages as
``merit train`` / ``merit merge``. A unit whose experiment equals the compare config's own shares
its run directory; the others live in ``compare/runs/<unit>/``. The kinds of row are registered
in :data:`ROWS`, one module per row family under :mod:`merit.compare.rowkinds`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merit.config import EXPERIMENT, ConfigError, RunConfig, apply_overrides, config_from_dict
from merit.registry import Registry
from merit.run import RunPaths


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


@dataclass(frozen=True)
class RowKind:
    """A kind of row, registered in :data:`ROWS` by its module.

    ``units(cfg, seed)`` lists the models to train for one seed (as run-config overrides);
    ``make(comparison, row)``, where given, turns the trained units into the scored model(s)
    (a selection on the validation split, a merge of them); else each unit is scored as trained.
    """

    name: str
    label: Callable[[RunConfig], str]
    units: Callable[[RunConfig, int], list[Unit]]
    budget: float = 1.0  # training tokens as a multiple of joint training's (1 epoch)
    make: Callable[[Any, Row], list] | None = None
    validation: bool = False  # chooses on the validation split
    requires: tuple[str, ...] = ()  # rows it is made from
    once: bool = False  # one seed only (θ0)
    order: int = 100


ROWS: Registry[RowKind] = Registry("compare row", "merit.compare.rowkinds")


def row_label(name: str, cfg: RunConfig) -> str:
    return ROWS.get(name).label(cfg)


def rows(cfg: RunConfig) -> list[Row]:
    """The rows of ``compare.rows``, each with its units for every seed (θ0 once)."""
    seeds = cfg.compare.seeds or [cfg.training.seed]
    out = []
    for name in cfg.compare.rows:
        kind = ROWS.get(name)
        units = [u for s in (seeds[:1] if kind.once else seeds) for u in kind.units(cfg, s)]
        out.append(Row(name, kind.label(cfg), kind.budget, tuple(units)))
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
    if out.settings(*EXPERIMENT) != cfg.settings(*EXPERIMENT):
        out.run_dir = str(RunPaths(root).compare_run(unit.key))
    return out


def _yaml(v: Any) -> str:
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
    wants = [r for r in cfg.compare.rows if ROWS.get(r).validation]
    if wants and cfg.data.split.validation == 0:
        raise ConfigError(
            f"compare rows {', '.join(wants)} choose on a validation split: set "
            "data.split.validation (examples per dataset carved from the training examples)"
        )
    for r in cfg.compare.rows:
        for need in ROWS.get(r).requires:
            if need not in cfg.compare.rows:
                raise ConfigError(
                    f"compare row {r} is made from the {need} row: add {need} to rows"
                )
