"""Training settings through the CLI: a Trainer field passed with `training.extra` trains and is
part of the experiment; speed levers change no weights; a step budget trains and merges; levers
this machine lacks are one-line errors before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_run_config
from merit.cli import main


def test_extra_optimizer_trains_and_is_the_experiment(tmp_path, mixture_specs, tiny_base, capsys):
    cfg = write_run_config(
        tmp_path / "run.yaml", tmp_path / "run", mixture_specs, tiny_base,
        training={"learning_rate": 3e-3, "batch_size": 8, "extra": {"optim": "adafactor"}},
    )  # fmt: skip
    assert main(["joint", str(cfg)]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "baselines" / "joint" / "manifest.json").read_text())
    assert manifest["steps"] > 0 and manifest["final_loss"] is not None
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["extra"] == {"optim": "adafactor"}
    # The optimizer is part of the experiment: the same run directory refuses another one.
    capsys.readouterr()
    assert main(["joint", str(cfg), "training.extra={optim: sgd}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different experiment" in err and "training.extra.optim" in err


def _joint(tmp_path, name, specs, base, *overrides):
    cfg = write_run_config(
        tmp_path / f"{name}.yaml", tmp_path / name, specs, base,
        training={"learning_rate": 3e-3, "batch_size": 8},
    )  # fmt: skip
    assert main(["joint", str(cfg), *overrides]) == 0
    out = tmp_path / name / "baselines" / "joint"
    return load_file(out / "model" / "model.safetensors"), json.loads(
        (out / "manifest.json").read_text()
    )


def test_speed_levers_train_the_same_weights(tmp_path, mixture_specs, tiny_base, capsys):
    """Gradient checkpointing and eager attention change how a branch is computed, not what:
    the same experiment, the same steps, weights within float noise."""
    plain, m = _joint(tmp_path, "plain", mixture_specs, tiny_base)
    levers, m2 = _joint(tmp_path, "levers", mixture_specs, tiny_base,
                        "training.gradient_checkpointing=true", "model.attn_implementation=eager")  # fmt: skip
    said = capsys.readouterr().err
    assert "joint: 1 process(es) on cpu, one process, float32 weights, no autocast" in said
    assert "gradient checkpointing, answer-only logits" in said
    assert m2["training"] == m["training"] and m2["steps"] == m["steps"]
    for name, t in plain.items():
        torch.testing.assert_close(levers[name], t, rtol=0, atol=1e-5)


def test_max_steps_trains_each_branch_that_many_steps_and_merges(
    tmp_path, mixture_specs, tiny_base
):
    cfg = write_run_config(
        tmp_path / "run.yaml", tmp_path / "run", mixture_specs, tiny_base,
        training={"learning_rate": 3e-3, "batch_size": 4, "max_steps": 5},
    )  # fmt: skip
    assert main(["merge", str(cfg)]) != 0  # nothing trained yet: the merge never trains
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    k = len(plan["groups"])
    branches = [json.loads(p.read_text()) for p in sorted(run.glob("branches/*/manifest.json"))]
    joint = json.loads((run / "baselines" / "joint" / "manifest.json").read_text())
    assert [b["steps"] for b in branches] == [5] * k
    assert joint["steps"] == 5 * k  # the joint baseline: the same examples as all K branches
    assert all(b["tokens_seen"] == b["tokens_scheduled"] for b in branches)
    assert main(["merge", str(cfg)]) == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.distributed=deepspeed", "needs the deepspeed package"),
        ("training.liger_kernel=true", "needs the liger-kernel package"),
        ("model.attn_implementation=flash_attention_2", "needs the flash-attn package"),
        ("training.extra={bogus: 1}", "training.extra.bogus: not a field of trl's SFTConfig"),
        ("training.extra={learning_rate: 1}", "set training.learning_rate instead"),
        ("training.extra={gradient_checkpointing: true}", "set training.gradient_checkpointing"),
    ],
)
def test_levers_this_machine_lacks_are_one_line_errors(
    tmp_path, mixture_specs, tiny_base, capsys, override, message
):
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", mixture_specs, tiny_base)
    capsys.readouterr()
    assert main(["train", str(cfg), override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_merge_chosen_on_the_validation_split(tmp_path, mixture_specs, tiny_base, capsys):
    """``merging.select: validation`` merges every grid point, keeps the one of lowest loss on the
    validation split, and records the curve; a select without a grid is one line, exit 2."""
    cfg = write_run_config(
        tmp_path / "run.yaml", tmp_path / "run", mixture_specs, tiny_base,
        data={"split": {"eval": 6, "calibration": 8, "train": 20, "validation": 4}},
        training={"learning_rate": 3e-3, "batch_size": 4, "baselines": []},
        merging={"method": "task_arithmetic", "select": "validation",
                 "grid": {"scale": [0.5, 1.0, 2.0]}},
    )  # fmt: skip
    assert main(["train", str(cfg)]) == 0
    assert main(["merge", str(cfg)]) == 0
    m = json.loads((tmp_path / "run" / "merged" / "merge_manifest.json").read_text())
    curve = m["metadata"]["selection"]
    assert [c["params"]["scale"] for c in curve] == [0.5, 1.0, 2.0]
    best = min(curve, key=lambda c: c["validation_loss"])
    assert m["params"] == best["params"] and m["method"] == "task_arithmetic"
    assert len({round(c["validation_loss"], 6) for c in curve}) == 3  # the grid moved the loss
    assert not (tmp_path / "run" / "merge-candidates").exists()
    capsys.readouterr()
    assert main(["merge", str(cfg), "merging.grid={}"]) == 2
    assert "select: validation needs a grid" in capsys.readouterr().err

    # RegMean and learned coefficients: fitted by the run's merge stage, on the run's own data.
    run, plain = tmp_path / "run", ["merging.select=none", "merging.grid={}"]
    branch = run / "branches" / "branch-0" / "manifest.json"
    before = branch.stat().st_mtime_ns
    assert (
        main(["merge", str(cfg), *plain, "merging.method=regmean", "merging.gram_examples=4"]) == 0
    )
    m = json.loads((run / "merged" / "merge_manifest.json").read_text())
    assert m["method"] == "regmean" and m["metadata"]["regmean"]["layers"] == 14  # 2 blocks × 7
    assert (run / "branches" / "branch-0" / "grams.safetensors").is_file()
    steps = "merging.params={steps: 4, groups: 2}"
    assert main(["merge", str(cfg), *plain, "merging.method=learned", steps]) == 0
    m = json.loads((run / "merged" / "merge_manifest.json").read_text())
    fit = m["metadata"]["learned"]
    assert set(fit["groups"]) == {"embeddings", "blocks 0-0", "blocks 1-1", "other"}
    assert fit["validation_loss"]["fitted"] <= fit["validation_loss"]["start"] + 1e-3 or (
        fit["best_step"] == 0)  # fmt: skip
    assert branch.stat().st_mtime_ns == before  # nothing retrained
    assert main(["report", str(cfg), *plain, "merging.method=learned", steps]) == 0
    page = (run / "report" / "report.md").read_text()
    assert "Learned coefficients: validation loss" in page and "coefficients" in page
    assert any((run / "report").rglob("*coefficients*.png"))
    capsys.readouterr()
    for bad, words in (
        (["merging.method=learned", "data.split.validation=0"], "learned needs a validation"),
        (["merging.method=regmean", "merging.params={alpha: 2}"], "alpha must be in [0, 1]"),
    ):
        assert main(["merge", str(cfg), *plain, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
