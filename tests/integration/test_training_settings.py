"""Open training settings through the CLI: a Trainer field passed with `training.extra` trains
and is part of the experiment; a run with it reuses nothing trained without it."""

from __future__ import annotations

import json

import yaml

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
