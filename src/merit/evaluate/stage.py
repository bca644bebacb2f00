"""Stage 5: held-out metrics of every model, with intervals and paired comparisons."""

from __future__ import annotations

import time
from pathlib import Path

from merit.artifacts import read_json, sha256_file, write_json
from merit.data.stage import prepare_data
from merit.lm import (
    load_model,
)
from merit.merge.stage import merge
from merit.plan.stage import make_plan, plan_summary
from merit.run import Run
from merit.train.stage import train


def model_dirs(run: Run, plan: dict) -> dict[str, Path]:
    wanted = run.cfg.evaluation.models
    out: dict[str, Path] = {}
    if "base" in wanted:
        out["θ0 (base)"] = run.base_dir
    if "joint" in wanted and "joint" in run.cfg.training.baselines:
        out["joint"] = run.paths.baseline("joint") / "model"
    if "merged" in wanted:
        out[f"MERIT K={plan['K']}"] = run.paths.merged
    if "branches" in wanted:
        for g in plan["groups"]:
            out[f"branch {g['id']}"] = run.paths.branch(g["id"]) / "model"
    return out


def evaluate(run: Run) -> dict:
    """Held-out NLL and accuracy per dataset for θ0, joint, the merge and each branch, with
    bootstrap intervals and paired comparisons of the merge with every other model."""
    from merit.evaluate.scoring import (
        EVAL_VERSION,
        compare_models,
        comparison_table,
        evaluate_model,
        markdown_table,
        with_intervals,
    )

    plan = make_plan(run)
    train(run)
    merge(run)
    ec = run.cfg.evaluation
    results: dict[str, dict] = {}
    for label, path in model_dirs(run, plan).items():
        slug = label.split(" (")[0].replace(" ", "_").replace("=", "").replace("θ0", "base")
        out = run.paths.eval_dir / f"{slug}.json"
        stamp = sha256_file(sorted(path.glob("*.safetensors"))[0])
        if out.is_file():
            old = read_json(out)
            if old.get("weights_sha256") == stamp and old.get("version") == EVAL_VERSION:
                results[label] = old
                continue
        run.say(f"evaluating {label}")
        with run.timed("evaluate"):
            model = load_model(path, run.device, run.cfg.model.dtype)
            per = evaluate_model(
                model,
                run.tokenizer,
                run.mixture,
                run.cfg.model.max_length,
                ec.max_examples,
                ec.max_generate,
                ec.max_new_tokens,
                ec.batch_size,
                run.progress,
                label,
            )
        rec = {
            "model": label,
            "version": EVAL_VERSION,
            "path": str(path),
            "weights_sha256": stamp,
            "datasets": per,
        }
        write_json(out, rec)
        results[label] = rec
    st = run.cfg.diagnostics  # statistics settings: not part of the experiment
    stats = (st.bootstrap_samples, st.confidence, st.seed)
    for rec in results.values():
        rec["summary"] = with_intervals(rec["datasets"], *stats)
    merged = next((k for k in results if k.startswith("MERIT")), None)
    per = {k: v["datasets"] for k, v in results.items()}
    pairs = compare_models(per, merged, *stats) if merged else {}
    table = markdown_table({k: v["summary"] for k, v in results.items()})
    write_json(run.paths.eval_dir / "results.json", {"models": results, "comparisons": pairs})
    (run.paths.eval_dir / "results.md").write_text(
        "Held-out metrics, averaged over datasets (each dataset counts once).\n\n"
        + table
        + (
            "\nPaired bootstrap comparisons (the same resampled examples for A and B):\n\n"
            + comparison_table(pairs)
            if pairs
            else ""
        )
    )
    return {"models": results, "table": table, "comparisons": pairs}


def run_all(run: Run) -> dict:
    """Every stage, skipping what is already done; returns the evaluation."""
    t0 = time.perf_counter()
    prepare_data(run)
    run.say(plan_summary(make_plan(run)))
    result = evaluate(run)  # trains and merges first
    run.timings["total"] = time.perf_counter() - t0
    write_json(run.paths.root / "timings.json", run.timings)
    return result


def run_command(run: Run) -> dict:
    """``merit run`` / ``merit demo``: every stage, then the held-out table and the stage times."""
    result = run_all(run)
    print("\nHeld-out metrics, averaged over datasets:\n")
    print(result["table"])
    print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in run.timings.items()))
    print(f"results -> {run.paths.eval_dir / 'results.md'}")
    return result
