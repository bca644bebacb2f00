"""Statistics of held-out results: dataset averages, bootstrap intervals, paired comparisons and
their Markdown tables.

Every dataset counts once in an average. Confidence intervals come from a stratified bootstrap:
examples are resampled within each dataset (the set of datasets is what the user chose, the
examples are a sample), with indices drawn from a generator seeded by the dataset's name, so two
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

METRICS = ("nll", "accuracy")


def summarize(per: dict[str, dict]) -> dict[str, float | None]:
    """Dataset averages: every dataset counts once, whatever its size."""
    nll = [r["nll"] for r in per.values() if r.get("nll") is not None]
    acc = [r["accuracy"] for r in per.values() if r.get("accuracy") is not None]
    return {
        "nll": float(np.mean(nll)) if nll else None,
        "accuracy": float(np.mean(acc)) if acc else None,
        "datasets": len(per),
        "perplexity": float(math.exp(np.mean(nll))) if nll else None,
    }


def _resample_idx(name: str, n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) example indices of one dataset: a function of (seed, name, n) only."""
    key = int.from_bytes(
        hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little"
    )
    return np.random.default_rng([key, n]).integers(0, n, size=(samples, n))


def _has(rec: dict, metric: str) -> bool:
    if metric == "nll":
        return bool(rec.get("example_tokens")) and sum(rec["example_tokens"]) > 0
    return bool(rec.get("example_correct"))


def _dataset_resamples(rec: dict, name: str, metric: str, samples: int, seed: int) -> np.ndarray:
    """The dataset's metric under each bootstrap resample of its examples."""
    if metric == "nll":
        nll = np.asarray(rec["example_nll"], dtype=np.float64)
        tok = np.asarray(rec["example_tokens"], dtype=np.float64)
        idx = _resample_idx(name, len(nll), samples, seed)
        return nll[idx].sum(1) / np.maximum(tok[idx].sum(1), 1.0)
    hits = np.asarray(rec["example_correct"], dtype=np.float64)
    idx = _resample_idx(name + "/accuracy", len(hits), samples, seed)
    return hits[idx].mean(1)


def _average_resamples(
    per: dict[str, dict], names: Sequence[str], metric: str, samples: int, seed: int
) -> np.ndarray:
    acc = np.zeros(samples)
    for name in names:
        acc += _dataset_resamples(per[name], name, metric, samples, seed)
    return acc / max(1, len(names))


