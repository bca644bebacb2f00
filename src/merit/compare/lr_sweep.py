"""``compare.lr_sweep``: joint training and the compare config's own MERIT at each learning rate of
a grid (multiples of ``training.learning_rate``; the optimizer is ``training.optim``, AdamW by
default, ``sgd`` for the paper's sweep), scored on held-out examples and unseen tasks: where on
the curve, if anywhere, does MERIT beat joint training? (The paper: MERIT matches or beats joint
training for η ≥ 8 × 10⁻⁵ under SGD.) Every (model, rate) is an ordinary run, trained once and
reused, as every row of the table is.
"""

from __future__ import annotations

import io

import numpy as np

from merit.compare.rows import Unit
from merit.compare.units import Comparison, produce, score
from merit.evaluate.statistics import paired_metrics, with_intervals

PRIMARY = "nll"


def sweep_units(cmp: Comparison, seed: int) -> list[tuple[float, Unit, Unit]]:
    """(multiple, joint unit, MERIT unit) per rate; at a multiple of 1 they are the table's own."""
    cfg = cmp.run.cfg
    out = []
    for m in cfg.compare.lr_sweep:
        over = {"training.seed": seed, "training.learning_rate": cfg.training.learning_rate * m}
        tag = f"-lr{m:g}" if m != 1 else ""
        out.append((m, Unit("lr-sweep", f"joint{tag}-s{seed}", seed, "joint", over),
                    Unit("lr-sweep", f"merit{tag}-s{seed}", seed, "merged", over)))  # fmt: skip
    return out


def run_sweep(cmp: Comparison) -> list[dict]:
    """Per rate: joint's and MERIT's held-out and unseen-task NLL with intervals, and MERIT −
    joint paired (the first seed: a sweep is one seed's curve)."""
    ec = cmp.run.cfg.evaluation
    stats = (ec.bootstrap_samples, ec.confidence, ec.seed)
    seed = (cmp.run.cfg.compare.seeds or [cmp.run.cfg.training.seed])[0]
    out = []
    for m, ju, mu in sweep_units(cmp, seed):
        lr = cmp.run.cfg.training.learning_rate * m
        cmp.run.say(f"compare: learning-rate sweep at {lr:g}")
        js = score(produce(cmp.run, ju), f"joint, lr {lr:g}")
        ms = score(produce(cmp.run, mu), f"MERIT, lr {lr:g}")
        point = {"multiple": m, "learning_rate": lr}
        for where, a, b in (
            ("heldout", ms.datasets, js.datasets),
            ("unseen", ms.unseen, js.unseen),
        ):
            if a:
                point[where] = _point(a, b, stats)
        out.append(point)
    return out


def _point(merit: dict, joint: dict, stats: tuple) -> dict:
    sm, sj = with_intervals(merit, *stats), with_intervals(joint, *stats)
    return {"joint": sj[PRIMARY], "joint_ci": sj[f"{PRIMARY}_ci"], "merit": sm[PRIMARY],
            "merit_ci": sm[f"{PRIMARY}_ci"], "difference": paired_metrics(merit, joint, *stats)[
                PRIMARY]}  # fmt: skip


def sweep_markdown(points: list[dict]) -> str:
    lines = ["| learning rate | joint NLL | MERIT NLL | MERIT − joint | unseen: joint | unseen: "
             "MERIT | unseen: MERIT − joint |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in points:
        cells = [f"{p['learning_rate']:g}"]
        for where in ("heldout", "unseen"):
            r = p.get(where)
            if r is None:
                cells += ["–"] * 3
                continue
            d = r["difference"]
            cells += [f"{r['joint']:.3f}", f"{r['merit']:.3f}",
                      f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_figure(points: list[dict]) -> bytes:
    """Held-out and unseen-task NLL against the learning rate, joint and MERIT, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    lr = np.array([p["learning_rate"] for p in points])
    for ax, where, title in ((axes[0], "heldout", "held-out examples"),
                             (axes[1], "unseen", "unseen tasks")):  # fmt: skip
        for who, color in (("joint", "0.3"), ("merit", "C0")):
            pts = [p[where] for p in points if where in p]
            if not pts:
                continue
            y = np.array([r[who] for r in pts])
            ci = np.array([r[f"{who}_ci"] or [r[who], r[who]] for r in pts])
            ax.errorbar(lr[: len(y)], y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="o-",
                        color=color, capsize=3, label="joint" if who == "joint" else "MERIT")  # fmt: skip
        ax.set_xscale("log")
        # The grid's own rates as ticks: log-axis minor labels collide on a narrow range.
        ax.set_xticks(lr, [f"{x:.1e}" for x in lr])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="learning rate η", ylabel="answer NLL", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
