"""``merit compare``: the paper's table (§5) with its controls, from one θ0 and one mixture.

Every row's models come from the ordinary stages (through the stage executor) and the evaluate
stage's scorer, each in a run directory that ``merit report`` opens; what the comparison adds
is made from those runs' outputs (a control, a soup) by the merge stage's own writer. Data and
calibration are computed once, in the compare config's run directory, and shared by hard links.
Every step is reused when done, so a killed comparison resumes at the row it was in.
"""

from __future__ import annotations

import time

from merit.artifacts import atomic_path
from merit.compare.lr_sweep import run_sweep, sweep_figure, sweep_markdown
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
from merit.compare.rows import Row, check_rows, rows
from merit.compare.units import Comparison
from merit.evaluate.models import ModelScores
from merit.graph import STAGES, Context, Stage

COMPARE_VERSION = 1


def _row_entry(row: Row, units: list[dict], joint_tokens: float) -> dict:
    """A row's record: its units and their means (distance, train loss, budget)."""

    def mean(key: str) -> float | None:
        vals = [u[key] for u in units if u.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    tokens = mean("tokens") or 0.0
    steps = [n for u in units for n in u.get("steps", [])]
    return {
        "key": row.name,
        "label": row.label,
        "budget": tokens / joint_tokens if joint_tokens else row.budget,
        "nominal_budget": row.budget,
        "tokens": tokens,
        "steps": [min(steps), max(steps)] if steps else None,  # per training job
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


MIN_STEPS = 16  # fewer optimizer steps per job, and a row measures step counts, not MERIT


def few_steps(entries: list[dict]) -> list[str]:
    """A line for each row some of whose training jobs took fewer than :data:`MIN_STEPS`."""
    return [
        f"{r['label']}: a training job took {r['steps'][0]} optimizer step(s) (fewer than "
        f"{MIN_STEPS}: the row measures step counts; use a smaller training.batch_size or more "
        "examples)"
        for r in entries
        if r.get("steps") and r["steps"][0] < MIN_STEPS
    ]


def check(ctx: Context) -> None:
    """Refuse bad input in one line before anything is trained: the config and its data
    (``Context.validate``), rows the mixture cannot hold, every unit's config."""
    ctx.validate()
    check_rows(ctx.cfg, len(ctx.mixture.datasets))


def build(ctx: Context, _inputs: dict) -> CompareResults:
    """Every row of ``compare.rows`` for every seed — θ0, joint training (1 and 2 epochs, at the
    learning rate best on the validation split), the shrinkage control, random splits, a
    uniform soup, MERIT-1D/2D/3D and the gain planner — trained, merged and scored by the
    ordinary stages, then pooled over seeds with intervals and paired tests against joint
    training; writes ``compare/results.json``, ``results.md`` and ``gain.png``."""
    t0 = time.perf_counter()
    table_rows = rows(ctx.cfg)
    cmp = Comparison(ctx)
    done: list[tuple[Row, list[tuple[dict, ModelScores]]]] = []
    for row in table_rows:
        done.append((row, cmp.row(row)))
    cmp.measure([rec for _, units in done for rec, _ in units])
    sweep = run_sweep(cmp) if ctx.cfg.compare.lr_sweep else []
    return _write(cmp, done, time.perf_counter() - t0, sweep)


def _write(cmp: Comparison, done: list, seconds: float, sweep: list) -> CompareResults:
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
    for w in few_steps(entries):
        cmp.run.say(f"warning: {w}")
    res = CompareResults(
        reference=REFERENCE,
        rows=entries,
        selection=cmp.selection,
        diagnostics=diagnostics,
        claims=claims(per, unseen, diagnostics, stats),
        table=table(entries),
        lr_sweep=sweep,
        settings={
            "compare": cmp.run.cfg.compare.model_dump(mode="json"),
            "version": COMPARE_VERSION,
        },
    )
    cmp.dir.mkdir(parents=True, exist_ok=True)
    (cmp.dir / "results.md").write_text(_markdown(res, seconds))
    with atomic_path(cmp.dir / "gain.png") as tmp:
        tmp.write_bytes(gain_figure(entries))
    if sweep:
        with atomic_path(cmp.dir / "lr_sweep.png") as tmp:
            tmp.write_bytes(sweep_figure(sweep))
    return res


def _markdown(res: CompareResults, seconds: float) -> str:
    parts = [f"Warning: {w}\n\n" for w in few_steps(res.rows)]
    parts += [
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
    if res.lr_sweep:
        parts += ["\nLearning-rate sweep (joint training and MERIT at each rate; NLL, MERIT − "
                  "joint paired):\n\n", sweep_markdown(res.lr_sweep)]  # fmt: skip
    for seed, sel in res.selection.items():
        for what, rec in sel.items():
            parts.append(
                f"\nSeed {seed}: {what} chosen on the validation split: {rec['chosen']:g}."
            )
    parts.append(
        f"\n\nWall time of this invocation (work it reused not counted): {seconds:.0f} s.\n"
    )
    return "".join(parts)


def _show(ctx: Context, res: CompareResults) -> str:
    ctx.say(f"results -> {ctx.paths.compare / 'results.md'} (and results.json, gain.png)")
    return res.table


STAGES.register(
    Stage(
        name="compare",
        help="the paper's table with its controls: joint (1/2 epochs, best LR), shrinkage, "
        "random split, soup, MERIT-1D/2D/3D, gain planner; one run directory per row",
        reads=("compare",),
        needs=("data", "calibrate"),
        artifact=CompareResults,
        path=lambda p: p.compare_results,
        build=build,
        what="the comparison",
        always=True,  # every row reuses its own runs' stages; this only pools and tests them
        show=_show,
        order=90,
    )
)
