"""The stage graph: each stage declares what it reads and needs and what it makes; one executor
runs a command's stages in order, decides once for all of them whether an artifact is reused,
says why, times the work and saves the artifact atomically.

A stage never calls another stage: it receives its inputs (the artifacts of the stages it
``needs``) from the executor. Reuse is decided from a *stamp* recorded in every artifact: the
stage's version, the settings it reads, θ0's fingerprint and the sha256 of each input artifact's
file. A stage may add an ``intact`` check for files its JSON describes (weights, sketches).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from merit.artifacts import Artifact, sha256_file
from merit.config import ConfigError, RunConfig, changed_keys
from merit.errors import StageError
from merit.lm import Base, Encoded, cache_dir
from merit.registry import Registry
from merit.run import Run, RunPaths, record_timing


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, declared.

    ``needs`` names the stages whose artifacts ``build`` receives; it may depend on the config
    (evaluation trains only what its models need). ``reads`` are the config sections whose
    settings the artifact depends on (upstream sections included, as recorded in it).
    """

    name: str
    help: str
    reads: tuple[str, ...]
    artifact: type[Artifact]
    path: Callable[[RunPaths], Path]
    build: Callable[[Context, dict[str, Artifact]], Artifact]
    needs: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]] = ()
    what: str = ""  # the artifact, for people ("plan.json")
    version: int = 1
    intact: Callable[[Context, Artifact], bool] | None = None
    always: bool = False  # rebuilt every time it is asked for (seconds of work)
    show: Callable[[Context, Artifact], str] | None = None  # what its command prints
    order: int = 100

    def upstream(self, cfg: RunConfig) -> tuple[str, ...]:
        return self.needs(cfg) if callable(self.needs) else self.needs


STAGES: Registry[Stage] = Registry("stage")


class Context:
    """What a stage works with: the run (config, paths, console), θ0 (:class:`merit.lm.Base`)
    and the mixture (a :class:`merit.data.corpus.Corpus`), made by ``factory`` (the commands
    layer's :func:`merit.context.open_context`), which also makes the contexts of other runs."""

    def __init__(self, run: Run, corpus, base: Base, options: dict | None = None, factory=None):
        self.run = run
        self.cfg = run.cfg
        self.paths = run.paths
        self.say = run.say
        self.timed = run.timed
        self.options = options or {}
        self.cache = cache_dir(self.cfg.runtime)
        self.progress = self.cfg.runtime.progress
        self.corpus = corpus
        self.base = base
        self.device = base.device
        self._factory = factory

    def derive(self, cfg: RunConfig) -> Context:
        """The context of another run (a row of ``merit compare``), made the same way."""
        return self._factory(Run(cfg), self.options)

    @property
    def mixture(self):
        """The mixture as the stages read it (``data.overlong`` applied: needs θ0's tokenizer)."""
        return self.corpus.fitted(self.base)

    @property
    def is_demo(self) -> bool:
        return self.cfg.model.path == "demo"

    def encoded(self, split: str) -> dict[str, list[Encoded]]:
        return self.corpus.encoded(split, self.base)

    def sample(self, split: str, n: int | None, seed: int) -> list[Encoded]:
        return self.corpus.sample(split, n, seed, self.base)

    def validate(self) -> None:
        """Checks that need the data but no trained model: run before anything is written."""
        # Find (check, download, convert) θ0 now and apply data.overlong (which needs its
        # tokenizer); the demo's θ0 is trained later.
        mixture = self.corpus.mixture if self.is_demo else self.corpus.fitted(self.base)
        if self.cfg.runtime.launcher == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError(
                "runtime.launcher=ray needs Ray, which is not installed: pip install 'merit[ray]' "
                "(or use --launcher local)"
            )
        n = len(mixture.datasets)
        if n == 0:
            raise ConfigError("the mixture has no datasets")
        pc = self.cfg.planning
        if pc.groups > n:
            what = f"planning.k={pc.groups}" if pc.k is not None else f"planning.rank={pc.rank}"
            raise ConfigError(
                f"{what} asks for K={pc.groups} groups but the mixture has only {n} datasets"
            )

    def open(self, add: bool = False) -> Context:
        self.validate()
        self.run.open(add)
        return self

    @cached_property
    def executor(self) -> Executor:
        return Executor(self)


