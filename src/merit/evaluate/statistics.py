"""Statistics of held-out results: dataset averages, bootstrap intervals, paired comparisons and
their Markdown tables.

The metrics are those registered in :data:`merit.evaluate.metrics.METRICS`; each says how a
dataset's examples make its value and how they are resampled. Every dataset counts once in an
average. Confidence intervals come from a stratified bootstrap: examples are resampled within
each dataset (the set of datasets is what the user chose, the examples are a sample), with
indices drawn from a generator seeded by the dataset's name and the metric's stream, so two
models are always resampled identically — a paired comparison of a model with itself has a
difference of exactly zero in every resample.

Models are keyed by a stable key ("base", "joint", "merged", "branch-0", ...) that code may
select by; what a table prints for a model is its display label, given separately (the key
when none is given).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from merit.evaluate.metrics import METRICS, Metric, headline, present, resolve


def summarize(per: dict[str, dict]) -> dict[str, float | None]:
    """Dataset averages of every registered metric that a dataset has (and of those always
    reported): every dataset counts once, whatever its size."""
    out: dict[str, float | None] = {}
    for m in METRICS:
        vals = [v for r in per.values() if (v := m.value(r)) is not None]
        if vals or m.always:
            out[m.name] = float(np.mean(vals)) if vals else None
    out["datasets"] = len(per)
    # exp of the average NLL, a summary field since before metrics were registered.
    nll = out.get("nll")
    out["perplexity"] = float(math.exp(nll)) if nll is not None else None
    return out


def _resample_idx(name: str, n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) example indices of one dataset: a function of (seed, name, n) only."""
    key = int.from_bytes(
        hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little"
    )
    return np.random.default_rng([key, n]).integers(0, n, size=(samples, n))


def _dataset_resamples(rec: dict, name: str, m: Metric, samples: int, seed: int) -> np.ndarray:
    """The dataset's metric under each bootstrap resample of its examples."""
    v, w = m.values(rec)
    return m.resampled(v, w, _resample_idx(name + m.stream, len(v), samples, seed))


def _average_resamples(
    per: dict[str, dict], names: Sequence[str], m: Metric, samples: int, seed: int
) -> np.ndarray:
    acc = np.zeros(samples)
    for name in names:
        acc += _dataset_resamples(per[name], name, m, samples, seed)
    return acc / max(1, len(names))


