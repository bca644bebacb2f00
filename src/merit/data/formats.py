"""Load instruction datasets into one in-memory form: a list of :class:`Example`.

Supported inputs (``FORMATS``):

* ``jsonl`` — one record per line (``.jsonl``; ``.jsonl.gz`` is read too).
* ``json`` — a top-level list of records, or an object holding exactly one list under
  ``"data"``, ``"examples"`` or ``"train"`` (``.json`` or ``.json.gz``).
* ``parquet`` — one record per row.
* ``hf`` — a directory written by ``datasets.Dataset.save_to_disk`` (a saved
  ``DatasetDict`` works too: its ``train`` split, or its only split, is used).
* ``bigbench`` — a BIG-bench ``task.json`` / ``task.json.gz`` file or a directory holding one.

Records of the first four formats follow one of TRL's two dataset styles:

* prompt/completion: ``prompt`` is a string (it becomes one user message) or a list of
  ``{"role", "content"}`` messages; ``completion`` is a string (the answer) or a list with
  exactly one assistant message whose content is the answer.
* ``messages``: a list of ``{"role", "content"}`` messages whose last message is from the
  assistant; that message is the answer and everything before it is the prompt. Earlier
  assistant turns are kept as context only: training puts loss on the final answer alone.

If a record has both styles, ``prompt``/``completion`` wins (datasets such as UltraChat
carry a bare ``prompt`` column next to ``messages``; without ``completion`` the record is
read as ``messages``). Optional keys ``choices`` (list of strings) and ``targets`` (a string
or a list of strings) pass through to :class:`Example`; without ``targets`` the answer is
the only target. Loading is strict: a bad record raises :class:`DataError` naming the file
and line (JSONL, 1-based) or record (other formats, 0-based index).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merit.artifacts import sha256_file

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "parquet", "hf", "bigbench")

_ROLES = ("system", "user", "assistant")
_JSON_LIST_KEYS = ("data", "examples", "train")

# BIG-bench's own zero-shot defaults (bigbench/api/json_task.py).
_BB_INPUT_PREFIX = "\nQ: "
_BB_OUTPUT_PREFIX = "\nA: "
_BB_CHOICE_PREFIX = "\n  choice: "

# Selection rule for the BIG-bench mixture (see /work/shared/data/README.md).
_BB_VERSION = "1.0.0"
_BB_MIN_EXAMPLES = 250
_BB_MAX_MEDIAN_INPUT_CHARS = 600
_BB_MAX_EXAMPLES = 1000
_BB_TASKS_MARKER = "bigbench/benchmark_tasks/"
_PYPI_URLS = (
    f"https://pypi.org/pypi/bigbench/{_BB_VERSION}/json",
    # The per-version endpoint is not reachable everywhere (some mirrors and proxies
    # answer 404); the project endpoint lists the same files under "releases".
    "https://pypi.org/pypi/bigbench/json",
)


class DataError(ValueError):
    """Bad input data; the message is one line and names the file (and line/record number where it applies)."""


class _NoAnswer(DataError):
    """A BIG-bench example without any usable reference answer (skipped with a warning)."""


@dataclass(frozen=True)
class Example:
    """One training/evaluation example.

    Attributes:
        messages: the conversation before the answer: dicts with "role" and "content";
            at least one message, and the last one is not from the assistant.
        answer: the reference assistant answer (training target; loss is on its tokens only).
        choices: multiple-choice options in presentation order; ``()`` for generative examples.
        targets: acceptable answers: for multiple choice the correct choice(s), for generative
            examples all accepted strings (the answer included).
    """

    messages: tuple[dict[str, str], ...]
    answer: str
    choices: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()


@dataclass
class LoadedDataset:
    """A dataset loaded into memory, with where it came from."""

    name: str
    format: str  # one of FORMATS
    path: str
    examples: list[Example]
    output_regex: str | None = None  # BIG-bench post-processing of generations, else None
    stop_string: str | None = None


# --------------------------------------------------------------------------- detection


def _known_formats() -> str:
    return ", ".join(FORMATS)


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped for ``*.gz``."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if _is_gz(path) else data
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _parse_json_file(path: Path) -> Any:
    try:
        return json.loads(_read_bytes(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from e


def _is_bigbench_task(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("examples"), list)


def _bigbench_task_file(folder: Path) -> Path | None:
    for name in ("task.json", "task.json.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _detect(path: Path) -> tuple[str, Any]:
    """Detect the format of ``path``; for JSON files also return the parsed content.

    Returning the parsed JSON lets :func:`load_dataset` avoid parsing a file twice.
    """
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    name = path.name.lower()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "hf", None
        if (path / "dataset_dict.json").is_file():
            return "hf", None
        if _bigbench_task_file(path) is not None:
            return "bigbench", None
    elif name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl", None
    elif name.endswith(".parquet"):
        return "parquet", None
    elif name.endswith((".json", ".json.gz")):
        obj = _parse_json_file(path)
        return ("bigbench" if _is_bigbench_task(obj) else "json"), obj
    raise DataError(
        f"{path}: cannot detect the dataset format (known formats: {_known_formats()}; "
        "expected a .jsonl, .json, .json.gz or .parquet file, a datasets save_to_disk "
        "directory or a BIG-bench task directory)"
    )


def detect_format(path: str | Path) -> str:
    """Return the format of ``path``: one of :data:`FORMATS`.

    ``.jsonl`` -> jsonl, ``.parquet`` -> parquet; ``.json``/``.json.gz`` -> bigbench when the
    top-level object has an ``examples`` list (a BIG-bench task.json), else json; a
    ``save_to_disk`` directory -> hf; a directory with ``task.json(.gz)`` -> bigbench.

    Raises:
        DataError: the path does not exist or its format is not recognised.
    """
    return _detect(Path(path))[0]


# --------------------------------------------------------------------------- records


def _message(msg: Any, where: str, i: int) -> dict[str, str]:
    if not isinstance(msg, dict):
        raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
    role, content = msg.get("role"), msg.get("content")
    if role not in _ROLES:
        raise DataError(
            f"{where}: message {i} has role {role!r} (expected one of {', '.join(_ROLES)})"
        )
    if not isinstance(content, str):
        raise DataError(
            f"{where}: message {i} content must be a string, got {type(content).__name__}"
        )
    # Keep only role/content: Arrow-backed formats add null columns for optional keys.
    return {"role": role, "content": content}


def _messages(value: Any, key: str, where: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: '{key}' must be a string or a list of messages")
    return [_message(m, where, i) for i, m in enumerate(value)]


def _check_prompt(prompt: list[dict[str, str]], where: str) -> tuple[dict[str, str], ...]:
    if not prompt:
        raise DataError(f"{where}: the prompt has no messages")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt must not end with an assistant message")
    return tuple(prompt)


def _check_answer(answer: str, where: str) -> str:
    if not answer.strip():
        raise DataError(f"{where}: empty answer")
    return answer


def _string_list(value: Any, key: str, where: str, allow_str: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        if allow_str:
            return (value,)
        raise DataError(f"{where}: '{key}' must be a list of strings")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: '{key}' must be a list of strings")
    return tuple(value)


def _record_to_example(record: Any, where: str) -> Example:
    """Convert one TRL-style record (prompt/completion or messages) to an :class:`Example`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    prompt, completion = record.get("prompt"), record.get("completion")
    if prompt is not None and completion is not None:
        if isinstance(prompt, str):
            messages: tuple[dict[str, str], ...] = ({"role": "user", "content": prompt},)
        else:
            messages = _check_prompt(_messages(prompt, "prompt", where), where)
        if isinstance(completion, str):
            answer = completion
        else:
            turns = _messages(completion, "completion", where)
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise DataError(f"{where}: 'completion' must be exactly one assistant message")
            answer = turns[0]["content"]
    elif record.get("messages") is not None:
        turns = _messages(record["messages"], "messages", where)
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last of 'messages' must be an assistant message (the answer)"
            )
        answer = turns[-1]["content"]
        messages = _check_prompt(turns[:-1], where)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{where}: expected 'prompt' and 'completion' keys or a 'messages' key (got keys: {keys})"
        )
    _check_answer(answer, where)
    choices = _string_list(record.get("choices"), "choices", where, allow_str=False)
    targets = _string_list(record.get("targets"), "targets", where, allow_str=True) or (answer,)
    if choices and not set(targets) <= set(choices):
        raise DataError(f"{where}: 'targets' (or the answer) must be among 'choices'")
    return Example(messages=messages, answer=answer, choices=choices, targets=targets)


