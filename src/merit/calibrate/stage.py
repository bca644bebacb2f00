"""Stage 1 (paper §3.1): a sketched representative gradient per dataset at θ0."""

from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from merit.artifacts import atomic_path, sha256_file
from merit.calibrate.artifact import CalibrationRecord
from merit.calibrate.gram import extend_gram
from merit.calibrate.sensitivity import (
    Sensitivity,
    mean_curve,
    recommend,
    sensitivity_figure,
    subset_curve,
)
from merit.calibrate.sketch import (
    Calibration,
    CountSketch,
    SketchSpec,
    calibrate_model,
    check_spec,
    fold,
    mean_gradient_sketch,
    parameter_layout,
    part_dim,
    spec_dict,
    split_parts,
)
from merit.errors import StageError
from merit.graph import STAGES, Context, Stage
from merit.lm import meta_model

READS = ("seed", "model", "data", "calibration")


def _parameter_layout(ctx: Context) -> str:
    """θ0's parameter names and shapes (from its config, on the meta device: no weights read)."""
    # θ0 is resolved first: that may build it (the demo's), which must not happen on the
    # meta device. Only the trainable parameters are sketched (model.trainable).
    return _layout(ctx.base.dir, ctx.base.trainable, ctx.base.fingerprint)


@functools.lru_cache(maxsize=8)
def _layout(base_dir: Path, trainable: tuple[str, ...] | None, _fingerprint: str) -> str:
    # Built once per θ0 (its fingerprint covers config.json) and process: the reuse check and
    # the build both need it, and so does every run of `merit compare` on the same θ0.
    return parameter_layout(meta_model(base_dir, trainable))


def sketch_spec(ctx: Context) -> dict:
    """Everything that must match for two calibrations' sketches to be compared (``--add``)."""
    cc = ctx.cfg.calibration
    return spec_dict(
        SketchSpec(cc.sketch_dim, cc.seed),
        layout=_parameter_layout(ctx),
        base_fingerprint=ctx.base.fingerprint,
        max_length=ctx.cfg.model.max_length,
        parts=cc.microbatches,
        part_dim=part_dim(cc.sketch_dim, cc.microbatch_dim),
    )


def _calibration_ids(ctx: Context) -> dict[str, str]:
    """Per dataset: a digest of its file and its calibration examples (what its sketch is of)."""
    return {
        d.name: hashlib.sha256(
            json.dumps([d.file_hash, d.splits["calibration"]]).encode()
        ).hexdigest()[:16]
        for d in ctx.mixture.datasets
    }


def _grams(sketches: dict, names: list[str], counts: list[int], old) -> dict:
    """Gram of the dataset sketches (fp64) and of the part sketches (fp32 products), reusing
    the entries of an earlier calibration ``old`` (a CalibrationRecord with its tensors) so that
    only the new datasets' rows are computed."""
    sk = sketches["sketches"].double().numpy()
    parts = sketches["parts"].numpy()
    known = part_known = None
    rows: list[int] = []
    part_rows: list[int] = []
    kept = old.tensors if old is not None else {}
    if "gram" in kept and "part_gram" in kept:
        pos = {n: i for i, n in enumerate(names)}
        start = np.cumsum([0, *counts])
        rows = [pos[n] for n in old.datasets]
        part_rows = [j for r in rows for j in range(start[r], start[r + 1])]
        known, part_known = kept["gram"].numpy(), kept["part_gram"].numpy()
    return {
        "gram": torch.from_numpy(extend_gram(sk, known, rows)),
        "part_gram": torch.from_numpy(extend_gram(parts, part_known, part_rows)),
    }


def current(ctx: Context, rec: CalibrationRecord) -> bool:
    """Whether these sketches are of this θ0, sketch spec and calibration examples, and the
    sketches file is the one recorded."""
    return (
        rec.spec == sketch_spec(ctx)
        and rec.base_fingerprint == ctx.base.fingerprint
        and rec.datasets == ctx.mixture.names
        and rec.data_ids == _calibration_ids(ctx)
        and ctx.paths.sketches.is_file()
        and rec.sketches_sha256 == sha256_file(ctx.paths.sketches)
    )


def sketch_tensors(ctx: Context, rec: CalibrationRecord) -> dict:
    """The record's tensors (sketches, parts, gram, part_gram), read once."""
    if not rec.tensors:
        rec.tensors = load_file(ctx.paths.sketches)
    return rec.tensors


