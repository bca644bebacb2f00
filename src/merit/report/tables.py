"""The report's tables: models × dataset families, model order and display names.

Evaluation results are keyed by model key — ``base``, ``joint``, ``merged``, ``branch-0`` … —
and each record may carry a display ``label`` (e.g. "MERIT K=4"); without one the key is shown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from merit.data.bigbench import family
from merit.evaluate.metrics import HEADLINE, Metric, resolve

# The paper's table order: θ0, joint training, the merge, then the branches.
MODEL_ORDER = ("base", "joint", "merged")
_BRANCH = re.compile(r"branch-(\d+)")


def model_label(key: str, rec: dict) -> str:
    """How model ``key`` is shown: its record's ``label``, else the key itself."""
    return rec.get("label") or key


def model_order(evaluation: dict[str, dict]) -> list[str]:
    """Model keys in table order: base, joint, merged, branches by number, then any other
    model in the order it was evaluated."""

    def rank(item: tuple[int, str]) -> tuple[int, int, int]:
        i, key = item
        if key in MODEL_ORDER:
            return (MODEL_ORDER.index(key), 0, i)
        m = _BRANCH.fullmatch(key)
        if m:
            return (len(MODEL_ORDER), int(m.group(1)), i)
        return (len(MODEL_ORDER) + 1, 0, i)

    return [key for _, key in sorted(enumerate(evaluation), key=rank)]


def comparison_title(name: str, rec: dict, evaluation: dict[str, dict]) -> str:
    """ "A vs B", each side shown by its label. The sides are the record's ``reference`` and
    ``other`` model keys when it names them, else the two halves of a name "A vs B"."""
    a, b = rec.get("reference"), rec.get("other")
    if a is None or b is None:
        a, _, b = name.partition(" vs ")
        if not b:
            return name

    def show(key: str) -> str:
        return model_label(key, evaluation[key]) if key in evaluation else key

    return f"{show(a)} vs {show(b)}"


@dataclass
class FamilyTable:
    columns: list[str]
    sizes: list[int]
    rows: dict[str, list[float | None]]  # by model key
    average: dict[str, float | None]
    interval: dict[str, list[float] | None]


def _family_columns(datasets, max_columns: int) -> dict[str, list[str]]:
    fams: dict[str, list[str]] = {}
    for name in datasets:
        fams.setdefault(family(name), []).append(name)
    order = sorted(fams, key=lambda f: (-len(fams[f]), f))
    if len(order) <= max_columns:
        return {f: fams[f] for f in order}
    keep, rest = order[: max_columns - 1], order[max_columns - 1 :]
    columns = {f: fams[f] for f in keep}
    columns[f"other ({len(rest)} families)"] = [n for f in rest for n in fams[f]]
    return columns


def family_table(
    evaluation: dict[str, dict], metric: str | Metric = HEADLINE, max_columns: int = 16
) -> FamilyTable:
    """Models × dataset families (each dataset counts once in its family and in the average)
    of one registered metric (its name or itself).

    With more than ``max_columns`` families, the largest keep a column and the rest share one.
    """
    m = resolve(metric)
    columns = _family_columns(next(iter(evaluation.values()))["datasets"], max_columns)
    rows: dict[str, list[float | None]] = {}
    avg: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    for key, rec in evaluation.items():
        per = rec["datasets"]
        vals = []
        for names in columns.values():
            xs = [v for n in names if n in per and (v := m.value(per[n])) is not None]
            vals.append(float(np.mean(xs)) if xs else None)
        rows[key] = vals
        avg[key] = rec["summary"].get(m.name)
        ci[key] = rec["summary"].get(f"{m.name}_ci")
    return FamilyTable(list(columns), [len(v) for v in columns.values()], rows, avg, ci)


def cell(v: float | None, metric: str | Metric) -> str:
    """A value in a per-family table: "56.8" (accuracy, in %), "0.123" (NLL); "–" if none."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return resolve(metric).fmt.short(v)


def best_cells(ft: FamilyTable, order: list[str], metric: str | Metric) -> set[tuple[int, int]]:
    """(row, column) of the best model of each column (highest accuracy, lowest NLL: the
    metric's direction), ties included; column 0 is the model name. A column where all models
    agree has none."""
    pick = max if resolve(metric).higher_is_better else min
    strong = set()
    for c in range(len(ft.columns) + 1):
        vals = [(ft.rows[m] + [ft.average[m]])[c] for m in order]
        known = [v for v in vals if v is not None]
        if known and len(set(known)) > 1:
            best = pick(known)
            strong |= {(r, c + 1) for r, v in enumerate(vals) if v == best}
    return strong
