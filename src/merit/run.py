"""A run: its validated config, its directory (every artifact file named once), stage errors."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from merit.artifacts import read_json, write_json
from merit.config import ConfigError, RunConfig, save_config
from merit.data.bigbench import resolve_bigbench
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
from merit.plan.splitters import PlanError


@dataclass(frozen=True)
class RunPaths:
    """Layout of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data.json"

    @property
    def base(self) -> Path:
        return self.root / "base.json"

    @property
    def sketches(self) -> Path:
        return self.root / "calibration" / "sketches.safetensors"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration" / "calibration.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    def branch(self, k: int) -> Path:
        return self.root / "branches" / f"branch-{k}"

    def baseline(self, name: str) -> Path:
        return self.root / "baselines" / name

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"


class StageError(RuntimeError):
    """An artifact is missing, stale, or does not match what this stage expects."""


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


def record_timing(run: Run, name: str, seconds: float) -> None:
    path = run.paths.root / "timings.json"
    timings = read_json(path) if path.is_file() else {}
    timings[name] = seconds
    write_json(path, timings)
