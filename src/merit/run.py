"""A run: its validated config, its directory (every artifact file named once), stage errors."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from merit.artifacts import atomic_path, read_json, write_json
from merit.config import (
    ConfigError,
    RunConfig,
    appended_datasets,
    experiment_changes,
    load_config,
    save_config,
)
from merit.errors import StageError
from merit.lm import apply_runtime

__all__ = ["Run", "RunPaths", "StageError", "record_timing"]

# A finished branch or baseline's manifest (written last, atomically); a merge's proof. The merge
# library, which sits below runs, spells the same names (merit.merge.manifest; a test checks).
MANIFEST, MERGE_MANIFEST = "manifest.json", "merge_manifest.json"


@dataclass(frozen=True)
class RunPaths:
    """Layout of a run directory: every artifact's file name, defined once."""

    root: Path

    config = property(lambda self: self.root / "config.yaml")
    data = property(lambda self: self.root / "data.json")
    base = property(lambda self: self.root / "base.json")
    sketches = property(lambda self: self.root / "calibration" / "sketches.safetensors")
    calibration = property(lambda self: self.root / "calibration" / "calibration.json")
    sensitivity = property(lambda self: self.root / "calibration" / "sensitivity.json")
    plan = property(lambda self: self.root / "plan.json")
    plan_plots = property(lambda self: self.root / "plan_plots")
    launch_config = property(lambda self: self.root / "branches" / "launch.yaml")
    merged = property(lambda self: self.root / "merged")
    merged_adapter = property(lambda self: self.root / "merged-adapter")
    shrink = property(lambda self: self.root / "controls" / "shrink")
    merge_manifest = property(lambda self: self.merged / MERGE_MANIFEST)
    shrink_manifest = property(lambda self: self.shrink / MERGE_MANIFEST)
    eval_dir = property(lambda self: self.root / "eval")
    results = property(lambda self: self.eval_dir / "results.json")
    results_md = property(lambda self: self.eval_dir / "results.md")
    diagnostics = property(lambda self: self.root / "diagnostics")
    diagnostics_record = property(lambda self: self.diagnostics / "diagnostics.json")
    report = property(lambda self: self.root / "report")
    report_record = property(lambda self: self.report / "report.json")
    trained = property(lambda self: self.root / "branches" / "trained.json")
    joint_trained = property(lambda self: self.baseline("joint") / "trained.json")
    compare = property(lambda self: self.root / "compare")
    compare_results = property(lambda self: self.compare / "results.json")
    timings = property(lambda self: self.root / "timings.json")

    def compare_run(self, unit: str) -> Path:
        """The run directory of a compare unit whose experiment differs from the compare's."""
        return self.compare / "runs" / unit

    def scores(self, key: str) -> Path:
        """One model's per-example scores."""
        return self.eval_dir / f"{key}.json"

    def branch(self, k: int) -> Path:
        return self.root / "branches" / f"branch-{k}"

    def baseline(self, name: str) -> Path:
        return self.root / "baselines" / name

    @staticmethod
    def manifest(job_dir: Path) -> Path:
        return job_dir / MANIFEST


@dataclass
class Run:
    """A run: its validated config, its directory, and the console. θ0 is :class:`merit.lm.Base`,
    the mixture :class:`merit.data.corpus.Corpus`; stages see both through a context."""

    cfg: RunConfig
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = RunPaths(Path(self.cfg.run_dir))
        apply_runtime(self.cfg.runtime)

    def open(self, add: bool = False) -> Run:
        """Refuse a different experiment, then (and only then) create the run directory and save
        the resolved config. Inputs are validated before (``Context.open``).

        With ``add`` (``merit plan --add``) the config may differ from the run's by datasets
        appended to ``data.datasets``, and nothing else.
        """
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


def record_timing(run: Run, name: str, seconds: float | dict, peak: bool = False) -> None:
    """A stage's seconds (or a record such as the overhead) into ``timings.json``; with
    ``peak``, also the process's and its largest child's peak resident memory (GB) as it ends,
    under ``peak_rss_gb``: both only ever rise, so the stage whose figure first reaches the
    run's peak is the one that sets it."""
    path = run.paths.timings
    timings = read_json(path) if path.is_file() else {}
    timings[name] = seconds
    if peak:
        timings.setdefault("peak_rss_gb", {})[name] = peak_memory()
    write_json(path, timings)


def peak_memory() -> dict[str, float]:
    """Peak resident memory so far (GB) of this process and of its largest child process."""
    import resource

    def gb(who: int) -> float:
        return round(resource.getrusage(who).ru_maxrss / 2**20, 2)  # Linux: KiB

    return {"process": gb(resource.RUSAGE_SELF), "children": gb(resource.RUSAGE_CHILDREN)}
