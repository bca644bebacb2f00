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

Image-text records (for a vision-language θ0) come in two forms:

* TRL's vision form: an ``images`` list (or one ``image``) of file paths, with message contents
  that are lists of parts, ``{"type": "image"}`` where an image goes and ``{"type": "text",
  "text": ...}``; string contents get the images before the first user message, as TRL does.
* LLaVA / Vision-FLAN JSON: ``image`` (a path or a list) and ``conversations``, a list of
  ``{"from": "human" | "gpt" | "system", "value": ...}`` turns whose text marks each image with
  ``<image>``.

Image paths are relative to ``image_dir`` (default: the dataset file's folder). Inside merit an
image's place in a message is the ``<image>`` placeholder, and :attr:`Example.images` lists the
files in placeholder order.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "parquet", "hf", "bigbench")

_ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IMAGE = "<image>"  # an image's place in a message's text
_JSON_LIST_KEYS = ("data", "examples", "train")

# BIG-bench's own zero-shot defaults (bigbench/api/json_task.py).
_BB_INPUT_PREFIX = "\nQ: "
_BB_OUTPUT_PREFIX = "\nA: "
_BB_CHOICE_PREFIX = "\n  choice: "


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
        images: absolute image paths, one per ``<image>`` placeholder in ``messages``, in order.
    """

    messages: tuple[dict[str, str], ...]
    answer: str
    choices: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


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


def is_bigbench_task(obj: Any) -> bool:
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
        return ("bigbench" if is_bigbench_task(obj) else "json"), obj
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
    if isinstance(content, (list, tuple)):
        content = _parts_text(content, where, i)
    if not isinstance(content, str):
        raise DataError(
            f"{where}: message {i} content must be a string or a list of parts, got "
            f"{type(content).__name__}"
        )
    # Keep only role/content: Arrow-backed formats add null columns for optional keys.
    return {"role": role, "content": content}


def _parts_text(parts: Sequence[Any], where: str, i: int) -> str:
    """TRL's structured content as text: an image part becomes the ``<image>`` placeholder."""
    out = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append(IMAGE)
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise DataError(f"{where}: message {i} has a part that is neither text nor an image")
    return "".join(out)


def _llava_messages(turns: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(turns, (list, tuple)):
        raise DataError(f"{where}: 'conversations' must be a list of turns")
    out = []
    for i, t in enumerate(turns):
        role = _LLAVA_ROLES.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise DataError(
                f"{where}: turn {i} of 'conversations' needs 'from' (human, gpt or system) "
                "and a string 'value'"
            )
        out.append({"role": role, "content": t["value"]})
    return out


def _image_paths(record: dict, where: str, root: Path | None) -> tuple[str, ...]:
    value = record.get("images", record.get("image"))
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    paths = []
    for item in items:
        if isinstance(item, dict):  # a datasets Image feature: its bytes, or where it was
            item = _spilled(item["bytes"]) if item.get("bytes") else item.get("path")
        if not isinstance(item, str) or not item:
            raise DataError(f"{where}: images must be file paths or datasets Image features")
        p = Path(item).expanduser()
        paths.append(str(p if p.is_absolute() or root is None else root / p))
    return tuple(paths)


def _spilled(data: bytes) -> str:
    """An image stored inside a dataset (Parquet, ``save_to_disk``), written once to a file
    named by its sha256 (the same path on every run and machine, so examples stay comparable):
    batches are built from image files."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / "merit-images"
    path = folder / hashlib.sha256(data).hexdigest()
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: branches loading the same data at once agree
    return str(path)


def _place_images(messages: tuple, images: tuple[str, ...], where: str) -> tuple:
    """Messages with one ``<image>`` per image: as TRL does, images go before the first user
    message's text when no message marks where they go. Text-only records keep any literal
    ``<image>`` as text."""
    marks = sum(m["content"].count(IMAGE) for m in messages)
    if images and marks == 0:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        msg = messages[first]
        msg = {**msg, "content": IMAGE * len(images) + msg["content"]}
        return (*messages[:first], msg, *messages[first + 1 :])
    if images and marks != len(images):
        raise DataError(f"{where}: {marks} image placeholder(s) but {len(images)} image(s)")
    return messages


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


def _record_to_example(record: Any, where: str, root: Path | None = None) -> Example:
    """Convert one record (TRL prompt/completion or messages, or LLaVA conversations) to an
    :class:`Example`; image paths are resolved against ``root``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if record.get("conversations") is not None and record.get("messages") is None:
        record = {**record, "messages": _llava_messages(record["conversations"], where)}
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
    if IMAGE in answer:
        raise DataError(f"{where}: an image in the answer (images go in the prompt)")
    images = _image_paths(record, where, root)
    messages = _place_images(messages, images, where)
    return Example(messages, answer, choices=choices, targets=targets, images=images)


def _examples_from_records(
    records: Iterable[tuple[str, Any]], root: Path | None = None
) -> list[Example]:
    return [_record_to_example(record, where, root) for where, record in records]


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


def as_text(value: Any) -> str:
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
            name=as_text(task.get("name", "")),
            task_prefix=as_text(task.get("task_prefix", "")),
            input_prefix=as_text(task.get("example_input_prefix", _BB_INPUT_PREFIX)),
            output_prefix=as_text(task.get("example_output_prefix", _BB_OUTPUT_PREFIX)),
            choice_prefix=as_text(task.get("choice_prefix", _BB_CHOICE_PREFIX)),
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
        given = [as_text(t) for t in target] if isinstance(target, list) else [as_text(target)]

    choices: tuple[str, ...] = ()
    if scores is not None:
        if not isinstance(scores, dict) or not scores:
            raise DataError(f"{where}: 'target_scores' must be a non-empty object")
        try:
            numeric = {as_text(c): float(s) for c, s in scores.items()}
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

    prompt = fmt.task_prefix + fmt.input_prefix + as_text(record["input"])
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
    if not is_bigbench_task(task):
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
        output_regex=None if regex is None else as_text(regex),
        stop_string=None if stop is None else as_text(stop),
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


def load_dataset(
    name: str, path: str | Path, format: str = "auto", image_dir: str | Path | None = None
) -> LoadedDataset:
    """Load a dataset file or directory into memory.

    Args:
        name: the dataset's name (kept in the result; not used to find the data).
        path: a file or directory in one of :data:`FORMATS`.
        format: one of :data:`FORMATS`, or ``"auto"`` to use :func:`detect_format`.
        image_dir: the folder image paths are relative to (default: ``path``'s folder).

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
        root = Path(image_dir) if image_dir else (path if path.is_dir() else path.parent)
        loaded = LoadedDataset(
            name=name,
            format=format,
            path=str(path),
            examples=_examples_from_records(records, root.expanduser().resolve()),
        )
    if not loaded.examples:
        raise DataError(f"{path}: no usable examples")
    return loaded