def _file_digest(path: Path) -> str:
    return sha256_file(path) if path.is_file() else ""


class Executor:
    """Runs stages with their needs, each at most once per process, reusing what is current."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.made: dict[str, Artifact] = {}

    def get(self, name: str) -> Artifact:
        """The artifact of stage ``name``, made (with everything it needs) unless current."""
        if name in self.made:
            return self.made[name]
        stage = STAGES.get(name)
        inputs = {n: self.get(n) for n in stage.upstream(self.ctx.cfg)}
        stamp = self.stamp(stage, inputs)
        path = stage.path(self.ctx.paths)
        old = None if stage.always else _load(stage, path)
        why = self.verdict(stage, old, stamp)
        self.ctx.say(f"{stage.name}: {why}")
        if why.startswith("reusing"):
            self.made[name] = old
            return old
        t0 = time.perf_counter()
        art = stage.build(self.ctx, inputs)
        art.stamp = stamp
        art.save(path)
        self._record_time(stage.name, time.perf_counter() - t0)
        self.made[name] = art
        return art

    def stamp(self, stage: Stage, inputs: dict[str, Artifact]) -> dict:
        """What the stage's artifact is of: version, settings, θ0, input artifacts' sha256."""
        paths = self.ctx.paths
        digests = {n: _file_digest(STAGES.get(n).path(paths)) for n in inputs}
        return {
            "version": stage.version,
            "settings": self.ctx.cfg.settings(*stage.reads),
            "base": self.ctx.base.fingerprint,
            "inputs": digests,
        }

    def verdict(self, stage: Stage, old: Artifact | None, stamp: dict) -> str:
        what = stage.what or stage.name
        rec = getattr(old, "stamp", None) if old is not None else None
        if stage.always:
            return f"building {what}"
        if not rec:
            return f"computing {what}"
        if rec.get("version") != stamp["version"]:
            return "re-running (made by another version of this stage)"
        if changed := changed_keys(rec.get("settings"), stamp["settings"]):
            return f"re-running ({', '.join(changed)} changed)"
        if rec.get("base") != stamp["base"]:
            return "re-running (θ0 changed)"
        if moved := [n for n, d in stamp["inputs"].items() if rec["inputs"].get(n) != d]:
            return f"re-running ({', '.join(moved)} changed upstream)"
        if stage.intact is not None and not stage.intact(self.ctx, old):
            return f"re-running (the files of {what} changed)"
        return f"reusing {what}"

    def _record_time(self, name: str, seconds: float) -> None:
        run = self.ctx.run
        run.timings[name] = run.timings.get(name, 0.0) + seconds
        record_timing(run, name, run.timings[name], peak=True)


def _load(stage: Stage, path: Path) -> Artifact | None:
    """The stage's artifact on disk, or None where there is none or it cannot be read (an older
    merit's file: made again)."""
    try:
        return stage.artifact.load_if(path)
    except (KeyError, TypeError, ValueError, StageError):
        return None


def stage_graph(cfg: RunConfig) -> list[tuple[str, str]]:
    """Every (stage it needs, stage) edge for ``cfg``."""
    return [(n, s.name) for s in STAGES for n in s.upstream(cfg)]


def mermaid(cfg: RunConfig) -> str:
    """The stage graph as a Mermaid flowchart: what `docs/architecture.md` draws (a test checks
    that the page holds exactly this, so it cannot drift from the declarations)."""
    lines = ["flowchart LR"]
    lines += [f'  {s.name.replace("-", "_")}["{s.name}: {s.what or s.name}"]' for s in STAGES]
    lines += [f"  {a.replace('-', '_')} --> {b.replace('-', '_')}" for a, b in stage_graph(cfg)]
    return "\n".join(lines)
