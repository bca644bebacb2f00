"""Stage 4 (paper eq. 3): verify the branches, then the token-weighted merge into ``merged/``."""

from __future__ import annotations

import shutil
from pathlib import Path

from merit.artifacts import read_json, sha256_file
from merit.diagnose.selection import best_key, objective, vector
from merit.errors import StageError
from merit.graph import STAGES, Context, Stage
from merit.hashing import cached_sha256
from merit.merge.derived import derived_model, frozen
from merit.merge.fitted import fitted_overrides
from merit.merge.manifest import MergeManifest
from merit.merge.methods import get_method
from merit.merge.safetensors_io import distances_from
from merit.merge.streaming import merge_checkpoints
from merit.plan.stage import Plan, PlanGroup, plan_hash
from merit.run import RunPaths
from merit.train.lora import merge_adapters
from merit.train.stage import READS as TRAIN_READS
from merit.train.stage import BranchManifest

READS = (*TRAIN_READS, "merging")


def verify_branches(run: Context, plan: Plan) -> list[Path]:
    """Every branch finished, from this θ0, plan and schedule, on the planned token budget, with
    the weights its manifest lists; else one error listing every problem."""
    _check_trainable(run, plan)
    problems: list[str] = []
    for g in plan.groups:
        problems += _branch_problems(run, plan, g)
    if problems:
        raise StageError(f"cannot merge: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return [run.paths.branch(g.id) / "model" for g in plan.groups]


def _check_trainable(run: Context, plan: Plan) -> None:
    """Every finished branch trained the parameters the plan's calibration sketched (the same
    groups of a vision-language θ0): averaging a branch that moved others would move them by
    w_k of its change alone. One line for the first branch that did not."""
    for g in plan.groups:
        mp = RunPaths.manifest(run.paths.branch(g.id))
        if not mp.is_file():
            continue
        m = BranchManifest.load(mp)
        if m.layout and m.layout != plan.sketch.get("layout"):
            raise StageError(
                f"cannot merge: branch {g.id} trained another parameter set "
                f"({_groups(m.trainable)}) than the plan's branches ({_groups(plan.trainable)})"
            )


def _groups(groups: list[str] | None) -> str:
    return ", ".join(groups) if groups else "every parameter"


def _branch_problems(run: Context, plan: Plan, g: PlanGroup) -> list[str]:
    k, d = g.id, run.paths.branch(g.id)
    mp = RunPaths.manifest(d)
    if not mp.is_file():
        if not d.is_dir():
            return [f"branch {k}: missing (never started; no {d})"]
        prog, where = d / "progress.json", ""
        if prog.is_file():
            p = read_json(prog)
            where = f", {p.get('status')} at step {p.get('step')} of {p.get('max_steps')}"
        return [f"branch {k}: unfinished (no manifest{where})"]
    m = BranchManifest.load(mp)
    problems = []
    if m.plan_sha256 != plan_hash(run):
        problems.append(f"branch {k}: trained from another plan")
    if m.base_fingerprint != run.base.fingerprint:
        problems.append(f"branch {k}: trained from another θ0")
    if m.training != run.cfg.experiment_hash():
        problems.append(f"branch {k}: trained with other training settings")
    if m.datasets != g.datasets:
        problems.append(f"branch {k}: trained on other datasets than its group")
    if m.tokens != g.tokens:
        problems.append(f"branch {k}: trained {m.tokens} tokens, plan says {g.tokens}")
    epochs, whole = run.cfg.training.epochs, run.cfg.training.max_steps is None
    # Whole epochs feed exactly epochs × N_k; a step budget or a fractional epoch, its schedule.
    want = g.tokens * int(epochs) if whole and float(epochs).is_integer() else m.tokens_scheduled
    if m.tokens_seen != want:
        problems.append(f"branch {k}: saw {m.tokens_seen} tokens, the plan's budget is {want}")
    if not any(rel.startswith("model/") for rel in m.weights):
        problems.append(f"branch {k}: its manifest lists no weight files")
    for rel, digest in m.weights.items():
        f = d / rel
        if not f.is_file():
            problems.append(f"branch {k}: {f} is missing")
        elif cached_sha256(f, run.cache / "sha256") != digest:  # the merge reuses it
            problems.append(f"branch {k}: {f} differs from its manifest (sha256)")
    return problems


def _digests(run: Context, files: list[Path]) -> dict[str, str]:
    """sha256 of each file ("" where missing), keyed by its path in the run directory."""
    return {
        str(f.relative_to(run.paths.root)): sha256_file(f) if f.is_file() else "" for f in files
    }


def _inputs(run: Context, plan: Plan) -> dict[str, str]:
    """What the merge is of: the plan and every branch manifest (by sha256)."""
    files = [run.paths.plan] + [RunPaths.manifest(run.paths.branch(g.id)) for g in plan.groups]
    return _digests(run, files)


def build_merge(run: Context, inputs: dict) -> MergeManifest:
    """θ̄ = Σ_k w_k θ_k with w_k = N_k / Σ N_j (paper eq. 3), or ``merging.method`` with the same
    weights, streamed into ``merged/``."""
    plan: Plan = inputs["plan"]
    dirs = verify_branches(run, plan)
    if run.paths.merged.exists():
        shutil.rmtree(run.paths.merged)  # a stale merge of another plan
    weights = [g.weight for g in plan.groups]
    mc = run.cfg.merging
    params, selection = dict(mc.params), None
    datasets = [g.datasets for g in plan.groups]
    if mc.select == "validation":
        params, selection = _select_on_validation(run, datasets, dirs, weights)
    resolved = get_method(mc.method).validate(weights, params)
    overrides, fitted = fitted_overrides(run, datasets, dirs, weights, mc.method, resolved)
    how = "" if mc.method == "linear" else f" by {mc.method} {params or ''}".rstrip()
    run.say("merging " + ", ".join(f"w{g.id}={g.weight:.3f}" for g in plan.groups) + how)
    manifest = merge_checkpoints(
        run.base.dir,
        dirs,
        weights,
        run.paths.merged,
        method=mc.method,
        params=params,
        dtype=mc.dtype,
        max_shard_bytes=mc.max_shard_bytes,
        metadata={
            "settings": run.cfg.settings(*READS),
            "inputs": _inputs(run, plan),
            "plan_sha256": plan_hash(run),
            "base_fingerprint": run.base.fingerprint,
            "weights_from": "plan tokens N_k / Σ N_j",
            "tokens": [g.tokens for g in plan.groups],
            **({"selection": selection} if selection else {}),
            **fitted,
        },
        overrides=overrides,
        weights_from="plan tokens N_k / Σ N_j",
        keep=frozen(run),
        base_fingerprint=run.base.fingerprint,
        hash_cache=run.cache / "sha256",
        progress=run.progress,
    )
    if run.cfg.training.lora is not None and mc.method == "linear":
        # LoRA branches: also the merge as one exact adapter (rank-stacked, merit.train.lora).
        adapters = [run.paths.branch(g.id) / "adapter" for g in plan.groups]
        merge_adapters(adapters, weights, run.paths.merged_adapter)
    return manifest


def _select_on_validation(run: Context, datasets, dirs: list[Path], weights: list[float]):
    """The grid point of ``merging.grid`` whose merge has the lowest validation loss, and every
    point's loss (the curve recorded in the manifest). Each candidate is merged to a scratch
    directory, scored, and removed; the eval split and the unseen tasks are never read."""
    mc = run.cfg.merging
    obj = objective(run, "validation")
    scratch = run.paths.root / "merge-candidates"
    curve = []
    for params in mc.grid_points():
        shutil.rmtree(scratch, ignore_errors=True)
        resolved = get_method(mc.method).validate(weights, params)
        overrides, _ = fitted_overrides(run, datasets, dirs, weights, mc.method, resolved)
        merge_checkpoints(run.base.dir, dirs, weights, scratch, method=mc.method, params=params,
                          dtype=mc.dtype, hash_cache=run.cache / "sha256", progress=False,
                          overrides=overrides)  # fmt: skip
        loss = obj.loss(vector(obj, scratch, run.cfg.model.dtype))
        run.say(f"merge: {mc.method} {params}: validation loss {loss:.4f}")
        curve.append({"params": params, "validation_loss": loss})
    shutil.rmtree(scratch, ignore_errors=True)
    best = curve[best_key({i: c["validation_loss"] for i, c in enumerate(curve)})]
    run.say(f"merge: chose {best['params']} on the validation split")
    return best["params"], curve


def build_shrink(run: Context, _inputs: dict) -> MergeManifest:
    """The shrinkage control θ0 + α(θ_joint − θ0) with α = ‖θ̄ − θ0‖ / ‖θ_joint − θ0‖.

    A token-weighted merge of K branches moves about 1/K as far from θ0 as joint training; this
    model moves joint training's way by as much as the merge moved, with no split at all, so it
    tells how much of the merge's difference from joint training is that shrinkage alone.
    """
    joint = run.paths.baseline("joint") / "model"
    if not RunPaths.manifest(joint.parent).is_file():
        raise StageError("the shrinkage control needs the joint baseline (training.baselines)")
    merged_d, joint_d = distances_from(run.base.dir, [run.paths.merged, joint])
    alpha = merged_d / joint_d if joint_d > 0 else 0.0
    run.say(
        f"shrinkage control: α = ‖θ̄ − θ0‖/‖θ_joint − θ0‖ = {merged_d:.4g}/{joint_d:.4g} = {alpha:.4f}"
    )
    meta = {"alpha": alpha, "merged_distance": merged_d, "joint_distance": joint_d}
    return derived_model(
        run, run.paths.shrink, [joint], [1.0], meta,
        "the joint model, scaled by α (shrinkage control)", "task_vector", alpha,
    )  # fmt: skip


STAGES.register(
    Stage(
        name="merge",
        help="merge a run's branches (CONFIG), or any checkpoints (--out DIR CKPT ...)",
        reads=READS,
        needs=("plan",),  # the branches are verified, never trained, by the merge
        artifact=MergeManifest,
        path=lambda p: p.merge_manifest,
        intact=lambda ctx, m: m.metadata.get("inputs") == _inputs(ctx, ctx.executor.get("plan")),
        build=build_merge,
        what="merged model",
        show=lambda ctx, m: (
            f"merged model -> {ctx.paths.merged} (weights {', '.join(f'{w:.3f}' for w in m.weights)})"
        ),
        order=50,
    )
)
STAGES.register(
    Stage(
        name="shrink",
        help="the shrinkage control θ0 + α(θ_joint − θ0), α = ‖θ̄ − θ0‖ / ‖θ_joint − θ0‖",
        reads=READS,
        needs=("merge", "joint"),
        artifact=MergeManifest,
        path=lambda p: p.shrink_manifest,
        build=build_shrink,
        what="the shrinkage control",
        show=lambda ctx, m: (
            f"shrinkage control -> {ctx.paths.shrink} (α {m.metadata['alpha']:.4f})"
        ),
        order=55,
    )
)
