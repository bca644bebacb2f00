"""Stage 5: held-out metrics of every model, with intervals and paired comparisons."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from merit.artifacts import Artifact, sha256_text, write_json
from merit.data.mixture import Mixture
from merit.data.stage import prepare_data
from merit.evaluate.statistics import (
    compare_models,
    comparison_table,
    markdown_table,
    unseen_table,
    with_intervals,
)
from merit.lm import (
    load_model,
)
from merit.merge.stage import merge, shrinkage_control
from merit.plan.stage import Plan, make_plan, plan_summary
from merit.run import Run
from merit.train.stage import train

# Settings that change how results are summarised, never an example's score.
_SUMMARY_ONLY = ("bootstrap_samples", "confidence", "seed", "models")


@dataclass
class ModelScores(Artifact):
    """``eval/<model>.json``: one model's per-example scores on the eval split."""

    model: str  # key: base, joint, merged, branch-<k>
    label: str  # for people: "θ0 (base)", "MERIT K=4", ...
    version: int
    path: str
    weights_sha256: str
    settings: dict
    datasets: dict
    unseen: dict = field(default_factory=dict)  # whole tasks kept out of training (data.unseen)


@dataclass
class EvaluationResults(Artifact):
    """``eval/results.json``: every model's scores with intervals, and the paired comparisons
    of the merge (key ``merged``) with every other model."""

    models: dict[str, dict]  # key -> ModelScores JSON plus its "summary" (and "unseen_summary")
    comparisons: dict
    table: str = ""
    unseen_comparisons: dict = field(default_factory=dict)


def model_dirs(run: Run, plan: Plan) -> dict[str, tuple[str, Path]]:
    """The models to evaluate: key -> (label, directory)."""
    wanted = run.cfg.evaluation.models
    out: dict[str, tuple[str, Path]] = {}
    if "base" in wanted:
        out["base"] = ("θ0 (base)", run.base_dir)
    if "joint" in wanted and "joint" in run.cfg.training.baselines:
        out["joint"] = ("joint", run.paths.baseline("joint") / "model")
    if "merged" in wanted:
        out["merged"] = (f"MERIT K={plan.K}", run.paths.merged)
    if "shrink" in wanted and "joint" in run.cfg.training.baselines:
        alpha = shrinkage_control(run)["alpha"]
        out["shrink"] = (f"θ0 + {alpha:.2f}(joint − θ0)", run.paths.shrink)
    if "branches" in wanted:
        for g in plan.groups:
            out[f"branch-{g.id}"] = (f"branch {g.id}", run.paths.branch(g.id) / "model")
    return out


def score_settings(run: Run) -> dict:
    """What an example's score depends on: the evaluate stage's settings less the summary's."""
    s = run.cfg.settings("evaluate")
    ev = {k: v for k, v in s.get("evaluation", {}).items() if k not in _SUMMARY_ONLY}
    return {**s, "evaluation": ev}


def _weights_sha256(run: Run, path: Path) -> str:
    from merit.merge.hashing import cached_sha256

    digests = [cached_sha256(f, run.cache / "sha256") for f in sorted(path.glob("*.safetensors"))]
    return digests[0] if len(digests) == 1 else sha256_text("".join(digests))


def score_model(run: Run, key: str, label: str, path: Path, out: Path | None = None) -> ModelScores:
    """One model's scores (``eval/<key>.json``, or ``out``): reused when its weights and the
    scoring settings are unchanged."""
    from merit.evaluate.scoring import EVAL_VERSION, evaluate_model

    out = out or run.paths.eval_dir / f"{key}.json"
    stamp = _weights_sha256(run, path)
    old = ModelScores.load_if(out)
    ok = old is not None and (old.weights_sha256, old.version) == (stamp, EVAL_VERSION)
    settings = score_settings(run)
    if ok and old.settings == settings:
        run.say(f"evaluate: reusing the scores of {label}")
        return old
    why = "no scores yet" if old is None else "weights or scoring settings changed"
    run.say(f"evaluating {label} ({why})")
    ec = run.cfg.evaluation
    with run.timed("evaluate"):
        model = load_model(path, run.device, run.cfg.model.dtype)

        def scores(mixture: Mixture, what: str) -> dict:
            if not mixture.datasets:
                return {}
            return evaluate_model(
                model,
                run.processor,
                mixture,
                run.cfg.model.max_length,
                ec.max_examples,
                ec.max_generate,
                ec.max_new_tokens,
                ec.batch_size,
                run.progress,
                f"{label}{what}",
            )

        per = scores(run.mixture, "")
        unseen = scores(Mixture(run.mixture.unseen), " (unseen tasks)")
    rec = ModelScores(key, label, EVAL_VERSION, str(path), stamp, settings, per, unseen)
    rec.save(out)
    return rec


def evaluate(run: Run) -> EvaluationResults:
    """Held-out NLL and accuracy per dataset for θ0, joint, the merge and each branch (and on
    whole tasks kept out of training), with bootstrap intervals and paired comparisons of the
    merge with every other model."""
    plan = make_plan(run)
    train_needed(run)
    ec = run.cfg.evaluation
    scores = {key: score_model(run, key, *where) for key, where in model_dirs(run, plan).items()}
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
    res.save(run.paths.eval_dir / "results.json")
    parts = ["Metrics averaged over datasets (each dataset counts once).\n\n", table]
    if pairs:
        parts += [
            "\nPaired bootstrap comparisons (the same resampled examples for A and B), held-out "
            "examples of the training tasks:\n\n",
            comparison_table(pairs, labels),
        ]
    if unseen_pairs:
        parts += ["\nOn the unseen tasks:\n\n", comparison_table(unseen_pairs, labels)]
    (run.paths.eval_dir / "results.md").write_text("".join(parts))
    return res


def needs_branches(run: Run) -> bool:
    """Whether the models to evaluate include the merge (or what is made from it)."""
    return bool(set(run.cfg.evaluation.models) & {"merged", "branches", "shrink"})


def train_needed(run: Run) -> None:
    """Train (and merge) only what ``evaluation.models`` needs: θ0 alone trains nothing, joint
    alone no branch."""
    wanted = set(run.cfg.evaluation.models)
    joint = "joint" in run.cfg.training.baselines and bool(wanted & {"joint", "shrink"})
    if needs_branches(run):
        train(run, baselines=["joint"] if joint else [])
        merge(run)
    elif joint:
        train(run, baseline="joint")


def _summaries(s: ModelScores, stats: tuple) -> dict:
    out = {**s.to_json(), "summary": with_intervals(s.datasets, *stats)}
    if s.unseen:
        out["unseen_summary"] = with_intervals(s.unseen, *stats)
    return out


def run_all(run: Run) -> dict:
    """Every stage, skipping what is already done; returns the evaluation."""
    t0 = time.perf_counter()
    prepare_data(run)
    run.say(plan_summary(make_plan(run)))
    result = evaluate(run)  # trains and merges first
    run.timings["total"] = time.perf_counter() - t0
    write_json(run.paths.timings, run.timings)
    return result


def run_command(run: Run) -> dict:
    """``merit run`` / ``merit demo``: every stage, then the held-out table and the stage times."""
    result = run_all(run)
    print("\nHeld-out metrics, averaged over datasets:\n")
    print(result.table)
    print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in run.timings.items()))
    print(f"results -> {run.paths.eval_dir / 'results.md'}")
    return result
