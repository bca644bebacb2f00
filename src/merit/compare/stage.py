"""``merit compare``: the paper's table (§5) with its controls, from one θ0 and one mixture.

Every row's models come from the ordinary stages — ``make_plan``, ``train``, ``merge``,
``score_model`` — each in a run directory that ``merit report`` opens; what the comparison adds
is made from those runs' outputs (a control, a soup) by the merge stage's own writer. Data and
calibration are computed once, in the compare config's run directory, and shared by hard links.
Every step is reused when done, so a killed comparison resumes at the row it was in.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from merit.artifacts import atomic_path, sha256_file, write_json
from merit.calibrate.stage import calibrate
from merit.compare import select
from merit.compare.results import (
    REFERENCE,
    CompareResults,
    claims,
    claims_markdown,
    gain_figure,
    pool,
    summarise,
    table,
)
from merit.compare.rows import Row, Unit, check_rows, rows, unit_config
from merit.data.stage import prepare_data
from merit.evaluate.stage import ModelScores, score_model
from merit.merge.stage import derived_model, merge
from merit.plan.stage import make_plan
from merit.run import Run, RunPaths
from merit.train.stage import train

COMPARE_VERSION = 1


@dataclass
class Made:
    """A unit's model: where it is, the run that made it, the tokens its training saw."""

    unit: Unit
    run: Run
    path: Path
    tokens: int


def _share_upstream(root: Run, run_dir: Path) -> None:
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


def unit_run(root: Run, unit: Unit) -> Run:
    """The unit's run: the compare's own directory, or its row directory, opened."""
    cfg = unit_config(root.cfg, unit, root.paths.root)
    if Path(cfg.run_dir) == root.paths.root:
        return Run(cfg)  # same experiment: the compare run, already opened and validated
    _share_upstream(root, Path(cfg.run_dir))
    return Run(cfg).open()


def produce(root: Run, unit: Unit) -> Made:
    """Train (and merge) a unit's model with the stage functions, reusing what is done."""
    run = unit_run(root, unit)
    if unit.model == "base":
        return Made(unit, run, run.base_dir, 0)
    make_plan(run)
    if unit.model == "joint":
        [m] = train(run, baseline="joint")
        return Made(unit, run, run.paths.baseline("joint") / "model", m.tokens_seen)
    done = train(run, baselines=[])
    merge(run)
    return Made(unit, run, run.paths.merged, sum(m.tokens_seen for m in done))


def _score(made: Made, label: str, out: Path | None = None, key: str | None = None) -> ModelScores:
    key = key or {"base": "base", "joint": "joint"}.get(made.unit.model, "merged")
    return score_model(made.run, key, label, made.path, out)


def _unit_record(made: Made, scores: ModelScores, **extra) -> dict:
    return {
        "key": made.unit.key,
        "seed": made.unit.seed,
        "run_dir": str(made.run.paths.root),
        "model": str(made.path),
        "tokens": made.tokens,
        "weights_sha256": scores.weights_sha256,
        **extra,
    }


def _job_sha(model: Path) -> str:
    """What identifies a trained model: the sha256 of its job's manifest."""
    return sha256_file(RunPaths.manifest(model.parent))


def _inputs(models: list[Path]) -> dict[str, str]:
    """What a derived model is of: its inputs' job directories and manifests' sha256."""
    return {str(m.parent): _job_sha(m) for m in models}


