"""Is θ0 merge-ready? The paper's premises (§4) measured on a finished run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from merit.artifacts import read_json, sha256_file, write_json
from merit.data.mixture import encode
from merit.lm import (
    Encoded,
    load_model,
)
from merit.merge.stage import merge
from merit.plan.stage import make_plan
from merit.run import Run, record_timing
from merit.train.stage import train

DIAGNOSTICS_VERSION = 1


def _diagnostics_stamp(run: Run, plan: dict, joint: Path | None) -> dict:
    files = [run.paths.merged / "merge_manifest.json"]
    files += [run.paths.branch(g["id"]) / "manifest.json" for g in plan["groups"]]
    if joint is not None:
        files.append(joint.parent / "manifest.json")
    return {
        "version": DIAGNOSTICS_VERSION,
        "base_fingerprint": run.base_fingerprint,
        "manifests": {str(f.relative_to(run.paths.root)): sha256_file(f) for f in files},
        "settings": run.cfg.diagnostics.model_dump(mode="json"),
    }


def diagnose(run: Run) -> dict:
    """Is θ0 merge-ready? Barriers, distances, train vs held-out loss, flatness, and the merging
    gain against its quadratic prediction (paper §4), with a verdict per premise; writes
    ``diagnostics/*.json`` and PNGs."""
    from merit.diagnose import premises as dg
    from merit.report.page import diagnostic_figures

    plan = make_plan(run)
    train(run)
    merge(run)
    dc = run.cfg.diagnostics
    out_dir = run.paths.root / "diagnostics"
    jp = run.paths.baseline("joint") / "model"
    joint_dir = jp if "joint" in run.cfg.training.baselines and jp.is_dir() else None
    stamp = _diagnostics_stamp(run, plan, joint_dir)
    path = out_dir / "diagnostics.json"
    if path.is_file() and read_json(path).get("stamp") == stamp:
        rec = read_json(path)
    else:
        t0 = time.perf_counter()
        # Sample first, tokenize only the sample (the train split of 256 datasets is large).
        ml = run.cfg.model.max_length

        def sample(split: str) -> list[Encoded]:
            raw = {d.name: d.examples(split) for d in run.mixture.datasets}
            return encode(run.tokenizer, dg.stratified_sample(raw, dc.examples, dc.seed), ml)

        heldout, train_ex = sample("eval"), sample("train")
        k = plan["K"]
        run.say(
            f"diagnosing θ0, {k} branches, θ̄{' and joint' if joint_dir else ''} on "
            f"{len(heldout)} held-out examples"
        )
        model = run.load_base()
        pad = run.tokenizer.pad_token_id
        obj = dg.LMObjective(
            model,
            dg.lm_batches(heldout, dc.batch_size, pad, run.device),
            hvp_method=dc.hvp,
            hvp_step=dc.hvp_step,
        )
        tobj = dg.LMObjective(model, dg.lm_batches(train_ex, dc.batch_size, pad, run.device))
        cpu = torch.device("cpu")

        def vector(d: Path) -> torch.Tensor:
            return obj.vector(load_model(d, cpu, run.cfg.model.dtype))

        rec = dg.diagnose(
            obj,
            tobj,
            obj.vector(),
            [vector(run.paths.branch(g["id"]) / "model") for g in plan["groups"]],
            [g["weight"] for g in plan["groups"]],
            vector(run.paths.merged),
            vector(joint_dir) if joint_dir else None,
            dc,
            run.progress,
        )
        rec["examples"] = {
            "heldout": len(heldout),
            "train": len(train_ex),
            "heldout_tokens": sum(e.answer_tokens for e in heldout),
            "train_tokens": sum(e.answer_tokens for e in train_ex),
        }
        rec["stamp"] = stamp
        for key in ("barriers", "distances", "generalization", "perturbation", "gain", "verdicts"):
            write_json(out_dir / f"{key}.json", {key: rec[key]})
        write_json(path, rec)
        run.timings["diagnose"] = time.perf_counter() - t0
        record_timing(run, "diagnose", run.timings["diagnose"])
    for name, png in diagnostic_figures(rec).items():
        (out_dir / f"{name}.png").write_bytes(png)
    return rec


def diagnostics_summary(rec: dict) -> str:
    """The verdicts in plain words, one premise a line."""
    tag = {True: "holds", False: "FAILS", None: "n/a  "}
    lines = [rec["overall"]]
    lines += [f"  [{tag[v['holds']]}] {v['premise']}: {v['why']}" for v in rec["verdicts"]]
    return "\n".join(lines)
