"""The MERIT pipeline: calibrate → plan → train → merge → evaluate, over one run directory.

Each stage is a plain function of the run: it reads the previous stage's artifacts, verifies
them, skips work that is already done, and writes its own artifacts. Any stage runs the missing
stages before it, so ``merit evaluate CONFIG`` on an empty run directory runs everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from merit.artifacts import RunPaths, read_json, sha256_file, write_json
from merit.calibrate.sketch import Calibration, SketchSpec, calibrate_model, spec_dict
from merit.config import ConfigError, RunConfig, save_config
from merit.data.mixture import Mixture, encode, load_mixture
from merit.lm import (
    Encoded,
    apply_runtime,
    cache_dir,
    fingerprint,
    load_model,
    load_tokenizer,
    local_model_dir,
    resolve_device,
)
from merit.plan.conflict import PartGram, cosine_from_gram
from merit.plan.splitters import PlanError, group_weights

SHARED_BIGBENCH = Path("../shared/data/bigbench")


class StageError(RuntimeError):
    """An artifact is missing, stale, or does not match what this stage expects."""


def resolve_bigbench(setting: str | None, cache: Path, progress: bool = True) -> Path | None:
    """The BIG-bench folder: the configured path; for 'auto', $MERIT_BIGBENCH, else
    ../shared/data/bigbench, else the PyPI sdist fetched once into the cache."""
    if setting is None:
        return None
    if setting != "auto":
        p = Path(setting).expanduser()
        if not p.exists():
            raise ConfigError(f"data.bigbench: {p}: no such directory")
        return p
    env = os.environ.get("MERIT_BIGBENCH")
    if env:
        if not Path(env).exists():
            raise ConfigError(f"MERIT_BIGBENCH={env}: no such directory")
        return Path(env)
    if SHARED_BIGBENCH.is_dir():
        return SHARED_BIGBENCH
    from merit.data.formats import fetch_bigbench

    return fetch_bigbench(cache)


@dataclass
class Run:
    """A run: its validated config, its directory, and lazily loaded shared state."""

    cfg: RunConfig
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = RunPaths(Path(self.cfg.run_dir))
        self.device = resolve_device(self.cfg.runtime)
        apply_runtime(self.cfg.runtime)
        self.progress = self.cfg.runtime.progress
        self.cache = cache_dir(self.cfg.runtime)

    # -- set-up -------------------------------------------------------------------------------
    def open(self, add: bool = False) -> Run:
        """Create the run directory and save the resolved config; refuse a different experiment.

        With ``add`` (``merit plan --add``) the config may differ from the run's by datasets
        appended to ``data.datasets``, and nothing else.
        """
        self.paths.root.mkdir(parents=True, exist_ok=True)
        saved = self.paths.config
        marker = self.paths.root / "experiment.sha256"
        if marker.is_file() and marker.read_text().strip() != self.cfg.experiment_hash():
            from merit.config import appended_datasets, load_config

            try:
                appended, why = appended_datasets(load_config(saved), self.cfg), ""
            except ConfigError as err:
                appended, why = None, str(err)
            if not (add and appended is not None):
                raise ConfigError(
                    f"merit plan --add: {why}"
                    if add
                    else f"{self.paths.root} holds a run of a different config; choose another "
                    "run_dir (only runtime.* may change between stages"
                    + (
                        "; to add datasets to this run, append them to data.datasets and run "
                        "`merit plan CONFIG --add`)"
                        if appended
                        else ")"
                    )
                )
        self.validate()
        # Atomic: parallel branch commands open the same run directory at once.
        for path, text in ((saved, None), (marker, self.cfg.experiment_hash() + "\n")):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            if text is None:
                save_config(self.cfg, tmp)
            else:
                tmp.write_text(text)
            os.replace(tmp, path)
        return self

    def validate(self) -> None:
        """Checks that need the data but no model: run before any long work starts."""
        n = len(self.mixture.datasets)
        if n == 0:
            raise ConfigError("the mixture has no datasets")
        pc = self.cfg.planning
        k = pc.groups
        if k > n:
            what = f"planning.k={k}" if pc.k is not None else f"planning.rank={pc.rank}"
            raise PlanError(f"{what} asks for K={k} groups but the mixture has only {n} datasets")

    @cached_property
    def bigbench_dir(self) -> Path | None:
        return resolve_bigbench(self.cfg.data.bigbench, self.cache, self.progress)

    @cached_property
    def mixture(self) -> Mixture:
        base = self.cfg.model.demo.examples_per_dataset if self.is_demo else 0
        return load_mixture(self.cfg.data, self.bigbench_dir, base_examples=base)

    @property
    def is_demo(self) -> bool:
        return self.cfg.model.path == "demo"

    @cached_property
    def base_dir(self) -> Path:
        """θ0's local model directory (built and cached for the demo)."""
        if self.is_demo:
            from merit.demo import build_demo_base

            with self.timed("base model"):
                return build_demo_base(
                    self.cfg.model.demo,
                    self.mixture,
                    self.cache,
                    self.cfg.model.max_length,
                    self.cfg.seed,
                    self.device,
                    self.progress,
                )
        return local_model_dir(self.cfg.model.path)

    @cached_property
    def base_fingerprint(self) -> str:
        path = self.paths.base
        d = self.base_dir
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(d.glob("*"))]
        if path.is_file():
            rec = read_json(path)
            if rec.get("path") == str(d) and rec.get("stamp") == [list(s) for s in stamp]:
                return rec["fingerprint"]
        fp = fingerprint(d)
        write_json(path, {"path": str(d), "fingerprint": fp, "stamp": stamp})
        return fp

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.base_dir)

    def load_base(self):
        return load_model(self.base_dir, self.device, self.cfg.model.dtype)

    def encoded(self, split: str) -> dict[str, list[Encoded]]:
        """Tokenized examples of one split, per dataset."""
        cache = self.__dict__.setdefault("_encoded", {})
        if split not in cache:
            ml = self.cfg.model.max_length
            cache[split] = {
                d.name: encode(self.tokenizer, d.examples(split), ml) for d in self.mixture.datasets
            }
        return cache[split]

    def timed(self, name: str):
        run = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - self.t

        return _T()

    def say(self, msg: str) -> None:
        print(f"[merit] {msg}", flush=True)


