"""Stage 0: load, split and tokenize the mixture (``data.json``)."""

from __future__ import annotations

from merit.artifacts import read_json, write_json
from merit.run import Run


def prepare_data(run: Run) -> dict:
    """Load, split and tokenize the mixture; write ``data.json`` (splits, counts, tokens)."""
    rec = read_json(run.paths.data) if run.paths.data.is_file() else None
    ok = rec is not None and rec.get("base_fingerprint") == run.base_fingerprint
    if run.reuse("data", rec and rec.get("settings"), "data.json", ok):
        return rec
    with run.timed("data"):
        train = run.encoded("train")
        rows = [
            {
                "name": d.name,
                "format": d.data.format,
                "path": d.data.path,
                "sha256": d.file_hash,
                "examples": len(d.data.examples),
                "splits": {k: len(v) for k, v in d.splits.items()},
                "train_tokens": sum(len(e.input_ids) for e in train[d.name]),
                "train_answer_tokens": sum(e.answer_tokens for e in train[d.name]),
                "train_images": sum(len(ex.images) for ex in d.examples("train")),
                "indices": d.splits,
            }
            for d in run.mixture.datasets
        ]
        unseen = [
            {"name": d.name, "sha256": d.file_hash, "eval": len(d.splits["eval"])}
            for d in run.mixture.unseen
        ]
        rec = {
            "settings": run.cfg.settings("data"),
            "base_fingerprint": run.base_fingerprint,
            "datasets": rows,
            "unseen": unseen,
            "dropped": run.mixture.dropped,
        }
        write_json(run.paths.data, rec)
    return rec


def data_table(rec: dict) -> str:
    """The mixture as a table: dataset, format, samples per split, train tokens.

    A ``val`` column appears only when some dataset has validation examples, so the table of a
    run without validation reads as it always has.
    """
    cols = [("train", "train"), ("calibration", "calib"), ("eval", "eval"), ("base", "base")]
    if any(r["splits"].get("validation", 0) for r in rec["datasets"]):
        cols.insert(1, ("validation", "val"))
    head = f"{'dataset':<48} {'format':<9} " + " ".join(f"{t:>6}" for _, t in cols)
    # Image-text mixtures: the training images (their tokens are in `tokens`).
    images = any(r.get("train_images") for r in rec["datasets"])
    head += f" {'tokens':>9}" + (f" {'images':>7}" if images else "")
    lines = [head, "-" * len(head)]
    tot = dict.fromkeys([k for k, _ in cols] + ["tokens", "images"], 0)
    for r in rec["datasets"]:
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
    label = f"total ({len(rec['datasets'])} datasets)"
    line = f"{label:<48} {'':<9} {counts} {tot['tokens']:>9}"
    lines.append(line + (f" {tot['images']:>7}" if images else ""))
    if unseen := rec.get("unseen"):
        names = ", ".join(u["name"] for u in unseen[:6]) + (" …" if len(unseen) > 6 else "")
        lines.append(f"unseen tasks (never trained on; evaluated): {len(unseen)} [{names}]")
    if dropped := rec.get("dropped"):
        lines.append(
            f"left out of training (they share examples with unseen tasks): {', '.join(dropped)}"
        )
    return "\n".join(lines)
