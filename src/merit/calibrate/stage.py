"""Stage 1 (paper §3.1): a sketched representative gradient per dataset at θ0."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from merit.artifacts import read_json, sha256_file, write_json
from merit.calibrate.sketch import Calibration, SketchSpec, calibrate_model, spec_dict
from merit.data.stage import prepare_data
from merit.run import Run, StageError


def _parameter_layout(run: Run) -> str:
    """θ0's parameter names and shapes (from its config, on the meta device: no weights read)."""
    if "_layout" not in run.__dict__:
        from transformers import AutoConfig, AutoModelForCausalLM

        from merit.calibrate.sketch import parameter_layout

        # The config is read first: resolving θ0 may build it (the demo's), which must not
        # happen on the meta device.
        config = AutoConfig.from_pretrained(run.base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        run.__dict__["_layout"] = parameter_layout(model)
    return run.__dict__["_layout"]


def _sketch_spec(run: Run) -> dict:
    """Everything that must match for two calibrations' sketches to be compared (``--add``)."""
    from merit.calibrate.sketch import part_dim

    cc = run.cfg.calibration
    return spec_dict(
        SketchSpec(cc.sketch_dim, cc.seed),
        layout=_parameter_layout(run),
        base_fingerprint=run.base_fingerprint,
        max_length=run.cfg.model.max_length,
        parts=cc.microbatches,
        part_dim=part_dim(cc.sketch_dim, cc.microbatch_dim),
    )


def _calibration_ids(run: Run) -> dict[str, str]:
    """Per dataset: a digest of its file and its calibration examples (what its sketch is of)."""
    return {
        d.name: hashlib.sha256(
            json.dumps([d.file_hash, d.splits["calibration"]]).encode()
        ).hexdigest()[:16]
        for d in run.mixture.datasets
    }


def _grams(sketches: dict, names: list[str], counts: list[int], old: dict | None) -> dict:
    """Gram of the dataset sketches (fp64) and of the part sketches (fp32 products), reusing
    the entries of an earlier calibration ``old`` (its record, with its tensors under "_tensors")
    so that only the new datasets' rows are computed."""
    from merit.plan.conflict import extend_gram

    sk = sketches["sketches"].double().numpy()
    parts = sketches["parts"].numpy()
    known = part_known = None
    rows: list[int] = []
    part_rows: list[int] = []
    kept = old["_tensors"] if old is not None else {}
    if "gram" in kept and "part_gram" in kept:
        pos = {n: i for i, n in enumerate(names)}
        start = np.cumsum([0, *counts])
        rows = [pos[n] for n in old["datasets"]]
        part_rows = [j for r in rows for j in range(start[r], start[r + 1])]
        known, part_known = kept["gram"].numpy(), kept["part_gram"].numpy()
    return {
        "gram": torch.from_numpy(extend_gram(sk, known, rows)),
        "part_gram": torch.from_numpy(extend_gram(parts, part_known, part_rows)),
    }


def calibrate(run: Run, add: bool = False) -> dict:
    """Sketched mean answer-token gradient of every dataset at θ0 (paper §3.1), and of a few
    disjoint parts of its calibration examples (for plan stability).

    With ``add``, an existing calibration is extended: its sketch spec (seed, d, parameter
    layout, θ0 fingerprint, loss definition, parts) must be this run's and its datasets unchanged;
    only the datasets it lacks are computed.
    """
    from safetensors.torch import load_file, save_file

    from merit.calibrate.sketch import check_spec

    prepare_data(run)
    cc = run.cfg.calibration
    spec = _sketch_spec(run)
    ids = _calibration_ids(run)
    names = run.mixture.names
    expect = {
        "config_hash": run.cfg.experiment_hash(),
        "base_fingerprint": run.base_fingerprint,
        "spec": spec,
    }
    old = None
    if run.paths.calibration.is_file() and run.paths.sketches.is_file():
        rec = read_json(run.paths.calibration)
        # Reused when what the sketches are of is unchanged (θ0, spec, datasets and their
        # calibration examples), whatever else in the config changed (planning.*, say).
        if (
            rec.get("spec") == spec
            and rec.get("base_fingerprint") == run.base_fingerprint
            and rec.get("datasets") == names
            and rec.get("data_ids") == ids
            and rec.get("sketches_sha256") == sha256_file(run.paths.sketches)
        ):
            rec["sketches"] = load_file(run.paths.sketches)
            return rec
        if add:
            old = rec
    todo = names
    if old is not None:
        check_spec(old.get("spec", {}), spec)
        gone = [n for n in old["datasets"] if n not in ids]
        if gone:
            raise StageError(
                "--add only adds datasets; no longer in the mixture: " + ", ".join(gone)
            )
        changed = [n for n in old["datasets"] if old.get("data_ids", {}).get(n) != ids[n]]
        if changed:
            raise StageError(
                "--add: the calibration examples of " + ", ".join(changed) + " changed since "
                "they were sketched; plan from scratch in a new run_dir"
            )
        todo = [n for n in names if n not in old["datasets"]]
    run.say(
        f"calibrating {len(todo)} {'new ' if old is not None else ''}dataset(s) at θ0 "
        f"(sketch d={spec['dim']}, {cc.microbatches} parts each)"
    )
    with run.timed("calibrate"):
        enc = run.encoded("calibration")
        cal: dict[str, Calibration] = {}
        if todo:
            cal = calibrate_model(
                run.load_base(),
                {n: enc[n] for n in todo},
                SketchSpec(cc.sketch_dim, cc.seed),
                cc.batch_size,
                run.tokenizer.pad_token_id,
                run.progress,
                parts=cc.microbatches,
                fold_dim=spec["part_dim"],
                streaming=cc.streaming,
            )
        if old is not None:  # the kept datasets, as recorded
            kept = old["_tensors"] = load_file(run.paths.sketches)
            start = np.cumsum([0] + [len(p) for p in old["part_tokens"]])
            for i, n in enumerate(old["datasets"]):
                cal[n] = Calibration(
                    kept["sketches"][i],
                    old["sq_norms"][i],
                    old["losses"][i],
                    old["answer_tokens"][i],
                    parts=kept["parts"][start[i] : start[i + 1]],
                    part_tokens=old["part_tokens"][i],
                    sq_norm_exact=old["sq_norm_exact"][i],
                )
        sketches = {
            "sketches": torch.stack([cal[n].sketch for n in names]).contiguous(),
            "parts": torch.cat([cal[n].parts for n in names]).contiguous(),
        }
        # Inner products for planning, kept with the sketches: --add multiplies new rows only.
        sketches.update(_grams(sketches, names, [len(cal[n].part_tokens) for n in names], old))
        run.paths.sketches.parent.mkdir(parents=True, exist_ok=True)
        tmp = run.paths.sketches.with_name(".sketches.tmp")
        save_file(sketches, str(tmp))
        os.replace(tmp, run.paths.sketches)
        rec = {
            **expect,
            "sketches_sha256": sha256_file(run.paths.sketches),
            "datasets": names,
            "computed": todo,
            "sq_norms": [cal[n].sq_norm for n in names],
            "sq_norm_exact": [cal[n].sq_norm_exact for n in names],
            "losses": [cal[n].loss for n in names],
            "answer_tokens": [cal[n].tokens for n in names],
            "part_tokens": [cal[n].part_tokens for n in names],
            "data_ids": ids,
        }
        write_json(run.paths.calibration, rec)
    rec["sketches"] = sketches
    return rec
