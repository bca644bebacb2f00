"""``data.json``, typed: each dataset's file, splits and training tokens; and its table."""

from __future__ import annotations

from dataclasses import dataclass, field

from merit.artifacts import Artifact


@dataclass
class DataRecord(Artifact):
    """``data.json``: each dataset's file, splits (example indices) and training tokens."""

    settings: dict
    base_fingerprint: str
    datasets: list[dict]
    unseen: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # Left out: a split they need had only examples over model.max_length (data.overlong=drop).
    too_long: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = super().to_json()
        if not out["too_long"]:  # a run that leaves nothing out keeps its data.json
            del out["too_long"]
        return out


def data_table(rec: DataRecord) -> str:
    """The mixture as a table: dataset, format, samples per split, train tokens.

    A ``val`` column appears only when some dataset has validation examples, so the table of a
    run without validation reads as it always has.
    """
    cols = [("train", "train"), ("calibration", "calib"), ("eval", "eval"), ("base", "base")]
    if any(r["splits"].get("validation", 0) for r in rec.datasets):
        cols.insert(1, ("validation", "val"))
    head = f"{'dataset':<48} {'format':<9} " + " ".join(f"{t:>6}" for _, t in cols)
    # Image-text mixtures: the training images (their tokens are in `tokens`).
    images = any(r.get("train_images") for r in rec.datasets)
    head += f" {'tokens':>9}" + (f" {'images':>7}" if images else "")
    lines = [head, "-" * len(head)]
    tot = dict.fromkeys([k for k, _ in cols] + ["tokens", "images"], 0)
    for r in rec.datasets:
        s = r["splits"]
        counts = " ".join(f"{s.get(k, 0):>6}" for k, _ in cols)
        line = f"{r['name'][:48]:<48} {r['format']:<9} {counts} {r['train_tokens']:>9}"
        lines.append(line + (f" {r['train_images']:>7}" if images else ""))
        for k, _ in cols:
            tot[k] += s.get(k, 0)
        tot["tokens"] += r["train_tokens"]
        tot["images"] += r.get("train_images", 0)
    lines.append("-" * len(head))
    counts = " ".join(f"{tot[k]:>6}" for k, _ in cols)
    label = f"total ({len(rec.datasets)} datasets)"
    line = f"{label:<48} {'':<9} {counts} {tot['tokens']:>9}"
    lines.append(line + (f" {tot['images']:>7}" if images else ""))
    if unseen := rec.unseen:
        names = ", ".join(u["name"] for u in unseen[:6]) + (" …" if len(unseen) > 6 else "")
        lines.append(f"unseen tasks (never trained on; evaluated): {len(unseen)} [{names}]")
    if over := overlong_line(rec):
        lines.append(over)
    if too_long := too_long_line(rec):
        lines.append(too_long)
    if dropped := rec.dropped:
        lines.append(
            f"left out of training (they share examples with unseen tasks): {', '.join(dropped)}"
        )
    return "\n".join(lines)


_DONE = {"drop": "dropped", "truncate": "truncated", "error": "refused"}


def overlong_line(rec: DataRecord) -> str:
    """How many examples were over ``model.max_length`` and what was done, per dataset."""
    rows = [(r["name"], r["overlong"]) for r in rec.datasets + rec.unseen if r.get("overlong")]
    if not rows:
        return ""
    o = rows[0][1]
    per = ", ".join(
        f"{name} {' + '.join(f'{n} {split}' for split, n in x['splits'].items())}"
        for name, x in rows
    )
    total = sum(n for _, x in rows for n in x["splits"].values())
    return (
        f"{total} example(s) over model.max_length={o['max_length']} tokens, "
        f"{_DONE[o['action']]} (data.overlong={o['action']}): {per}"
    )


def too_long_line(rec: DataRecord) -> str:
    if not rec.too_long:
        return ""
    return "left out (every example of a split they need is over model.max_length): " + ", ".join(
        rec.too_long
    )
