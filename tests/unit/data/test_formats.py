"""Tests for merit.data.formats: dataset formats, record styles, BIG-bench formatting and selection."""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from merit.data.formats import (
    FORMATS,
    DataError,
    Example,
    bigbench_example,
    bigbench_task_files,
    detect_format,
    load_dataset,
)

# --------------------------------------------------------------------------- record styles

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}

# (records, expected examples) for each TRL record style.
STYLES: dict[str, tuple[list[dict[str, Any]], list[Example]]] = {
    "prompt_completion": (
        [
            {"prompt": "What is 2+2?", "completion": "4"},
            {"prompt": "Capital of France?", "completion": "Paris", "targets": ["Paris", "paris"]},
        ],
        [
            Example(messages=(USER,), answer="4", targets=("4",)),
            Example(
                messages=({"role": "user", "content": "Capital of France?"},),
                answer="Paris",
                targets=("Paris", "paris"),
            ),
        ],
    ),
    "conversational_prompt_completion": (
        [
            {"prompt": [SYSTEM, USER], "completion": [ASSISTANT]},
            {
                "prompt": [{"role": "user", "content": "Pick one"}],
                "completion": [{"role": "assistant", "content": "b"}],
                "choices": ["a", "b"],
            },
        ],
        [
            Example(messages=(SYSTEM, USER), answer="4", targets=("4",)),
            Example(
                messages=({"role": "user", "content": "Pick one"},),
                answer="b",
                choices=("a", "b"),
                targets=("b",),
            ),
        ],
    ),
    "messages": (
        [
            {"messages": [SYSTEM, USER, ASSISTANT]},
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Say yes"},
                    {"role": "assistant", "content": "yes"},
                ],
                "targets": "yes",
            },
        ],
        [
            Example(messages=(SYSTEM, USER), answer="4", targets=("4",)),
            Example(
                messages=(
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Say yes"},
                ),
                answer="yes",
                targets=("yes",),
                turns=True,  # its earlier assistant turn is an answer too (data.loss_on)
            ),
        ],
    ),
}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json_list(path: Path, records: list[Any]) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_json_data(path: Path, records: list[Any]) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps({"version": 1, "data": records}), encoding="utf-8")
    return path