# -- data ---------------------------------------------------------------------------------------
def prepare_data(run: Run) -> dict:
    """Load, split and tokenize the mixture; write ``data.json`` (splits, counts, tokens)."""
    if run.paths.data.is_file():
        rec = read_json(run.paths.data)
        if rec.get("config_hash") == run.cfg.experiment_hash():
            return rec
    _ = run.base_dir  # build the demo θ0 first (timed on its own): its tokenizer counts tokens
    with run.timed("data"):
        train = run.encoded("train")
        rows = []
        for d in run.mixture.datasets:
            rows.append(
                {
                    "name": d.name,
                    "format": d.data.format,
                    "path": d.data.path,
                    "sha256": d.file_hash,
                    "examples": len(d.data.examples),
                    "splits": {k: len(v) for k, v in d.splits.items()},
                    "train_tokens": sum(len(e.input_ids) for e in train[d.name]),
                    "train_answer_tokens": sum(e.answer_tokens for e in train[d.name]),
                    "indices": d.splits,
                }
            )
        rec = {"config_hash": run.cfg.experiment_hash(), "datasets": rows}
        write_json(run.paths.data, rec)
    return rec


def data_table(rec: dict) -> str:
    """The mixture as a table: dataset, format, samples per split, train tokens."""
    head = f"{'dataset':<48} {'format':<9} {'train':>6} {'calib':>6} {'eval':>6} {'base':>6} {'tokens':>9}"
    lines = [head, "-" * len(head)]
    tot = {"train": 0, "calibration": 0, "eval": 0, "base": 0, "tokens": 0}
    for r in rec["datasets"]:
        s = r["splits"]
        lines.append(
            f"{r['name'][:48]:<48} {r['format']:<9} {s['train']:>6} {s['calibration']:>6} "
            f"{s['eval']:>6} {s['base']:>6} {r['train_tokens']:>9}"
        )
        for k in ("train", "calibration", "eval", "base"):
            tot[k] += s[k]
        tot["tokens"] += r["train_tokens"]
    lines.append("-" * len(head))
    lines.append(
        f"{'total (' + str(len(rec['datasets'])) + ' datasets)':<48} {'':<9} {tot['train']:>6} "
        f"{tot['calibration']:>6} {tot['eval']:>6} {tot['base']:>6} {tot['tokens']:>9}"
    )
    return "\n".join(lines)


# -- calibrate ----------------------------------------------------------------------------------
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


# -- plan ---------------------------------------------------------------------------------------
def _finite(x):
    """JSON has no NaN: None instead."""
    return None if x is None or not np.isfinite(x) else float(x)


