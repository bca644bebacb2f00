"""Load instruction datasets into one in-memory form: a list of :class:`Example`.

Supported inputs (``FORMATS``):

* ``jsonl`` — one record per line (``.jsonl``; ``.jsonl.gz`` is read too).
* ``json`` — a top-level list of records, or an object holding exactly one list under
  ``"data"``, ``"examples"`` or ``"train"`` (``.json`` or ``.json.gz``).
* ``parquet`` — one record per row.
* ``hf`` — a directory written by ``datasets.Dataset.save_to_disk`` (a saved
  ``DatasetDict`` works too: its ``train`` split, or its only split, is used).
* ``bigbench`` — a BIG-bench ``task.json`` / ``task.json.gz`` file or a directory holding one.
* ``hub`` — a hub dataset id (``owner/name``) or a local dataset repository folder, read by
  ``datasets.load_dataset`` with its ``name`` (here ``subset``), ``split``, ``revision`` and
  ``data_files`` (:class:`HubArgs`), from the network or the hub cache.
* ``alpaca`` — a json, jsonl or parquet file of Alpaca records (``instruction``, optional
  ``input``, ``output``, optional ``system``); such records are also read in any format.

:func:`load_groups` splits one file into one dataset per value of a record field (Vision-FLAN's
single annotation file, by ``task_name``).

Records of the other formats follow one of TRL's two dataset styles:

* prompt/completion: ``prompt`` is a string (it becomes one user message) or a list of
  ``{"role", "content"}`` messages; ``completion`` is a string (the answer) or a list with
  exactly one assistant message whose content is the answer.
* ``messages``: a list of ``{"role", "content"}`` messages whose last message is from the
  assistant; that message is the answer and everything before it is the prompt. Earlier
  assistant turns are answers too under ``data.loss_on=all_assistant`` (the default, as TRL's
  ``assistant_only_loss``), context only under ``final``; evaluation scores the final answer.
  (An image-text record trains on its final answer only.)

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

This module reads each kind of file into records; :mod:`merit.data.records` turns one record of
any style into an :class:`Example`.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The record styles' names, imported from here across merit, the tests and the benchmarks.
from merit.data.records import (  # noqa: F401
    IMAGE,
    BigBenchFormat,
    DataError,
    Example,
    NoAnswer,
    as_text,
    bigbench_example,
    examples_from_records,
    format_bigbench,
)

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "json", "parquet", "hf", "bigbench", "hub", "alpaca")
_JSON_LIST_KEYS = ("data", "examples", "train")


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


# --------------------------------------------------------------------------- readers


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records one line at a time: a file of millions is never held whole."""
    opener = gzip.open if _is_gz(path) else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from e
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
                yield f"{path}:{lineno}", record
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


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


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows a batch at a time: the file is never held whole as Python objects."""
    import pyarrow as pa  # lazy: pyarrow is heavy and only needed here
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from e


def _hf_rows(path: Path) -> Any:
    """The saved dataset's rows (memory-mapped Arrow, read row by row)."""
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
    return _arrow_rows(ds)


def _arrow_rows(ds: Any) -> Iterator[dict[str, Any]]:
    """A ``datasets.Dataset``'s rows as stored, a batch at a time: an ``Image`` column stays
    ``{"bytes", "path"}`` (iterating the dataset itself would decode every image)."""
    for table in ds.with_format("arrow").iter(batch_size=4096):
        yield from table.to_pylist()


@dataclass(frozen=True)
class HubArgs:
    """``datasets.load_dataset``'s own arguments for a hub dataset (or a local dataset folder)."""

    subset: str | None = None  # load_dataset's ``name``: the configuration
    split: str = "train"
    revision: str | None = None
    data_files: Any = None


def _hub_rows(path: str, hub: HubArgs | None) -> Any:
    """The rows of a hub dataset, from the hub or its local cache (``HF_DATASETS_OFFLINE``),
    or of a local dataset folder; memory-mapped Arrow, read row by row."""
    import datasets  # lazy: importing datasets takes about a second

    hub = hub or HubArgs()
    try:
        ds = datasets.load_dataset(
            path, name=hub.subset, split=hub.split, revision=hub.revision,
            data_files=hub.data_files,
        )  # fmt: skip
    except Exception as e:  # datasets raises a dozen kinds for "cannot get it"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{path}: cannot load it with datasets.load_dataset (no network and not in the hub "
            f"cache, or no such dataset/split): {why}"
        ) from e
    return _arrow_rows(ds)


