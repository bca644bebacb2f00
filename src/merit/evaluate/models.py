"""One model's per-example scores (``eval/<model>.json``), reused while its weights and the
scoring settings are unchanged; what the evaluate stage and ``merit compare`` score with.

``run`` is a stage context (:class:`merit.graph.Context`): its θ0, mixture, config and console.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from merit.artifacts import Artifact, sha256_text
from merit.data.mixture import Mixture
from merit.evaluate.scoring import EVAL_VERSION, evaluate_model
from merit.hashing import cached_sha256
from merit.lm import load_model

READS = ("seed", "model", "data", "evaluation")
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


def score_settings(run) -> dict:
    """What an example's score depends on: the evaluate stage's settings less the summary's."""
    s = run.cfg.settings(*READS)
    ev = {k: v for k, v in s.get("evaluation", {}).items() if k not in _SUMMARY_ONLY}
    return {**s, "evaluation": ev}


def _weights_sha256(run, path: Path) -> str:
    digests = [cached_sha256(f, run.cache / "sha256") for f in sorted(path.glob("*.safetensors"))]
    return digests[0] if len(digests) == 1 else sha256_text("".join(digests))


def score_model(run, key: str, label: str, path: Path, out: Path | None = None) -> ModelScores:
    """One model's scores (``eval/<key>.json``, or ``out``): reused when its weights and the
    scoring settings are unchanged."""
    out = out or run.paths.scores(key)
    stamp = _weights_sha256(run, path)
    old = ModelScores.load_if(out)
    ok = old is not None and (old.weights_sha256, old.version) == (stamp, EVAL_VERSION)
    settings = score_settings(run)
    if ok and old.settings == settings:
        run.say(f"evaluate: reusing the scores of {label}")
        return old
    why = "no scores yet" if old is None else "weights or scoring settings changed"
    run.say(f"evaluating {label} ({why})")
    model = load_model(
        path, run.device, run.cfg.model.dtype, None, run.cfg.model.attn_implementation
    )
    per = _scores(run, model, run.mixture, label)
    unseen = _scores(run, model, Mixture(run.mixture.unseen), f"{label} (unseen tasks)")
    rec = ModelScores(key, label, EVAL_VERSION, str(path), stamp, settings, per, unseen)
    rec.save(out)
    return rec


def _scores(run, model, mixture: Mixture, label: str) -> dict:
    if not mixture.datasets:
        return {}
    ec = run.cfg.evaluation
    return evaluate_model(
        model, run.base.processor, mixture, run.cfg.model.max_length, ec.max_examples,
        ec.max_generate, ec.max_new_tokens, ec.batch_size, run.progress, label,
    )  # fmt: skip


@dataclass
class EvaluationResults(Artifact):
    """``eval/results.json``: every model's scores with intervals, and the paired comparisons
    of the merge (key ``merged``) with every other model."""

    models: dict[str, dict]  # key -> ModelScores JSON plus its "summary" (and "unseen_summary")
    comparisons: dict
    table: str = ""
    unseen_comparisons: dict = field(default_factory=dict)