def _candidate_record(c, chosen: bool) -> dict:
    st = c.stability
    return {
        "splitter": c.splitter,
        "chosen": chosen,
        "note": c.note,
        "groups": None if c.groups is None else c.groups.tolist(),
        "gain": _finite(c.gain),
        "gain_share": _finite(c.share),
        "balance": _finite(c.balance),
        "gain_hessian": _finite(c.gain_hessian),
        "merged_loss": _finite(c.merged_loss),
        "stability": None
        if st is None
        else {
            "ari_pairs": _finite(st.ari_pairs),
            "ari_plan": _finite(st.ari_plan),
            "dataset_mean": _finite(float(st.per_dataset.mean())),
            "dataset_min": _finite(float(st.per_dataset.min())),
            "draws": st.draws,
        },
    }


def _hessian_predictions(run: Run, names: list[str], tokens, candidates, k: int) -> dict:
    """True-H gain and merged-loss predictions for every available candidate (in place)."""
    from merit.calibrate.sketch import split_parts
    from merit.plan.curvature import measure
    from merit.plan.splitters import gain_hessian, joint_loss, merged_loss

    cc, pc = run.cfg.calibration, run.cfg.planning
    if cc.microbatches < 2:
        raise PlanError("planning.hessian needs calibration.microbatches ≥ 2 (held-out parts)")
    enc = run.encoded("calibration")
    avail = [c for c in candidates if c.available]
    run.say(f"measuring curvature at θ0 for {len(avail)} candidate plans (HVPs)")
    try:
        cur = measure(
            run.load_base(),
            [enc[n] for n in names],
            [split_parts(len(enc[n]), cc.microbatches, cc.seed, n) for n in names],
            tokens,
            [c.groups for c in avail],
            k,
            cc.batch_size,
            run.tokenizer.pad_token_id,
            pc.hessian_examples,
            run.progress,
        )
    except ValueError as err:
        raise PlanError(str(err)) from None
    tau = pc.horizon or cur.horizon()
    if tau is None:
        return {
            "horizon": None,
            "note": "the held-out quadratic has no minimum along −ḡ at θ0 (negative curvature "
            "or no descent): set planning.horizon to predict",
        }
    for j, c in enumerate(avail):
        c.gain_hessian = gain_hessian(cur, j, tau)
        c.merged_loss = merged_loss(cur, j, tau)
    return {
        "horizon": tau,
        "horizon_from": "planning.horizon" if pc.horizon else "held-out line search along ḡ",
        "heldout_loss_theta0": cur.loss0,
        "joint_loss": joint_loss(cur, tau),
    }


def _stability_warning(run: Run, st, k: int) -> str | None:
    pc = run.cfg.planning
    if st is None or not st.ari_pairs < pc.stability_threshold:
        return None
    weak = int((st.per_dataset < 0.8).sum())
    fixes = [
        f"more calibration samples per dataset (data.split.calibration="
        f"{run.cfg.data.split.calibration}; sampling noise falls as 1/√n)"
    ]
    if k > 2:
        fixes.append(
            "fewer groups ("
            + (f"planning.rank={pc.rank - 1}" if pc.k is None else f"planning.k={k - 1}")
            + ")"
        )
    return (
        f"unstable plan: two plans from resampled calibration data agree at ARI "
        f"{st.ari_pairs:.2f} (< {pc.stability_threshold}), and {weak} of {len(st.per_dataset)} "
        f"datasets land in their group in under 80% of draws. What would fix it: "
        + "; or ".join(fixes)
    )