def _alpaca_only(records: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    for where, record in records:
        if not (isinstance(record, dict) and "instruction" in record and "output" in record):
            raise DataError(f"{where}: an Alpaca record needs 'instruction' and 'output'")
        yield where, record


# --------------------------------------------------------------------------- BIG-bench


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
    fmt = BigBenchFormat.of(task)
    examples: list[Example] = []
    skipped: list[int] = []
    for i, record in enumerate(task["examples"]):
        try:
            examples.append(format_bigbench(fmt, record, i, str(path_read)))
        except NoAnswer:
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


def _records(
    path: Path, format: str, parsed: Any, hub: HubArgs | None
) -> Iterable[tuple[str, Any]]:
    """(where, record) of a non-BIG-bench dataset, in file order."""
    if format == "jsonl":
        return _jsonl_records(path)
    if format == "json":
        return _indexed(path, _json_records(path, parsed or _parse_json_file(path)))
    if format == "parquet":
        return _indexed(path, _parquet_rows(path))
    if format == "hf":
        return _indexed(path, _hf_rows(path))
    if format == "hub":
        return _indexed(path, _hub_rows(str(path), hub))
    kind, parsed = _detect(path)  # alpaca: records in a json, jsonl or parquet file
    if kind not in ("jsonl", "json", "parquet"):
        raise DataError(f"{path}: Alpaca records are read from .json, .jsonl or .parquet files")
    return _alpaca_only(_records(path, kind, parsed, hub))


def _resolve(path: Path, format: str) -> tuple[str, Any]:
    if format == "auto":
        return _detect(path)
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r} (known formats: {_known_formats()})")
    if format != "hub" and not path.exists():
        raise DataError(f"{path}: no such file or directory")
    return format, None


def _root(path: Path, image_dir: str | Path | None) -> Path:
    root = Path(image_dir) if image_dir else (path if path.is_dir() else path.parent)
    return root.expanduser().resolve()


def load_dataset(
    name: str,
    path: str | Path,
    format: str = "auto",
    image_dir: str | Path | None = None,
    hub: HubArgs | None = None,
) -> LoadedDataset:
    """Load a dataset file or directory (or a hub dataset) into memory.

    Args:
        name: the dataset's name (kept in the result; not used to find the data).
        path: a file or directory in one of :data:`FORMATS`, or a hub id with ``format="hub"``.
        format: one of :data:`FORMATS`, or ``"auto"`` to use :func:`detect_format`.
        image_dir: the folder image paths are relative to (default: ``path``'s folder).
        hub: ``datasets.load_dataset``'s arguments, for ``format="hub"``.

    Raises:
        DataError: unknown format, missing path, malformed data, or no usable examples.
    """
    path = Path(path)
    format, parsed = _resolve(path, format)
    if format == "bigbench":
        loaded = _load_bigbench(name, path, parsed)
    else:
        records = _records(path, format, parsed, hub)
        examples = examples_from_records(records, _root(path, image_dir))
        loaded = LoadedDataset(name=name, format=format, path=str(path), examples=examples)
    if not loaded.examples:
        raise DataError(f"{path}: no usable examples")
    return loaded


def load_groups(
    path: str | Path,
    field: str,
    format: str = "auto",
    image_dir: str | Path | None = None,
    hub: HubArgs | None = None,
) -> list[LoadedDataset]:
    """One dataset per value of the record field ``field`` (Vision-FLAN keeps its 191 tasks in
    one annotation file under ``task_name``), each named after its value, sorted by name; the
    examples of a group keep their file order.

    Raises:
        DataError: a record without ``field`` (or with a value that is not a name), or any
            error of :func:`load_dataset`.
    """
    path = Path(path)
    format, parsed = _resolve(path, format)
    if format == "bigbench":
        raise DataError(f"{path}: group_by splits record files, not a BIG-bench task")
    root = _root(path, image_dir)
    groups: dict[str, list[Example]] = {}
    for where, record in _records(path, format, parsed, hub):
        value = record.get(field) if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip() or "/" in value:
            raise DataError(f"{where}: group_by field {field!r} is missing or not a name")
        groups.setdefault(value, []).extend(examples_from_records([(where, record)], root))
    if not groups:
        raise DataError(f"{path}: no usable examples")
    return [
        LoadedDataset(name=k, format=format, path=str(path), examples=v)
        for k, v in sorted(groups.items())
    ]
