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
        }
        write_json(run.paths.data, rec)
    return rec


def data_table(rec: dict) -> str:
    """The mixture as a table: dataset, format, samples per split, train tokens."""
    head = f"{'dataset':<48} {'format':<9} {'train':>6} {'calib':>6} {'eval':>6} {'base':>6} {'tokens':>9}"
    lines = [head, "-" * len(head)]
    tot = {"train": 0, "calibration": 0, "eval": 0, "base": 0, "tokens": 0}
    for r in rec["datasets"]:
        s = r["splits"]
        lines.append(
            f"{r['name'][:48]:<48} {r['format']:<9} {s['train']:>6} {s['calibration']:>6} "
            f"{s['eval']:>6} {s['base']:>6} {r['train_tokens']:>9}"
        )
        for k in ("train", "calibration", "eval", "base"):
            tot[k] += s[k]
        tot["tokens"] += r["train_tokens"]
    lines.append("-" * len(head))
    lines.append(
        f"{'total (' + str(len(rec['datasets'])) + ' datasets)':<48} {'':<9} {tot['train']:>6} "
        f"{tot['calibration']:>6} {tot['eval']:>6} {tot['base']:>6} {tot['tokens']:>9}"
    )
    if unseen := rec.get("unseen"):
        names = ", ".join(u["name"] for u in unseen[:6]) + (" …" if len(unseen) > 6 else "")
        lines.append(f"unseen tasks (never trained on; evaluated): {len(unseen)} [{names}]")
    return "\n".join(lines)
