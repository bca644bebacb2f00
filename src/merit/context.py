"""How a run's context is made: θ0 found (or, for the demo, built), the mixture loaded, both on
demand. The commands layer makes contexts; stages only receive them."""

from __future__ import annotations

from pathlib import Path

from merit.data.corpus import Corpus
from merit.demo import build_demo_base
from merit.graph import Context
from merit.lm import Base, cache_dir, local_model_dir
from merit.run import Run


def open_context(run: Run, options: dict | None = None) -> Context:
    """A context for ``run``: its mixture and θ0 (found or built when first asked for)."""
    cfg = run.cfg
    cache = cache_dir(cfg.runtime)
    corpus = Corpus(cfg, cache)

    def find() -> Path:
        if cfg.model.path != "demo":
            return local_model_dir(cfg.model.path, cache, cfg.runtime.progress)
        with run.timed("base model"):  # θ0 of the demo: trained once, cached
            m = cfg.model
            return build_demo_base(
                m.demo, corpus.mixture, cache, m.max_length, cfg.seed, base.device,
                cfg.runtime.progress,
            )  # fmt: skip

    base = Base(cfg, find, run.paths.base, run.say)
    return Context(run, corpus, base, options, factory=open_context)