def build(ctx: Context, _inputs: dict) -> CalibrationRecord:
    """Sketched mean answer-token gradient of every dataset at θ0 (paper §3.1), and of a few
    disjoint parts of its calibration examples (for plan stability).

    With the ``add`` option (``merit plan --add``), an existing calibration is extended: its
    sketch spec (seed, d, parameter layout, θ0 fingerprint, loss definition, parts) must be this
    run's and its datasets unchanged; only the datasets it lacks are computed.
    """
    spec, ids = sketch_spec(ctx), _calibration_ids(ctx)
    old = CalibrationRecord.load_if(ctx.paths.calibration) if ctx.options.get("add") else None
    kept = _kept_datasets(old, spec, ids) if old is not None else None
    todo = [n for n in ctx.mixture.names if kept is None or n not in kept.datasets]
    ctx.say(
        f"calibrating {len(todo)} {'new ' if kept is not None else ''}dataset(s) at θ0 "
        f"(sketch d={spec['dim']}, {ctx.cfg.calibration.microbatches} parts each)"
    )
    cal = _sketch_datasets(ctx, todo) if todo else {}
    if kept is not None:
        sketch_tensors(ctx, kept)
        cal.update(_recorded(kept))
    return _write(ctx, cal, spec, ids, todo, kept)


def _kept_datasets(old: CalibrationRecord, spec: dict, ids: dict[str, str]) -> CalibrationRecord:
    """``--add``: the earlier calibration, if its sketches can be extended by the new datasets."""
    check_spec(old.spec, spec)
    gone = [n for n in old.datasets if n not in ids]
    if gone:
        raise StageError("--add only adds datasets; no longer in the mixture: " + ", ".join(gone))
    changed = [n for n in old.datasets if old.data_ids.get(n) != ids[n]]
    if changed:
        raise StageError(
            "--add: the calibration examples of " + ", ".join(changed) + " changed since "
            "they were sketched; plan from scratch in a new run_dir"
        )
    return old


def _sketch_datasets(ctx: Context, names: list[str]) -> dict[str, Calibration]:
    cc = ctx.cfg.calibration
    enc = ctx.encoded("calibration")
    return calibrate_model(
        ctx.base.load(),
        {n: enc[n] for n in names},
        SketchSpec(cc.sketch_dim, cc.seed),
        cc.batch_size,
        ctx.base.tokenizer.pad_token_id,
        ctx.progress,
        parts=cc.microbatches,
        fold_dim=part_dim(cc.sketch_dim, cc.microbatch_dim),
        streaming=cc.streaming,
    )


def _recorded(rec: CalibrationRecord) -> dict[str, Calibration]:
    """The datasets of an earlier calibration, as recorded."""
    start = np.cumsum([0] + [len(p) for p in rec.part_tokens])
    return {
        n: Calibration(
            rec.tensors["sketches"][i],
            rec.sq_norms[i],
            rec.losses[i],
            rec.answer_tokens[i],
            parts=rec.tensors["parts"][start[i] : start[i + 1]],
            part_tokens=rec.part_tokens[i],
            sq_norm_exact=rec.sq_norm_exact[i],
        )
        for i, n in enumerate(rec.datasets)
    }


def _write(ctx: Context, cal: dict, spec: dict, ids: dict, todo: list, kept) -> CalibrationRecord:
    names = ctx.mixture.names
    tensors = {
        "sketches": torch.stack([cal[n].sketch for n in names]).contiguous(),
        "parts": torch.cat([cal[n].parts for n in names]).contiguous(),
    }
    # Inner products for planning, kept with the sketches: --add multiplies new rows only.
    counts = [len(cal[n].part_tokens) for n in names]
    tensors.update(_grams(tensors, names, counts, kept))
    with atomic_path(ctx.paths.sketches) as tmp:
        save_file(tensors, str(tmp))
    rec = CalibrationRecord(
        settings=ctx.cfg.settings(*READS),
        base_fingerprint=ctx.base.fingerprint,
        spec=spec,
        sketches_sha256=sha256_file(ctx.paths.sketches),
        datasets=names,
        computed=todo,
        sq_norms=[cal[n].sq_norm for n in names],
        sq_norm_exact=[cal[n].sq_norm_exact for n in names],
        losses=[cal[n].loss for n in names],
        answer_tokens=[cal[n].tokens for n in names],
        part_tokens=[cal[n].part_tokens for n in names],
        data_ids=ids,
        modes=[getattr(cal[n], "mode", "") for n in todo],
    )
    rec.tensors = tensors
    return rec