def _interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(x, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    per: dict[str, dict],
    metric: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the dataset average of ``metric`` ('nll'/'accuracy')."""
    names = [n for n, r in per.items() if _has(r, metric)]
    if not names:
        return None
    return _interval(_average_resamples(per, names, metric, samples, seed), confidence)


def paired_bootstrap(
    per_a: dict[str, dict],
    per_b: dict[str, dict],
    metric: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict | None:
    """Model A minus model B on the datasets both have, examples resampled identically.

    Returns the observed difference of dataset averages, its percentile interval, the share of
    resamples in which A is better (lower NLL / higher accuracy), and per-dataset wins, ties
    and losses of A.
    """
    names = [n for n in per_a if n in per_b and _has(per_a[n], metric) and _has(per_b[n], metric)]
    if not names:
        return None
    for n in names:
        key = "example_tokens" if metric == "nll" else "example_correct"
        if len(per_a[n][key]) != len(per_b[n][key]):
            raise ValueError(f"{n}: the two models were evaluated on different examples")
    a = _average_resamples(per_a, names, metric, samples, seed)
    b = _average_resamples(per_b, names, metric, samples, seed)
    diff = a - b
    sign = -1.0 if metric == "nll" else 1.0
    obs_a = float(np.mean([per_a[n][metric] for n in names]))
    obs_b = float(np.mean([per_b[n][metric] for n in names]))
    d = np.array([per_a[n][metric] - per_b[n][metric] for n in names]) * sign
    return {
        "metric": metric,
        "datasets": len(names),
        "a": obs_a,
        "b": obs_b,
        "difference": obs_a - obs_b,
        "ci": list(_interval(diff, confidence)),
        "confidence": confidence,
        "p_a_better": float(np.mean(sign * diff > 0)),
        "wins": int((d > 1e-12).sum()),
        "ties": int((np.abs(d) <= 1e-12).sum()),
        "losses": int((d < -1e-12).sum()),
    }


def with_intervals(
    per: dict[str, dict], samples: int, confidence: float, seed: int
) -> dict[str, object]:
    """:func:`summarize` plus a bootstrap interval for each averaged metric."""
    s: dict[str, object] = dict(summarize(per))
    for m in METRICS:
        ci = bootstrap_ci(per, m, samples, confidence, seed)
        s[f"{m}_ci"] = list(ci) if ci else None
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
    other model's key, ``{"reference": reference_key, "other": key, "nll": paired,
    "accuracy": paired}`` (``paired_bootstrap`` of the reference minus the other model).
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
            **{
                m: paired_bootstrap(per[reference_key], per[other], m, samples, confidence, seed)
                for m in METRICS
            },
        }
    return out


def _label(labels: Mapping[str, str] | None, key: str) -> str:
    return labels.get(key, key) if labels else key


def _fmt(value, ci, pct: bool) -> str:
    if value is None:
        return "n/a"
    if pct:
        text = f"{100 * value:.2f}%"
        return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    return f"{value:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _ci_tag(summaries: Mapping[str, dict]) -> str:
    """ " (95% CI)" for a column header, from the summaries' confidence ("" without intervals)."""
    conf = next((s.get("confidence") for s in summaries.values() if s.get("confidence")), None)
    return f" ({100 * conf:.0f}% CI)" if conf else ""


def markdown_table(summaries: Mapping[str, dict], labels: Mapping[str, str] | None = None) -> str:
    """Models × (held-out NLL, accuracy) averaged over datasets, with intervals when known.

    ``summaries`` maps a model key to its summary (``with_intervals``); a row shows the key's
    display label from ``labels`` (default: the key).
    """
    tag = _ci_tag(summaries)
    lines = [
        f"| model | held-out NLL ↓{tag} | accuracy ↑{tag} | datasets |",
        "|---|---:|---:|---:|",
    ]
    for key, s in summaries.items():
        nll = _fmt(s.get("nll"), s.get("nll_ci"), pct=False)
        acc = _fmt(s.get("accuracy"), s.get("accuracy_ci"), pct=True)
        lines.append(f"| {_label(labels, key)} | {nll} | {acc} | {s['datasets']} |")
    return "\n".join(lines) + "\n"


def unseen_table(
    seen: Mapping[str, dict], unseen: Mapping[str, dict], labels: Mapping[str, str] | None = None
) -> str:
    """Models × (NLL, accuracy) on held-out examples of the training tasks and on whole tasks
    kept out of training, each averaged over datasets, with intervals when known."""
    tag = _ci_tag(seen)
    lines = [
        f"| model | held-out NLL ↓{tag} | held-out acc ↑ | unseen-task NLL ↓{tag} | unseen-task acc ↑ |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, s in seen.items():
        u = unseen.get(key, {})
        cells = [
            _fmt(s.get("nll"), s.get("nll_ci"), pct=False),
            _fmt(s.get("accuracy"), s.get("accuracy_ci"), pct=True),
            _fmt(u.get("nll"), u.get("nll_ci"), pct=False),
            _fmt(u.get("accuracy"), u.get("accuracy_ci"), pct=True),
        ]
        lines.append(f"| {_label(labels, key)} | " + " | ".join(cells) + " |")
    n_seen = next(iter(seen.values()), {}).get("datasets", 0)
    n_unseen = next(iter(unseen.values()), {}).get("datasets", 0)
    return "\n".join(lines) + f"\n\n({n_seen} training tasks, {n_unseen} unseen tasks)\n"


def comparison_name(row: Mapping, key: str, labels: Mapping[str, str] | None = None) -> str:
    """ "A vs B" in display labels for a ``compare_models`` row (its key for other rows)."""
    if "reference" in row and "other" in row:
        return f"{_label(labels, row['reference'])} vs {_label(labels, row['other'])}"
    return _label(labels, key)


def comparison_table(rows: Mapping[str, Mapping], labels: Mapping[str, str] | None = None) -> str:
    """Paired comparisons (``compare_models``: A = the reference, B = the row's model) as
    Markdown, models named by their display ``labels`` (default: their keys)."""
    lines = [
        "| comparison | Δ NLL (A−B) [CI] | P(A lower NLL) | Δ accuracy (A−B) [CI] | P(A more accurate) | datasets A/=/B better (acc) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        n, a = r.get("nll"), r.get("accuracy")
        dn = f"{n['difference']:+.4f} [{n['ci'][0]:+.4f}, {n['ci'][1]:+.4f}]" if n else "n/a"
        da = (
            f"{100 * a['difference']:+.2f} pt [{100 * a['ci'][0]:+.2f}, {100 * a['ci'][1]:+.2f}]"
            if a
            else "n/a"
        )
        pn = f"{n['p_a_better']:.3f}" if n else "n/a"
        pa = f"{a['p_a_better']:.3f}" if a else "n/a"
        wl = f"{a['wins']}/{a['ties']}/{a['losses']}" if a else "n/a"
        lines.append(f"| {comparison_name(r, key, labels)} | {dn} | {pn} | {da} | {pa} | {wl} |")
    return "\n".join(lines) + "\n"