class Comparison:
    """The state of one ``merit compare``: the compare run, its selection objective, results."""

    def __init__(self, run: Run):
        self.run = run
        self.dir = run.paths.root / "compare"
        self.selection: dict[str, dict] = {}
        self._validation: select.LMObjective | None = None

    @property
    def validation(self) -> select.LMObjective:
        if self._validation is None:
            self._validation = select.objective(self.run, "validation")
        return self._validation

    def _memo(self, key: str, compute):
        """A validation-split result, kept in ``compare/selection.json`` under what it was
        computed from (a trained model's manifest sha256), so a resumed comparison re-reads it."""
        from merit.artifacts import read_json

        path = self.dir / "selection.json"
        stamp = {"data": self.run.cfg.settings("data"), "base": self.run.base_fingerprint}
        cache = read_json(path) if path.is_file() else {}
        if cache.get("stamp") != stamp:
            cache = {"stamp": stamp, "values": {}}
        if key not in cache["values"]:
            cache["values"][key] = compute()
            write_json(path, cache)
        return cache["values"][key]

    def _loss(self, path: Path) -> float:
        return select.losses(self.validation, {"m": path}, self.run.cfg.model.dtype)["m"]

    def _alphas(self, joint: Path) -> dict[str, float]:
        obj = self.validation
        theta0 = obj.vector(self.run.load_base())
        theta = select.vector(obj, joint, self.run.cfg.model.dtype)
        curve = select.alpha_curve(obj, theta0, theta, self.run.cfg.compare.alphas)
        return {str(a): v for a, v in curve.items()}

    def row(self, row: Row) -> list[tuple[dict, ModelScores]]:
        """Every unit of the row, produced and scored: (record, scores) each."""
        self.run.say(f"compare: {row.label}")
        builder = {"joint-lr": self._joint_lr, "shrink": self._shrink, "soup": self._soup}
        if row.name in builder:
            return builder[row.name](row)
        out = []
        for unit in row.units:
            made = produce(self.run, unit)
            out.append((made, _score(made, row.label)))
        return [(_unit_record(m, s), s) for m, s in out]

    def _by_seed(self, row: Row) -> dict[int, list[Unit]]:
        seeds: dict[int, list[Unit]] = {}
        for u in row.units:
            seeds.setdefault(u.seed, []).append(u)
        return seeds

    def _joint_lr(self, row: Row) -> list[tuple[dict, ModelScores]]:
        """Joint training at each learning rate; the one best on the validation split."""
        out = []
        for seed, units in self._by_seed(row).items():
            made = {u.key: produce(self.run, u) for u in units}
            curve = {k: self._memo(f"loss:{_job_sha(m.path)}", lambda m=m: self._loss(m.path))
                     for k, m in made.items()}  # fmt: skip
            best = made[select.best_key(curve)]
            lr = best.run.cfg.training.learning_rate
            self.selection.setdefault(str(seed), {})["learning_rate"] = {
                "validation_loss": {str(made[k].run.cfg.training.learning_rate): v
                                    for k, v in curve.items()},
                "chosen": lr,
                "extra_tokens": sum(m.tokens for m in made.values() if m is not best),
            }  # fmt: skip
            s = _score(best, f"{row.label}: lr {lr:g}")
            out.append((_unit_record(best, s, learning_rate=lr), s))
        return out

    def _shrink(self, row: Row) -> list[tuple[dict, ModelScores]]:
        """θ0 + α(θ_joint − θ0) with α best on the validation split, per seed."""
        out = []
        alphas = self.run.cfg.compare.alphas
        for seed, (unit,) in self._by_seed(row).items():
            joint = produce(self.run, unit)
            key = f"alpha:{_job_sha(joint.path)}:{sorted(alphas)}"
            curve = {
                float(a): v
                for a, v in self._memo(key, lambda j=joint: self._alphas(j.path)).items()
            }
            alpha = select.best_key(curve)  # the curve runs from the smallest α: ties move less
            self.selection.setdefault(str(seed), {})["alpha"] = {
                "validation_loss": {str(a): v for a, v in curve.items()},
                "chosen": alpha,
            }
            target = self.dir / "models" / f"shrink-s{seed}"
            meta = {"alpha": alpha, "inputs": _inputs([joint.path])}
            derived_model(
                joint.run, target, [joint.path], [1.0], meta,
                f"the joint model, scaled by α = {alpha:g} (chosen on the validation split)",
                "task_vector", alpha,
            )  # fmt: skip
            made = Made(unit, joint.run, target, joint.tokens)
            scores = self.dir / "scores" / f"{target.name}.json"
            s = _score(made, f"{row.label}: α {alpha:g}", scores, "shrink")
            out.append((_unit_record(made, s, alpha=alpha), s))
        return out

    def _soup(self, row: Row) -> list[tuple[dict, ModelScores]]:
        """The uniform average of joint runs with other seeds, each a fraction of the budget."""
        out = []
        for seed, units in self._by_seed(row).items():
            members = [produce(self.run, u) for u in units]
            target = self.dir / "models" / f"soup-s{seed}"
            meta = {"inputs": _inputs([m.path for m in members])}
            n = len(members)
            derived_model(
                members[0].run, target, [m.path for m in members], [1 / n] * n, meta,
                f"the uniform soup of {n} joint runs with other seeds",
            )  # fmt: skip
            made = Made(units[0], members[0].run, target, sum(m.tokens for m in members))
            s = _score(made, row.label, self.dir / "scores" / f"{target.name}.json", "soup")
            out.append((_unit_record(made, s, members=[m.unit.key for m in members]), s))
        return out

    # -- measurements --------------------------------------------------------------------------
    def measure(self, records: list[dict]) -> None:
        """‖θ − θ0‖ and the loss on a sample of training examples, for every unit's model;
        kept in ``compare/measurements.json`` by weights sha256 (a resumed run re-reads them)."""
        from merit.artifacts import read_json
        from merit.merge.safetensors_io import distances_from

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
            dists = distances_from(self.run.base_dir, [Path(r["model"]) for r in todo])
            for r, d in zip(todo, dists):
                loss = select.losses(obj, {"m": Path(r["model"])}, self.run.cfg.model.dtype)["m"]
                cache["models"][r["weights_sha256"]] = {"distance": d, "train_loss": loss}
            write_json(path, cache)
        for r in records:
            r.update(cache["models"][r["weights_sha256"]])


