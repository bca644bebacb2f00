"""The comparison's numbers: rows pooled over seeds, intervals, paired tests against joint
training, the Markdown table laid out like the paper's Table 1, and the gain plot.

The table has a column (and an unseen-task column) for every registered metric the rows have;
the differences from joint training, the family columns, the gain plot and the claims are on
:data:`PRIMARY`, the held-out NLL the paper's comparison (§5) is about.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from merit.artifacts import Artifact
from merit.data.bigbench import family
from merit.evaluate.metrics import ARRAYS, METRICS, WEIGHTS, Metric, present, resolve
from merit.evaluate.statistics import paired_bootstrap, paired_metrics, with_intervals

REFERENCE = "joint"  # every row is tested against joint training for one epoch
# The metric of the differences, family columns, gain plot and claims: accuracy on a handful of
# examples per task is too coarse at CPU scale to rank the rows (paper §5 ranks them by NLL).
PRIMARY = "nll"


@dataclass
class CompareResults(Artifact):
    """``compare/results.json``: one entry per row (in table order), with its units."""

    reference: str
    rows: list[dict]
    selection: dict = field(default_factory=dict)  # what the validation split chose, per seed
    diagnostics: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)  # a verdict on each of the paper's claims
    table: str = ""
    settings: dict = field(default_factory=dict)
    lr_sweep: list = field(default_factory=list)  # per rate: joint and MERIT, held out / unseen


def pool(records: Sequence[Mapping[str, dict]]) -> dict[str, dict]:
    """One record per dataset from several units (seeds, draws) scored on the same examples:
    each example's NLL and correctness averaged over units, so intervals and paired tests
    resample examples exactly as for one model."""
    if len(records) == 1:
        return dict(records[0])
    out = {}
    for name, first in records[0].items():
        recs = [r[name] for r in records]
        rec = dict(first)
        for key in (a for f, a in ARRAYS.items() if f not in WEIGHTS):
            if first.get(key):
                rec[key] = np.mean([r[key] for r in recs], axis=0).tolist()
        for m in METRICS:
            vals = [r.get(m.name) for r in recs]
            if None not in vals:
                rec[m.name] = float(np.mean(vals))
            elif m.always or m.name in rec:
                rec[m.name] = None
            # else: not recorded by scoring; computed from the pooled examples when asked
        out[name] = rec
    return out


def family_means(per: Mapping[str, dict], metric: str | Metric = PRIMARY) -> dict[str, float]:
    """The metric averaged within each dataset family (each dataset counts once)."""
    m = resolve(metric)
    groups: dict[str, list[float]] = {}
    for name, rec in per.items():
        if (v := m.value(rec)) is not None:
            groups.setdefault(family(name), []).append(v)
    return {f: float(np.mean(v)) for f, v in sorted(groups.items())}


def summarise(
    per: dict[str, dict[str, dict]], unseen: dict[str, dict[str, dict]], stats: tuple
) -> dict[str, dict]:
    """Per row: averages with intervals, the paired test against joint training (row − joint),
    on the training tasks' held-out examples and on the unseen tasks, and family averages."""
    out = {}
    for key in per:
        out[key] = {
            "summary": with_intervals(per[key], *stats),
            "unseen_summary": with_intervals(unseen[key], *stats) if unseen.get(key) else None,
            "vs_joint": _vs_joint(per, key, stats),
            "unseen_vs_joint": _vs_joint(unseen, key, stats),
            "families": family_means(per[key]),
        }
    return out


def _vs_joint(per: dict[str, dict], key: str, stats: tuple) -> dict | None:
    """The row minus joint training, paired (None for joint itself or without joint)."""
    if key == REFERENCE or REFERENCE not in per or key not in per:
        return None
    return paired_metrics(per[key], per[REFERENCE], *stats)


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _short(v: float | None, m: Metric) -> str:
    return "–" if v is None else m.fmt.short(v)


def _with_ci(s: dict | None, m: Metric) -> str:
    if not s or s.get(m.name) is None:
        return "–"
    ci = s.get(f"{m.name}_ci")
    return _short(s[m.name], m) + (f" [{_short(ci[0], m)}, {_short(ci[1], m)}]" if ci else "")


