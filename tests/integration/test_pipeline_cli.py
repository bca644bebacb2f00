"""The whole pipeline through the CLI on a tiny model and a fixture mixture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_run_config
from merit.cli import main


def _config(tmp_path: Path, specs: list[dict], base: Path) -> Path:
    return write_run_config(
        tmp_path / "run.yaml",
        tmp_path / "run",
        specs,
        base,
        training={"learning_rate": 3e-3, "batch_size": 8},
        evaluation={"max_examples": 6, "max_generate": 3, "max_new_tokens": 6, "batch_size": 16},
    )


def test_pipeline_end_to_end(tmp_path, mixture_specs, tiny_base, capsys):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    run = tmp_path / "run"

    assert main(["data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "copy_words" in out and "pick_word" in out and "bigbench" in out

    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "MERIT K=2" in out and "joint" in out and "θ0 (base)" in out
    assert "MERIT overhead: calibrate" in out and "of branch training" in out
    recorded = json.loads((run / "timings.json").read_text())["overhead"]
    assert recorded["seconds"] == sum(recorded["steps"].values()) and len(recorded["branches"]) == 2

    plan = json.loads((run / "plan.json").read_text())
    names = sorted(s["name"] for s in mixture_specs)
    grouped = sorted(n for g in plan["groups"] for n in g["datasets"])
    assert grouped == names  # the groups partition the datasets
    assert plan["K"] == 2 and abs(sum(g["weight"] for g in plan["groups"]) - 1) < 1e-12
    assert len(plan["cosine"]) == len(names)

    # Each branch trained exactly the tokens the plan gave it.
    for g in plan["groups"]:
        m = json.loads((run / "branches" / f"branch-{g['id']}" / "manifest.json").read_text())
        assert m["tokens"] == g["tokens"] and m["datasets"] == g["datasets"]
    joint = json.loads((run / "baselines" / "joint" / "manifest.json").read_text())
    assert joint["tokens"] == sum(g["tokens"] for g in plan["groups"])

    # The merged model loads with from_pretrained and equals Σ w_k θ_k.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert tok.chat_template
    branches = [
        load_file(run / "branches" / f"branch-{k}" / "model" / "model.safetensors") for k in (0, 1)
    ]
    w = [g["weight"] for g in plan["groups"]]
    name = "model.layers.0.mlp.up_proj.weight"
    expect = w[0] * branches[0][name].double() + w[1] * branches[1][name].double()
    got = dict(merged.named_parameters())[name].detach().double()
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # tie kept

    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert set(results) == {"base", "joint", "merged", "branch-0", "branch-1"}
    assert results["merged"]["label"] == "MERIT K=2" and results["base"]["label"] == "θ0 (base)"
    for rec in results.values():
        assert set(rec["datasets"]) == set(names)
        assert rec["datasets"]["pick_word"]["kind"] == "multiple_choice"
        assert 0.0 <= rec["datasets"]["pick_word"]["accuracy"] <= 1.0
        assert rec["datasets"]["copy_words"]["n_accuracy"] == 3
    # Training lowered held-out NLL compared to the untrained θ0.
    assert results["joint"]["summary"]["nll"] < results["base"]["summary"]["nll"]
    assert results["merged"]["summary"]["nll"] < results["base"]["summary"]["nll"]
    assert (run / "eval" / "results.md").read_text().count("|") > 10
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["planning"]["rank"] == 1 and saved["calibration"]["seed"] == 0

    # Stages are resumable: a second run redoes nothing and gives the same table.
    before = (run / "merged" / "merge_manifest.json").stat().st_mtime_ns
    assert main(["run", str(cfg)]) == 0
    assert (run / "merged" / "merge_manifest.json").stat().st_mtime_ns == before

    # One branch on its own (what a scheduler runs) is a no-op once done.
    assert main(["train", str(cfg), "--branch", "1"]) == 0
    assert "already trained" in capsys.readouterr().err
    assert main(["train", str(cfg), "--branch", "7"]) == 2
    capsys.readouterr()

    # A changed evaluation setting re-runs evaluation only: nothing upstream is touched.
    upstream = [
        run / "data.json",
        run / "calibration" / "sketches.safetensors",
        run / "plan.json",
        run / "branches" / "branch-0" / "manifest.json",
        run / "baselines" / "joint" / "manifest.json",
        run / "merged" / "merge_manifest.json",
    ]
    stamps = [f.stat().st_mtime_ns for f in upstream]
    scores = run / "eval" / "merged.json"
    scored = scores.stat().st_mtime_ns
    assert main(["evaluate", str(cfg), "evaluation.batch_size=7"]) == 0
    out = capsys.readouterr().err  # what each stage reuses or re-runs, and why
    assert [f.stat().st_mtime_ns for f in upstream] == stamps
    assert scores.stat().st_mtime_ns > scored  # re-scored with the new setting
    assert "plan: reusing plan.json" in out and "evaluating MERIT K=2" in out
    # Summary settings re-summarise without re-scoring.
    scored = scores.stat().st_mtime_ns
    assert main(["evaluate", str(cfg), "evaluation.batch_size=7", "evaluation.confidence=0.9"]) == 0
    assert scores.stat().st_mtime_ns == scored
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert results["merged"]["summary"]["confidence"] == 0.9

    # A changed experiment setting is refused in one line that names it.
    res = _cli("run", str(cfg), "training.learning_rate=0.01")
    assert res.returncode == 2
    err = res.stderr.strip()
    assert "\n" not in err and "different experiment" in err and "training.learning_rate" in err
    assert [f.stat().st_mtime_ns for f in upstream] == stamps


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "merit.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s, d: s.append({"name": "ghost", "path": str(d / "nope.jsonl")}), "no such file"),
        (
            lambda s, d: s.append({"name": "weird", "path": str(_touch(d / "x.csv", "a,b\n"))}),
            "format",
        ),
        (
            lambda s, d: s.append({"name": "empty", "path": str(_touch(d / "e.jsonl", ""))}),
            "no usable examples",
        ),
        (lambda s, d: s.append(dict(s[0])), "same name"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, mixture_specs, tiny_base, mutate, message):
    specs = [dict(s) for s in mixture_specs]
    mutate(specs, tmp_path)
    cfg = _config(tmp_path, specs, tiny_base)
    res = _cli("plan", str(cfg))
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("merit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run" / "calibration").exists()  # nothing long started


def test_k_larger_than_datasets_and_unknown_key(tmp_path, mixture_specs, tiny_base):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    res = _cli("plan", str(cfg), "planning.rank=3")
    assert res.returncode == 2 and "K=8" in res.stderr and "only 5 datasets" in res.stderr
    res = _cli("plan", str(cfg), "planning.rnak=1")
    assert res.returncode == 2 and "planning.rnak: no such config key" in res.stderr
    res = _cli("plan", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "no such config file" in res.stderr


def _touch(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