def make_plan(run: Run, add: bool = False) -> dict:
    """Cosine matrix → PCA conflict embedding → K sample-balanced groups → ``plan.json``.

    Every splitter (median, sign, random, gain) is run and compared — predicted merging gain,
    balance, bootstrap stability, and with ``planning.hessian`` the true-H gain and predicted
    merged loss — and the configured one (or, for ``auto``, the best under
    ``planning.objective``) is the plan. PNG plots are written next to it (``plan_plots/``).
    With ``add``, only datasets new to the calibration are calibrated, and the plan records which
    datasets changed group.
    """
    from merit.plan.splitters import (
        PlanInputs,
        changed_groups,
        choose,
        compare,
        power_of_two,
        resampled_cosine_agreement,
        resampled_grams,
    )

    data = prepare_data(run)
    pc = run.cfg.planning
    k = pc.groups
    if k > len(data["datasets"]):
        what = f"planning.k={k}" if pc.k is not None else f"planning.rank={pc.rank}"
        raise PlanError(
            f"{what} asks for K={k} groups but there are only {len(data['datasets'])} datasets"
        )
    previous = read_json(run.paths.plan) if run.paths.plan.is_file() else None
    cal = calibrate(run, add=add)
    plan_inputs = {
        "config_hash": run.cfg.experiment_hash(),
        "base_fingerprint": run.base_fingerprint,
        "sketches_sha256": cal["sketches_sha256"],
    }
    if previous is not None and all(previous.get(key) == v for key, v in plan_inputs.items()):
        return previous
    rows = {r["name"]: r for r in data["datasets"]}
    names = cal["datasets"]
    samples = np.array([rows[n]["splits"]["train"] for n in names], dtype=np.float64)
    tokens = np.array([rows[n]["train_tokens"] for n in names], dtype=np.int64)
    with run.timed("plan"):
        gram = cal["sketches"]["gram"].double().numpy()
        c = cosine_from_gram(gram)
        parts = None
        if run.cfg.calibration.microbatches > 1:
            owner = np.concatenate([np.full(len(p), t) for t, p in enumerate(cal["part_tokens"])])
            parts = PartGram(
                cal["sketches"]["part_gram"].double().numpy(),
                owner,
                np.concatenate([np.asarray(p, dtype=np.float64) for p in cal["part_tokens"]]),
            )
        x = PlanInputs.from_gram(gram, samples, tokens, parts.noise() if parts else None)
        rank = power_of_two(k) if power_of_two(k) is not None else pc.rank
        emb = x.embedding(rank)
        draws = pc.bootstrap if parts is not None else 0
        run.say(f"planning K={k}: comparing splitters ({draws} resampled draws each)")
        candidates = compare(x, k, parts, draws, pc.seed, pc.balance_tolerance)
        predictions = (
            _hessian_predictions(run, names, tokens, candidates, k) if pc.hessian else None
        )
        chosen_i = choose(candidates, pc.splitter, pc.objective)
        chosen = candidates[chosen_i]
        groups = chosen.groups
        st = chosen.stability
        cosine_agreement = (
            resampled_cosine_agreement(resampled_grams(parts, min(draws, 10), pc.seed))
            if draws >= 2
            else None
        )
    n_k, w_k = group_weights(groups, tokens, k)
    warnings = [w for w in [_stability_warning(run, st, k)] if w]
    if st is None:
        warnings.append(
            "stability not measured (needs calibration.microbatches ≥ 2 and planning.bootstrap > 0)"
        )
    changes = None
    if add and previous is not None:
        old_names = [d["name"] for d in previous["datasets"]]
        changes = {
            "added": [n for n in names if n not in old_names],
            "changed_group": changed_groups(
                old_names, [d["group"] for d in previous["datasets"]], names, groups, k
            ),
            "previous_splitter": previous.get("method"),
        }
    plan = {
        "version": 2,
        **plan_inputs,
        "method": chosen.splitter,
        "objective": pc.objective,
        "rank": rank,
        "K": k,
        "sketch": cal["spec"],
        "explained_variance": emb.explained_variance.tolist(),
        "scree": emb.scree.tolist(),
        "datasets": [
            {
                "name": n,
                "group": int(groups[i]),
                "samples": int(samples[i]),
                "tokens": int(tokens[i]),
                "z": emb.z[i].tolist(),
                "stability": None if st is None else float(st.per_dataset[i]),
                "grad_sq_norm": cal["sq_norms"][i],
                "calibration_loss": cal["losses"][i],
                "sha256": rows[n]["sha256"],
            }
            for i, n in enumerate(names)
        ],
        "groups": [
            {
                "id": j,
                "datasets": [n for i, n in enumerate(names) if groups[i] == j],
                "samples": int(samples[groups == j].sum()),
                "tokens": n_k[j],
                "weight": w_k[j],
            }
            for j in range(k)
        ],
        "stability": None
        if st is None
        else {
            "method": f"bootstrap over calibration parts ({st.draws} draws)",
            "ari_pairs": _finite(st.ari_pairs),
            "ari_plan": _finite(st.ari_plan),
            "cosine_pearson_resampled": _finite(cosine_agreement),
            "threshold": pc.stability_threshold,
        },
        "candidates": [_candidate_record(cd, i == chosen_i) for i, cd in enumerate(candidates)],
        "hessian": predictions,
        "warnings": warnings,
        "changes": changes,
        "cosine": np.round(c, 6).tolist(),
    }
    from merit.plan.figures import write_plan_plots

    plan["plots"] = [
        str(p.relative_to(run.paths.root))
        for p in write_plan_plots(plan, run.paths.root / "plan_plots")
    ]
    write_json(run.paths.plan, plan)
    return plan


def plan_hash(run: Run) -> str:
    return sha256_file(run.paths.plan)


