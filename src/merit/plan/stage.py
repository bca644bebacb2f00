"""Stage 2 (paper §3.2): the conflict-aware split, recorded in ``plan.json``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merit.artifacts import sha256_file
from merit.calibrate.sketch import split_parts
from merit.calibrate.stage import CalibrationRecord, sketch_tensors
from merit.data.stage import DataRecord
from merit.graph import STAGES, Context, Stage
from merit.plan.artifact import Plan, PlanDataset, PlanGroup, plan_comparison, plan_summary
from merit.plan.conflict import PartGram, cosine_from_gram
from merit.plan.curvature import measure
from merit.plan.figures import write_plan_plots
from merit.plan.splitters import (
    PlanError,
    PlanInputs,
    changed_groups,
    choose,
    compare,
    gain_hessian,
    group_weights,
    joint_loss,
    merged_loss,
    power_of_two,
    resampled_cosine_agreement,
    resampled_grams,
)

READS = ("seed", "model", "data", "calibration", "planning")


def _finite(x):
    """JSON has no NaN: None instead."""
    return None if x is None or not np.isfinite(x) else float(x)


def _candidate_record(c, chosen: bool) -> dict:
    st = c.stability
    return {
        "splitter": c.splitter,
        "chosen": chosen,
        "note": c.note,
        "groups": None if c.groups is None else c.groups.tolist(),
        "gain": _finite(c.gain),
        "gain_share": _finite(c.share),
        "balance": _finite(c.balance),
        "deviation": _finite(c.deviation),
        "gain_hessian": _finite(c.gain_hessian),
        "merged_loss": _finite(c.merged_loss),
        "stability": None
        if st is None
        else {
            "ari_pairs": _finite(st.ari_pairs),
            "ari_plan": _finite(st.ari_plan),
            "dataset_mean": _finite(float(st.per_dataset.mean())),
            "dataset_min": _finite(float(st.per_dataset.min())),
            "draws": st.draws,
        },
    }


def _hessian_predictions(run: Context, names: list[str], tokens, candidates, k: int) -> dict:
    """True-H gain and merged-loss predictions for every available candidate (in place)."""
    cc, pc = run.cfg.calibration, run.cfg.planning
    if cc.microbatches < 2:
        raise PlanError("planning.hessian needs calibration.microbatches ≥ 2 (held-out parts)")
    enc = run.encoded("calibration")
    avail = [c for c in candidates if c.available]
    run.say(f"measuring curvature at θ0 for {len(avail)} candidate plans (HVPs)")
    try:
        cur = measure(
            run.base.load(),
            [enc[n] for n in names],
            [split_parts(len(enc[n]), cc.microbatches, cc.seed, n) for n in names],
            tokens,
            [c.groups for c in avail],
            k,
            cc.batch_size,
            run.base.tokenizer.pad_token_id,
            pc.hessian_examples,
            run.progress,
        )
    except ValueError as err:
        raise PlanError(str(err)) from None
    tau = pc.horizon or cur.horizon()
    if tau is None:
        return {
            "horizon": None,
            "note": "the held-out quadratic has no minimum along −ḡ at θ0 (negative curvature "
            "or no descent): set planning.horizon to predict",
        }
    for j, c in enumerate(avail):
        c.gain_hessian = gain_hessian(cur, j, tau)
        c.merged_loss = merged_loss(cur, j, tau)
    return {
        "horizon": tau,
        "horizon_from": "planning.horizon" if pc.horizon else "held-out line search along ḡ",
        "heldout_loss_theta0": cur.loss0,
        "joint_loss": joint_loss(cur, tau),
    }


def _stability_warning(run: Context, st, k: int) -> str | None:
    pc = run.cfg.planning
    if st is None or not st.ari_pairs < pc.stability_threshold:
        return None
    weak = int((st.per_dataset < 0.8).sum())
    fixes = [
        f"more calibration samples per dataset (data.split.calibration="
        f"{run.cfg.data.split.calibration}; sampling noise falls as 1/√n)"
    ]
    if k > 2:
        fixes.append(
            "fewer groups ("
            + (f"planning.rank={pc.rank - 1}" if pc.k is None else f"planning.k={k - 1}")
            + ")"
        )
    return (
        f"unstable plan: two plans from resampled calibration data agree at ARI "
        f"{st.ari_pairs:.2f} (< {pc.stability_threshold}), and {weak} of {len(st.per_dataset)} "
        f"datasets land in their group in under 80% of draws. What would fix it: "
        + "; or ".join(fixes)
    )


def build(ctx: Context, inputs: dict) -> Plan:
    """Cosine matrix → PCA conflict embedding → K sample-balanced groups → ``plan.json``.

    Every splitter (median, sign, random, gain, and any registered one) is run and compared —
    predicted merging gain, balance, bootstrap stability, and with ``planning.hessian`` the
    true-H gain and predicted merged loss — and the configured one (or, for ``auto``, the best
    under ``planning.objective``) is the plan. PNG plots are written next to it
    (``plan_plots/``). With the ``add`` option the plan records which datasets changed group.
    """
    data: DataRecord = inputs["data"]
    cal: CalibrationRecord = inputs["calibrate"]
    previous = _load_plan(ctx) if ctx.options.get("add") else None
    rows = {r["name"]: r for r in data.datasets}
    samples = np.array([rows[n]["splits"]["train"] for n in cal.datasets], dtype=np.float64)
    tokens = np.array([rows[n]["train_tokens"] for n in cal.datasets], dtype=np.int64)
    found = _split(ctx, cal, samples, tokens)
    plan = _plan_record(ctx, cal, found, samples, tokens, rows)
    if previous is not None:
        plan.changes = _changes(previous, plan)
    plots = write_plan_plots(plan.to_json(), ctx.paths.plan_plots)
    plan.plots = [str(p.relative_to(ctx.paths.root)) for p in plots]
    return plan


def _load_plan(ctx: Context) -> Plan | None:
    try:
        return Plan.load_if(ctx.paths.plan)
    except (KeyError, TypeError):  # a plan.json of an older merit: planned again
        return None


@dataclass
class _Found:
    emb: object
    rank: int
    candidates: list
    chosen: int
    predictions: dict | None
    cosine: np.ndarray
    cosine_agreement: float | None


def _split(run: Context, cal, samples: np.ndarray, tokens: np.ndarray) -> _Found:
    """Every splitter on the conflict embedding; the configured (or best) one is chosen."""
    pc = run.cfg.planning
    k = pc.groups
    tensors = sketch_tensors(run, cal)
    gram = tensors["gram"].double().numpy()
    parts = None
    if run.cfg.calibration.microbatches > 1:
        owner = np.concatenate([np.full(len(p), t) for t, p in enumerate(cal.part_tokens)])
        parts = PartGram(
            tensors["part_gram"].double().numpy(),
            owner,
            np.concatenate([np.asarray(p, dtype=np.float64) for p in cal.part_tokens]),
        )
    x = PlanInputs.from_gram(gram, samples, tokens, parts.noise() if parts else None)
    rank = power_of_two(k) if power_of_two(k) is not None else pc.rank
    draws = pc.bootstrap if parts is not None else 0
    run.say(f"planning K={k}: comparing splitters ({draws} resampled draws each)")
    candidates = compare(x, k, parts, draws, pc.seed, pc.balance_tolerance)
    predictions = (
        _hessian_predictions(run, cal.datasets, tokens, candidates, k) if pc.hessian else None
    )
    agreement = (
        resampled_cosine_agreement(resampled_grams(parts, min(draws, 10), pc.seed))
        if draws >= 2
        else None
    )
    return _Found(
        x.embedding(rank),
        rank,
        candidates,
        choose(candidates, pc.splitter, pc.objective),
        predictions,
        cosine_from_gram(gram),
        agreement,
    )


def _plan_record(run: Context, cal, f: _Found, samples, tokens, rows: dict) -> Plan:
    pc = run.cfg.planning
    k = pc.groups
    chosen = f.candidates[f.chosen]
    groups, st = chosen.groups, chosen.stability
    n_k, w_k = group_weights(groups, tokens, k)
    names = cal.datasets
    return Plan(
        trainable=list(run.base.trainable) if run.base.trainable else None,
        settings=run.cfg.settings(*READS),
        base_fingerprint=run.base.fingerprint,
        sketches_sha256=cal.sketches_sha256,
        method=chosen.splitter,
        objective=pc.objective,
        rank=f.rank,
        K=k,
        sketch=cal.spec,
        explained_variance=f.emb.explained_variance.tolist(),
        scree=f.emb.scree.tolist(),
        datasets=[
            PlanDataset(
                n,
                int(groups[i]),
                int(samples[i]),
                int(tokens[i]),
                f.emb.z[i].tolist(),
                None if st is None else float(st.per_dataset[i]),
                cal.sq_norms[i],
                cal.losses[i],
                rows[n]["sha256"],
            )
            for i, n in enumerate(names)
        ],
        groups=[
            PlanGroup(
                j,
                [n for i, n in enumerate(names) if groups[i] == j],
                int(samples[groups == j].sum()),
                n_k[j],
                w_k[j],
            )
            for j in range(k)
        ],
        stability=_stability_record(run, st, f.cosine_agreement),
        candidates=[_candidate_record(c, i == f.chosen) for i, c in enumerate(f.candidates)],
        hessian=f.predictions,
        warnings=_warnings(run, chosen, k),
        changes=None,
        cosine=np.round(f.cosine, 6).tolist(),
    )


def _stability_record(run: Context, st, cosine_agreement: float | None) -> dict | None:
    if st is None:
        return None
    return {
        "method": f"bootstrap over calibration parts ({st.draws} draws)",
        "ari_pairs": _finite(st.ari_pairs),
        "ari_plan": _finite(st.ari_plan),
        "cosine_pearson_resampled": _finite(cosine_agreement),
        "threshold": run.cfg.planning.stability_threshold,
    }


def _warnings(run: Context, chosen, k: int) -> list[str]:
    st = chosen.stability
    warnings = [w for w in [_stability_warning(run, st, k)] if w]
    if st is None:
        warnings.append(
            "stability not measured (needs calibration.microbatches ≥ 2 and planning.bootstrap > 0)"
        )
    warnings += list(getattr(chosen, "warnings", []) or [])
    return warnings


def _changes(previous: Plan, plan: Plan) -> dict:
    """``--add``: which datasets are new, and which of the old ones changed group."""
    old_names = [d.name for d in previous.datasets]
    names = [d.name for d in plan.datasets]
    groups = np.array([d.group for d in plan.datasets])
    return {
        "added": [n for n in names if n not in old_names],
        "changed_group": changed_groups(
            old_names, [d.group for d in previous.datasets], names, groups, plan.K
        ),
        "previous_splitter": previous.method,
    }


def plan_hash(ctx: Context) -> str:
    return sha256_file(ctx.paths.plan)


def _show(ctx: Context, plan: Plan) -> str:
    out = [plan_summary(plan)]
    if ctx.options.get("compare"):
        out.append(plan_comparison(plan))
    out.append(f"plan -> {ctx.paths.plan} (plots in {ctx.paths.plan_plots})")
    return "\n".join(out)


STAGE = STAGES.register(
    Stage(
        name="plan",
        help="conflict-aware split into K groups, with stability (writes plan.json, plots)",
        reads=READS,
        needs=("data", "calibrate"),
        artifact=Plan,
        path=lambda p: p.plan,
        build=build,
        what="plan.json",
        version=3,
        show=_show,
        order=30,
    )
)
