"""``merit data`` on real mixtures' shapes: an example over the token budget is dropped and
counted, refused with its dataset and line, or truncated, never cut without a word; a
multi-turn dataset's N_k counts every assistant turn, and calibration reads what training
reads; an unreachable hub dataset stops the run in one line before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_run_config
from merit.artifacts import read_json
from merit.cli import main
from merit.lm import IGNORE

LONG = "word " * 150  # far over the tiny runs' 96 tokens


def _specs(tmp_path: Path, mixture_specs) -> list[dict]:
    """The tiny mixture with a chat dataset whose lines 3 and 7 are over the budget."""
    rows = []
    for i in range(40):
        user = LONG if i in (2, 6) else f"Copy: apple {i}"
        rows.append({"messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": user},
            {"role": "assistant", "content": f"apple {i}"},
        ]})  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [*mixture_specs[:3], {"name": "chat", "path": str(path)}]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "merit.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def chat_config(tmp_path_factory, mixture_specs, tiny_base) -> Path:
    tmp = tmp_path_factory.mktemp("chat")
    # Every example in some split: eval 6, calibration 8, the rest trained on.
    data = {"split": {"eval": 6, "calibration": 8}}
    return write_run_config(tmp / "run.yaml", tmp / "run", _specs(tmp, mixture_specs),
                            tiny_base, data=data)  # fmt: skip


def test_overlong_examples_are_dropped_and_counted(chat_config, capsys):
    assert main(["data", str(chat_config)]) == 0
    out = capsys.readouterr().out
    assert "2 example(s) over model.max_length=96 tokens, dropped (data.overlong=drop)" in out
    rec = read_json(Path(chat_config).parent / "run" / "data.json")
    chat = next(r for r in rec["datasets"] if r["name"] == "chat")
    assert sum(chat["overlong"]["splits"].values()) == 2
    assert sum(chat["splits"].values()) == 38  # both gone from whatever split held them
    others = [r for r in rec["datasets"] if r["name"] != "chat"]
    assert not any("overlong" in r for r in others)
    # Each stage leaves the process's peak memory so far: what sets a run's peak is findable.
    peak = read_json(Path(chat_config).parent / "run" / "timings.json")["peak_rss_gb"]["data"]
    assert 0.05 < peak["process"] < 64


def test_overlong_error_names_the_dataset_and_line(chat_config, tmp_path):
    res = _cli("data", str(chat_config), "data.overlong=error", f"run_dir={tmp_path / 'r'}")
    err = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in err, err
    assert "chat:" in err and ("chat.jsonl:3:" in err or "chat.jsonl:7:" in err), err
    assert not (tmp_path / "r").exists()


def test_truncate_keeps_every_example_cut_to_the_budget(chat_config, tmp_path):
    from merit.config import load_config
    from merit.context import open_context
    from merit.run import Run

    cfg = load_config(chat_config, ["data.overlong=truncate", f"run_dir={tmp_path / 'r'}"])
    ctx = open_context(Run(cfg))
    chat = ctx.mixture["chat"]
    assert sum(len(v) for k, v in chat.splits.items()) == 40
    assert sum(chat.overlong.values()) == 2
    lengths = [len(e.input_ids) for split in ("train", "calibration")
               for e in ctx.encoded(split)["chat"]]  # fmt: skip
    assert max(lengths) == 96


def _answer_runs(enc) -> int:
    marks = [label != IGNORE for label in enc.labels]
    return sum(1 for i, m in enumerate(marks) if m and (i == 0 or not marks[i - 1]))


@pytest.mark.parametrize(("loss_on", "runs"), [("all_assistant", 2), ("final", 1)])
def test_calibration_trains_what_training_trains(chat_config, tmp_path, loss_on, runs):
    from merit.config import load_config
    from merit.context import open_context
    from merit.run import Run

    cfg = load_config(chat_config, [f"data.loss_on={loss_on}", f"run_dir={tmp_path / 'r'}"])
    ctx = open_context(Run(cfg))
    for split in ("calibration", "train"):
        assert {_answer_runs(e) for e in ctx.encoded(split)["chat"]} == {runs}
        assert {_answer_runs(e) for e in ctx.encoded(split)["copy_words"]} == {1}


def test_n_k_counts_every_assistant_turn(chat_config, tmp_path, capsys):
    tokens = {}
    for loss_on in ("final", "all_assistant"):
        run = tmp_path / loss_on
        assert main(["data", str(chat_config), f"data.loss_on={loss_on}", f"run_dir={run}"]) == 0
        rec = read_json(run / "data.json")
        tokens[loss_on] = {r["name"]: r["train_answer_tokens"] for r in rec["datasets"]}
    assert tokens["all_assistant"]["chat"] > tokens["final"]["chat"]
    assert tokens["all_assistant"]["copy_words"] == tokens["final"]["copy_words"]


def test_an_unreachable_hub_dataset_writes_nothing(tmp_path, mixture_specs, tiny_base):
    specs = [*mixture_specs[:2], {"name": "hub", "path": "nobody-here/no-such-dataset"}]
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", specs, tiny_base)
    res = _cli("data", str(cfg))
    err = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in err, err
    assert "nobody-here/no-such-dataset" in err
    assert not (tmp_path / "run").exists()


def test_a_dataset_with_nothing_under_the_budget_is_left_out(tmp_path, mixture_specs, tiny_base):
    rows = [{"prompt": f"{LONG} {i}", "completion": "yes"} for i in range(30)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [*mixture_specs[:3], {"name": "long", "path": str(path)}]
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", specs, tiny_base)
    assert main(["data", str(cfg)]) == 0
    rec = read_json(tmp_path / "run" / "data.json")
    assert rec["too_long"] == ["long"]
    assert [r["name"] for r in rec["datasets"]] == sorted(s["name"] for s in mixture_specs[:3])
