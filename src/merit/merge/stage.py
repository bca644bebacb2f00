"""Stage 4 (paper eq. 3): verify the branches, then the token-weighted merge into ``merged/``."""

from __future__ import annotations

from pathlib import Path

from merit.artifacts import read_json
from merit.plan.stage import make_plan, plan_hash
from merit.run import Run, StageError


def verify_branches(run: Run, plan: dict) -> list[Path]:
    """Every branch finished, from this θ0 and plan, on the planned token budget, with the weights
    its manifest lists; else one error listing every problem."""
    from merit.merge.streaming import cached_sha256

    problems = []
    p_hash = plan_hash(run)
    epochs = run.cfg.training.epochs
    dirs = []
    for g in plan["groups"]:
        k = g["id"]
        d = run.paths.branch(k)
        dirs.append(d / "model")
        mp = d / "manifest.json"
        if not mp.is_file():
            if not d.is_dir():
                problems.append(f"branch {k}: missing (never started; no {d})")
                continue
            prog = d / "progress.json"
            where = ""
            if prog.is_file():
                p = read_json(prog)
                where = f", {p.get('status')} at step {p.get('step')} of {p.get('max_steps')}"
            problems.append(f"branch {k}: unfinished (no manifest{where})")
            continue
        m = read_json(mp)
        if m.get("plan_sha256") != p_hash:
            problems.append(f"branch {k}: trained from another plan")
        if m.get("base_fingerprint") != run.base_fingerprint:
            problems.append(f"branch {k}: trained from another θ0")
        if m.get("datasets") != g["datasets"]:
            problems.append(f"branch {k}: trained on other datasets than its group")
        if m.get("tokens") != g["tokens"]:
            problems.append(
                f"branch {k}: trained {m.get('tokens')} tokens, plan says {g['tokens']}"
            )
        seen = m.get("tokens_seen")
        want = (
            g["tokens"] * int(epochs) if float(epochs).is_integer() else m.get("tokens_scheduled")
        )
        if seen != want:
            problems.append(f"branch {k}: saw {seen} tokens, the plan's budget is {want}")
        weights = m.get("weights", {})
        if not any(r.startswith("model/") for r in weights):
            problems.append(f"branch {k}: its manifest lists no weight files")
        for rel, digest in weights.items():
            f = d / rel
            if not f.is_file():
                problems.append(f"branch {k}: {f} is missing")
            elif cached_sha256(f, run.cache / "sha256") != digest:  # the merge reuses it
                problems.append(f"branch {k}: {f} differs from its manifest (sha256)")
    if problems:
        raise StageError(f"cannot merge: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return dirs


def merge(run: Run) -> dict:
    """θ̄ = Σ_k w_k θ_k with w_k = N_k / Σ N_j (paper eq. 3), streamed into ``merged/``."""
    from merit.merge.streaming import merge_checkpoints

    plan = make_plan(run)
    mp = run.paths.merged / "merge_manifest.json"
    p_hash = plan_hash(run)
    if mp.is_file() and read_json(mp).get("metadata", {}).get("plan_sha256") == p_hash:
        return read_json(mp)
    dirs = verify_branches(run, plan)
    if run.paths.merged.exists():
        import shutil

        shutil.rmtree(run.paths.merged)  # a stale merge of another plan
    weights = [g["weight"] for g in plan["groups"]]
    run.say("merging " + ", ".join(f"w{g['id']}={g['weight']:.3f}" for g in plan["groups"]))
    with run.timed("merge"):
        manifest = merge_checkpoints(
            run.base_dir,
            dirs,
            weights,
            run.paths.merged,
            dtype=run.cfg.merging.dtype,
            max_shard_bytes=run.cfg.merging.max_shard_bytes,
            metadata={
                "plan_sha256": p_hash,
                "base_fingerprint": run.base_fingerprint,
                "weights_from": "plan tokens N_k / Σ N_j",
                "tokens": [g["tokens"] for g in plan["groups"]],
            },
            weights_from="plan tokens N_k / Σ N_j",
            base_fingerprint=run.base_fingerprint,
            hash_cache=run.cache / "sha256",
            progress=run.progress,
        )
        if run.cfg.training.lora is not None:
            # LoRA branches: also the merge as one exact adapter (rank-stacked, see merit.train.lora).
            from merit.train.lora import merge_adapters

            adapters = [run.paths.branch(g["id"]) / "adapter" for g in plan["groups"]]
            merge_adapters(adapters, weights, run.paths.root / "merged-adapter")
    return manifest