def _delta_text(d: dict, m: Metric) -> str:
    """A difference and its interval at the table's precision: "+0.123 [+0.050, +0.200]"."""
    f, k = m.fmt, m.fmt.short_digits
    lo, hi = d["ci"]
    return f"{f.delta(d['difference'], k)} [{f.delta(lo, k)}, {f.delta(hi, k)}]"


def _delta(p: dict | None, m: Metric) -> str:
    return _delta_text(p[m.name], m) if p and p.get(m.name) else "–"


def _head(m: Metric) -> str:
    return m.abbrev + (f" {m.fmt.unit}" if m.fmt.unit else "")


def table(rows: list[dict], max_families: int = 6) -> str:
    """The paper's table in Markdown (see :func:`table_cells`)."""
    head, body = table_cells(rows, max_families)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def table_cells(rows: list[dict], max_families: int = 6) -> tuple[list[str], list[list[str]]]:
    """The paper's table: one line per row; every metric (held-out NLL, accuracy, ...) of the
    training tasks, then of the unseen tasks, each followed by the paired difference of
    :data:`PRIMARY` from joint training, then :data:`PRIMARY` per dataset family."""
    fams = _columns(rows, max_families)
    p = resolve(PRIMARY)
    shown = present(s for r in rows for s in (r["summary"], r["unseen_summary"]))
    head = [
        "Row", "tokens ×joint", "steps/job", "‖θ−θ0‖", "train loss", *map(_head, shown),
        f"Δ{p.abbrev} vs joint", *[f"unseen {_head(m)}" for m in shown],
        f"Δunseen {p.abbrev} vs joint", *[f"{f} {p.abbrev}" for f in fams],
    ]  # fmt: skip
    body = []
    for r in rows:
        cells = [
            r["label"],
            _num(r.get("budget"), ".2f"),
            _steps(r.get("steps")),
            _num(r.get("distance"), ".3g"),
            _num(r.get("train_loss"), ".3f"),
            *[_with_ci(r["summary"], m) for m in shown],
            _delta(r["vs_joint"], p),
            *[_with_ci(r["unseen_summary"], m) for m in shown],
            _delta(r["unseen_vs_joint"], p),
            *[_short(_family_value(r["families"], f, fams), p) for f in fams],
        ]
        body.append(cells)
    return head, body


def _steps(steps: list[int] | None) -> str:
    if not steps:
        return "–"
    lo, hi = steps
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _columns(rows: list[dict], max_families: int) -> list[str]:
    names = sorted({f for r in rows for f in r["families"]})
    return names if len(names) <= max_families else [*names[: max_families - 1], "other"]


def _family_value(fam: dict[str, float], name: str, columns: list[str]) -> float | None:
    if name != "other":
        return fam.get(name)
    rest = [v for f, v in fam.items() if f not in columns]
    return float(np.mean(rest)) if rest else None


