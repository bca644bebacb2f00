"""The comparison's numbers: rows pooled over seeds, intervals, paired tests against joint
training, the Markdown table laid out like the paper's Table 1, and the gain plot."""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from merit.artifacts import Artifact
from merit.evaluate.statistics import METRICS, paired_bootstrap, with_intervals
from merit.report.tables import family

REFERENCE = "joint"  # every row is tested against joint training for one epoch


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
        for key in ("example_nll", "example_correct"):
            if first.get(key):
                rec[key] = np.mean([r[key] for r in recs], axis=0).tolist()
        for key in ("nll", "accuracy"):
            vals = [r.get(key) for r in recs]
            rec[key] = float(np.mean(vals)) if None not in vals else None
        out[name] = rec
    return out


def family_means(per: Mapping[str, dict], metric: str = "nll") -> dict[str, float]:
    """The metric averaged within each dataset family (each dataset counts once)."""
    groups: dict[str, list[float]] = {}
    for name, rec in per.items():
        if rec.get(metric) is not None:
            groups.setdefault(family(name), []).append(rec[metric])
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
    return {m: paired_bootstrap(per[key], per[REFERENCE], m, *stats) for m in METRICS}


def _num(v: float | None, fmt: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, fmt)


def _with_ci(s: dict | None, metric: str, scale: float, fmt: str) -> str:
    if not s or s.get(metric) is None:
        return "–"
    ci = s.get(f"{metric}_ci")
    body = _num(s[metric], fmt, scale)
    return body + (f" [{_num(ci[0], fmt, scale)}, {_num(ci[1], fmt, scale)}]" if ci else "")


def _delta(p: dict | None, metric: str, scale: float, fmt: str) -> str:
    if not p or not p.get(metric):
        return "–"
    d = p[metric]
    lo, hi = d["ci"]
    return f"{d['difference'] * scale:+{fmt}} [{lo * scale:+{fmt}}, {hi * scale:+{fmt}}]"


def table(rows: list[dict], max_families: int = 6) -> str:
    """The paper's table in Markdown (see :func:`table_cells`)."""
    head, body = table_cells(rows, max_families)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def table_cells(rows: list[dict], max_families: int = 6) -> tuple[list[str], list[list[str]]]:
    """The paper's table: one line per row; held-out NLL and accuracy of the training tasks,
    then of the unseen tasks, each with its paired difference from joint training, then the
    held-out NLL per dataset family."""
    fams = _columns(rows, max_families)
    head = [
        "Row", "tokens ×joint", "‖θ−θ0‖", "train loss", "NLL", "acc %", "ΔNLL vs joint",
        "unseen NLL", "unseen acc %", "Δunseen NLL vs joint", *[f"{f} NLL" for f in fams],
    ]  # fmt: skip
    body = []
    for r in rows:
        cells = [
            r["label"],
            _num(r.get("budget"), ".2f"),
            _num(r.get("distance"), ".3g"),
            _num(r.get("train_loss"), ".3f"),
            _with_ci(r["summary"], "nll", 1, ".3f"),
            _with_ci(r["summary"], "accuracy", 100, ".1f"),
            _delta(r["vs_joint"], "nll", 1, ".3f"),
            _with_ci(r["unseen_summary"], "nll", 1, ".3f"),
            _with_ci(r["unseen_summary"], "accuracy", 100, ".1f"),
            _delta(r["unseen_vs_joint"], "nll", 1, ".3f"),
            *[_num(_family_value(r["families"], f, fams), ".3f") for f in fams],
        ]
        body.append(cells)
    return head, body


def _columns(rows: list[dict], max_families: int) -> list[str]:
    names = sorted({f for r in rows for f in r["families"]})
    return names if len(names) <= max_families else [*names[: max_families - 1], "other"]


def _family_value(fam: dict[str, float], name: str, columns: list[str]) -> float | None:
    if name != "other":
        return fam.get(name)
    rest = [v for f, v in fam.items() if f not in columns]
    return float(np.mean(rest)) if rest else None


def gain_figure(rows: list[dict]) -> bytes:
    """Each row's NLL gain over joint training (joint − row: right is better) with its paired
    interval, on the training tasks' held-out examples and on the unseen tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["key"] != REFERENCE]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(shown) + 1.6), sharey=True)
    for ax, which, title in (
        (axes[0], "vs_joint", "held-out examples of the training tasks"),
        (axes[1], "unseen_vs_joint", "unseen tasks"),
    ):
        y = np.arange(len(shown))
        for i, r in enumerate(shown):
            p = (r.get(which) or {}).get("nll")
            if p is None:
                continue
            g, (lo, hi) = -p["difference"], p["ci"]
            ax.errorbar(g, i, xerr=[[g - (-hi)], [(-lo) - g]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("NLL gain over joint (1 epoch)")
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
    """'held' if b is better than a (lower NLL, interval below 0), 'did not hold' if worse
    (interval above 0), else 'could not be decided'."""
    p = paired_bootstrap(per[b], per[a], "nll", *stats)
    if p is None:
        return "could not be decided", None
    lo, hi = p["ci"]
    return ("held" if hi < 0 else "did not hold" if lo > 0 else "could not be decided"), p


def claims(per: dict, unseen: dict, diagnostics: dict, stats: tuple) -> list[dict]:
    """A verdict on each of the paper's claims that the rows present can test."""
    out = []
    for where, data in (("held-out examples", per), ("unseen tasks", unseen)):
        out += _ranking_claims(data, where, stats)
    if diagnostics:
        out += _displacement_claims(diagnostics)
    return out


def _ci(p: dict | None) -> str:
    return f"ΔNLL {p['difference']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]" if p else ""


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
    best = next((k for k in ("merit-3d", "merit-2d", "merit-1d") if k in data), None)
    if best and "joint" in data:
        v, p = _step(data, "joint", best, stats)
        out.append({"claim": f"{best} beats joint training ({where})", "verdict": v,
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
