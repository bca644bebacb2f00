"""Stage 5: held-out metrics of every model, with intervals and paired comparisons."""

from __future__ import annotations

import time
from pathlib import Path

from merit.artifacts import read_json
from merit.config import RunConfig
from merit.evaluate.models import READS, EvaluationResults, ModelScores, score_model
from merit.evaluate.statistics import (
    compare_models,
    comparison_table,
    markdown_table,
    unseen_table,
    with_intervals,
)
from merit.graph import STAGES, Context, Stage
from merit.overhead import Overhead, overhead
from merit.plan.stage import Plan, plan_summary
from merit.run import RunPaths, record_timing
from merit.train.artifact import BranchManifest


def model_dirs(run: Context, inputs: dict) -> dict[str, tuple[str, Path]]:
    """The models to evaluate: key -> (label, directory)."""
    plan: Plan = inputs["plan"]
    wanted = run.cfg.evaluation.models
    out: dict[str, tuple[str, Path]] = {}
    if "base" in wanted:
        out["base"] = ("θ0 (base)", run.base.dir)
    if "joint" in inputs and "joint" in wanted:
        out["joint"] = ("joint", run.paths.baseline("joint") / "model")
    if "merged" in wanted:
        out["merged"] = (f"MERIT K={plan.K}", run.paths.merged)
    if "shrink" in inputs:
        alpha = inputs["shrink"].metadata["alpha"]
        out["shrink"] = (f"θ0 + {alpha:.2f}(joint − θ0)", run.paths.shrink)
    if "branches" in wanted:
        for g in plan.groups:
            out[f"branch-{g.id}"] = (f"branch {g.id}", run.paths.branch(g.id) / "model")
    return out


def build(run: Context, inputs: dict) -> EvaluationResults:
    """Held-out NLL and accuracy per dataset for θ0, joint, the merge and each branch (and on
    whole tasks kept out of training), with bootstrap intervals and paired comparisons of the
    merge with every other model."""
    ec = run.cfg.evaluation
    where = model_dirs(run, inputs)
    scores = {key: score_model(run, key, *at) for key, at in where.items()}
    stats = (ec.bootstrap_samples, ec.confidence, ec.seed)
    models = {k: _summaries(s, stats) for k, s in scores.items()}
    labels = {k: s.label for k, s in scores.items()}
    per = {k: s.datasets for k, s in scores.items()}
    unseen = {k: s.unseen for k, s in scores.items() if s.unseen}
    pairs = compare_models(per, "merged", *stats) if "merged" in per else {}
    unseen_pairs = compare_models(unseen, "merged", *stats) if "merged" in unseen else {}
    seen_summaries = {k: v["summary"] for k, v in models.items()}
    if unseen:
        unseen_summaries = {k: v.get("unseen_summary", {}) for k, v in models.items()}
        table = unseen_table(seen_summaries, unseen_summaries, labels)
    else:
        table = markdown_table(seen_summaries, labels)
    res = EvaluationResults(models, pairs, table, unseen_pairs)
    run.paths.results_md.parent.mkdir(parents=True, exist_ok=True)
    run.paths.results_md.write_text(_markdown(res, labels))
    return res


def _markdown(res: EvaluationResults, labels: dict) -> str:
    parts = ["Metrics averaged over datasets (each dataset counts once).\n\n", res.table]
    if res.comparisons:
        parts += [
            "\nPaired bootstrap comparisons (the same resampled examples for A and B), held-out "
            "examples of the training tasks:\n\n",
            comparison_table(res.comparisons, labels),
        ]
    if res.unseen_comparisons:
        parts += ["\nOn the unseen tasks:\n\n", comparison_table(res.unseen_comparisons, labels)]
    return "".join(parts)


def needs_branches(cfg: RunConfig) -> bool:
    """Whether the models to evaluate include the merge (or what is made from it)."""
    return bool(set(cfg.evaluation.models) & {"merged", "branches", "shrink"})


def needs(cfg: RunConfig) -> tuple[str, ...]:
    """Only what ``evaluation.models`` needs is trained: θ0 alone trains nothing, joint alone
    no branch."""
    wanted = set(cfg.evaluation.models)
    joint = "joint" in cfg.training.baselines and bool(wanted & {"joint", "shrink"})
    out = ["plan"]
    if needs_branches(cfg):
        out += ["train", "merge"]
    if joint:
        out.append("joint")
    if joint and "shrink" in wanted:
        out.append("shrink")
    return tuple(out)


def _summaries(s: ModelScores, stats: tuple) -> dict:
    out = {**s.to_json(), "summary": with_intervals(s.datasets, *stats)}
    if s.unseen:
        out["unseen_summary"] = with_intervals(s.unseen, *stats)
    return out


def run_command(ctx: Context) -> EvaluationResults:
    """``merit run`` / ``merit demo``: every stage, then the held-out table and the stage times."""
    t0 = time.perf_counter()
    ctx.executor.get("data")
    ctx.say(plan_summary(ctx.executor.get("plan")))
    result = ctx.executor.get("evaluate")  # trains and merges first
    ctx.run.timings["total"] = time.perf_counter() - t0
    record_timing(ctx.run, "total", ctx.run.timings["total"])
    print("\nHeld-out metrics, averaged over datasets:\n")
    print(result.table)
    print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in ctx.run.timings.items()))
    if (o := run_overhead(ctx)) is not None:
        record_timing(ctx.run, "overhead", o.to_json())
        print(o.line())
    print(f"results -> {ctx.paths.results_md}")
    return result


def run_overhead(ctx: Context) -> Overhead | None:
    """Calibration + planning + merge time against the branches' training seconds."""
    seconds = []
    for g in ctx.executor.get("plan").groups:
        mp = RunPaths.manifest(ctx.paths.branch(g.id))
        if mp.is_file():
            seconds.append(BranchManifest.load(mp).seconds)
    timings = read_json(ctx.paths.timings) if ctx.paths.timings.is_file() else {}
    return overhead(timings, seconds)


STAGES.register(
    Stage(
        name="evaluate",
        help="held-out NLL/accuracy of θ0, joint, merged and branches",
        reads=READS,
        needs=needs,
        artifact=EvaluationResults,
        path=lambda p: p.results,
        build=build,
        what="the results table",
        show=lambda _ctx, res: res.table,
        order=60,
    )
)