def _examples_from_records(records: Iterable[tuple[str, Any]]) -> list[Example]:
    return [_record_to_example(record, where) for where, record in records]


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        yield f"{path}:{lineno}", record


def _indexed(path: Path, rows: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows):
        yield f"{path}: record {i}", row


def _json_records(path: Path, obj: Any) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        lists = [k for k in _JSON_LIST_KEYS if isinstance(obj.get(k), list)]
        if len(lists) == 1:
            return obj[lists[0]]
    raise DataError(
        f"{path}: expected a list of records, or an object with one list under "
        f"{', '.join(repr(k) for k in _JSON_LIST_KEYS)}"
    )


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa  # lazy: pyarrow is heavy and only needed here
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from e


def _hf_rows(path: Path) -> list[dict[str, Any]]:
    import datasets  # lazy: importing datasets takes about a second

    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: cannot load a saved datasets directory ({str(e).splitlines()[0]})"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})"
            )
    return ds.to_list()


# --------------------------------------------------------------------------- BIG-bench


def _as_str(value: Any) -> str:
    # Some task files store numbers (e.g. arithmetic targets); prompts and answers are text.
    return value if isinstance(value, str) else str(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


@dataclass(frozen=True)
class _BigBenchFormat:
    """How one task formats its prompts; built once per task so loading stays fast."""

    name: str
    task_prefix: str
    input_prefix: str
    output_prefix: str
    choice_prefix: str
    append_choices: bool

    @classmethod
    def of(cls, task: dict) -> _BigBenchFormat:
        return cls(
            name=_as_str(task.get("name", "")),
            task_prefix=_as_str(task.get("task_prefix", "")),
            input_prefix=_as_str(task.get("example_input_prefix", _BB_INPUT_PREFIX)),
            output_prefix=_as_str(task.get("example_output_prefix", _BB_OUTPUT_PREFIX)),
            choice_prefix=_as_str(task.get("choice_prefix", _BB_CHOICE_PREFIX)),
            append_choices=_as_bool(task.get("append_choices_to_input", True)),
        )


def bigbench_example(task: dict, record: dict, index: int) -> Example:
    """Format one BIG-bench example as :class:`Example`, as BIG-bench formats it zero-shot.

    The prompt (one user message) is ``task_prefix + input_prefix + input`` followed, for a
    multiple-choice example with ``append_choices_to_input``, by
    ``choice_prefix + choice_prefix.join(choices)``, and then ``output_prefix``. Prefixes
    default to ``"\\nQ: "``, ``"\\nA: "`` and ``"\\n  choice: "`` and are overridden by the
    task's ``example_input_prefix``, ``example_output_prefix`` and ``choice_prefix``.

    Multiple choice (``target_scores``): like BIG-bench, the sorted choices are permuted,
    here with ``random.Random(f"{task['name']}/{index}")`` so the order is reproducible.
    ``targets`` are the choices with the maximal score (in ``target_scores`` order); the
    answer is the example's ``target`` when it is one of the choices, else the first target.
    Generative (``target``: a string or a list): the answer is the first non-empty target and
    ``targets`` are all non-empty targets.

    As in BIG-bench 1.0.0's ``json_task.py``, a task's legacy ``prefix`` field is ignored (it
    is not a prompt prefix: bbq_lite_json stores ``"bbq-lite-json:"`` there). Unlike
    BIG-bench, duplicate examples are not dropped, so indices match the task file.

    Raises:
        DataError: the record is malformed or has no usable answer; the message names the
            example index but not the file (callers add it).
    """
    return _format_bigbench(_BigBenchFormat.of(task), record, index)


def _format_bigbench(fmt: _BigBenchFormat, record: Any, index: int) -> Example:
    """:func:`bigbench_example` with the task's format already resolved."""
    where = f"example {index}"
    if not isinstance(record, dict) or "input" not in record:
        raise DataError(f"{where}: a BIG-bench example needs an 'input'")
    scores, target = record.get("target_scores"), record.get("target")
    if scores is None and target is None:
        raise DataError(f"{where}: a BIG-bench example needs 'target' or 'target_scores'")

    given: list[str] = []  # the example's "target" strings, in order
    if target is not None:
        given = [_as_str(t) for t in target] if isinstance(target, list) else [_as_str(target)]

    choices: tuple[str, ...] = ()
    if scores is not None:
        if not isinstance(scores, dict) or not scores:
            raise DataError(f"{where}: 'target_scores' must be a non-empty object")
        try:
            numeric = {_as_str(c): float(s) for c, s in scores.items()}
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: 'target_scores' values must be numbers") from e
        order = sorted(numeric)
        random.Random(f"{fmt.name}/{index}").shuffle(order)
        choices = tuple(order)
        best = max(numeric.values())
        if len(numeric) > 1 and best <= min(numeric.values()):
            raise _NoAnswer(f"{where}: no choice scores higher than the others")
        targets = tuple(c for c, s in numeric.items() if s == best and c.strip())
        answer = next(
            (t for t in given if t in numeric and t.strip()), targets[0] if targets else ""
        )
    else:
        targets = tuple(t for t in given if t.strip())
        answer = targets[0] if targets else ""
    if not answer:
        raise _NoAnswer(f"{where}: empty target")

    prompt = fmt.task_prefix + fmt.input_prefix + _as_str(record["input"])
    if choices and fmt.append_choices:
        prompt += fmt.choice_prefix + fmt.choice_prefix.join(choices)
    prompt += fmt.output_prefix
    return Example(
        messages=({"role": "user", "content": prompt},),
        answer=answer,
        choices=choices,
        targets=targets,
    )


def _load_bigbench(name: str, path: Path, task: Any) -> LoadedDataset:
    if path.is_dir():
        task_file = _bigbench_task_file(path)
        if task_file is None:
            raise DataError(f"{path}: no task.json or task.json.gz in this directory")
        path_read = task_file
    else:
        path_read = path
    if task is None:
        task = _parse_json_file(path_read)
    if not _is_bigbench_task(task):
        raise DataError(f"{path_read}: not a BIG-bench task (no 'examples' list)")
    fmt = _BigBenchFormat.of(task)
    examples: list[Example] = []
    skipped: list[int] = []
    for i, record in enumerate(task["examples"]):
        try:
            examples.append(_format_bigbench(fmt, record, i))
        except _NoAnswer:
            # Upstream BIG-bench data has a few examples without a usable answer (e.g. an
            # empty target); users cannot fix those, so skip them instead of failing the task.
            skipped.append(i)
        except DataError as e:
            raise DataError(f"{path_read}: {e}") from e
    if skipped:
        logger.warning(
            "%s: skipped %d example(s) without a usable answer (indices %s)",
            path_read,
            len(skipped),
            ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else ""),
        )
    regex, stop = task.get("output_regex"), task.get("stop_string")
    return LoadedDataset(
        name=name,
        format="bigbench",
        path=str(path),
        examples=examples,
        output_regex=None if regex is None else _as_str(regex),
        stop_string=None if stop is None else _as_str(stop),
    )


