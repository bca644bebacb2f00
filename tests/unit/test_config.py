"""Run config: validation, dotted overrides, shipped configs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merit.config import (
    ConfigError,
    apply_overrides,
    experiment_changes,
    load_config,
)
from merit.stages import STAGES

# The stages of one run (compare reads its own section; report reads none).
PIPELINE = ("data", "calibrate", "plan", "train", "joint", "merge", "evaluate", "diagnose")

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, raw):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_shipped_configs_validate():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.model.path == "smollm2-135m-instruct" and demo.data.bigbench == "auto"
    assert demo.data.unseen > 0 and "shrink" in demo.evaluation.models
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.model.path == "demo" and tiny.data.unseen > 0
    example = load_config(ROOT / "configs" / "example-3b.yaml")
    assert "/" in example.model.path  # a hub id
    assert len(example.data.datasets) >= 4
    assert example.training.learning_rate < 1e-4
    assert example.runtime.device == "auto"


def test_vision_example_config_validates_with_its_data_layout(tmp_path):
    """The Qwen2.5-VL config as shipped, and its data: a miniature Vision-FLAN tree at the paths
    it names (one LLaVA JSON per task, images under image_dir) loads as its mixture."""
    from PIL import Image

    from merit.data.mixture import load_mixture

    shutil.copy(ROOT / "configs" / "example-qwen2.5-vl-3b.yaml", tmp_path / "vl.yaml")
    cfg = load_config(tmp_path / "vl.yaml")
    assert cfg.model.path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.model.trainable == ["projector", "language"]
    assert cfg.model.max_image_pixels == 1024 * 28 * 28
    assert cfg.planning.groups == 4 and cfg.calibration.sketch_dim >= 2**18
    for spec in cfg.data.datasets:
        images = Path(spec.image_dir)
        rows = []
        for i in range(12):
            rel = f"{spec.name}/{i}.jpg"
            (images / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), "gray").save(images / rel)
            turns = [{"from": "human", "value": "<image>\nWhat is shown?"}]
            rows.append(
                {
                    "id": str(i),
                    "image": rel,
                    "conversations": [*turns, {"from": "gpt", "value": "x"}],
                }
            )
        Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
        Path(spec.path).write_text(json.dumps(rows))
    mixture = load_mixture(cfg.data)
    assert len(mixture.datasets) == len(cfg.data.datasets) >= 8
    ex = mixture.datasets[0].examples("train")[0]
    assert ex.images[0].startswith(str(tmp_path / "vision-flan" / "images_191task_1k"))


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


def _reads(stage: str) -> tuple[str, ...]:
    return STAGES.get(stage).reads


def test_stage_settings_are_scoped(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    ev = load_config(p, ["evaluation.batch_size=7"])
    mg = load_config(p, ["merging.dtype=bfloat16"])
    tr = load_config(p, ["training.learning_rate=0.01"])
    for stage in ("data", "calibrate", "plan", "train"):
        assert (
            a.settings_hash(*_reads(stage))
            == ev.settings_hash(*_reads(stage))
            == mg.settings_hash(*_reads(stage))
        )
    assert a.settings_hash(*_reads("evaluate")) != ev.settings_hash(*_reads("evaluate"))
    assert a.settings_hash(*_reads("merge")) != mg.settings_hash(*_reads("merge"))
    assert a.settings_hash(*_reads("merge")) != tr.settings_hash(
        *_reads("merge")
    )  # merging reads the branches
    assert (
        a.settings_hash(*_reads("plan"))
        == tr.settings_hash(*_reads("plan"))
        != tr.settings_hash(*_reads("train"))
    )
    # How calibration runs is not what it computes.
    assert a.settings_hash(*_reads("calibrate")) == load_config(
        p, ["calibration.streaming=false"]
    ).settings_hash(*_reads("calibrate"))
    # Which baselines run beside the branches is not what any of them computes.
    nb = load_config(p, ["training.baselines=[]"])
    assert a.settings_hash(*_reads("train")) == nb.settings_hash(
        *_reads("train")
    ) and not experiment_changes(a, nb)
    # What `merit compare` runs is read by no stage.
    cmp = load_config(p, ["compare.rows=[base, joint]", "compare.seeds=[0, 1]"])
    assert all(a.settings_hash(*_reads(s)) == cmp.settings_hash(*_reads(s)) for s in PIPELINE)


def test_default_valued_settings_change_no_hash(tmp_path):
    """A setting left at its default is recorded as absent: adding a new setting whose default
    keeps the old behaviour leaves every existing run directory valid."""
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    b = load_config(p, ["training.learning_rate=0.0005", "planning.rank=2", "seed=0"])
    assert all(a.settings_hash(*_reads(s)) == b.settings_hash(*_reads(s)) for s in PIPELINE)
    assert "training" not in a.settings(*_reads("train"))


def test_experiment_changes_name_the_setting(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    assert experiment_changes(a, load_config(p, ["evaluation.batch_size=7"])) == []
    changed = experiment_changes(a, load_config(p, ["training.learning_rate=0.01"]))
    assert changed == ["training.learning_rate (0.0005 -> 0.01)"]


def test_invalid_yaml_override_is_one_line(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    with pytest.raises(ConfigError, match=r"planning.rank: override value '\[1' is not valid YAML"):
        load_config(p, ["planning.rank=[1"])


def test_architecture_page_draws_the_declared_stage_graph():
    """docs/architecture.md holds exactly the graph the stage declarations give."""
    from merit.graph import mermaid

    cfg = load_config(
        ROOT / "src/merit/configs/demo.yaml",
        ["evaluation.models=[base,branches,merged,joint,shrink]"],
    )
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert f"```mermaid\n{mermaid(cfg)}\n```" in page


def test_run_paths_name_the_files_the_merge_library_writes():
    from merit.merge.manifest import BRANCH_MANIFEST_FILE, MANIFEST_FILE
    from merit.run import MANIFEST, MERGE_MANIFEST

    assert (MANIFEST, MERGE_MANIFEST) == (BRANCH_MANIFEST_FILE, MANIFEST_FILE)


# -- training.extra: any other SFTConfig field, validated when the config loads -----------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("{bogus: 1}", "training.extra.bogus: not a field of trl's SFTConfig"),
        (
            "{learning_rate: 0.1}",
            "training.extra.learning_rate: set training.learning_rate instead",
        ),
        ("{report_to: [wandb]}", "training.extra.report_to: set runtime.report_to instead"),
        ("{max_steps: 10}", "training.extra.max_steps: set training.max_steps instead"),
    ],
)
def test_training_extra_refuses_unknown_and_merit_owned_keys(tmp_path, extra, message):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    with pytest.raises(ConfigError) as err:
        load_config(p, [f"training.extra={extra}"])
    assert str(err.value) == message


def test_training_extra_counts_in_the_experiment_unless_logging_or_loading(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    optim = load_config(p, ["training.extra={optim_args: 'scale_parameter=False'}"])
    beta = load_config(p, ["training.extra={adam_beta2: 0.95}"])
    logging = load_config(p, ["training.extra={logging_steps: 7, dataloader_num_workers: 2}"])
    assert len({a.experiment_hash(), optim.experiment_hash(), beta.experiment_hash()}) == 3
    assert logging.experiment_hash() == a.experiment_hash()
    assert experiment_changes(a, logging) == []
    assert experiment_changes(a, beta) == ["training.extra.adam_beta2 (None -> 0.95)"]
    # Unknown to both lists but a field of SFTConfig: part of the experiment (the safe default).
    assert load_config(p, ["training.extra={neftune_noise_alpha: 5}"]).experiment_hash() != (
        a.experiment_hash()
    )


def test_training_optim_and_report_to(tmp_path):
    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    assert load_config(p, ["training.optim=adamw_torch_fused"]).experiment_hash() == (
        a.experiment_hash()
    )  # today's optimizer, spelt out: nothing changes
    assert load_config(p, ["training.optim=adafactor"]).experiment_hash() != a.experiment_hash()
    assert load_config(p, ["runtime.report_to=[tensorboard]"]).experiment_hash() == (
        a.experiment_hash()
    )
    with pytest.raises(ConfigError, match=r"training.optim: .*unknown optimizer 'adamw_fast'"):
        load_config(p, ["training.optim=adamw_fast"])


def test_extra_optim_is_the_trainers_spelling_of_training_optim(tmp_path):
    """`training.extra={optim: adafactor}` reaches the Trainer and is part of the experiment."""
    from merit.train.sft import sft_config

    p = _write(tmp_path, {"data": {"bigbench": "/x"}})
    a = load_config(p)
    ada = load_config(p, ["training.extra={optim: adafactor}"])
    assert ada.experiment_hash() != a.experiment_hash()
    assert experiment_changes(a, ada) == ["training.extra.optim (None -> 'adafactor')"]
    args = sft_config(ada.training, tmp_path, torch.device("cpu"), 64, 8, False)
    assert args.optim == "adafactor"
    with pytest.raises(ConfigError, match="both set"):
        load_config(p, ["training.extra={optim: adafactor}", "training.optim=sgd"])
