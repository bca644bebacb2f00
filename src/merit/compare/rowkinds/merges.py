"""Rows that merge another row's trained branches by a method beyond the average: task arithmetic
(λ on the validation split), TIES (density and λ on the validation split), RegMean, learned
coefficients (fitted on the validation split, from the best task-arithmetic λ); for MERIT-2D and
for the random split, so that the split's contribution stays apart from the merge's. They train
nothing: each unit is its source row's, and only the merge is new.

λ is chosen along the line θ0 + λ(θ − θ0) through the method's merge at λ = 1, in memory; a
candidate TIES density is one merge. Nothing is chosen on the eval split or the unseen tasks.
"""

from __future__ import annotations

import dataclasses
import shutil

from merit.artifacts import sha256_file
from merit.compare.rows import ROWS, Row, RowKind, Unit
from merit.compare.units import Comparison, Made, inputs_of, job_sha, produce, score, unit_record
from merit.config import RunConfig
from merit.diagnose import selection as select
from merit.merge.derived import derived_model
from merit.merge.fitted import fitted_overrides
from merit.merge.manifest import MANIFEST_FILE
from merit.merge.methods import get_method

METHODS = {
    "ta": ("task_arithmetic", "task arithmetic, λ on validation"),
    "ties": ("ties", "TIES, density and λ on validation"),
    "regmean": ("regmean", "RegMean"),
    "learned": ("learned", "learned coefficients"),
}


def _branches(made: Made) -> tuple[list, list[float], list[list[str]]]:
    plan = made.run.executor.get("plan")
    dirs = [made.run.paths.branch(g.id) / "model" for g in plan.groups]
    return dirs, [g.weight for g in plan.groups], [g.datasets for g in plan.groups]


def _sha(path) -> str:
    """What identifies a model: its merge manifest's sha256, else its training job's."""
    mp = path / MANIFEST_FILE
    return sha256_file(mp) if mp.is_file() else job_sha(path)


def _ties_curve(cmp: Comparison, made: Made, scratch) -> dict[tuple[float, float], float]:
    """(density, λ) -> validation loss: one TIES merge per density at λ = 1, then its line."""
    cc, (dirs, weights, _) = cmp.run.cfg.compare, _branches(made)
    out = {}
    for density in cc.merge_densities:
        target = scratch / f"ties-{density:g}"
        meta = {"inputs": inputs_of(dirs), "density": density}
        derived_model(made.run, target, dirs, weights, meta, "plan tokens N_k / Σ N_j", "ties",
                      params={"density": density})  # fmt: skip
        for lam, v in cmp.alpha_curve(target, cc.merge_scales).items():
            out[(density, lam)] = v
    return out


def _choose(cmp: Comparison, made: Made, method: str, scratch) -> tuple[dict, dict]:
    """The method's parameters chosen on the validation split, and the curve that chose them;
    kept in ``compare/selection.json`` by the average's merge manifest and the grids."""
    cc = cmp.run.cfg.compare
    grids = [cc.merge_scales, cc.merge_densities, cc.merge_params.get(method, {})]
    key = f"merge:{method}:{_sha(made.path)}:{grids}"
    return tuple(cmp.memo(key, lambda: _choice(cmp, made, method, scratch)))


def _choice(cmp: Comparison, made: Made, method: str, scratch) -> tuple[dict, dict]:
    cc = cmp.run.cfg.compare
    if method == "task_arithmetic":
        curve = cmp.alpha_curve(made.path, cc.merge_scales)  # the average is λ = 1
        lam = select.best_key(curve)
        return {"scale": lam}, {str(k): v for k, v in curve.items()}
    if method == "ties":
        curve = _ties_curve(cmp, made, scratch)
        density, lam = select.best_key(curve)
        return {"density": density, "scale": lam}, {
            f"{d:g},{s:g}": v for (d, s), v in curve.items()
        }
    if method == "learned":  # from the best task-arithmetic λ: learned starts where TA ends
        start, _ = _choose(cmp, made, "task_arithmetic", scratch)
        return {**cc.merge_params.get("learned", {}), **start}, {}
    return dict(cc.merge_params.get(method, {})), {}


def _merged_row(short: str):
    method = METHODS[short][0]

    def make(cmp: Comparison, row: Row) -> list:
        return [_merge_unit(cmp, row, unit, method) for unit in row.units]

    return make


def _merge_unit(cmp: Comparison, row: Row, unit: Unit, method: str) -> tuple:
    """One unit of a merge row: the source row's branches (trained, merged by the average, all
    reused), merged by ``method`` with parameters chosen on the validation split, and scored."""
    made = produce(cmp.run, unit)
    dirs, weights, datasets = _branches(made)
    scratch = cmp.dir / "models" / "candidates"
    params, curve = _choose(cmp, made, method, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    target = cmp.dir / "models" / f"{row.name}-{unit.key}"
    meta = {"inputs": inputs_of(dirs), "method": method, "params": params}
    resolved = get_method(method).validate(weights, params)
    derived_model(
        made.run, target, dirs, weights, meta, "plan tokens N_k / Σ N_j", method, params=params,
        fit=lambda: fitted_overrides(made.run, datasets, dirs, weights, method, resolved),
    )  # fmt: skip
    new = dataclasses.replace(made, path=target)
    label = f"{row.label}: " + ", ".join(f"{k} {v:g}" for k, v in params.items())
    s = score(new, label, cmp.dir / "scores" / f"{target.name}.json", "merged")
    return unit_record(new, s, params=params, validation_curve=curve), s


def _register(source: str, short: str, order: int) -> None:
    name = f"{source}+{short}"

    def units(cfg: RunConfig, seed: int) -> list[Unit]:
        return [dataclasses.replace(u, row=name) for u in ROWS.get(source).units(cfg, seed)]

    ROWS.register(
        RowKind(
            name,
            lambda cfg: f"{ROWS.get(source).label(cfg)} + {METHODS[short][1]}",
            units,
            make=_merged_row(short),
            validation=short != "regmean",
            order=order,
        )
    )


for _i, _short in enumerate(METHODS):
    _register("random", _short, 90 + _i)
    _register("merit-2d", _short, 95 + _i)