def bigbench_task_files(folder: str | Path) -> list[Path]:
    """Sorted BIG-bench task files in ``folder``: ``*.json.gz``, ``*.json`` and ``*/task.json(.gz)``.

    Raises:
        DataError: the folder does not exist or holds no task files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory")
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.lower().endswith((".json", ".json.gz"))
    ]
    files += [f for sub in folder.iterdir() if sub.is_dir() and (f := _bigbench_task_file(sub))]
    if not files:
        raise DataError(f"{folder}: no BIG-bench task files (*.json, *.json.gz, */task.json)")
    return sorted(files)


# --------------------------------------------------------------------------- loading


def load_dataset(name: str, path: str | Path, format: str = "auto") -> LoadedDataset:
    """Load a dataset file or directory into memory.

    Args:
        name: the dataset's name (kept in the result; not used to find the data).
        path: a file or directory in one of :data:`FORMATS`.
        format: one of :data:`FORMATS`, or ``"auto"`` to use :func:`detect_format`.

    Raises:
        DataError: unknown format, missing path, malformed data, or no usable examples.
    """
    path = Path(path)
    parsed: Any = None
    if format == "auto":
        format, parsed = _detect(path)
    elif format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r} (known formats: {_known_formats()})")
    elif not path.exists():
        raise DataError(f"{path}: no such file or directory")

    if format == "bigbench":
        loaded = _load_bigbench(name, path, parsed)
    else:
        if format == "jsonl":
            records: Iterable[tuple[str, Any]] = _jsonl_records(path)
        elif format == "json":
            obj = parsed if parsed is not None else _parse_json_file(path)
            records = _indexed(path, _json_records(path, obj))
        elif format == "parquet":
            records = _indexed(path, _parquet_rows(path))
        else:
            records = _indexed(path, _hf_rows(path))
        loaded = LoadedDataset(
            name=name, format=format, path=str(path), examples=_examples_from_records(records)
        )
    if not loaded.examples:
        raise DataError(f"{path}: no usable examples")
    return loaded


# --------------------------------------------------------------------------- BIG-bench download


def _task_rel(path: str) -> str:
    """``.../bigbench/benchmark_tasks/arithmetic/2_digit_addition/task.json`` -> ``arithmetic/2_digit_addition``."""
    p = path.replace("\\", "/")
    i = p.find(_BB_TASKS_MARKER)
    if i >= 0:
        p = p[i + len(_BB_TASKS_MARKER) :]
    elif p.startswith("benchmark_tasks/"):
        p = p[len("benchmark_tasks/") :]
    return p.removesuffix("/task.json")


def _leaf_rels(rels: Iterable[str]) -> set[str]:
    """Task dirs with no other task dir below them (a family with subtasks is not a leaf)."""
    rels = set(rels)
    parents = {r.rsplit("/", k)[0] for r in rels for k in range(1, r.count("/") + 1)}
    return rels - parents


def _select_task(rel: str, task: Any) -> dict | None:
    """Apply the size/length rule to one task; cap it at 1000 examples. ``None`` if not selected."""
    if not _is_bigbench_task(task):
        return None
    examples = task["examples"]
    if len(examples) < _BB_MIN_EXAMPLES:
        return None
    lengths = [len(_as_str(e.get("input", ""))) if isinstance(e, dict) else 0 for e in examples]
    if statistics.median(lengths) > _BB_MAX_MEDIAN_INPUT_CHARS:
        return None
    if len(examples) > _BB_MAX_EXAMPLES:
        # Seeded by the task's path ("family/subtask"): this reproduces the shared files.
        keep = sorted(random.Random(rel).sample(range(len(examples)), _BB_MAX_EXAMPLES))
        task = {**task, "examples": [examples[i] for i in keep]}
    return task


def _output_name(path: str) -> str:
    """File name for a selected task: ``FAMILY__SUBTASK.json.gz`` or ``TASK.json.gz``."""
    return _task_rel(path).replace("/", "__") + ".json.gz"


def select_bigbench_tasks(members: dict[str, dict]) -> dict[str, dict]:
    """Choose the BIG-bench tasks of the mixture, a pure function of the parsed task files.

    Args:
        members: task path (``.../benchmark_tasks/FAMILY[/SUBTASK]/task.json``) -> parsed task.

    Returns:
        The selected paths (sorted) -> task, capped at 1000 examples. A task is selected when
        it is a leaf (no task.json below its directory), has at least 250 examples, and the
        median length of its examples' ``input`` is at most 600 characters. A task with more
        than 1000 examples keeps ``sorted(random.Random("FAMILY/SUBTASK").sample(range(n), 1000))``.
        Input tasks are not modified.
    """
    rel_of = {path: _task_rel(path) for path in members}
    leaves = _leaf_rels(rel_of.values())
    selected: dict[str, dict] = {}
    for path in sorted(members):
        if (
            rel_of[path] in leaves
            and (task := _select_task(rel_of[path], members[path])) is not None
        ):
            selected[path] = task
    return selected


def _pypi_sdist() -> tuple[str, str, int]:
    """URL, sha256 and size of the bigbench sdist, from PyPI's JSON API."""
    last_error: Exception | None = None
    for url in _PYPI_URLS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                meta = json.load(response)
        except urllib.error.HTTPError as e:
            last_error = e
            continue
        files = meta.get("urls") if url.endswith(f"/{_BB_VERSION}/json") else None
        files = files or meta.get("releases", {}).get(_BB_VERSION, [])
        for f in files:
            if f.get("packagetype") == "sdist":
                return f["url"], f["digests"]["sha256"], int(f.get("size") or 0)
        last_error = DataError(f"{url}: no sdist for bigbench {_BB_VERSION}")
    raise OSError(f"cannot find the bigbench {_BB_VERSION} sdist on PyPI ({last_error})")