def _row_entry(row: Row, units: list[dict], joint_tokens: float) -> dict:
    """A row's record: its units and their means (distance, train loss, budget)."""

    def mean(key: str) -> float | None:
        vals = [u[key] for u in units if u.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    tokens = mean("tokens") or 0.0
    return {
        "key": row.name,
        "label": row.label,
        "budget": tokens / joint_tokens if joint_tokens else row.budget,
        "nominal_budget": row.budget,
        "tokens": tokens,
        "distance": mean("distance"),
        "train_loss": mean("train_loss"),
        "units": units,
    }


def _diagnostics(rows_: list[dict]) -> dict:
    """The paper's diagnostics of MERIT-2D against joint training (§5): how far each moved from
    θ0 and the ratio, and the train-loss and held-out gaps."""
    by = {r["key"]: r for r in rows_}
    m, j = by.get("merit-2d"), by.get(REFERENCE)
    if not m or not j or not m.get("distance") or not j.get("distance"):
        return {}
    return {
        "merged_distance": m["distance"],
        "joint_distance": j["distance"],
        "distance_ratio": j["distance"] / m["distance"],
        "merge_alpha": m["distance"] / j["distance"],  # the shrinkage the merge amounts to
        "merged_train_loss": m["train_loss"],
        "joint_train_loss": j["train_loss"],
        "train_loss_gap": m["train_loss"] - j["train_loss"],
        "heldout_nll_gap": m["summary"]["nll"] - j["summary"]["nll"],
        "unseen_nll_gap": (
            m["unseen_summary"]["nll"] - j["unseen_summary"]["nll"]
            if m.get("unseen_summary") and j.get("unseen_summary")
            else None
        ),
    }


def check(run: Run) -> None:
    """Refuse bad input in one line before anything is trained: the config and its data
    (``Run.validate``), rows the mixture cannot hold, every unit's config."""
    run.validate()
    check_rows(run.cfg, len(run.mixture.datasets))


def compare(run: Run) -> CompareResults:
    """Every row of ``compare.rows`` for every seed — θ0, joint training (1 and 2 epochs, at the
    learning rate best on the validation split), the shrinkage control, random splits, a
    uniform soup, MERIT-1D/2D/3D and the gain planner — trained, merged and scored by the
    ordinary stages, then pooled over seeds with intervals and paired tests against joint
    training; writes ``compare/results.json``, ``results.md`` and ``gain.png``."""
    t0 = time.perf_counter()
    check(run)
    table_rows = rows(run.cfg)
    prepare_data(run)
    calibrate(run)
    cmp = Comparison(run)
    done: list[tuple[Row, list[tuple[dict, ModelScores]]]] = []
    for row in table_rows:
        done.append((row, cmp.row(row)))
    cmp.measure([rec for _, units in done for rec, _ in units])
    return _write(cmp, done, time.perf_counter() - t0)


def _write(cmp: Comparison, done: list, seconds: float) -> CompareResults:
    ec = cmp.run.cfg.evaluation
    stats = (ec.bootstrap_samples, ec.confidence, ec.seed)
    per = {row.name: pool([s.datasets for _, s in units]) for row, units in done}
    unseen = {row.name: pool([s.unseen for _, s in units]) for row, units in done}
    unseen = {k: v for k, v in unseen.items() if v}
    summaries = summarise(per, unseen, stats)
    joint = next((units for row, units in done if row.name == REFERENCE), None)
    joint_tokens = sum(r["tokens"] for r, _ in joint) / len(joint) if joint else 0
    entries = [
        {**_row_entry(row, [r for r, _ in units], joint_tokens), **summaries[row.name]}
        for row, units in done
    ]
    diagnostics = _diagnostics(entries)
    res = CompareResults(
        reference=REFERENCE,
        rows=entries,
        selection=cmp.selection,
        diagnostics=diagnostics,
        claims=claims(per, unseen, diagnostics, stats),
        table=table(entries),
        settings={
            "compare": cmp.run.cfg.compare.model_dump(mode="json"),
            "version": COMPARE_VERSION,
        },
    )
    cmp.dir.mkdir(parents=True, exist_ok=True)
    res.save(cmp.dir / "results.json")
    (cmp.dir / "results.md").write_text(_markdown(res, seconds))
    with atomic_path(cmp.dir / "gain.png") as tmp:
        tmp.write_bytes(gain_figure(entries))
    return res


def _markdown(res: CompareResults, seconds: float) -> str:
    parts = [
        "Held-out answer NLL (lower is better) and accuracy, averaged over datasets, with "
        "95% bootstrap intervals; Δ: the row minus joint training (1 epoch), paired.\n\n",
        res.table,
    ]
    d = res.diagnostics
    if d:
        parts.append(
            f"\nMERIT-2D vs joint: ‖θ_joint − θ0‖ / ‖θ̄ − θ0‖ = {d['distance_ratio']:.2f} (the "
            f"merge moved as far as θ0 + α(θ_joint − θ0) with α = {d['merge_alpha']:.3f}); "
            f"train loss {d['merged_train_loss']:.3f} vs {d['joint_train_loss']:.3f} "
            f"(gap {d['train_loss_gap']:+.3f}); held-out NLL gap {d['heldout_nll_gap']:+.3f}.\n"
        )
    if res.claims:
        parts += ["\nThe paper's claims, as measured here:\n\n", claims_markdown(res.claims)]
    for seed, sel in res.selection.items():
        for what, rec in sel.items():
            parts.append(
                f"\nSeed {seed}: {what} chosen on the validation split: {rec['chosen']:g}."
            )
    parts.append(
        f"\n\nWall time of this invocation (work it reused not counted): {seconds:.0f} s.\n"
    )
    return "".join(parts)


def compare_command(run: Run) -> CompareResults:
    """``merit compare``: the table on stdout, the files' paths on stderr."""
    res = compare(run)
    print(res.table)
    run.say(f"results -> {run.paths.root / 'compare' / 'results.md'} (and results.json, gain.png)")
    return res
