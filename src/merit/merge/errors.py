"""How the merge reports what is wrong: one line per problem, naming the tensor or file at fault."""

from __future__ import annotations

from pathlib import Path

_MAX_PROBLEM_LINES = 50


class MergeError(ValueError):
    """One-line message naming the tensor or file at fault.

    When validation finds several problems they are reported together, one line each.
    """


def problems_error(out_dir: Path, problems: list[str]) -> MergeError:
    """One problem: one line. Several: a summary line, then one line each."""
    if len(problems) == 1:
        return MergeError(f"cannot merge into {out_dir}: {problems[0]}")
    lines = problems[:_MAX_PROBLEM_LINES]
    if len(problems) > _MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - _MAX_PROBLEM_LINES} more")
    return MergeError("\n".join([f"cannot merge into {out_dir}: {len(problems)} problems", *lines]))
