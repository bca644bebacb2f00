"""The stage executor's reuse decisions, on two toy stages and no model."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from merit.artifacts import Artifact
from merit.config import config_from_dict
from merit.graph import STAGES, Context, Stage
from merit.run import Run

BUILT: list[str] = []


@dataclass
class Count(Artifact):
    value: int


def _build_a(ctx, _inputs):
    BUILT.append("a")
    return Count(ctx.cfg.seed)


def _build_b(_ctx, inputs):
    BUILT.append("b")
    return Count(inputs["toy-a"].value + 1)


@pytest.fixture
def toy_stages():
    a = Stage("toy-a", "", ("seed",), Count, lambda p: p.root / "a.json", _build_a, what="a")
    b = Stage(
        "toy-b", "", ("evaluation",), Count, lambda p: p.root / "b.json", _build_b,
        needs=("toy-a",), what="b", intact=lambda ctx, art: not (ctx.paths.root / "bad").exists(),
    )  # fmt: skip
    STAGES.register(a, replace=True)
    STAGES.register(b, replace=True)
    BUILT.clear()
    yield
    STAGES.unregister("toy-a")
    STAGES.unregister("toy-b")


def _ctx(tmp_path, said: list[str], fingerprint: str = "f0", **raw) -> Context:
    cfg = config_from_dict(
        {"run_dir": str(tmp_path), "data": {"bigbench": str(tmp_path / "bb")}, **raw}
    )
    run = Run(cfg)
    run.say = said.append
    base = SimpleNamespace(fingerprint=fingerprint, device="cpu")
    return Context(run, corpus=None, base=base)


def test_reuse_and_every_reason_to_rerun(tmp_path, toy_stages):
    said: list[str] = []
    assert _ctx(tmp_path, said).executor.get("toy-b").value == 1
    assert BUILT == ["a", "b"] and said == ["toy-a: computing a", "toy-b: computing b"]

    said.clear(), BUILT.clear()
    ex = _ctx(tmp_path, said).executor
    assert ex.get("toy-b").value == 1 and ex.get("toy-b") is ex.get("toy-b")  # once per process
    assert BUILT == [] and said == ["toy-a: reusing a", "toy-b: reusing b"]

    # A setting only b reads: b alone re-runs, and says which.
    said.clear()
    _ctx(tmp_path, said, evaluation={"batch_size": 7}).executor.get("toy-b")
    assert BUILT == ["b"] and said[-1] == "toy-b: re-running (evaluation.batch_size changed)"

    # A setting a reads: a re-runs; b re-runs only because its input's bytes changed.
    said.clear(), BUILT.clear()
    _ctx(tmp_path, said, seed=3, evaluation={"batch_size": 7}).executor.get("toy-b")
    assert BUILT == ["a", "b"] and said[0] == "toy-a: re-running (seed changed)"
    assert said[1] == "toy-b: re-running (toy-a changed upstream)"

    # Another θ0; a file the artifact describes changed (the stage's own check).
    said.clear(), BUILT.clear()
    _ctx(tmp_path, said, "f1", seed=3, evaluation={"batch_size": 7}).executor.get("toy-b")
    assert said == ["toy-a: re-running (θ0 changed)", "toy-b: re-running (θ0 changed)"]
    (tmp_path / "bad").touch()
    said.clear()
    _ctx(tmp_path, said, "f1", seed=3, evaluation={"batch_size": 7}).executor.get("toy-b")
    assert said[-1] == "toy-b: re-running (the files of b changed)"


def test_an_unreadable_artifact_is_made_again(tmp_path, toy_stages):
    said: list[str] = []
    (tmp_path / "a.json").write_text('{"something": "else"}')
    assert _ctx(tmp_path, said).executor.get("toy-a").value == 0
    assert said == ["toy-a: computing a"]


def test_unknown_stage_is_a_config_error(tmp_path):
    from merit.config import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        _ctx(tmp_path, []).executor.get("nope")