def _interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(x, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    per: dict[str, dict],
    metric: str | Metric,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the dataset average of a metric (its name or itself)."""
    m = resolve(metric)
    names = [n for n, r in per.items() if m.has(r)]
    if not names:
        return None
    return _interval(_average_resamples(per, names, m, samples, seed), confidence)


def paired_bootstrap(
    per_a: dict[str, dict],
    per_b: dict[str, dict],
    metric: str | Metric,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict | None:
    """Model A minus model B on the datasets both have, examples resampled identically.

    Returns the observed difference of dataset averages, its percentile interval, the share of
    resamples in which A is better (lower NLL / higher accuracy: the metric's direction), and
    per-dataset wins, ties and losses of A.
    """
    m = resolve(metric)
    names = [n for n in per_a if n in per_b and m.has(per_a[n]) and m.has(per_b[n])]
    if not names:
        return None
    for n in names:
        if len(m.values(per_a[n])[0]) != len(m.values(per_b[n])[0]):
            raise ValueError(f"{n}: the two models were evaluated on different examples")
    a = _average_resamples(per_a, names, m, samples, seed)
    b = _average_resamples(per_b, names, m, samples, seed)
    diff = a - b
    obs_a = float(np.mean([m.value(per_a[n]) for n in names]))
    obs_b = float(np.mean([m.value(per_b[n]) for n in names]))
    d = np.array([m.value(per_a[n]) - m.value(per_b[n]) for n in names]) * m.sign
    return {
        "metric": m.name,
        "datasets": len(names),
        "a": obs_a,
        "b": obs_b,
        "difference": obs_a - obs_b,
        "ci": list(_interval(diff, confidence)),
        "confidence": confidence,
        "p_a_better": float(np.mean(m.sign * diff > 0)),
        "wins": int((d > 1e-12).sum()),
        "ties": int((np.abs(d) <= 1e-12).sum()),
        "losses": int((d < -1e-12).sum()),
    }


def paired_metrics(
    per_a: dict[str, dict],
    per_b: dict[str, dict],
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict | None]:
    """:func:`paired_bootstrap` of A minus B for every registered metric both models have
    (and, as None when they have none, for those always reported), keyed by metric name."""
    out = {}
    for m in METRICS:
        p = paired_bootstrap(per_a, per_b, m, samples, confidence, seed)
        if p is not None or m.always:
            out[m.name] = p
    return out


def with_intervals(
    per: dict[str, dict], samples: int, confidence: float, seed: int
) -> dict[str, object]:
    """:func:`summarize` plus a bootstrap interval for each averaged metric."""
    s: dict[str, object] = dict(summarize(per))
    for m in present([s]):
        ci = bootstrap_ci(per, m, samples, confidence, seed)
        s[f"{m.name}_ci"] = list(ci) if ci else None
    s["confidence"] = confidence
    return s


def compare_models(
    per: Mapping[str, dict[str, dict]],
    reference_key: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """Paired comparisons of model ``reference_key`` with every other model of ``per``.

    ``per`` maps a model key to its per-dataset records (``evaluate_model``). Returns, for each
    other model's key, ``{"reference": reference_key, "other": key, <metric>: paired, ...}``
    (:func:`paired_metrics` of the reference minus the other model).
    """
    if reference_key not in per:
        raise KeyError(f"no results for the reference model {reference_key!r}")
    out = {}
    for other in per:
        if other == reference_key:
            continue
        out[other] = {
            "reference": reference_key,
            "other": other,
            **paired_metrics(per[reference_key], per[other], samples, confidence, seed),
        }
    return out


def _label(labels: Mapping[str, str] | None, key: str) -> str:
    return labels.get(key, key) if labels else key


def _fmt(value, ci, m: Metric) -> str:
    if value is None:
        return "n/a"
    f = m.fmt
    return f.value(value) + (f" [{f.short(ci[0])}, {f.short(ci[1])}]" if ci else "")


def _ci_tag(summaries: Mapping[str, dict]) -> str:
    """ " (95% CI)" for a column header, from the summaries' confidence ("" without intervals)."""
    conf = next((s.get("confidence") for s in summaries.values() if s.get("confidence")), None)
    return f" ({100 * conf:.0f}% CI)" if conf else ""


def _cells(s: Mapping, shown: Sequence[Metric]) -> list[str]:
    return [_fmt(s.get(m.name), s.get(f"{m.name}_ci"), m) for m in shown]


def markdown_table(summaries: Mapping[str, dict], labels: Mapping[str, str] | None = None) -> str:
    """Models × metrics (held-out NLL, accuracy, ...) averaged over datasets, with intervals when
    known; a column for each registered metric the summaries have.

    ``summaries`` maps a model key to its summary (``with_intervals``); a row shows the key's
    display label from ``labels`` (default: the key).
    """
    tag = _ci_tag(summaries)
    shown = present(summaries.values())
    heads = [f"{m.label} {m.arrow}{tag}" for m in shown]
    lines = [
        "| model | " + "".join(f"{h} | " for h in heads) + "datasets |",
        "|---|" + "---:|" * (len(shown) + 1),
    ]
    for key, s in summaries.items():
        cells = [_label(labels, key), *_cells(s, shown), str(s["datasets"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def unseen_table(
    seen: Mapping[str, dict], unseen: Mapping[str, dict], labels: Mapping[str, str] | None = None
) -> str:
    """Models × metrics on held-out examples of the training tasks and on whole tasks kept out
    of training, each averaged over datasets, with intervals when known. The interval's level
    is named once per half, on its first column."""
    tag = _ci_tag(seen)
    shown = present([*seen.values(), *unseen.values()])
    heads = [
        f"{where} {m.abbrev} {m.arrow}" + (tag if i == 0 else "")
        for where in ("held-out", "unseen-task")
        for i, m in enumerate(shown)
    ]
    lines = ["| model | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for key, s in seen.items():
        cells = [*_cells(s, shown), *_cells(unseen.get(key, {}), shown)]
        lines.append(f"| {_label(labels, key)} | " + " | ".join(cells) + " |")
    n_seen = next(iter(seen.values()), {}).get("datasets", 0)
    n_unseen = next(iter(unseen.values()), {}).get("datasets", 0)
    return "\n".join(lines) + f"\n\n({n_seen} training tasks, {n_unseen} unseen tasks)\n"


def comparison_name(row: Mapping, key: str, labels: Mapping[str, str] | None = None) -> str:
    """ "A vs B" in display labels for a ``compare_models`` row (its key for other rows)."""
    if "reference" in row and "other" in row:
        return f"{_label(labels, row['reference'])} vs {_label(labels, row['other'])}"
    return _label(labels, key)


def paired_text(p: Mapping | None, m: Metric) -> str:
    """A paired difference with its interval: "+0.0123 [-0.0100, +0.0300]", "+1.50 pt [...]"."""
    if not p:
        return "n/a"
    f = m.fmt
    unit = f" {f.delta_unit}" if f.delta_unit else ""
    return f"{f.delta(p['difference'])}{unit} [{f.delta(p['ci'][0])}, {f.delta(p['ci'][1])}]"


def comparison_table(rows: Mapping[str, Mapping], labels: Mapping[str, str] | None = None) -> str:
    """Paired comparisons (``compare_models``: A = the reference, B = the row's model) as
    Markdown, models named by their display ``labels`` (default: their keys): the difference
    and P(A better) of each registered metric the rows have, then the datasets each model wins
    on the headline metric."""
    shown = present(rows.values())
    head = headline(shown)
    cols = [c for m in shown for c in (f"Δ {m.noun} (A−B) [CI]", f"P(A {m.better})")]
    cols += [f"datasets A/=/B better ({head.abbrev})"] if head else []
    lines = ["| comparison | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, r in rows.items():
        cells = [comparison_name(r, key, labels)]
        for m in shown:
            p = r.get(m.name)
            cells += [paired_text(p, m), f"{p['p_a_better']:.3f}" if p else "n/a"]
        if head:
            w = r.get(head.name)
            cells.append(f"{w['wins']}/{w['ties']}/{w['losses']}" if w else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