def columns(records: list[Any]) -> dict[str, list[Any]]:
    """Records as columns; a key missing from a record becomes null, as Arrow stores it."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def write_parquet(path: Path, records: list[Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = path.with_suffix(".parquet")
    pq.write_table(pa.table(columns(records)), path)
    return path


def write_hf(path: Path, records: list[Any]) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns(records)).save_to_disk(str(path))
    return path


WRITERS: dict[str, tuple[str, Callable[[Path, list[Any]], Path]]] = {
    "jsonl": ("jsonl", write_jsonl),
    "json_list": ("json", write_json_list),
    "json_data": ("json", write_json_data),
    "parquet": ("parquet", write_parquet),
    "hf": ("hf", write_hf),
}


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_formats_and_record_styles(tmp_path: Path, writer: str, style: str) -> None:
    fmt, write = WRITERS[writer]
    records, expected = STYLES[style]
    path = write(tmp_path / "ds", records)
    assert detect_format(path) == fmt
    loaded = load_dataset("demo", path)
    assert (loaded.name, loaded.format, loaded.path) == ("demo", fmt, str(path))
    assert loaded.examples == expected
    assert loaded.output_regex is None and loaded.stop_string is None
    # An explicit format gives the same result as detection.
    assert load_dataset("demo", path, format=fmt).examples == expected


def test_arrow_formats_treat_missing_optional_columns_as_absent(tmp_path: Path) -> None:
    # Arrow fills a column missing from some rows with nulls; those rows must still load.
    records = [
        {"prompt": "Pick", "completion": "b", "choices": ["a", "b"]},
        {"prompt": "Say hi", "completion": "hi"},
    ]
    for write in (write_parquet, write_hf):
        loaded = load_dataset("x", write(tmp_path / write.__name__, records))
        assert loaded.examples[0].choices == ("a", "b")
        assert loaded.examples[1] == Example(
            messages=({"role": "user", "content": "Say hi"},), answer="hi", targets=("hi",)
        )


def test_hf_dataset_dict_uses_train_split(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "a", "completion": "train"}]),
            "test": datasets.Dataset.from_list([{"prompt": "a", "completion": "test"}]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert detect_format(tmp_path / "dd") == "hf"
    assert [e.answer for e in load_dataset("x", tmp_path / "dd").examples] == ["train"]


def test_gzipped_jsonl_and_json(tmp_path: Path) -> None:
    rec = {"prompt": "q", "completion": "a"}
    jl = tmp_path / "d.jsonl.gz"
    jl.write_bytes(gzip.compress((json.dumps(rec) + "\n").encode()))
    js = tmp_path / "d.json.gz"
    js.write_bytes(gzip.compress(json.dumps([rec]).encode()))
    assert detect_format(jl) == "jsonl" and detect_format(js) == "json"
    assert load_dataset("x", jl).examples == load_dataset("x", js).examples


def test_blank_jsonl_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n\n   \n{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:4: expected 'prompt' and 'completion'"):
        load_dataset("x", path)


# --------------------------------------------------------------------------- errors


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "foo.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    with pytest.raises(DataError) as err:
        load_dataset("x", path)
    assert str(err.value) == f"{path}:2: invalid JSON (Expecting ',' delimiter)"


def test_malformed_json_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "foo.json"
    path.write_text('[\n{"prompt": "a",\n "completion": }\n]')
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON \(Expecting value\)$"
    ):
        load_dataset("x", path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"question": "q", "answer": "a"},
            r"expected 'prompt' and 'completion' keys, a 'messages' key or Alpaca's 'instruction' "
            r"and 'output' \(got keys: answer, question\)",
        ),
        ({"prompt": "q"}, "expected 'prompt' and 'completion'"),
        ({"prompt": "q", "completion": ""}, "empty answer"),
        ({"prompt": "q", "completion": "  \n"}, "empty answer"),
        ({"messages": [USER, {"role": "assistant", "content": ""}]}, "empty answer"),
        ({"messages": [USER]}, "last of 'messages' must be an assistant message"),
        ({"messages": [ASSISTANT]}, "the prompt has no messages"),
        ({"messages": [USER, ASSISTANT, ASSISTANT]}, "must not end with an assistant message"),
        ({"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}, "message 0 has role 'bot'"),
        (
            {"messages": [USER, {"role": "assistant", "content": 4}]},
            "message 1 content must be a string",
        ),
        ({"messages": [USER, "4"]}, "message 1 must be an object"),
        ({"messages": "hi"}, "'messages' must be a string or a list of messages"),
        ({"prompt": [USER], "completion": [ASSISTANT, ASSISTANT]}, "exactly one assistant message"),
        ({"prompt": [USER], "completion": [USER]}, "exactly one assistant message"),
        ({"prompt": [], "completion": "a"}, "the prompt has no messages"),
        ({"prompt": "q", "completion": "a", "choices": "a"}, "'choices' must be a list of strings"),
        ({"prompt": "q", "completion": "a", "targets": [1]}, "'targets' must be a list of strings"),
        ({"prompt": "q", "completion": "c", "choices": ["a", "b"]}, "must be among 'choices'"),
        (["prompt", "completion"], "a record must be a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, record: Any, message: str) -> None:
    path = write_jsonl(tmp_path / "bad", [{"prompt": "ok", "completion": "ok"}, record])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: .*{message}"):
        load_dataset("x", path)


def test_bad_record_in_json_names_record_index(tmp_path: Path) -> None:
    path = write_json_list(tmp_path / "bad", [{"prompt": "a", "completion": "b"}, {"x": 1}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: record 1: expected 'prompt'"):
        load_dataset("x", path)


def test_no_usable_examples(tmp_path: Path) -> None:
    for path in (write_jsonl(tmp_path / "e", []), write_json_list(tmp_path / "e", [])):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no usable examples$"):
            load_dataset("x", path)


def test_json_object_without_a_single_record_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [], "train": []}))
    with pytest.raises(DataError, match="expected a list of records"):
        load_dataset("x", path)


def test_explicit_json_format_reads_examples_key(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"examples": [{"prompt": "q", "completion": "a"}]}))
    assert detect_format(path) == "bigbench"  # an "examples" list looks like a BIG-bench task
    assert load_dataset("x", path, format="json").examples[0].answer == "a"


def test_unknown_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(
        DataError,
        match=r"unknown format 'csv' \(known formats: jsonl, json, parquet, hf, bigbench, hub, alpaca\)",
    ):
        load_dataset("x", path, format="csv")
    text = tmp_path / "d.txt"
    text.write_text("hello")
    with pytest.raises(DataError) as err:
        detect_format(text)
    assert str(text) in str(err.value) and all(f in str(err.value) for f in FORMATS)
    with pytest.raises(DataError, match="cannot detect the dataset format"):
        load_dataset("x", tmp_path)  # a directory with no dataset markers


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for call in (
        lambda: detect_format(missing),
        lambda: load_dataset("x", missing),
        lambda: load_dataset("x", missing, "jsonl"),
    ):
        with pytest.raises(
            DataError, match=rf"^{re.escape(str(missing))}: no such file or directory$"
        ):
            call()


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet\n at all\n")
    with pytest.raises(DataError) as err:
        load_dataset("x", path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------- BIG-bench


def gen_task(**fields: Any) -> dict[str, Any]:
    return {
        "name": "tiny_gen",
        "examples": [
            {"input": "2 + 2", "target": "4"},
            {"input": 7, "target": ["seven", 7]},
        ],
        **fields,
    }


def mc_task(**fields: Any) -> dict[str, Any]:
    return {
        "name": "tiny_mc",
        "examples": [
            {
                "input": "Sky colour?",
                "target_scores": {"blue": 1, "green": 0, "red": 0, "black": 0},
            },
            {"input": "Pick both", "target_scores": {"x": 0.0, "y": 1.0, "z": 1.0}},
        ],
        **fields,
    }


def permuted(name: str, index: int, choices: list[str]) -> tuple[str, ...]:
    """The documented permutation: sorted choices shuffled by Random(f"{name}/{index}")."""
    order = sorted(choices)
    random.Random(f"{name}/{index}").shuffle(order)
    return tuple(order)


def prompt(example: Example) -> str:
    assert len(example.messages) == 1 and example.messages[0]["role"] == "user"
    return example.messages[0]["content"]


def test_bigbench_generative_default_prefixes() -> None:
    task = gen_task()
    first = bigbench_example(task, task["examples"][0], 0)
    assert prompt(first) == "\nQ: 2 + 2\nA: "
    assert (first.answer, first.choices, first.targets) == ("4", (), ("4",))
    second = bigbench_example(task, task["examples"][1], 1)  # numbers are coerced to text
    assert prompt(second) == "\nQ: 7\nA: "
    assert (second.answer, second.targets) == ("seven", ("seven", "7"))


def test_bigbench_generative_custom_prefixes() -> None:
    task = gen_task(
        task_prefix="Add the numbers.\n",
        example_input_prefix="Problem: ",
        example_output_prefix="\nSum: ",
        prefix="ignored-by-bigbench:",
    )
    ex = bigbench_example(task, task["examples"][0], 0)
    assert prompt(ex) == "Add the numbers.\nProblem: 2 + 2\nSum: "


def test_bigbench_multiple_choice_default_prefixes() -> None:
    task = mc_task()
    ex = bigbench_example(task, task["examples"][0], 0)
    order = permuted("tiny_mc", 0, ["blue", "green", "red", "black"])
    assert ex.choices == order
    assert prompt(ex) == "\nQ: Sky colour?" + "".join(f"\n  choice: {c}" for c in order) + "\nA: "
    assert (ex.answer, ex.targets) == ("blue", ("blue",))
    tie = bigbench_example(task, task["examples"][1], 1)
    assert tie.targets == ("y", "z") and tie.answer == "y"


def test_bigbench_multiple_choice_custom_prefixes() -> None:
    task = mc_task(
        task_prefix="Answer the question.",
        example_input_prefix="\nQuestion: ",
        example_output_prefix="\nAnswer: ",
        choice_prefix="\n - ",
    )
    ex = bigbench_example(task, task["examples"][0], 0)
    a, b, c, d = permuted("tiny_mc", 0, ["blue", "green", "red", "black"])
    assert (
        prompt(ex)
        == f"Answer the question.\nQuestion: Sky colour?\n - {a}\n - {b}\n - {c}\n - {d}\nAnswer: "
    )
    hidden = mc_task(append_choices_to_input=False)
    ex = bigbench_example(hidden, hidden["examples"][0], 0)
    assert prompt(ex) == "\nQ: Sky colour?\nA: "
    assert ex.choices == (a, b, c, d)  # still scored over the same presentation order


def test_bigbench_permutation_is_deterministic_and_order_free() -> None:
    choices = [f"option {i}" for i in range(8)]
    task = {"name": "perm", "examples": []}
    rec = {"input": "?", "target_scores": {c: int(c == "option 3") for c in choices}}
    rev = {"input": "?", "target_scores": dict(reversed(rec["target_scores"].items()))}
    first = bigbench_example(task, rec, 5)
    assert first.choices == bigbench_example(task, rec, 5).choices  # same call, same order
    assert first.choices == bigbench_example(task, rev, 5).choices  # key order does not matter
    assert sorted(first.choices) == sorted(choices)
    orders = {bigbench_example(task, rec, i).choices for i in range(20)}
    assert len(orders) > 10  # permuted per example, not once per task
    other = {"name": "other", "examples": []}
    assert [bigbench_example(other, rec, i).choices for i in range(20)] != [
        bigbench_example(task, rec, i).choices for i in range(20)
    ]


def test_bigbench_target_and_target_scores() -> None:
    task = {"name": "arith", "examples": []}
    # Arithmetic style: "target" is one of the choices but not the first max-score one.
    rec = {"input": "1+1", "target": "2", "target_scores": {"two": 1, "2": 1, "3": 0}}
    ex = bigbench_example(task, rec, 0)
    assert (ex.answer, set(ex.choices), ex.targets) == ("2", {"two", "2", "3"}, ("two", "2"))
    # StrategyQA style: "target" is an explanation, not a choice -> the best choice is the answer.
    rec = {"input": "Is it?", "target": "Yes. Because.", "target_scores": {"Yes": 1, "No": 0}}
    ex = bigbench_example(task, rec, 0)
    assert (ex.answer, ex.targets) == ("Yes", ("Yes",))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"target": "a"}, "needs an 'input'"),
        ({"input": "a"}, "needs 'target' or 'target_scores'"),
        ({"input": "a", "target_scores": {}}, "'target_scores' must be a non-empty object"),
        ({"input": "a", "target_scores": {"x": "high"}}, "values must be numbers"),
    ],
)
def test_bigbench_malformed_examples(record: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=f"example 3: .*{message}"):
        bigbench_example({"name": "t"}, record, 3)


def test_bigbench_examples_without_answer_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = gen_task()
    task["examples"] += [
        {"input": "x", "target": [""]},
        {"input": "y", "target_scores": {"a": 0, "b": 0}},
        {"input": "z", "target_scores": {"": 1, "b": 0}},
    ]
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    with caplog.at_level(logging.WARNING, logger="merit.data.formats"):
        loaded = load_dataset("t", path)
    assert [e.answer for e in loaded.examples] == ["4", "seven"]
    assert "skipped 3 example(s)" in caplog.text and "2, 3, 4" in caplog.text
    task["examples"] = task["examples"][2:]
    path.write_text(json.dumps(task))
    with pytest.raises(DataError, match="no usable examples"):
        load_dataset("t", path)


def test_bigbench_malformed_example_in_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "task.json"
    path.write_text(
        json.dumps({"name": "t", "examples": [{"input": "q", "target": "a"}, {"input": "q"}]})
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: example 1: "):
        load_dataset("t", path)


def test_bigbench_files_and_dirs(tmp_path: Path) -> None:
    task = gen_task(output_regex=r"\d+", stop_string="\n")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(task))
    packed = tmp_path / "packed.json.gz"
    packed.write_bytes(gzip.compress(json.dumps(task).encode()))
    json_dir = tmp_path / "json_dir"
    json_dir.mkdir()
    (json_dir / "task.json").write_text(json.dumps(task))
    gz_dir = tmp_path / "gz_dir"
    gz_dir.mkdir()
    (gz_dir / "task.json.gz").write_bytes(gzip.compress(json.dumps(task).encode()))
    results = []
    for path in (plain, packed, json_dir, gz_dir):
        assert detect_format(path) == "bigbench"
        loaded = load_dataset("tiny", path)
        assert (loaded.format, loaded.path) == ("bigbench", str(path))
        assert (loaded.output_regex, loaded.stop_string) == (r"\d+", "\n")
        results.append(loaded.examples)
    assert all(r == results[0] for r in results) and len(results[0]) == 2
    container = tmp_path / "container"
    container.mkdir()
    (container / "task.json").write_text(json.dumps({"name": "c", "subtasks": []}))
    with pytest.raises(DataError, match="not a BIG-bench task"):
        load_dataset("c", container)


def test_bigbench_task_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no BIG-bench task files"):
        bigbench_task_files(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        bigbench_task_files(tmp_path / "missing")
    for name in ("b.json.gz", "a.json", "notes.txt"):
        (tmp_path / name).write_text("{}")
    for sub, name in (("c", "task.json"), ("d", "task.json.gz"), ("e", "other.json")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_text("{}")
    expected = ["a.json", "b.json.gz", "c/task.json", "d/task.json.gz"]
    assert [p.relative_to(tmp_path).as_posix() for p in bigbench_task_files(tmp_path)] == expected
