"""Rows made from their units after training: joint training at the learning rate best on the
validation split, the shrinkage control θ0 + α(θ_joint − θ0) with α best on the validation split,
and a uniform soup of joint runs with other seeds (paper §5). Nothing is chosen on the eval split
or on the unseen tasks."""

from __future__ import annotations

from merit.compare.rows import ROWS, Row, RowKind, Unit
from merit.compare.units import Comparison, Made, inputs_of, job_sha, produce, score, unit_record
from merit.config import RunConfig
from merit.diagnose import selection as select
from merit.merge.derived import derived_model


def _lr_units(cfg: RunConfig, seed: int) -> list[Unit]:
    s, lr = {"training.seed": seed}, cfg.training.learning_rate
    return [
        Unit("joint-lr", f"joint-s{seed}" if m == 1 else f"joint-lr{m:g}-s{seed}", seed, "joint",
             {**s, "training.learning_rate": lr * m} if m != 1 else s, "candidate")
        for m in cfg.compare.learning_rates
    ]  # fmt: skip


def _joint_lr(cmp: Comparison, row: Row) -> list:
    """Joint training at each learning rate; the one best on the validation split."""
    out = []
    for seed, units in cmp.by_seed(row).items():
        made = {u.key: produce(cmp.run, u) for u in units}
        curve = {k: cmp.memo(f"loss:{job_sha(m.path)}", lambda m=m: cmp.loss(m.path))
                 for k, m in made.items()}  # fmt: skip
        best = made[select.best_key(curve)]
        lr = best.run.cfg.training.learning_rate
        cmp.selection.setdefault(str(seed), {})["learning_rate"] = {
            "validation_loss": {str(made[k].run.cfg.training.learning_rate): v
                                for k, v in curve.items()},
            "chosen": lr,
            "extra_tokens": sum(m.tokens for m in made.values() if m is not best),
        }  # fmt: skip
        s = score(best, f"{row.label}: lr {lr:g}")
        out.append((unit_record(best, s, learning_rate=lr), s))
    return out


def _shrink(cmp: Comparison, row: Row) -> list:
    """θ0 + α(θ_joint − θ0) with α best on the validation split, per seed."""
    out = []
    alphas = cmp.run.cfg.compare.alphas
    for seed, (unit,) in cmp.by_seed(row).items():
        joint = produce(cmp.run, unit)
        key = f"alpha:{job_sha(joint.path)}:{sorted(alphas)}"
        kept = cmp.memo(
            key, lambda j=joint: {str(a): v for a, v in cmp.alpha_curve(j.path).items()}
        )
        curve = {float(a): v for a, v in kept.items()}
        alpha = select.best_key(curve)  # the curve runs from the smallest α: ties move less
        cmp.selection.setdefault(str(seed), {})["alpha"] = {
            "validation_loss": {str(a): v for a, v in curve.items()},
            "chosen": alpha,
        }
        target = cmp.dir / "models" / f"shrink-s{seed}"
        meta = {"alpha": alpha, "inputs": inputs_of([joint.path])}
        derived_model(
            joint.run, target, [joint.path], [1.0], meta,
            f"the joint model, scaled by α = {alpha:g} (chosen on the validation split)",
            "task_vector", alpha,
        )  # fmt: skip
        made = Made(unit, joint.run, target, joint.tokens, joint.steps)
        scores = cmp.dir / "scores" / f"{target.name}.json"
        s = score(made, f"{row.label}: α {alpha:g}", scores, "shrink")
        out.append((unit_record(made, s, alpha=alpha), s))
    return out


def _soup_units(cfg: RunConfig, seed: int) -> list[Unit]:
    c, t = cfg.compare, cfg.training
    return [
        Unit("soup", f"soup-m{m}-s{seed}", seed, "joint",
             {"training.seed": 1000 * seed + m + 1, "training.epochs": t.epochs / c.soup_runs},
             "member")
        for m in range(c.soup_runs)
    ]  # fmt: skip


def _soup(cmp: Comparison, row: Row) -> list:
    """The uniform average of joint runs with other seeds, each a fraction of the budget."""
    out = []
    for _seed, units in cmp.by_seed(row).items():
        members = [produce(cmp.run, u) for u in units]
        target = cmp.dir / "models" / f"soup-s{_seed}"
        meta = {"inputs": inputs_of([m.path for m in members])}
        n = len(members)
        derived_model(
            members[0].run, target, [m.path for m in members], [1 / n] * n, meta,
            f"the uniform soup of {n} joint runs with other seeds",
        )  # fmt: skip
        steps = tuple(n for m in members for n in m.steps)
        made = Made(units[0], members[0].run, target, sum(m.tokens for m in members), steps)
        s = score(made, row.label, cmp.dir / "scores" / f"{target.name}.json", "soup")
        out.append((unit_record(made, s, members=[m.unit.key for m in members]), s))
    return out


ROWS.register(
    RowKind("joint-lr", lambda _cfg: "Joint (LR on validation)", _lr_units, make=_joint_lr,
            validation=True, order=40)
)  # fmt: skip
ROWS.register(
    RowKind(
        "shrink",
        lambda _cfg: "θ0 + α(θ_joint − θ0), α on validation",
        lambda _cfg, s: [Unit("shrink", f"joint-s{s}", s, "joint", {"training.seed": s})],
        make=_shrink,
        validation=True,
        requires=("joint",),
        order=50,
    )
)
ROWS.register(
    RowKind(
        "soup",
        lambda cfg: f"Uniform soup ({cfg.compare.soup_runs} runs × 1/{cfg.compare.soup_runs})",
        _soup_units,
        make=_soup,
        order=65,
    )
)