STAGE = STAGES.register(
    Stage(
        name="calibrate",
        help="sketch each dataset's mean gradient at θ0",
        reads=READS,
        needs=("data",),
        artifact=CalibrationRecord,
        path=lambda p: p.calibration,
        build=build,
        what="calibration sketches",
        intact=current,
        show=lambda ctx, rec: f"calibrated {len(rec.datasets)} datasets -> {ctx.paths.sketches}",
        order=20,
    )
)


def build_sensitivity(ctx: Context, inputs: dict) -> Sensitivity:
    """The cosine of each sampled dataset's n-sample calibration gradient (its part sketches,
    m of M) with a reference gradient over more training examples, and where it saturates."""
    rec: CalibrationRecord = inputs["calibrate"]
    cc, dc = ctx.cfg.calibration, ctx.cfg.diagnostics
    if cc.microbatches < 2:
        note = ("calibration size: no curve with calibration.microbatches = 1 (one part: no "
                "smaller sample to compare); set it to 2 or more and calibrate again")  # fmt: skip
        return Sensitivity({}, {}, note=note)
    names = sorted(random.Random(dc.seed).sample(rec.datasets, min(dc.sensitivity_datasets,
                                                                   len(rec.datasets))))  # fmt: skip
    parts, refs, sizes_ref = _reference_sketches(ctx, rec, names)
    curves = {}
    for name in names:
        n_cal = len(ctx.encoded("calibration")[name])
        sizes = [len(p) for p in split_parts(n_cal, cc.microbatches, cc.seed, name)]
        i = rec.datasets.index(name)
        curves[name] = subset_curve(parts[name], rec.part_tokens[i], sizes, refs[name],
                                    dc.sensitivity_draws, dc.seed)  # fmt: skip
    mean = mean_curve(curves)
    pdim = part_dim(cc.sketch_dim, cc.microbatch_dim)
    out = Sensitivity(sizes_ref, curves,
                      mean, recommend(mean), sketch_error=pdim**-0.5)  # fmt: skip
    with atomic_path(ctx.paths.sensitivity.with_suffix(".png")) as tmp:
        tmp.write_bytes(sensitivity_figure(out))
    return out


def _reference_examples(ctx: Context, name: str) -> list:
    """The reference's examples: training examples (never the calibration's), seeded."""
    dc, train = ctx.cfg.diagnostics, ctx.encoded("train")[name]
    n = dc.sensitivity_reference or 4 * len(ctx.encoded("calibration")[name])
    return random.Random(f"{dc.seed}:{name}").sample(train, min(n, len(train)))


def _reference_sketches(ctx: Context, rec: CalibrationRecord, names: list[str]):
    """Each dataset's part sketches, its reference gradient's sketch folded to theirs, and the
    reference's number of examples."""
    cc = ctx.cfg.calibration
    tensors = sketch_tensors(ctx, rec)
    start = np.cumsum([0] + [len(p) for p in rec.part_tokens])
    model, sketcher = ctx.base.load(), CountSketch(SketchSpec(cc.sketch_dim, cc.seed))
    pdim = part_dim(cc.sketch_dim, cc.microbatch_dim)
    parts, refs, counts = {}, {}, {}
    for name in names:
        i = rec.datasets.index(name)
        parts[name] = tensors["parts"][start[i] : start[i + 1]]
        examples = _reference_examples(ctx, name)
        if len(examples) < 2:
            raise StageError(f"sensitivity: {name} has {len(examples)} training example(s) for a "
                             "reference; set diagnostics.sensitivity_datasets lower or add data")  # fmt: skip
        ctx.say(f"sensitivity: reference gradient of {name} on {len(examples)} training examples")
        g = mean_gradient_sketch(model, examples, sketcher, cc.batch_size,
                                 ctx.base.tokenizer.pad_token_id, streaming=cc.streaming)  # fmt: skip
        refs[name], counts[name] = fold(g.sketch, pdim), len(examples)
    return parts, refs, counts


SENSITIVITY_READS = (*READS, "diagnostics")

STAGES.register(
    Stage(
        name="sensitivity",
        help="calibration size: cosine of the n-sample calibration gradient with a larger "
        "reference, per sampled dataset, and the n where it saturates",
        reads=SENSITIVITY_READS,
        needs=("data", "calibrate"),
        artifact=Sensitivity,
        path=lambda p: p.sensitivity,
        build=build_sensitivity,
        what="the calibration-size curve",
        show=lambda ctx, s: s.line(),
        order=25,
    )
)