def plan_summary(plan: dict) -> str:
    ev = ", ".join(f"{x:.1%}" for x in plan["explained_variance"])
    lines = [
        f"plan: K={plan['K']} groups ({plan.get('method', 'median')} splitter) from "
        f"r={plan['rank']} conflict axes (explained variance {ev})"
    ]
    for g in plan["groups"]:
        shown = ", ".join(g["datasets"][:4]) + (" …" if len(g["datasets"]) > 4 else "")
        lines.append(
            f"  group {g['id']}: {len(g['datasets']):>3} datasets, {g['samples']:>6} samples, "
            f"{g['tokens']:>8} tokens, w={g['weight']:.3f}  [{shown}]"
        )
    st = plan.get("stability")
    if st:
        rows = [d for d in plan["datasets"] if d.get("stability") is not None]
        low = sorted(rows, key=lambda d: d["stability"])[:3]
        lines.append(
            f"stability ({st['method']}): resampled plans agree at ARI {st['ari_pairs']:.2f}; "
            "least stable: " + ", ".join(f"{d['name']} {d['stability']:.0%}" for d in low)
        )
    ch = plan.get("changes")
    if ch:
        lines.append(
            f"added: {', '.join(ch['added']) or 'none'}; changed group: "
            f"{', '.join(ch['changed_group']) or 'none'}"
        )
    lines += [f"warning: {w}" for w in plan.get("warnings", [])]
    return "\n".join(lines)


def plan_comparison(plan: dict) -> str:
    """Every splitter's plan side by side: predicted gain, merged loss, balance, stability."""
    hs = plan.get("hessian") or {}
    tau = hs.get("horizon")
    head = (
        f"{'splitter':<8} {'gain/τ² (H=I)':>14} {'share':>6} "
        f"{'gain (H)':>10} {'merged loss':>11} {'balance':>8} {'ARI':>5} {'min stab':>8}"
    )
    lines = [f"candidates for K={plan['K']} (objective: {plan.get('objective', 'gain')})", head]
    lines.append("-" * len(head))

    def num(v, fmt):
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
        return "—".rjust(width) if v is None else format(v, fmt)

    for c in plan.get("candidates", []):
        mark = " <- chosen" if c["chosen"] else ""
        if c["groups"] is None:
            lines.append(f"{c['splitter']:<8} n/a: {c['note']}")
            continue
        st = c["stability"] or {}
        lines.append(
            f"{c['splitter']:<8} {num(c['gain'], '14.4g')} {num(c['gain_share'], '6.1%')} "
            f"{num(c['gain_hessian'], '10.4g')} {num(c['merged_loss'], '11.5f')} "
            f"{num(c['balance'], '8.3f')} {num(st.get('ari_pairs'), '5.2f')} "
            f"{num(st.get('dataset_min'), '8.0%')}{mark}"
            + (f"  ({c['note']})" if c["note"] else "")
        )
    if hs and tau is None:
        lines.append(f"no true-H predictions: {hs['note']}")
    elif tau is not None:
        lines.append(
            f"true-H predictions at τ={tau:.4g} ({hs['horizon_from']}): held-out loss at θ0 "
            f"{hs['heldout_loss_theta0']:.5f}, joint training {hs['joint_loss']:.5f}"
        )
    else:
        lines.append(
            "gain (H) and merged loss need planning.hessian=true (under H = I the merged model "
            "θ0 − τḡ does not depend on the split)"
        )
    return "\n".join(lines)


# -- train --------------------------------------------------------------------------------------
def _pinned_plan(run: Run, plan_sha256: str) -> dict:
    """The existing plan, if it is the one the launcher saw; a branch command never re-plans."""
    if not run.paths.plan.is_file():
        raise StageError(f"no plan at {run.paths.plan}: run `merit plan` before the branches")
    got = plan_hash(run)
    if got != plan_sha256:
        raise StageError(
            f"{run.paths.plan} has sha256 {got[:12]}…, the launcher expected {plan_sha256[:12]}… "
            "(re-planned since the branches were launched?)"
        )
    plan = read_json(run.paths.plan)
    if plan.get("config_hash") != run.cfg.experiment_hash():
        raise StageError(f"{run.paths.plan} was made from another config")
    return plan


def _verify_job_inputs(run: Run, plan: dict, names: list[str], label: str) -> None:
    """θ0's fingerprint and every dataset's sha256 must be the plan's; else one error."""
    problems = []
    if plan.get("base_fingerprint") != run.base_fingerprint:
        problems.append(
            f"θ0 {run.base_dir} has fingerprint {run.base_fingerprint[:12]}…, the plan was made "
            f"from {str(plan.get('base_fingerprint'))[:12]}…"
        )
    rows = {d["name"]: d for d in plan["datasets"]}
    have = {d.name: d for d in run.mixture.datasets}
    for n in names:
        if n not in rows or n not in have:
            problems.append(f"dataset {n} is not in both the plan and the mixture")
        elif rows[n].get("sha256") != have[n].file_hash:
            problems.append(f"dataset {n} ({have[n].data.path}) changed since planning")
    if problems:
        raise StageError(f"{label}: " + "; ".join(problems))


