"""Record styles: one record of a dataset file, whatever its file kind, as an :class:`Example`.

TRL's prompt/completion and ``messages`` styles, their image-text forms (TRL's vision form and
LLaVA / Vision-FLAN ``conversations``), and a BIG-bench task's examples formatted as BIG-bench
formats them zero-shot. :mod:`merit.data.formats` reads the files and describes the styles.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IMAGE = "<image>"  # an image's place in a message's text

# BIG-bench's own zero-shot defaults (bigbench/api/json_task.py).
_BB_INPUT_PREFIX = "\nQ: "
_BB_OUTPUT_PREFIX = "\nA: "
_BB_CHOICE_PREFIX = "\n  choice: "


class DataError(ValueError):
    """Bad input data; the message is one line and names the file (and line/record number where it applies)."""


class NoAnswer(DataError):
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
        turns: whether the earlier assistant turns in ``messages`` are answers too (a
            ``messages`` record: ``data.loss_on=all_assistant`` trains on them, as TRL's
            ``assistant_only_loss`` does) or context only (a prompt/completion record).
        source: where the record is (file and line, or record index), for error messages.
    """

    messages: tuple[dict[str, str], ...]
    answer: str
    choices: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    turns: bool = False
    source: str = field(default="", compare=False)


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
    multi = False
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
        multi = any(m["role"] == "assistant" for m in messages)
    elif record.get("instruction") is not None and record.get("output") is not None:
        messages, answer = _alpaca(record, where)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{where}: expected 'prompt' and 'completion' keys, a 'messages' key or Alpaca's "
            f"'instruction' and 'output' (got keys: {keys})"
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
    return Example(messages, answer, choices, targets, images=images, turns=multi, source=where)


def _alpaca(record: dict, where: str) -> tuple[tuple[dict[str, str], ...], str]:
    """An Alpaca record as one user message and its answer: the instruction, then the input
    (if any) after a blank line, as the Alpaca data is usually rendered for chat models; an
    optional ``system`` string becomes the system message."""
    fields = {k: record.get(k) for k in ("instruction", "input", "output", "system")}
    bad = [k for k, v in fields.items() if v is not None and not isinstance(v, str)]
    if bad:
        raise DataError(f"{where}: Alpaca's '{bad[0]}' must be a string")
    text = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    messages = ({"role": "user", "content": text},)
    if fields["system"]:
        messages = ({"role": "system", "content": fields["system"]}, *messages)
    return messages, fields["output"]


def examples_from_records(
    records: Iterable[tuple[str, Any]], root: Path | None = None
) -> list[Example]:
    return [_record_to_example(record, where, root) for where, record in records]


# --------------------------------------------------------------------------- BIG-bench


def as_text(value: Any) -> str:
    # Some task files store numbers (e.g. arithmetic targets); prompts and answers are text.
    return value if isinstance(value, str) else str(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


@dataclass(frozen=True)
class BigBenchFormat:
    """How one task formats its prompts; built once per task so loading stays fast."""

    name: str
    task_prefix: str
    input_prefix: str
    output_prefix: str
    choice_prefix: str
    append_choices: bool

    @classmethod
    def of(cls, task: dict) -> BigBenchFormat:
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
    return format_bigbench(BigBenchFormat.of(task), record, index)


def format_bigbench(fmt: BigBenchFormat, record: Any, index: int, file: str = "") -> Example:
    """:func:`bigbench_example` with the task's format already resolved (``file``: the task's
    file, for :attr:`Example.source`)."""
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
            raise NoAnswer(f"{where}: no choice scores higher than the others")
        targets = tuple(c for c, s in numeric.items() if s == best and c.strip())
        answer = next(
            (t for t in given if t in numeric and t.strip()), targets[0] if targets else ""
        )
    else:
        targets = tuple(t for t in given if t.strip())
        answer = targets[0] if targets else ""
    if not answer:
        raise NoAnswer(f"{where}: empty target")

    prompt = fmt.task_prefix + fmt.input_prefix + as_text(record["input"])
    if choices and fmt.append_choices:
        prompt += fmt.choice_prefix + fmt.choice_prefix.join(choices)
    prompt += fmt.output_prefix
    return Example(
        messages=({"role": "user", "content": prompt},),
        answer=answer,
        choices=choices,
        targets=targets,
        source=f"{file}: {where}" if file else where,
    )
