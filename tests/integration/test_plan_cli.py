"""`merit plan`: candidates side by side, stability, plots, true-H predictions, `--add`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_run_config
from merit.cli import main


def _config(tmp_path: Path, specs, base: Path, name="run", **planning) -> Path:
    return write_run_config(
        tmp_path / f"{name}.yaml",
        tmp_path / name,
        specs,
        base,
        calibration={"batch_size": 4, "microbatches": 4},
        planning={"bootstrap": 4, **planning},
    )


def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_plan_compare_stability_plots_and_hessian(tmp_path, mixture_specs, tiny_base, capsys):
    cfg = _config(
        tmp_path,
        mixture_specs,
        tiny_base,
        hessian=True,
        horizon=0.5,
        splitter="auto",
        objective="merged_loss",
    )
    assert main(["plan", str(cfg), "--compare"]) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    names = sorted(s["name"] for s in mixture_specs)
    assert sorted(n for g in plan["groups"] for n in g["datasets"]) == names
    for key in ("K", "rank", "cosine", "explained_variance", "settings", "base_fingerprint"):
        assert key in plan
    for d in plan["datasets"]:
        assert {"name", "group", "samples", "tokens", "z"} <= set(d)
        assert 0.0 <= d["stability"] <= 1.0
    cands = {c["splitter"]: c for c in plan["candidates"]}
    assert set(cands) == {"median", "sign", "random", "gain"}
    for name, c in cands.items():
        assert name in out
        assert c["gain"] >= 0 and 0 <= c["gain_share"] <= 1
        assert c["gain_hessian"] is not None and np.isfinite(c["merged_loss"])
        assert c["stability"]["draws"] == 4
    # auto + merged_loss: the plan is the candidate with the lowest predicted merged loss.
    chosen = [c for c in plan["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and "<- chosen" in out
    assert chosen[0]["merged_loss"] == min(c["merged_loss"] for c in cands.values())
    assert [d["group"] for d in plan["datasets"]] == chosen[0]["groups"]
    assert plan["method"] == chosen[0]["splitter"]
    assert plan["hessian"]["horizon"] == 0.5
    # Pictures next to the plan: real images, not blank.
    assert sorted(Path(p).name for p in plan["plots"]) == [
        "cosine.png",
        "pca.png",
        "scree.png",
        "stability.png",
    ]
    for p in plan["plots"]:
        img = _png(tmp_path / "run" / p)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01


def _plan_of(run: Path) -> dict:
    return json.loads((run / "plan.json").read_text())


def test_add_equals_planning_from_scratch(tmp_path, mixture_specs, tiny_base, capsys):
    specs = [dict(s) for s in mixture_specs]
    new = specs[-1]["name"]
    plan_kw = {"k": 3, "splitter": "gain"}
    first = _config(tmp_path, specs[:-1], tiny_base, "grow", **plan_kw)
    assert main(["plan", str(first)]) == 0
    before = _plan_of(tmp_path / "grow")
    assert new not in [d["name"] for d in before["datasets"]]

    grown = _config(tmp_path, specs, tiny_base, "grow", **plan_kw)
    capsys.readouterr()
    assert main(["plan", str(grown), "--add"]) == 0
    out = capsys.readouterr()
    assert "calibrating 1 new dataset(s)" in out.err and "changed group" in out.out
    cal = json.loads((tmp_path / "grow" / "calibration" / "calibration.json").read_text())
    assert cal["computed"] == [new]  # one gradient pass, for the new dataset only

    scratch = _config(tmp_path, specs, tiny_base, "scratch", **plan_kw)
    assert main(["plan", str(scratch)]) == 0
    a = load_file(tmp_path / "grow" / "calibration" / "sketches.safetensors")
    b = load_file(tmp_path / "scratch" / "calibration" / "sketches.safetensors")
    for key in ("sketches", "parts"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    pa, pb = _plan_of(tmp_path / "grow"), _plan_of(tmp_path / "scratch")
    assert pa["groups"] == pb["groups"]
    assert [d["group"] for d in pa["datasets"]] == [d["group"] for d in pb["datasets"]]
    np.testing.assert_allclose(pa["cosine"], pb["cosine"], atol=1e-5)
    sa, sb = pa["stability"], pb["stability"]
    assert sa["ari_pairs"] == sb["ari_pairs"] and sa["ari_plan"] == sb["ari_plan"]
    assert sa["cosine_pearson_resampled"] == pytest.approx(sb["cosine_pearson_resampled"], rel=1e-6)
    assert [d["stability"] for d in pa["datasets"]] == [d["stability"] for d in pb["datasets"]]
    assert [c["groups"] for c in pa["candidates"]] == [c["groups"] for c in pb["candidates"]]
    assert pa["changes"]["added"] == [new] and pb["changes"] is None
    old_group = {d["name"]: d["group"] for d in before["datasets"]}
    assert set(pa["changes"]["changed_group"]) <= set(old_group)


def test_add_refuses_other_changes_and_foreign_sketches(tmp_path, mixture_specs, tiny_base):
    specs = [dict(s) for s in mixture_specs]
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    first = _config(tmp_path, specs[:-1], base, "r")
    assert main(["plan", str(first)]) == 0
    grown = _config(tmp_path, specs, base, "r")

    def error(*args):
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(list(args)) == 2
        # Progress lines ([merit] ...) may come first; the error is the last line, and one line.
        lines = err.getvalue().strip().splitlines()
        assert lines[-1].startswith("merit: error:")
        assert all(x.startswith("[merit] ") for x in lines[:-1])
        return lines[-1]

    # Appending without --add: refused, and told how.
    assert "--add" in error("plan", str(grown))
    # --add with anything else changed: refused, naming the key.
    assert "calibration.seed" in error("plan", str(grown), "--add", "calibration.seed=1")

    # θ0 replaced in place (same path, other weights): the sketches are not comparable.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(base)
    msg = error("plan", str(grown), "--add")
    assert "base_fingerprint (θ0 fingerprint)" in msg and "layout" not in msg

    # Another architecture at the same path: the parameter layout differs too.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(base)
    cfg.num_hidden_layers = 3
    LlamaForCausalLM(cfg).save_pretrained(base)
    msg = error("plan", str(grown), "--add")
    assert "layout (parameter layout" in msg


def test_plan_rebuilds_a_demo_base_missing_from_the_cache(tmp_path, mixture_specs):
    """`model.path: demo`, θ0 gone from the cache after the data stage (another machine, a
    cleared cache): `merit plan` rebuilds it. θ0's parameter layout used to be read on the meta
    device, where building θ0 crashed."""
    from merit.lm import fingerprint

    tiny_demo = {
        "vocab_size": 300,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "steps": 2,
        "batch_size": 4,
        "examples_per_dataset": 2,
    }
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tmp_path / "run",
        mixture_specs,
        Path("demo"),
        model={"path": "demo", "demo": tiny_demo},
        runtime={"cache_dir": str(tmp_path / "cache")},
    )
    assert main(["plan", str(cfg)]) == 0
    shutil.rmtree(tmp_path / "cache")
    assert main(["plan", str(cfg)]) == 0
    (base,) = (tmp_path / "cache" / "base").glob("demo-*")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["base_fingerprint"] == fingerprint(base)
