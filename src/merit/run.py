"""A run: its validated config, its directory (every artifact file named once), stage errors."""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from merit.artifacts import atomic_path, read_json, write_json
from merit.config import (
    ConfigError,
    RunConfig,
    appended_datasets,
    changed_keys,
    experiment_changes,
    load_config,
    save_config,
)
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
from merit.merge.manifest import BRANCH_MANIFEST_FILE
from merit.plan.splitters import PlanError
from merit.vision import (
    default_trainable,
    is_vision_model,
    limit_pixels,
    load_processor,
    text_tokenizer,
)

MANIFEST = BRANCH_MANIFEST_FILE  # a finished branch or baseline: written last, atomically


@dataclass(frozen=True)
class RunPaths:
    """Layout of a run directory: every artifact's file name, defined once."""

    root: Path

    config = property(lambda self: self.root / "config.yaml")
    data = property(lambda self: self.root / "data.json")
    base = property(lambda self: self.root / "base.json")
    sketches = property(lambda self: self.root / "calibration" / "sketches.safetensors")
    calibration = property(lambda self: self.root / "calibration" / "calibration.json")
    plan = property(lambda self: self.root / "plan.json")
    plan_plots = property(lambda self: self.root / "plan_plots")
    launch_config = property(lambda self: self.root / "branches" / "launch.yaml")
    merged = property(lambda self: self.root / "merged")
    merged_adapter = property(lambda self: self.root / "merged-adapter")
    shrink = property(lambda self: self.root / "controls" / "shrink")
    eval_dir = property(lambda self: self.root / "eval")
    diagnostics = property(lambda self: self.root / "diagnostics")
    report = property(lambda self: self.root / "report")
    timings = property(lambda self: self.root / "timings.json")

    def branch(self, k: int) -> Path:
        return self.root / "branches" / f"branch-{k}"

    def baseline(self, name: str) -> Path:
        return self.root / "baselines" / name

    @staticmethod
    def manifest(job_dir: Path) -> Path:
        return job_dir / MANIFEST


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
        """Validate the config and its inputs, refuse a different experiment, then (and only
        then) create the run directory and save the resolved config.

        With ``add`` (``merit plan --add``) the config may differ from the run's by datasets
        appended to ``data.datasets``, and nothing else.
        """
        self.validate()
        self._check_experiment(add)
        self._check_writable()
        # Atomic: parallel branch commands open the same run directory at once.
        with atomic_path(self.paths.config) as tmp:
            save_config(self.cfg, tmp)
        return self

    def _check_experiment(self, add: bool) -> None:
        """A run directory holds one experiment: the settings its branches were trained with."""
        if not self.paths.config.is_file():
            return
        try:
            saved = load_config(self.paths.config, [f"run_dir={self.paths.root}"])
        except ConfigError as err:
            raise ConfigError(
                f"{self.paths.config}: cannot read the run's config ({err})"
            ) from None
        changed = experiment_changes(saved, self.cfg)
        if not changed:
            return
        if add:
            appended_datasets(saved, self.cfg)  # ConfigError naming what else changed
            return
        try:
            hint = bool(appended_datasets(saved, self.cfg))
        except ConfigError:
            hint = False
        raise ConfigError(
            f"{self.paths.root} holds a different experiment: {'; '.join(changed)} changed; "
            "choose another run_dir (merging.*, evaluation.*, diagnostics.* and runtime.* may "
            "change between commands"
            + ("; to add datasets, run `merit plan CONFIG --add`)" if hint else ")")
        )

    def _check_writable(self) -> None:
        root = self.paths.root
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(
                f"run_dir={root}: cannot write there ({err.strerror or type(err).__name__})"
            ) from None

    def validate(self) -> None:
        """Checks that need the data but no model: run before anything is written or trained."""
        if not self.is_demo:  # find (check, download, convert) θ0 now; the demo's is trained later
            _ = self.base_dir
        if self.cfg.runtime.launcher == "ray" and not _installed("ray"):
            raise ConfigError(
                "runtime.launcher=ray needs Ray, which is not installed: pip install 'merit[ray]' "
                "(or use --launcher local)"
            )
        n = len(self.mixture.datasets)
        if n == 0:
            raise ConfigError("the mixture has no datasets")
        pc = self.cfg.planning
        k = pc.groups
        if k > n:
            what = f"planning.k={k}" if pc.k is not None else f"planning.rank={pc.rank}"
            raise PlanError(f"{what} asks for K={k} groups but the mixture has only {n} datasets")

    def reuse(self, stage: str, recorded: dict | None, what: str, inputs_ok: bool = True) -> bool:
        """Whether ``stage``'s artifact ``what``, made with the settings ``recorded`` (None: no
        artifact), is reused; says so, or why the stage runs again (once per process: stages
        call the stages they need, so one stage is asked many times)."""
        if recorded is None:
            why = f"computing {what}"
        elif changed := changed_keys(recorded, self.cfg.settings(stage)):
            why = f"re-running ({', '.join(changed)} changed)"
        elif not inputs_ok:
            why = "re-running (its inputs changed upstream)"
        else:
            why = f"reusing {what}"
        said = self.__dict__.setdefault("_said", set())
        if (stage, what) not in said:
            said.add((stage, what))
            self.say(f"{stage}: {why}")
        return why.startswith("reusing")

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
        return local_model_dir(self.cfg.model.path, self.cache, self.progress)

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
    def is_vision(self) -> bool:
        """Whether θ0 is a vision-language model (:mod:`merit.vision`)."""
        return is_vision_model(self.base_dir)

    @cached_property
    def processor(self):
        """What encodes examples: a vision-language θ0's processor, else its tokenizer."""
        from transformers.utils import is_torchvision_available

        if not self.is_vision:
            return load_tokenizer(self.base_dir)
        processor = load_processor(self.base_dir)
        if not is_torchvision_available():  # transformers' fast image processors need it
            name = type(processor.image_processor).__name__
            self.say(f"θ0's image processor: {name}, the slow (PIL) one (no usable torchvision)")
        if self.cfg.model.max_image_pixels:
            limit_pixels(processor, self.cfg.model.max_image_pixels)
        return processor

    @property
    def tokenizer(self):
        return text_tokenizer(self.processor)

    @cached_property
    def trainable(self) -> tuple[str, ...] | None:
        """The parameter groups that train (the same for calibration, branches and joint);
        None for a text-only θ0, which trains every parameter."""
        groups = self.cfg.model.trainable
        if not self.is_vision:
            if groups is not None and "language" not in groups:
                raise StageError(
                    f"model.trainable={groups}: θ0 is a text-only model, all of it language"
                )
            return None
        return tuple(groups) if groups else default_trainable(self.cfg.training.lora is not None)

    def load_base(self):
        return load_model(self.base_dir, self.device, self.cfg.model.dtype, self.trainable)

    def _encode(self, examples: list) -> list[Encoded]:
        if not self.is_vision and any(ex.images for ex in examples):
            raise StageError(
                f"the data has images but θ0 ({self.cfg.model.path}) is a text-only model"
            )
        return encode(self.processor, examples, self.cfg.model.max_length)

    def encoded(self, split: str) -> dict[str, list[Encoded]]:
        """Tokenized examples of one split, per dataset."""
        cache = self.__dict__.setdefault("_encoded", {})
        if split not in cache:
            cache[split] = {d.name: self._encode(d.examples(split)) for d in self.mixture.datasets}
        return cache[split]

    def sample(self, split: str, n: int | None, seed: int) -> list[Encoded]:
        """``n`` tokenized examples of ``split`` spread over datasets (all when ``n`` is None).
        Sampled first, tokenized after: the train split of 256 datasets is large."""
        from merit.diagnose.premises import stratified_sample

        raw = {d.name: d.examples(split) for d in self.mixture.datasets}
        if n is not None:
            raw = {"": stratified_sample(raw, n, seed)}
        return [e for v in raw.values() for e in self._encode(v)]

    def timed(self, name: str):
        run = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - self.t

        return _T()

    def say(self, msg: str) -> None:
        """Progress for people, on stderr: stdout carries results (tables, printed commands)."""
        print(f"[merit] {msg}", file=sys.stderr, flush=True)


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def record_timing(run: Run, name: str, seconds: float) -> None:
    path = run.paths.timings
    timings = read_json(path) if path.is_file() else {}
    timings[name] = seconds
    write_json(path, timings)
