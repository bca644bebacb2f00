"""How a comparison's units become scored models: each unit's run, trained and merged through
the stage executor, scored by the evaluate stage's scorer; the state of one comparison."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from merit.artifacts import read_json, sha256_file, write_json
from merit.compare.rows import ROWS, Row, Unit, unit_config
from merit.data.stage import READS as DATA_READS
from merit.diagnose import selection as select
from merit.evaluate.models import ModelScores, score_model
from merit.graph import Context
from merit.merge.safetensors_io import distances_from
from merit.run import RunPaths
from merit.train.artifact import BranchManifest, Trained


@dataclass
class Made:
    """A unit's model: where it is, the run that made it, the tokens its training saw."""

    unit: Unit
    run: Context
    path: Path
    tokens: int
    steps: tuple[int, ...] = ()  # optimizer steps of each job that trained it


def _share_upstream(root: Context, run_dir: Path) -> None:
    """Give a row's run directory the compare run's data and calibration (hard links, else
    copies): the row's own stages then find them current and reuse them."""
    src = root.paths
    for f in (src.data, src.base, src.calibration, src.sketches):
        dst = run_dir / f.relative_to(src.root)
        if dst.exists() or not f.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copy2(f, dst)


def unit_run(root: Context, unit: Unit) -> Context:
    """The unit's run: the compare's own directory, or its row directory, opened."""
    cfg = unit_config(root.cfg, unit, root.paths.root)
    if Path(cfg.run_dir) == root.paths.root:
        return root.derive(cfg)  # same experiment: the compare run, already opened and validated
    _share_upstream(root, Path(cfg.run_dir))
    ctx = root.derive(cfg)
    ctx.run.open()
    return ctx


def produce(root: Context, unit: Unit) -> Made:
    """Train (and merge) a unit's model through the stage executor, reusing what is done."""
    run = unit_run(root, unit)
    if unit.model == "base":
        return Made(unit, run, run.base.dir, 0)
    if unit.model == "joint":
        trained = run.executor.get("joint")
        tokens = sum(trained.tokens_seen.values())
        path = run.paths.baseline("joint") / "model"
        return Made(unit, run, path, tokens, _steps(run, trained))
    trained = run.executor.get("train")
    run.executor.get("merge")
    return Made(
        unit, run, run.paths.merged, sum(trained.tokens_seen.values()), _steps(run, trained)
    )


def _steps(run: Context, trained: Trained) -> tuple[int, ...]:
    return tuple(
        BranchManifest.load(RunPaths.manifest(run.paths.root / rel)).steps
        for rel in sorted(trained.manifests)
    )


def score(made: Made, label: str, out: Path | None = None, key: str | None = None) -> ModelScores:
    key = key or {"base": "base", "joint": "joint"}.get(made.unit.model, "merged")
    return score_model(made.run, key, label, made.path, out)


def unit_record(made: Made, scores: ModelScores, **extra) -> dict:
    return {
        "key": made.unit.key,
        "seed": made.unit.seed,
        "run_dir": str(made.run.paths.root),
        "model": str(made.path),
        "tokens": made.tokens,
        "steps": list(made.steps),
        "weights_sha256": scores.weights_sha256,
        **extra,
    }


def job_sha(model: Path) -> str:
    """What identifies a trained model: the sha256 of its job's manifest."""
    return sha256_file(RunPaths.manifest(model.parent))


def inputs_of(models: list[Path]) -> dict[str, str]:
    """What a derived model is of: its inputs' job directories and manifests' sha256."""
    return {str(m.parent): job_sha(m) for m in models}


class Comparison:
    """The state of one ``merit compare``: the compare run, its selection objective, results."""

    def __init__(self, run: Context):
        self.run = run
        self.dir = run.paths.compare
        self.selection: dict[str, dict] = {}
        self._validation: select.LMObjective | None = None

    @property
    def validation(self) -> select.LMObjective:
        if self._validation is None:
            self._validation = select.objective(self.run, "validation")
        return self._validation

    def memo(self, key: str, compute):
        """A validation-split result, kept in ``compare/selection.json`` under what it was
        computed from (a trained model's manifest sha256), so a resumed comparison re-reads it."""
        path = self.dir / "selection.json"
        stamp = {"data": self.run.cfg.settings(*DATA_READS), "base": self.run.base.fingerprint}
        cache = read_json(path) if path.is_file() else {}
        if cache.get("stamp") != stamp:
            cache = {"stamp": stamp, "values": {}}
        if key not in cache["values"]:
            cache["values"][key] = compute()
            write_json(path, cache)
        return cache["values"][key]

    def loss(self, path: Path) -> float:
        return select.losses(self.validation, {"m": path}, self.run.cfg.model.dtype)["m"]

    def alpha_curve(self, model: Path, grid: list[float] | None = None) -> dict[float, float]:
        """Validation loss along θ0 + α(θ − θ0) for the model at ``model``, α on ``grid``
        (default: ``compare.alphas``), smallest α first."""
        obj = self.validation
        theta0 = obj.vector(self.run.base.load())
        theta = select.vector(obj, model, self.run.cfg.model.dtype)
        return select.alpha_curve(obj, theta0, theta, grid or self.run.cfg.compare.alphas)

    def row(self, row: Row) -> list[tuple[dict, ModelScores]]:
        """Every unit of the row, produced and scored: (record, scores) each."""
        self.run.say(f"compare: {row.label}")
        kind = ROWS.get(row.name)
        if kind.make is not None:  # a row made from its units afterwards (a selection, a soup)
            return kind.make(self, row)
        out = []
        for unit in row.units:
            made = produce(self.run, unit)
            out.append((made, score(made, row.label)))
        return [(unit_record(m, s), s) for m, s in out]

    def by_seed(self, row: Row) -> dict[int, list[Unit]]:
        seeds: dict[int, list[Unit]] = {}
        for u in row.units:
            seeds.setdefault(u.seed, []).append(u)
        return seeds

    # -- measurements --------------------------------------------------------------------------
    def measure(self, records: list[dict]) -> None:
        """‖θ − θ0‖ and the loss on a sample of training examples, for every unit's model;
        kept in ``compare/measurements.json`` by weights sha256 (a resumed run re-reads them)."""
        path = self.dir / "measurements.json"
        cc = self.run.cfg.compare
        stamp = {
            "train_loss_examples": cc.train_loss_examples,
            "seed": self.run.cfg.diagnostics.seed,
        }
        cache = read_json(path) if path.is_file() else {}
        if cache.get("stamp") != stamp:
            cache = {"stamp": stamp, "models": {}}
        todo = [r for r in records if r["weights_sha256"] not in cache["models"]]
        if todo:
            self.run.say(f"compare: distances and train loss of {len(todo)} model(s)")
            obj = select.objective(self.run, "train", cc.train_loss_examples, stamp["seed"])
            dists = distances_from(self.run.base.dir, [Path(r["model"]) for r in todo])
            for r, d in zip(todo, dists):
                loss = select.losses(obj, {"m": Path(r["model"])}, self.run.cfg.model.dtype)["m"]
                cache["models"][r["weights_sha256"]] = {"distance": d, "train_loss": loss}
            write_json(path, cache)
        for r in records:
            r.update(cache["models"][r["weights_sha256"]])