def _download_sdist(cache_dir: Path) -> Path:
    """Download (or reuse) ``cache_dir/bigbench-1.0.0.tar.gz``, verified against PyPI's sha256."""
    from tqdm.auto import tqdm

    url, sha256, size = _pypi_sdist()
    target = cache_dir / url.rsplit("/", 1)[-1]
    if target.is_file() and sha256_file(target) == sha256:
        return target
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            partial.open("wb") as out,
            tqdm(total=size or None, unit="B", unit_scale=True, desc=target.name) as bar,
        ):
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
                bar.update(len(block))
    except BaseException:
        partial.unlink(missing_ok=True)  # an interrupted download is useless
        raise
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise DataError(f"{url}: sha256 mismatch (expected {sha256}, got {digest.hexdigest()})")
    partial.replace(target)
    return target


def _write_task(path: Path, task: dict) -> None:
    # mtime=0 keeps the output byte-for-byte reproducible.
    with path.open("wb") as raw, gzip.GzipFile(path.name, "wb", fileobj=raw, mtime=0) as gz:
        gz.write(json.dumps(task, ensure_ascii=False).encode("utf-8"))


def _extract_bigbench(tarball: Path, dest: Path) -> int:
    """Write the selected tasks of a bigbench sdist into ``dest``; return how many.

    The archive is read in one streaming pass, one task at a time, because the sdist holds
    about 1.7 GB of task JSON: each task is selected, capped and written as soon as it is
    parsed. The leaf rule needs every task path, so non-leaf files are removed at the end.
    """
    written: dict[str, Path] = {}
    rels: set[str] = set()
    with tarfile.open(tarball, "r|gz") as tar:
        for member in tar:
            name = member.name
            if not (member.isfile() and name.endswith("/task.json") and _BB_TASKS_MARKER in name):
                continue
            rel = _task_rel(name)
            if any(part in ("", ".", "..") for part in rel.split("/")):
                continue  # never write outside dest, whatever the archive says
            rels.add(rel)
            fh = tar.extractfile(member)
            if fh is None:
                continue
            try:
                task = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("%s: invalid JSON, skipped", name)
                continue
            if (selected := _select_task(rel, task)) is not None:
                written[rel] = dest / _output_name(rel)
                _write_task(written[rel], selected)
    leaves = _leaf_rels(rels)
    for rel, path in written.items():
        if rel not in leaves:
            path.unlink()
    return len(leaves & written.keys())


