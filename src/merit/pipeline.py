"""The MERIT pipeline: calibrate → plan → train → merge → evaluate, over one run directory.

Each stage is a plain function of the run: it reads the previous stage's artifacts, verifies
them, skips work that is already done, and writes its own artifacts. Any stage runs the missing
stages before it, so ``merit evaluate CONFIG`` on an empty run directory runs everything.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from merit.artifacts import RunPaths, read_json, write_json
from merit.config import ConfigError, RunConfig, save_config
from merit.conflict import conflict_embedding, cosine_matrix
from merit.gradients import Calibration, SketchSpec, calibrate_model, spec_dict
from merit.mixture import Encoded, Mixture, encode, load_mixture
from merit.modeling import (
    apply_threads,
    cache_dir,
    fingerprint,
    load_model,
    load_tokenizer,
    local_model_dir,
    resolve_device,
)
from merit.planning import PlanError, group_weights, median_split

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
    from merit.data import fetch_bigbench

    return fetch_bigbench(cache)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Run:
    """A run: its validated config, its directory, and lazily loaded shared state."""

    cfg: RunConfig
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = RunPaths(Path(self.cfg.run_dir))
        self.device = resolve_device(self.cfg.runtime)
        apply_threads(self.cfg.runtime)
        self.progress = self.cfg.runtime.progress
        self.cache = cache_dir(self.cfg.runtime)

    # -- set-up -------------------------------------------------------------------------------
    def open(self) -> Run:
        """Create the run directory and save the resolved config; refuse a different experiment."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        saved = self.paths.config
        marker = self.paths.root / "experiment.sha256"
        if marker.is_file() and marker.read_text().strip() != self.cfg.experiment_hash():
            raise ConfigError(
                f"{self.paths.root} holds a run of a different config; choose another run_dir "
                "(only runtime.* may change between stages)"
            )
        self.validate()
        save_config(self.cfg, saved)
        marker.write_text(self.cfg.experiment_hash() + "\n")
        return self

    def validate(self) -> None:
        """Checks that need the data but no model: run before any long work starts."""
        n = len(self.mixture.datasets)
        if n == 0:
            raise ConfigError("the mixture has no datasets")
        k = 2**self.cfg.planning.rank
        if k > n:
            raise PlanError(
                f"planning.rank={self.cfg.planning.rank} asks for K={k} groups but the mixture "
                f"has only {n} datasets"
            )

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
def calibrate(run: Run) -> dict:
    """Sketched mean answer-token gradient of every dataset at θ0 (paper §3.1)."""
    from safetensors.torch import load_file, save_file

    prepare_data(run)
    spec = SketchSpec(run.cfg.calibration.sketch_dim, run.cfg.calibration.seed)
    expect = {
        "config_hash": run.cfg.experiment_hash(),
        "base_fingerprint": run.base_fingerprint,
        "spec": spec_dict(spec),
    }
    if run.paths.calibration.is_file() and run.paths.sketches.is_file():
        rec = read_json(run.paths.calibration)
        if all(rec.get(k) == v for k, v in expect.items()):
            rec["sketches"] = load_file(run.paths.sketches)
            return rec
    run.say(f"calibrating {len(run.mixture.datasets)} datasets at θ0 (sketch d={spec.dim})")
    with run.timed("calibrate"):
        model = run.load_base()
        cal: dict[str, Calibration] = calibrate_model(
            model,
            run.encoded("calibration"),
            spec,
            run.cfg.calibration.batch_size,
            run.tokenizer.pad_token_id,
            run.progress,
        )
        names = list(cal)
        sketches = {"sketches": torch.stack([cal[n].sketch for n in names])}
        run.paths.sketches.parent.mkdir(parents=True, exist_ok=True)
        tmp = run.paths.sketches.with_name(".sketches.tmp")
        save_file(sketches, str(tmp))
        os.replace(tmp, run.paths.sketches)
        rec = {
            **expect,
            "datasets": names,
            "sq_norms": [cal[n].sq_norm for n in names],
            "losses": [cal[n].loss for n in names],
            "answer_tokens": [cal[n].tokens for n in names],
        }
        write_json(run.paths.calibration, rec)
    rec["sketches"] = sketches
    return rec


