"""Run config: validation, dotted overrides, shipped configs."""

from pathlib import Path

import pytest
import yaml

from merit.config import ConfigError, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, raw):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_shipped_configs_validate():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.model.path == "demo" and demo.data.bigbench == "auto"
    example = load_config(ROOT / "configs" / "example-3b.yaml")
    assert "/" in example.model.path  # a hub id
    assert len(example.data.datasets) >= 4
    assert example.training.learning_rate < 1e-4
    assert example.runtime.device == "auto"


def test_dotted_overrides_with_yaml_values(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    cfg = load_config(
        p, ["planning.rank=3", "training.learning_rate=1e-4", "evaluation.models=[merged]"]
    )
    assert cfg.planning.rank == 3
    assert cfg.training.learning_rate == 1e-4
    assert cfg.evaluation.models == ["merged"]
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=null"])
    assert raw == {"a": {"b": 1, "c": None}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["planning.rnak=2"], "planning.rnak: no such config key"),
        (["trainng.learning_rate=1"], "trainng: no such config key"),
        (["planning.rank=-1"], "planning.rank"),
        (["training.learning_rate=abc"], "training.learning_rate"),
        (["planning"], "key.sub=value"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, overrides, message):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    with pytest.raises(ConfigError, match=message) as err:
        load_config(p, overrides)
    assert "\n" not in str(err.value)


def test_duplicate_dataset_names_refused(tmp_path):
    p = _write(
        tmp_path,
        {
            "data": {
                "datasets": [{"name": "a", "path": "x.jsonl"}, {"name": "a", "path": "y.jsonl"}]
            }
        },
    )
    with pytest.raises(ConfigError, match="same name: a"):
        load_config(p)


def test_no_data_refused(tmp_path):
    with pytest.raises(ConfigError, match="no datasets"):
        load_config(_write(tmp_path, {"data": {}}))


def test_experiment_hash_ignores_runtime(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    b = load_config(p, ["runtime.threads=1", "runtime.device=cpu", "run_dir=elsewhere"])
    c = load_config(p, ["training.seed=1"])
    assert a.experiment_hash() == b.experiment_hash() != c.experiment_hash()


def test_relative_dataset_paths_resolve_against_config_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text("")
    p = _write(tmp_path, {"data": {"datasets": [{"name": "x", "path": "d/x.jsonl"}]}})
    cfg = load_config(p)
    assert Path(cfg.data.datasets[0].path) == tmp_path / "d" / "x.jsonl"