def fetch_bigbench(cache_dir: str | Path) -> Path:
    """Return ``cache_dir/bigbench/`` holding the BIG-bench mixture, downloading it if needed.

    If the folder already has task files it is returned as is. Otherwise the ``bigbench==1.0.0``
    sdist is downloaded from PyPI into ``cache_dir`` (sha256-checked; removed afterwards) and
    the tasks chosen by :func:`select_bigbench_tasks` are written as ``FAMILY__SUBTASK.json.gz``
    / ``TASK.json.gz``. The folder appears atomically (written to a temporary directory, then
    renamed), so an interrupted fetch leaves no partial folder behind.

    Raises:
        OSError: PyPI cannot be reached.
        DataError: the download does not match its sha256 or yields no tasks.
    """
    cache_dir = Path(cache_dir)
    dest = cache_dir / "bigbench"
    try:
        return _existing_tasks(dest)
    except DataError:
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = _download_sdist(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".bigbench-", dir=cache_dir))
    try:
        if _extract_bigbench(tarball, tmp) == 0:
            raise DataError(f"{tarball}: no BIG-bench tasks matched the selection rule")
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process may have finished first; its folder is as good as ours.
            return _existing_tasks(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    tarball.unlink(missing_ok=True)
    return dest


def _existing_tasks(dest: Path) -> Path:
    """``dest`` if it already holds task files, else DataError."""
    bigbench_task_files(dest)
    return dest