def gain_figure(rows: list[dict]) -> bytes:
    """Each row's :data:`PRIMARY` gain over joint training (right is better) with its paired
    interval, on the training tasks' held-out examples and on the unseen tasks."""
    import matplotlib  # deferred: plotting is optional and slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = resolve(PRIMARY)
    shown = [r for r in rows if r["key"] != REFERENCE]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(shown) + 1.6), sharey=True)
    for ax, which, title in (
        (axes[0], "vs_joint", "held-out examples of the training tasks"),
        (axes[1], "unseen_vs_joint", "unseen tasks"),
    ):
        y = np.arange(len(shown))
        for i, r in enumerate(shown):
            p = (r.get(which) or {}).get(m.name)
            if p is None:
                continue
            # A gain is the row's improvement: joint − row for a loss, row − joint for a score.
            g, (lo, hi) = m.sign * p["difference"], sorted(m.sign * x for x in p["ci"])
            ax.errorbar(g, i, xerr=[[g - lo], [hi - g]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{m.abbrev} gain over joint (1 epoch)")
        ax.set_yticks(y, [r["label"] for r in shown], fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# The paper's claims (§5) that the comparison can check, each on the held-out NLL of the training
# tasks (accuracy on a handful of examples per task is too coarse at CPU scale) and on the unseen
# tasks. A step "a < b" holds when b's NLL is lower than a's with its paired interval below zero.
ORDER = ("joint", "random", "merit-1d", "merit-2d", "merit-3d")
PAPER_RATIO = (2.4, 2.9)


def _step(per: dict, a: str, b: str, stats: tuple) -> tuple[str, dict | None]:
    """'held' if b is better than a (lower NLL: the interval of b − a below 0), 'did not hold'
    if worse (above 0), else 'could not be decided'."""
    m = resolve(PRIMARY)
    p = paired_bootstrap(per[b], per[a], m, *stats)
    if p is None:
        return "could not be decided", None
    lo, hi = sorted(m.sign * x for x in p["ci"])  # the interval of b's improvement over a
    return ("held" if lo > 0 else "did not hold" if hi < 0 else "could not be decided"), p


def claims(per: dict, unseen: dict, diagnostics: dict, stats: tuple) -> list[dict]:
    """A verdict on each of the paper's claims that the rows present can test."""
    out = []
    for where, data in (("held-out examples", per), ("unseen tasks", unseen)):
        out += _ranking_claims(data, where, stats)
    if diagnostics:
        out += _displacement_claims(diagnostics)
    return out


def _ci(p: dict | None) -> str:
    m = resolve(PRIMARY)
    return f"Δ{m.abbrev} {_delta_text(p, m)}" if p else ""


def _ranking_claims(data: dict, where: str, stats: tuple) -> list[dict]:
    out = []
    keys = [k for k in ORDER if k in data]
    steps = [(a, b, *_step(data, a, b, stats)) for a, b in itertools.pairwise(keys)]
    if steps:
        verdicts = {v for *_, v, _ in steps}
        overall = "did not hold" if "did not hold" in verdicts else (
            "held" if verdicts == {"held"} else "could not be decided")  # fmt: skip
        detail = "; ".join(f"{a} → {b}: {_ci(p)} {v}" for a, b, v, p in steps if p)
        out.append({"claim": f"ordering {' < '.join(keys)} ({where})", "verdict": overall,
                    "detail": detail})  # fmt: skip
    if "random" in data and "soup" in data:
        v, p = _step(data, "random", "soup", stats)
        same = "held" if v == "could not be decided" else "did not hold"
        out.append({"claim": f"random split ≈ uniform soup ({where})", "verdict": same,
                    "detail": f"soup − random: {_ci(p)}"})  # fmt: skip
    out += _merge_claims(data, where, stats)
    best = next((k for k in ("merit-3d", "merit-2d", "merit-1d") if k in data), None)
    if best and "joint" in data:
        v, p = _step(data, "joint", best, stats)
        out.append({"claim": f"{best} beats joint training ({where})", "verdict": v,
                    "detail": _ci(p)})  # fmt: skip
    return out


def _merge_claims(data: dict, where: str, stats: tuple) -> list[dict]:
    """For each merge of MERIT-2D's branches beyond the average (``merit-2d+<m>``): does it beat
    joint training, the shrinkage control, and the same merge of the random split's branches?"""
    out = []
    for key in (k for k in data if k.startswith("merit-2d+")):
        rivals = [("joint", "joint training"), ("shrink", "the shrinkage control"),
                  (f"random+{key.split('+', 1)[1]}", "the same merge of random branches")]  # fmt: skip
        for rival, what in rivals:
            if rival in data:
                v, p = _step(data, rival, key, stats)
                out.append({"claim": f"{key} beats {what} ({where})", "verdict": v,
                            "detail": _ci(p)})  # fmt: skip
    return out


def _displacement_claims(d: dict) -> list[dict]:
    r, (lo, hi) = d["distance_ratio"], PAPER_RATIO
    g, h = d["train_loss_gap"], d["heldout_nll_gap"]
    return [
        {"claim": f"the merge is {lo}–{hi}× closer to θ0 than joint training",
         "verdict": "held" if lo <= r <= hi else "did not hold",
         "detail": f"‖θ_joint − θ0‖/‖θ̄ − θ0‖ = {r:.2f} (MERIT-2D)"},
        {"claim": "higher train loss than joint training, yet no worse held out",
         "verdict": "held" if g > 0 and h <= 0 else "did not hold",
         "detail": f"train-loss gap {g:+.3f}, held-out NLL gap {h:+.3f} (MERIT-2D − joint)"},
    ]  # fmt: skip


def claims_markdown(items: list[dict]) -> str:
    lines = ["| claim (paper §5) | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['verdict']} | {c['detail']} |" for c in items]
    return "\n".join(lines) + "\n"
