"""Exact match of a generation, as BIG-bench 1.0.0 scores it: how a generative example counts
towards :mod:`accuracy <merit.evaluate.metrics.accuracy>`.

Results have always stored exact match under ``accuracy`` (one hit rate with multiple choice),
so this module registers no key of its own: it decides the ``correct`` field of a generative
example's scored record. The post-processing is BIG-bench's (``stop_string`` kept up to and
including its first occurrence, then the first match of ``output_regex``, whose default for a
task that sets neither is ``[^\\.\\?\\!\\;\\n]+``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"  # bigbench/api/json_task.py, _DEFAULT_REGEX


def postprocess(
    text: str, output_regex: str | None, stop_string: str | None, bigbench: bool = False
) -> str:
    """A generation post-processed as BIG-bench 1.0.0 does (``models/model_utils.py``).

    The stop string is kept (the text is cut just after its first occurrence past position 0),
    then the first ``re.findall`` match of the regex is returned ("" when none). A BIG-bench task
    that sets neither gets BIG-bench's default regex (up to the first sentence end); other
    datasets are compared verbatim. Surrounding whitespace is stripped last: a chat template,
    unlike BIG-bench's raw ``"\\nA: "`` continuation, fixes no convention for a leading space.
    """
    if bigbench and output_regex is None and stop_string is None:
        output_regex = BIGBENCH_DEFAULT_REGEX
    if stop_string:
        index = text.find(stop_string)
        if index > 0:
            text = text[: index + len(stop_string)]
    if output_regex:
        text = next(iter(re.findall(output_regex, text)), "")
    return text.strip()


def exact_match(response: str, targets: Sequence[str]) -> bool:
    """BIG-bench's ``exact_str_match``: the (post-processed) response is one of the targets."""
    return response in {t.strip() for t in targets}


def judge(
    text: str,
    targets: Sequence[str],
    output_regex: str | None,
    stop_string: str | None,
    bigbench: bool,
) -> int:
    """1 if a raw generation, post-processed, matches one of the targets exactly, else 0."""
    return int(exact_match(postprocess(text, output_regex, stop_string, bigbench), targets))
