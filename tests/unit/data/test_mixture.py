"""Tests for merit.data.mixture: validation carved from training, explicit unseen datasets and
the refusal of unseen tasks that overlap the training tasks; the data table's validation column."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from merit.config import DataConfig, SplitConfig
from merit.data.formats import DataError
from merit.data.mixture import dataset_sources, load_mixture, split_indices
from merit.data.stage import DataRecord, data_table


def _split_before_validation(n: int, name: str, cfg: SplitConfig, base: int = 0) -> dict:
    """split_indices as it was before validation existed: existing runs must keep these splits."""
    order = list(range(n))
    random.Random(f"{cfg.seed}/{name}").shuffle(order)
    n_eval = max(1, min(cfg.eval, n // 5))
    n_cal = max(1, min(cfg.calibration, n // 5))
    n_base = min(base, max(0, (n - n_eval - n_cal) // 2))
    cuts = [n_eval, n_eval + n_cal, n_eval + n_cal + n_base]
    rest = order[cuts[2] :]
    if cfg.train is not None:
        rest = rest[: cfg.train]
    return {
        "eval": sorted(order[: cuts[0]]),
        "calibration": sorted(order[cuts[0] : cuts[1]]),
        "base": sorted(order[cuts[1] : cuts[2]]),
        "train": sorted(rest),
    }


CASES = [  # (n, name, split settings, base)
    (60, "copy_words", {"eval": 6, "calibration": 4, "train": 8}, 0),
    (60, "copy_words", {"eval": 6, "calibration": 4}, 10),
    (1000, "abstract_narrative", {"eval": 50, "calibration": 200, "train": 300, "seed": 3}, 16),
    (7, "tiny", {"eval": 50, "calibration": 200}, 2),
]


@pytest.mark.parametrize(("n", "name", "split", "base"), CASES)
def test_validation_zero_keeps_every_split(n, name, split, base):
    cfg = SplitConfig(**split)
    got = split_indices(n, name, cfg, base)
    assert got["validation"] == []
    assert {k: v for k, v in got.items() if k != "validation"} == _split_before_validation(
        n, name, cfg, base
    )


@pytest.mark.parametrize(("n", "name", "split", "base"), CASES[:3])
def test_validation_is_carved_from_the_old_training_examples(n, name, split, base):
    old = _split_before_validation(n, name, SplitConfig(**split), base)
    cfg = SplitConfig(**split, validation=3)
    got = split_indices(n, name, cfg, base)
    assert len(got["validation"]) == 3
    assert not set(got["validation"]) & set(got["train"])
    assert sorted(got["validation"] + got["train"]) == old["train"]
    for k in ("eval", "calibration", "base"):
        assert got[k] == old[k]
    assert split_indices(n, name, cfg, base) == got  # deterministic
    # A larger validation set extends the smaller one: the carve takes a fixed prefix.
    bigger = split_indices(n, name, SplitConfig(**split, validation=5), base)
    assert set(got["validation"]) < set(bigger["validation"])


def test_validation_too_large_is_one_line_error():
    cfg = SplitConfig(eval=2, calibration=2, validation=6)  # 10 - 2 - 2 = 6 training examples
    with pytest.raises(DataError) as e:
        split_indices(10, "small", cfg)
    assert str(e.value) == (
        "small: data.split.validation=6 is not smaller than its 6 training examples"
    )
    assert (
        len(split_indices(10, "small", SplitConfig(eval=2, calibration=2, validation=5))["train"])
        == 1
    )


def _write(path: Path, rows: list[dict]) -> dict:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"name": path.stem, "path": str(path)}


def _rows(prefix: str, n: int = 30) -> list[dict]:
    return [{"prompt": f"{prefix} {i}?", "completion": f"{prefix}-{i}"} for i in range(n)]


@pytest.fixture
def two_tasks(tmp_path) -> list[dict]:
    return [
        _write(tmp_path / "alpha.jsonl", _rows("alpha")),
        _write(tmp_path / "beta.jsonl", _rows("beta")),
    ]


SPLIT = {"eval": 4, "calibration": 4, "train": 10, "validation": 2}


def test_unseen_datasets_are_loaded_as_unseen(tmp_path, two_tasks):
    gamma = _write(tmp_path / "gamma.jsonl", _rows("gamma"))
    cfg = DataConfig(datasets=two_tasks, unseen_datasets=[gamma], split=SPLIT)
    train, unseen = dataset_sources(cfg, None)
    assert [s.name for s in train] == ["alpha", "beta"]
    assert [s.name for s in unseen] == ["gamma"]
    mixture = load_mixture(cfg)
    assert mixture.names == ["alpha", "beta"]
    (u,) = mixture.unseen
    assert u.name == "gamma"
    assert u.splits == split_indices(30, "gamma", SplitConfig(**SPLIT))  # base 0, same splits
    assert len(u.examples("eval")) == 4
    assert len(mixture["alpha"].examples("validation")) == 2


def test_unseen_datasets_join_the_hash_picked_ones(tmp_path, two_tasks):
    more = [_write(tmp_path / f"t{i}.jsonl", _rows(f"t{i}")) for i in range(3)]
    gamma = _write(tmp_path / "gamma.jsonl", _rows("gamma"))
    cfg = DataConfig(datasets=two_tasks + more, unseen=1, unseen_datasets=[gamma], split=SPLIT)
    plain = DataConfig(datasets=two_tasks + more, unseen=1, split=SPLIT)
    train, unseen = dataset_sources(cfg, None)
    train0, (picked,) = dataset_sources(plain, None)
    assert [(s.name, s.path) for s in train] == [(s.name, s.path) for s in train0]
    assert sorted((s.name, s.path, s.format) for s in unseen) == sorted(
        [(picked.name, picked.path, picked.format), ("gamma", gamma["path"], "auto")]
    )


def test_unseen_name_clashing_with_a_bigbench_task_is_refused(tmp_path, two_tasks):
    bb = tmp_path / "bb"
    bb.mkdir()
    (bb / "gamma.json").write_text(
        json.dumps({"examples": [{"input": f"q{i}", "target": f"a{i}"} for i in range(30)]})
    )
    gamma = _write(tmp_path / "gamma.jsonl", _rows("gamma"))
    cfg = DataConfig(datasets=two_tasks, unseen_datasets=[gamma], split=SPLIT)
    with pytest.raises(DataError, match=r"^two datasets have the same name: gamma$"):
        dataset_sources(cfg, bb)


def test_identical_file_under_another_name_is_refused(tmp_path, two_tasks):
    copy = tmp_path / "copy" / "alpha_again.jsonl"
    copy.parent.mkdir()
    shutil.copy(two_tasks[0]["path"], copy)
    cfg = DataConfig(
        datasets=two_tasks,
        unseen_datasets=[{"name": "alpha_again", "path": str(copy)}],
        split=SPLIT,
    )
    with pytest.raises(DataError) as e:
        load_mixture(cfg)
    msg = str(e.value)
    assert msg.startswith("unseen tasks overlap the training tasks: ")
    assert "alpha_again" in msg and "alpha" in msg.replace("alpha_again", "") and "\n" not in msg
    assert "same file content" in msg


def test_one_shared_example_is_refused(tmp_path, two_tasks):
    # A different file (other examples, other order, re-serialised with other whitespace) that
    # contains a single example of beta.
    rows = _rows("gamma")
    rows.insert(
        7,
        {
            "messages": [
                {"role": "user", "content": "beta  17?"},
                {"role": "assistant", "content": "beta-17 "},
            ]
        },
    )
    gamma = _write(tmp_path / "gamma.jsonl", rows)
    cfg = DataConfig(datasets=two_tasks, unseen_datasets=[gamma], split=SPLIT)
    with pytest.raises(DataError) as e:
        load_mixture(cfg)
    assert str(e.value) == (
        "unseen tasks overlap the training tasks: gamma example 7 is also an example of beta"
    )


def test_distinct_datasets_are_not_an_overlap(tmp_path, two_tasks, mixture_specs):
    # Same prompts with other answers, and other prompts with the same answers, are new examples.
    near = [{"prompt": f"alpha {i}?", "completion": f"other-{i}"} for i in range(30)]
    near += [{"prompt": f"other {i}?", "completion": f"beta-{i}"} for i in range(30)]
    gamma = _write(tmp_path / "gamma.jsonl", near)
    mixture = load_mixture(DataConfig(datasets=two_tasks, unseen_datasets=[gamma], split=SPLIT))
    assert [u.name for u in mixture.unseen] == ["gamma"]
    # The shared planted mixture: every task distinct from the others.
    *train, last = mixture_specs
    mixture = load_mixture(DataConfig(datasets=train, unseen_datasets=[last], split=SPLIT))
    assert [u.name for u in mixture.unseen] == [last["name"]]


def _record(validation: int) -> DataRecord:
    def row(name: str) -> dict:
        splits = {"train": 10, "calibration": 4, "eval": 4, "base": 0, "validation": validation}
        return {"name": name, "format": "jsonl", "splits": splits, "train_tokens": 123}

    return DataRecord(
        settings={}, base_fingerprint="", datasets=[row("alpha"), row("beta")],
        unseen=[{"name": "gamma"}],
    )  # fmt: skip


def test_data_table_shows_validation_only_when_there_is_some():
    plain = data_table(_record(0))
    assert " val " not in plain
    assert plain.splitlines()[0] == (
        f"{'dataset':<48} {'format':<9} {'train':>6} {'calib':>6} {'eval':>6} {'base':>6} "
        f"{'tokens':>9}"
    )
    assert (
        plain.splitlines()[2] == f"{'alpha':<48} {'jsonl':<9} {10:>6} {4:>6} {4:>6} {0:>6} {123:>9}"
    )
    # A record written before validation existed has no "validation" count at all.
    old = _record(0)
    for r in old.datasets:
        del r["splits"]["validation"]
    assert data_table(old) == plain
    table = data_table(_record(2)).splitlines()
    assert table[0].split() == [
        "dataset",
        "format",
        "train",
        "val",
        "calib",
        "eval",
        "base",
        "tokens",
    ]
    assert table[2].split() == ["alpha", "jsonl", "10", "2", "4", "4", "0", "123"]
    assert table[-2].split() == ["total", "(2", "datasets)", "20", "4", "8", "8", "0", "246"]


def test_training_tasks_sharing_examples_with_a_picked_unseen_task_are_dropped(tmp_path):
    # Like BIG-bench's abstract_narrative_understanding__{4,9,99}_distractors: subtasks that
    # hold the same examples. merit picked the unseen one, so the leak is left out of training.
    tasks = [_write(tmp_path / f"t{i}.jsonl", _rows(f"t{i}")) for i in range(4)]
    cfg = DataConfig(datasets=tasks, unseen=1, split=SPLIT)
    (picked,) = load_mixture(cfg).unseen
    sibling = _write(tmp_path / "sibling.jsonl", _rows(picked.name)[::-1])  # same examples
    cfg = DataConfig(datasets=[*tasks, sibling], unseen=1, split=SPLIT)
    mixture = load_mixture(cfg)
    assert [u.name for u in mixture.unseen] == [picked.name]
    assert mixture.dropped == ["sibling"]
    assert "sibling" not in mixture.names and len(mixture.names) == 3