# -- plan ---------------------------------------------------------------------------------------
def make_plan(run: Run) -> dict:
    """Cosine matrix → PCA conflict embedding → recursive median splits → ``plan.json``."""
    data = prepare_data(run)
    rank = run.cfg.planning.rank
    k = 2**rank
    if k > len(data["datasets"]):
        raise PlanError(
            f"planning.rank={rank} asks for K={k} groups but there are only "
            f"{len(data['datasets'])} datasets"
        )
    cal = calibrate(run)
    plan_inputs = {
        "config_hash": run.cfg.experiment_hash(),
        "base_fingerprint": run.base_fingerprint,
        "sketches_sha256": _sha256_file(run.paths.sketches),
    }
    if run.paths.plan.is_file():
        plan = read_json(run.paths.plan)
        if all(plan.get(key) == v for key, v in plan_inputs.items()):
            return plan
    rows = {r["name"]: r for r in data["datasets"]}
    names = cal["datasets"]
    g = cal["sketches"]["sketches"].double().numpy()
    c = cosine_matrix(g)
    emb = conflict_embedding(c, rank)
    samples = np.array([rows[n]["splits"]["train"] for n in names], dtype=np.float64)
    tokens = np.array([rows[n]["train_tokens"] for n in names], dtype=np.int64)
    groups = median_split(emb.z, samples, rank)
    n_k, w_k = group_weights(groups, tokens, k)
    plan = {
        "version": 1,
        **plan_inputs,
        "method": "median",
        "rank": rank,
        "K": k,
        "sketch": cal["spec"],
        "explained_variance": emb.explained_variance.tolist(),
        "datasets": [
            {
                "name": n,
                "group": int(groups[i]),
                "samples": int(samples[i]),
                "tokens": int(tokens[i]),
                "z": emb.z[i].tolist(),
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
        "cosine": np.round(c, 6).tolist(),
    }
    write_json(run.paths.plan, plan)
    return plan


def plan_hash(run: Run) -> str:
    return _sha256_file(run.paths.plan)


def plan_summary(plan: dict) -> str:
    ev = ", ".join(f"{x:.1%}" for x in plan["explained_variance"])
    lines = [
        f"plan: K={plan['K']} groups from r={plan['rank']} conflict axes (explained variance {ev})"
    ]
    for g in plan["groups"]:
        shown = ", ".join(g["datasets"][:4]) + (" …" if len(g["datasets"]) > 4 else "")
        lines.append(
            f"  group {g['id']}: {len(g['datasets']):>3} datasets, {g['samples']:>6} samples, "
            f"{g['tokens']:>8} tokens, w={g['weight']:.3f}  [{shown}]"
        )
    return "\n".join(lines)


# -- train --------------------------------------------------------------------------------------
def _train_one(run: Run, out: Path, names: list[str], label: str, expect_tokens: int) -> dict:
    from merit.training import train_sft

    manifest_path = out / "manifest.json"
    p_hash = plan_hash(run)
    if manifest_path.is_file():
        m = read_json(manifest_path)
        if m.get("plan_sha256") == p_hash and m.get("base_fingerprint") == run.base_fingerprint:
            run.say(f"{label}: already trained, skipping")
            return m
    train = run.encoded("train")
    records = [e for n in names for e in train[n]]
    tokens = sum(len(e.input_ids) for e in records)
    if tokens != expect_tokens:
        raise StageError(f"{label}: {tokens} tokens to train but the plan says {expect_tokens}")
    run.say(f"training {label}: {len(names)} datasets, {len(records)} examples, {tokens} tokens")
    model = run.load_base()
    base_dtype = next(model.parameters()).dtype
    saved = read_json(run.base_dir / "config.json").get("dtype") or read_json(
        run.base_dir / "config.json"
    ).get("torch_dtype")
    save_dtype = (
        getattr(torch, saved) if isinstance(saved, str) and hasattr(torch, saved) else base_dtype
    )
    t0 = time.perf_counter()
    res = train_sft(
        model,
        run.tokenizer,
        records,
        run.cfg.training,
        out,
        run.cfg.model.max_length,
        run.progress,
        save_dtype=save_dtype,
    )
    weights = {f.name: _sha256_file(f) for f in sorted((out / "model").glob("*.safetensors"))}
    manifest = {
        "label": label,
        "plan_sha256": p_hash,
        "base_fingerprint": run.base_fingerprint,
        "datasets": names,
        "examples": res.examples,
        "tokens": res.tokens,
        "answer_tokens": res.answer_tokens,
        "steps": res.steps,
        "final_loss": res.final_loss,
        "losses": res.losses,
        "seconds": time.perf_counter() - t0,
        "weights": weights,
    }
    # Written last and atomically: a manifest means the branch is complete.
    write_json(manifest_path, manifest)
    return manifest


def train(run: Run, branch: int | None = None, baseline: str | None = None) -> list[dict]:
    """Train plan branches (all, or only ``branch``) and/or a baseline, each from θ0."""
    plan = make_plan(run)
    out = []
    if baseline is None:
        ks = range(plan["K"]) if branch is None else [branch]
        for k in ks:
            if not 0 <= k < plan["K"]:
                raise StageError(f"branch {k} does not exist: the plan has K={plan['K']} branches")
            g = plan["groups"][k]
            with run.timed("train branches"):
                out.append(
                    _train_one(run, run.paths.branch(k), g["datasets"], f"branch {k}", g["tokens"])
                )
    if baseline is not None or branch is None:
        names = [baseline] if baseline else run.cfg.training.baselines
        for name in names:
            if name != "joint":
                raise StageError(f"unknown baseline {name!r}")
            # Joint training: one branch on every dataset, the same total tokens (paper §4).
            everything = [d["name"] for d in plan["datasets"]]
            total = sum(g["tokens"] for g in plan["groups"])
            with run.timed("train joint"):
                out.append(_train_one(run, run.paths.baseline("joint"), everything, "joint", total))
    return out


# -- merge --------------------------------------------------------------------------------------
def verify_branches(run: Run, plan: dict) -> list[Path]:
    """Every branch finished, from this θ0 and plan, on the planned token budget; else one error
    listing every problem."""
    problems = []
    p_hash = plan_hash(run)
    dirs = []
    for g in plan["groups"]:
        d = run.paths.branch(g["id"])
        dirs.append(d / "model")
        mp = d / "manifest.json"
        if not mp.is_file():
            problems.append(f"branch {g['id']}: not finished (no {mp})")
            continue
        m = read_json(mp)
        if m.get("plan_sha256") != p_hash:
            problems.append(f"branch {g['id']}: trained from another plan")
        if m.get("base_fingerprint") != run.base_fingerprint:
            problems.append(f"branch {g['id']}: trained from another θ0")
        if m.get("tokens") != g["tokens"]:
            problems.append(
                f"branch {g['id']}: trained {m.get('tokens')} tokens, plan says {g['tokens']}"
            )
        for fname, digest in m.get("weights", {}).items():
            f = d / "model" / fname
            if not f.is_file() or _sha256_file(f) != digest:
                problems.append(f"branch {g['id']}: {f} differs from its manifest")
    if problems:
        raise StageError("cannot merge:\n  " + "\n  ".join(problems))
    return dirs


def merge(run: Run) -> dict:
    """θ̄ = Σ_k w_k θ_k with w_k = N_k / Σ N_j (paper eq. 3), streamed into ``merged/``."""
    from merit.merging import merge_checkpoints

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
        return merge_checkpoints(
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
            progress=run.progress,
        )


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
    """Held-out NLL and accuracy per dataset for θ0, joint, the merge and each branch."""
    from merit.evaluation import evaluate_model, markdown_table, summarize

    plan = make_plan(run)
    train(run)
    merge(run)
    ec = run.cfg.evaluation
    results: dict[str, dict] = {}
    for label, path in model_dirs(run, plan).items():
        slug = label.split(" (")[0].replace(" ", "_").replace("=", "").replace("θ0", "base")
        out = run.paths.eval_dir / f"{slug}.json"
        stamp = _sha256_file(sorted(path.glob("*.safetensors"))[0])
        if out.is_file() and read_json(out).get("weights_sha256") == stamp:
            results[label] = read_json(out)
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
            "path": str(path),
            "weights_sha256": stamp,
            "summary": summarize(per),
            "datasets": per,
        }
        write_json(out, rec)
        results[label] = rec
    table = markdown_table({k: v["summary"] for k, v in results.items()})
    write_json(run.paths.eval_dir / "results.json", {"models": results})
    (run.paths.eval_dir / "results.md").write_text(
        "Held-out metrics, averaged over datasets (each dataset counts once).\n\n" + table
    )
    return {"models": results, "table": table}


def run_all(run: Run) -> dict:
    """Every stage, skipping what is already done; returns the evaluation."""
    t0 = time.perf_counter()
    prepare_data(run)
    run.say(plan_summary(make_plan(run)))
    result = evaluate(run)  # trains and merges first
    run.timings["total"] = time.perf_counter() - t0
    write_json(run.paths.root / "timings.json", run.timings)
    return result
