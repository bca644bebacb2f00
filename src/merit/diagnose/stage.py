"""Is θ0 merge-ready? The paper's premises (§4) measured on a finished run."""

from __future__ import annotations

from pathlib import Path

import torch

from merit.artifacts import write_json
from merit.calibrate.artifact import CalibrationRecord
from merit.calibrate.sketch import CountSketch, SketchSpec
from merit.calibrate.stage import sketch_tensors
from merit.config import RunConfig
from merit.diagnose.alignment import alignment, conflict_directions, unit_gradients
from merit.diagnose.artifact import Diagnostics
from merit.diagnose.figures import diagnostic_figures
from merit.diagnose.measure import measure
from merit.diagnose.premises import LMObjective, lm_batches
from merit.diagnose.verdicts import Thresholds, overall, verdicts
from merit.graph import STAGES, Context, Stage
from merit.lm import Encoded, load_model
from merit.plan.stage import Plan

READS = ("seed", "model", "data", "calibration", "diagnostics")


def _sample(run: Context, split: str) -> list[Encoded]:
    """The diagnostic examples of ``split``, spread over datasets."""
    return run.sample(split, run.cfg.diagnostics.examples, run.cfg.diagnostics.seed)


def _measure(
    run: Context, plan: Plan, joint_dir: Path | None, cal: CalibrationRecord | None
) -> Diagnostics:
    dc = run.cfg.diagnostics
    heldout, train_ex = _sample(run, "eval"), _sample(run, "train")
    run.say(
        f"diagnosing θ0, {plan.K} branches, θ̄{' and joint' if joint_dir else ''} on "
        f"{len(heldout)} held-out examples"
    )
    model = run.base.load()
    pad = run.base.tokenizer.pad_token_id
    obj = LMObjective(
        model,
        lm_batches(heldout, dc.batch_size, pad, run.device),
        hvp_method=dc.hvp,
        hvp_step=dc.hvp_step,
        backward_batch=dc.backward_batch,
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
    if diag.eigenvectors is not None and cal is not None:
        diag.alignment = _alignment(run, plan, cal, obj, diag)
        diag.verdicts = verdicts(diag.to_json(), Thresholds.from_settings(dc))
        diag.overall = overall(diag.verdicts)
    diag.examples = {
        "heldout": len(heldout),
        "train": len(train_ex),
        "heldout_tokens": sum(e.answer_tokens for e in heldout),
        "train_tokens": sum(e.answer_tokens for e in train_ex),
    }
    return diag


def _alignment(
    run: Context, plan: Plan, cal: CalibrationRecord, obj: LMObjective, diag: Diagnostics
) -> dict:
    """The plan's conflict axes against the top Hessian eigenvectors at θ0, in the calibration's
    CountSketch (the eigenvectors sketched by the same map)."""
    cc = run.cfg.calibration
    pos = {n: i for i, n in enumerate(cal.datasets)}
    idx = [pos[d.name] for d in plan.datasets]
    z = torch.tensor([d.z for d in plan.datasets], dtype=torch.float64)
    sketches = sketch_tensors(run, cal)["sketches"][idx]
    sq_norms = [cal.sq_norms[i] for i in idx]
    axes = conflict_directions(sketches, sq_norms, z)
    sketcher = CountSketch(SketchSpec(cc.sketch_dim, cc.seed))
    eigen = _sketched(sketcher, obj, diag.eigenvectors)
    a = alignment(axes, eigen, diag.gain["eigenvalues"], obj.dim, seed=run.cfg.diagnostics.seed,
                  unit=unit_gradients(sketches, sq_norms))  # fmt: skip
    return {**a.to_json(), "line": a.line()}


def _sketched(sketcher: CountSketch, obj: LMObjective, vectors: torch.Tensor) -> torch.Tensor:
    """Each row of ``vectors`` (in the objective's parameter order) sketched by parameter name,
    as calibration sketches gradients."""
    sizes = [p.numel() for p in obj.params]
    rows = [sketcher.sketch_named(zip(obj.names, v.split(sizes)), torch.device("cpu"))
            for v in vectors.cpu()]  # fmt: skip
    return torch.stack(rows)


def build(run: Context, inputs: dict) -> Diagnostics:
    """Is θ0 merge-ready? Barriers, distances, train vs held-out loss, flatness, and the merging
    gain against its quadratic prediction (paper §4), with a verdict per premise; writes
    ``diagnostics/*.json`` and PNGs."""
    out_dir = run.paths.diagnostics
    joint_dir = run.paths.baseline("joint") / "model" if "joint" in inputs else None
    diag = _measure(run, inputs["plan"], joint_dir, inputs.get("calibrate"))
    rec = diag.to_json()
    for key in ("barriers", "distances", "generalization", "perturbation", "gain", "verdicts"):
        write_json(out_dir / f"{key}.json", {key: rec[key]})
    for name, png in diagnostic_figures(diag).items():
        (out_dir / f"{name}.png").write_bytes(png)
    return diag


def needs(cfg: RunConfig) -> tuple[str, ...]:
    joint = ("joint",) if "joint" in cfg.training.baselines else ()
    return ("calibrate", "plan", "train", "merge", *joint)


def diagnostics_summary(diag: Diagnostics) -> str:
    """The verdicts in plain words, one premise a line."""
    tag = {True: "holds", False: "FAILS", None: "n/a  "}
    lines = [diag.overall]
    lines += [f"  [{tag[v['holds']]}] {v['premise']}: {v['why']}" for v in diag.verdicts]
    return "\n".join(lines)


STAGES.register(
    Stage(
        name="diagnose",
        help="is θ0 merge-ready? barriers, distances, flatness, gain vs theory",
        reads=READS,
        needs=needs,
        artifact=Diagnostics,
        path=lambda p: p.diagnostics_record,
        build=build,
        what="diagnostics",
        show=lambda ctx, d: f"{diagnostics_summary(d)}\ndiagnostics -> {ctx.paths.diagnostics}",
        order=70,
    )
)
