"""Is θ0 merge-ready? The paper's premises (§4) measured on a finished run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from merit.artifacts import sha256_file, write_json
from merit.diagnose.artifact import Diagnostics
from merit.lm import Encoded, load_model
from merit.merge.stage import merge
from merit.plan.stage import Plan, make_plan
from merit.run import Run, record_timing
from merit.train.stage import train

DIAGNOSTICS_VERSION = 1


def _diagnostics_stamp(run: Run, plan: Plan, joint: Path | None) -> dict:
    files = [run.paths.merged / "merge_manifest.json"]
    files += [run.paths.manifest(run.paths.branch(g.id)) for g in plan.groups]
    if joint is not None:
        files.append(run.paths.manifest(joint.parent))
    return {
        "version": DIAGNOSTICS_VERSION,
        "base_fingerprint": run.base_fingerprint,
        "manifests": {str(f.relative_to(run.paths.root)): sha256_file(f) for f in files},
        "settings": run.cfg.diagnostics.model_dump(mode="json"),
    }


def _sample(run: Run, split: str) -> list[Encoded]:
    """The diagnostic examples of ``split``, spread over datasets."""
    return run.sample(split, run.cfg.diagnostics.examples, run.cfg.diagnostics.seed)


def _measure(run: Run, plan: Plan, joint_dir: Path | None) -> Diagnostics:
    from merit.diagnose.measure import measure
    from merit.diagnose.premises import LMObjective, lm_batches

    dc = run.cfg.diagnostics
    heldout, train_ex = _sample(run, "eval"), _sample(run, "train")
    run.say(
        f"diagnosing θ0, {plan.K} branches, θ̄{' and joint' if joint_dir else ''} on "
        f"{len(heldout)} held-out examples"
    )
    model = run.load_base()
    pad = run.tokenizer.pad_token_id
    obj = LMObjective(
        model,
        lm_batches(heldout, dc.batch_size, pad, run.device),
        hvp_method=dc.hvp,
        hvp_step=dc.hvp_step,
    )
    tobj = LMObjective(model, lm_batches(train_ex, dc.batch_size, pad, run.device))
    cpu = torch.device("cpu")

    def vector(d: Path) -> torch.Tensor:
        return obj.vector(load_model(d, cpu, run.cfg.model.dtype))

    diag = measure(
        obj,
        tobj,
        obj.vector(),
        [vector(run.paths.branch(g.id) / "model") for g in plan.groups],
        [g.weight for g in plan.groups],
        vector(run.paths.merged),
        vector(joint_dir) if joint_dir else None,
        dc,
        run.progress,
    )
    diag.examples = {
        "heldout": len(heldout),
        "train": len(train_ex),
        "heldout_tokens": sum(e.answer_tokens for e in heldout),
        "train_tokens": sum(e.answer_tokens for e in train_ex),
    }
    return diag


def diagnose(run: Run) -> Diagnostics:
    """Is θ0 merge-ready? Barriers, distances, train vs held-out loss, flatness, and the merging
    gain against its quadratic prediction (paper §4), with a verdict per premise; writes
    ``diagnostics/*.json`` and PNGs."""
    from merit.diagnose.figures import diagnostic_figures

    plan = make_plan(run)
    train(run)
    merge(run)
    out_dir = run.paths.diagnostics
    jp = run.paths.baseline("joint") / "model"
    joint_dir = jp if "joint" in run.cfg.training.baselines and jp.is_dir() else None
    stamp = _diagnostics_stamp(run, plan, joint_dir)
    path = out_dir / "diagnostics.json"
    diag = Diagnostics.load_if(path)
    if diag is None or diag.stamp != stamp:
        t0 = time.perf_counter()
        diag = _measure(run, plan, joint_dir)
        diag.stamp = stamp
        rec = diag.to_json()
        for key in ("barriers", "distances", "generalization", "perturbation", "gain", "verdicts"):
            write_json(out_dir / f"{key}.json", {key: rec[key]})
        diag.save(path)
        run.timings["diagnose"] = time.perf_counter() - t0
        record_timing(run, "diagnose", run.timings["diagnose"])
    for name, png in diagnostic_figures(diag).items():
        (out_dir / f"{name}.png").write_bytes(png)
    return diag


def diagnostics_summary(diag: Diagnostics) -> str:
    """The verdicts in plain words, one premise a line."""
    tag = {True: "holds", False: "FAILS", None: "n/a  "}
    lines = [diag.overall]
    lines += [f"  [{tag[v['holds']]}] {v['premise']}: {v['why']}" for v in diag.verdicts]
    return "\n".join(lines)