def _finished(out: Path, p_hash: str, base_fp: str) -> dict | None:
    """The branch's manifest if it is complete for this plan and θ0 (files present)."""
    mp = out / "manifest.json"
    if not mp.is_file():
        return None
    m = read_json(mp)
    if m.get("plan_sha256") != p_hash or m.get("base_fingerprint") != base_fp:
        return None
    if not all((out / _weight_path(rel)).is_file() for rel in m.get("weights", {})):
        return None
    return m


def _weight_path(rel: str) -> str:
    return rel if "/" in rel else f"model/{rel}"  # manifests before issue 4 named model/ files only


def _branch_lock(out: Path, label: str, say):
    """An exclusive lock on the branch directory: a re-run (say a Ray retry on another node while
    the preempted process still writes its checkpoint) waits instead of training alongside."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def lock():
        out.mkdir(parents=True, exist_ok=True)
        if not _main_process():  # under accelerate, the first process holds it for all
            yield
            return
        with open(out / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"{label}: another process is training it; waiting for it to stop")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return lock()


def _main_process() -> bool:
    """False on the other processes of a multi-GPU branch (``accelerate launch``)."""
    return int(os.environ.get("RANK", "0")) == 0


def _train_one(
    run: Run,
    plan: dict,
    out: Path,
    names: list[str],
    label: str,
    expect_tokens: int,
    group: int | None = None,
) -> dict:
    """Train one branch (or baseline) idempotently: skip if done, else resume, then a manifest.

    Raises :class:`merit.train.sft.Preempted` after checkpointing on SIGTERM / SIGUSR1.
    """
    import shutil

    from merit.train.sft import train_sft

    p_hash = plan_hash(run)
    _verify_job_inputs(run, plan, names, label)
    manifest_path = out / "manifest.json"
    if m := _finished(out, p_hash, run.base_fingerprint):
        run.say(f"{label}: already trained, skipping")
        return m
    with _branch_lock(out, label, run.say):
        if m := _finished(out, p_hash, run.base_fingerprint):  # finished while we waited
            run.say(f"{label}: already trained, skipping")
            return m
        if manifest_path.is_file() and _main_process():  # another plan or θ0: start over
            manifest_path.unlink()
            for sub in ("model", "adapter"):
                shutil.rmtree(out / sub, ignore_errors=True)
        train = run.encoded("train")
        records = [e for n in names for e in train[n]]
        tokens = sum(len(e.input_ids) for e in records)
        if tokens != expect_tokens:
            raise StageError(f"{label}: {tokens} tokens to train but the plan says {expect_tokens}")
        run.say(
            f"training {label}: {len(names)} datasets, {len(records)} examples, {tokens} tokens"
        )
        # A checkpoint is resumed only by the same job: plan (hence config and datasets), θ0, data.
        run_key = hashlib.sha256(
            json.dumps([p_hash, run.base_fingerprint, label, names]).encode()
        ).hexdigest()
        model = run.load_base()
        base_dtype = next(model.parameters()).dtype
        saved = read_json(run.base_dir / "config.json").get("dtype") or read_json(
            run.base_dir / "config.json"
        ).get("torch_dtype")
        save_dtype = (
            getattr(torch, saved)
            if isinstance(saved, str) and hasattr(torch, saved)
            else base_dtype
        )
        t0 = time.perf_counter()
        rt = run.cfg.runtime
        res = train_sft(
            model,
            run.tokenizer,
            records,
            run.cfg.training,
            out,
            run.cfg.model.max_length,
            run.progress,
            save_dtype=save_dtype,
            checkpoint_steps=rt.checkpoint_steps,
            keep_checkpoints=rt.keep_checkpoints,
            run_key=run_key,
            label=label,
            log=run.say,
        )
        # Token accounting (issue 4): merit's own count of what the branch was fed, across
        # resumes, must be what the fixed schedule holds (epochs × N_k for whole epochs).
        if res.tokens_seen != res.tokens_scheduled:
            raise StageError(
                f"{label}: trained on {res.tokens_seen} tokens but its schedule holds "
                f"{res.tokens_scheduled}"
            )
        weights = {
            str(f.relative_to(out)): sha256_file(f)
            for sub in ("model", "adapter")
            for f in sorted((out / sub).glob("*"))
            if f.is_file() and f.suffix in (".safetensors", ".json")
        }
        losses = [v for _s, v in res.losses]
        manifest = {
            "label": label,
            "group": group,
            "plan_sha256": p_hash,
            "base_fingerprint": run.base_fingerprint,
            "datasets": names,
            "examples": res.examples,
            "tokens": res.tokens,
            "tokens_seen": res.tokens_seen,
            "tokens_scheduled": res.tokens_scheduled,
            "epochs": run.cfg.training.epochs,
            "answer_tokens": res.answer_tokens,
            "steps": res.steps,
            "lora": run.cfg.training.lora is not None,
            "resumed_from_step": res.resumed_from,
            "final_loss": res.final_loss,
            "loss_summary": {
                "first": losses[0] if losses else None,
                "last": losses[-1] if losses else None,
                "min": min(losses) if losses else None,
                "logged": len(losses),
            },
            "losses": res.losses,
            "seconds": time.perf_counter() - t0,
            "weights": weights,
        }
        if _main_process():
            # Written last and atomically: a manifest means the branch is complete.
            write_json(manifest_path, manifest)
            shutil.rmtree(out / "trainer", ignore_errors=True)  # checkpoints no longer needed
    return manifest


def _jobs(run: Run, plan: dict, branch: int | None, baseline: str | None) -> list[tuple]:
    """(kind, id, out dir, datasets, label, planned tokens, group) of the requested jobs."""
    jobs = []
    if baseline is None:
        ks = range(plan["K"]) if branch is None else [branch]
        for k in ks:
            if not 0 <= k < plan["K"]:
                raise StageError(f"branch {k} does not exist: the plan has K={plan['K']} branches")
            g = plan["groups"][k]
            jobs.append(
                ("branch", k, run.paths.branch(k), g["datasets"], f"branch {k}", g["tokens"], k)
            )
    if baseline is not None or branch is None:
        for name in [baseline] if baseline else run.cfg.training.baselines:
            if name != "joint":
                raise StageError(f"unknown baseline {name!r}")
            # Joint training: one branch on every dataset, the same total tokens (paper §4).
            everything = [d["name"] for d in plan["datasets"]]
            total = sum(g["tokens"] for g in plan["groups"])
            jobs.append(("baseline", name, run.paths.baseline(name), everything, name, total, None))
    return jobs


def _job_command(run: Run, kind: str, ident, p_hash: str, merit: list[str]) -> list[str]:
    """The idempotent command that trains one job (what every launcher runs)."""
    root = run.paths.root.resolve()
    launch_cfg = root / "branches" / "launch.yaml"
    return [
        *merit,
        "train",
        str(launch_cfg),
        f"run_dir={root}",
        f"--{kind}",
        str(ident),
        "--plan-sha256",
        p_hash,
    ]


def _write_launch_config(run: Run) -> None:
    """The resolved config the branch commands read (atomically: branches may be reading it)."""
    import yaml

    path = run.paths.root / "branches" / "launch.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".launch.yaml.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)


def branch_commands(run: Run, kind: str) -> str:
    """The branch (and baseline) commands for another scheduler: shell, slurm or skypilot."""
    from merit.train.launchers import Job, print_commands

    plan = make_plan(run)
    p_hash = plan_hash(run)
    _write_launch_config(run)
    jobs = [
        Job(label, _job_command(run, kind_, ident, p_hash, ["merit"]), out)
        for kind_, ident, out, _n, label, _t, _g in _jobs(run, plan, None, None)
    ]
    template = _job_command(run, "branch", "{BRANCH}", p_hash, ["merit"])
    return print_commands(kind, jobs, template, plan["K"], run.cfg.runtime.branch_gpus)


def train(
    run: Run,
    branch: int | None = None,
    baseline: str | None = None,
    plan_sha256: str | None = None,
) -> list[dict]:
    """Train plan branches (all, or only ``branch``) and/or a baseline, each from θ0.

    One job (``branch`` or ``baseline``) runs here. All of them run through
    ``runtime.launcher``: inline (here, one after another), local (subprocesses,
    ``runtime.parallel`` at once) or ray. With ``plan_sha256`` (what launchers pass) the
    existing plan must have that hash; it is never recomputed.
    """
    plan = _pinned_plan(run, plan_sha256) if plan_sha256 else make_plan(run)
    jobs = _jobs(run, plan, branch, baseline)
    rt = run.cfg.runtime
    if branch is not None or baseline is not None or rt.launcher == "inline":
        out = []
        for kind, _ident, d, names, label, tokens, group in jobs:
            with run.timed("train branches" if kind == "branch" else f"train {label}"):
                out.append(_train_one(run, plan, d, names, label, tokens, group))
        return out
    from merit.train import launchers as orch

    p_hash = plan_hash(run)
    _write_launch_config(run)
    base_fp = run.base_fingerprint
    merit = [sys.executable, "-m", "merit.cli"]
    threads = rt.threads or max(1, (os.cpu_count() or 1) // max(1, rt.parallel))
    launch = []
    for kind, ident, d, names, label, _tokens, _group in jobs:
        _verify_job_inputs(run, plan, names, label)
        argv = _job_command(run, kind, ident, p_hash, merit)
        argv += [f"runtime.threads={threads}", "runtime.progress=false", "runtime.launcher=inline"]
        launch.append(
            orch.Job(label, argv, d, done=lambda d=d: _finished(d, p_hash, base_fp) is not None)
        )
    with run.timed(f"train ({rt.launcher} launcher)"):
        if rt.launcher == "local":
            orch.run_local(launch, rt.parallel, threads, rt.retries, say=run.say)
        else:
            orch.run_ray(
                launch,
                rt.ray_address,
                rt.branch_cpus,
                rt.branch_gpus,
                rt.branch_memory_gb,
                threads,
                rt.retries,
                say=run.say,
            )
    out = []
    for _kind, _ident, d, _names, label, _tokens, _group in jobs:
        m = _finished(d, p_hash, base_fp)
        if m is None:
            raise StageError(f"{label}: the launcher finished but the branch has no manifest")
        out.append(m)
    return out


# -- merge --------------------------------------------------------------------------------------
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
        if not any(_weight_path(r).startswith("model/") for r in weights):
            problems.append(f"branch {k}: its manifest lists no weight files")
        for rel, digest in weights.items():
            f = d / _weight_path(rel)
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


# -- evaluate -----------------------------------------------------------------------------------
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


# -- diagnose and report (issue 6) ---------------------------------------------------------------
DIAGNOSTICS_VERSION = 1


def _record_timing(run: Run, name: str, seconds: float) -> None:
    path = run.paths.root / "timings.json"
    timings = read_json(path) if path.is_file() else {}
    timings[name] = seconds
    write_json(path, timings)


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
        _record_timing(run, "diagnose", run.timings["diagnose"])
    for name, png in diagnostic_figures(rec).items():
        (out_dir / f"{name}.png").write_bytes(png)
    return rec


def diagnostics_summary(rec: dict) -> str:
    """The verdicts in plain words, one premise a line."""
    tag = {True: "holds", False: "FAILS", None: "n/a  "}
    lines = [rec["overall"]]
    lines += [f"  [{tag[v['holds']]}] {v['premise']}: {v['why']}" for v in rec["verdicts"]]
    return "\n".join(lines)


def report(run: Run) -> Path:
    """One self-contained HTML page (figures embedded) and a Markdown twin of the whole run:
    mixture, plan, branch curves, merge, diagnostics and the results table; ``report/``."""
    from merit.report.page import ReportData, build_report

    plan = make_plan(run)
    result = evaluate(run)  # trains and merges first
    diag = diagnose(run)
    t0 = time.perf_counter()
    joint_m = run.paths.baseline("joint") / "manifest.json"
    merge_m = run.paths.merged / "merge_manifest.json"
    timings_path = run.paths.root / "timings.json"
    rd = ReportData(
        title=f"merit report: {run.paths.root.resolve().name}",
        run_dir=str(run.paths.root),
        config=run.cfg.model_dump(mode="json"),
        data=read_json(run.paths.data) if run.paths.data.is_file() else None,
        plan=plan,
        branches=[read_json(run.paths.branch(g["id"]) / "manifest.json") for g in plan["groups"]],
        joint=read_json(joint_m) if joint_m.is_file() else None,
        merge=read_json(merge_m) if merge_m.is_file() else None,
        evaluation=result["models"],
        comparisons=result.get("comparisons", {}),
        diagnostics=diag,
        timings=read_json(timings_path) if timings_path.is_file() else {},
    )
    html_path, _ = build_report(rd, run.paths.root / "report")
    _record_timing(run, "report", time.perf_counter() - t0)
    return html_path


def run_all(run: Run) -> dict:
    """Every stage, skipping what is already done; returns the evaluation."""
    t0 = time.perf_counter()
    prepare_data(run)
    run.say(plan_summary(make_plan(run)))
    result = evaluate(run)  # trains and merges first
    run.timings["total"] = time.perf_counter() - t0
    write_json(run.paths.root / "timings.json", run.timings)
    return result
