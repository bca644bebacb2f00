"""Where datasets come from: a hub dataset (here a local dataset folder read by
``datasets.load_dataset``, and an unreachable id), Alpaca records, and one file split into many
datasets by a field (Vision-FLAN's single annotation file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merit.config import DataConfig, DatasetSpec, config_from_dict
from merit.data.formats import DataError, HubArgs, load_dataset, load_groups
from merit.data.mixture import dataset_sources, load_mixture


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache: what this machine (and an air-gapped node) has."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def _hub_folder(root: Path) -> Path:
    """A dataset repository as it sits on the hub: data files under data/, split by name."""
    rows = [{"prompt": f"Say {i}", "completion": str(i)} for i in range(30)]
    _jsonl(root / "data" / "train.jsonl", rows[:20])
    _jsonl(root / "data" / "test.jsonl", rows[20:])
    return root


def test_hub_format_reads_a_dataset_repository_by_split(tmp_path, offline):
    repo = _hub_folder(tmp_path / "owner__qa")
    train = load_dataset("qa", repo, "hub")
    test = load_dataset("qa", repo, "hub", hub=HubArgs(split="test"))
    assert [ex.answer for ex in train.examples] == [str(i) for i in range(20)]
    assert [ex.answer for ex in test.examples] == [str(i) for i in range(20, 30)]
    assert train.format == "hub" and "record 3" in train.examples[3].source


def test_hub_data_files_pick_the_files(tmp_path, offline):
    repo = _hub_folder(tmp_path / "owner__qa")
    got = load_dataset("qa", repo, "hub", hub=HubArgs(data_files={"train": "data/test.jsonl"}))
    assert len(got.examples) == 10


def test_an_unreachable_hub_dataset_is_one_line_naming_it(offline):
    with pytest.raises(DataError) as err:
        load_dataset("qa", "nobody-here/no-such-dataset", "hub")
    msg = str(err.value)
    assert "\n" not in msg and "nobody-here/no-such-dataset" in msg


def test_a_hub_id_is_recognised_and_not_resolved_as_a_path(tmp_path):
    raw = {"data": {"datasets": [
        {"name": "a", "path": "owner/name"},  # a hub id: kept as typed
        {"name": "b", "path": "data/b.jsonl"},  # a (missing) local file: resolved
        {"name": "c", "path": "owner/name", "format": "jsonl"},  # said to be a file
    ]}}  # fmt: skip
    cfg = config_from_dict(raw, base_dir=tmp_path)
    a, b, c = cfg.data.datasets
    assert a.path == "owner/name" and a.is_hub(exists=False)
    assert b.path == str(tmp_path / "data/b.jsonl") and not b.is_hub(exists=False)
    assert c.path == str(tmp_path / "owner/name") and not c.is_hub(exists=False)


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    {"instruction": "Greet.", "output": "Hello", "system": "Be brief."},
]


@pytest.mark.parametrize("fmt", ["alpaca", "auto"])
def test_alpaca_records_are_instruction_then_input(tmp_path, fmt):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA))
    got = load_dataset("alpaca", path, fmt).examples
    assert got[0].messages == ({"role": "user", "content": "Add the numbers.\n\n2 and 3"},)
    assert got[0].answer == "5"
    assert got[1].messages[0]["content"] == "Name a colour."  # an empty input adds nothing
    assert got[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert not any(ex.turns for ex in got)


def test_alpaca_format_refuses_other_records_with_the_line(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match=r"a\.jsonl:2: an Alpaca record needs"):
        load_dataset("a", path, "alpaca")


def _flan(path: Path) -> Path:
    """A Vision-FLAN-style annotation file: every task's records in one list, text-only here."""
    rows = []
    for i in range(12):
        task = ["ocr_titles", "count_things", "colour_names"][i % 3]
        rows.append({
            "task_name": task,
            "conversations": [
                {"from": "human", "value": f"{task} question {i}"},
                {"from": "gpt", "value": f"answer {i}"},
            ],
        })  # fmt: skip
    path.write_text(json.dumps(rows))
    return path


def test_group_by_makes_one_dataset_per_value_in_file_order(tmp_path):
    groups = load_groups(_flan(tmp_path / "annotation.json"), "task_name")
    assert [g.name for g in groups] == ["colour_names", "count_things", "ocr_titles"]
    count = groups[1].examples
    assert [ex.answer for ex in count] == [f"answer {i}" for i in (1, 4, 7, 10)]
    assert all(ex.messages[0]["content"].startswith("count_things") for ex in count)


def test_group_by_refuses_a_record_without_the_field(tmp_path):
    path = _flan(tmp_path / "annotation.json")
    rows = json.loads(path.read_text())
    del rows[5]["task_name"]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"record 5: group_by field 'task_name'"):
        load_groups(path, "task_name")


def test_grouped_datasets_join_the_mixture_as_datasets(tmp_path):
    path = _flan(tmp_path / "annotation.json")
    other = _jsonl(
        tmp_path / "qa.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(6)]
    )
    cfg = DataConfig(
        datasets=[DatasetSpec(path=str(path), group_by="task_name"),
                  DatasetSpec(name="qa", path=str(other))],
        unseen=1,
        split={"eval": 1, "calibration": 1},
    )  # fmt: skip
    train, unseen = dataset_sources(cfg, None)
    names = sorted(s.name for s in train + unseen)
    assert names == ["colour_names", "count_things", "ocr_titles", "qa"]
    mixture = load_mixture(cfg)
    # Groups of one file are different data: no group is taken for a copy of another.
    assert mixture.dropped == []
    hashes = {d.file_hash for d in mixture.datasets + mixture.unseen}
    assert len(hashes) == 4


def test_a_dataset_needs_a_name_unless_grouped():
    with pytest.raises(ValueError, match="needs a name"):
        DatasetSpec(path="x.jsonl")
    assert DatasetSpec(path="x.jsonl", group_by="task").name is None
