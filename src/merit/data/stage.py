"""Stage 0: load, split and tokenize the mixture (``data.json``)."""

from __future__ import annotations

from merit.data.artifact import DataRecord, data_table, overlong_line, too_long_line
from merit.graph import STAGES, Context, Stage

READS = ("seed", "model", "data")


def _row(d, train: list, cfg) -> dict:
    row = {
        "name": d.name,
        "format": d.data.format,
        "path": d.data.path,
        "sha256": d.file_hash,
        "examples": len(d.data.examples),
        "splits": {k: len(v) for k, v in d.splits.items()},
        "train_tokens": sum(len(e.input_ids) for e in train),
        "train_answer_tokens": sum(e.answer_tokens for e in train),
        "train_images": sum(len(ex.images) for ex in d.examples("train")),
        "indices": d.splits,
    }
    return _with_overlong(row, d, cfg)


def _with_overlong(row: dict, d, cfg) -> dict:
    if d.overlong:  # only then: a run with nothing over the budget keeps its data.json
        row["overlong"] = {
            "splits": d.overlong, "max_length": cfg.model.max_length, "action": cfg.data.overlong
        }  # fmt: skip
    return row


def build(ctx: Context, _inputs: dict) -> DataRecord:
    """Load, split and tokenize the mixture (splits, counts, tokens)."""
    train = ctx.encoded("train")
    mixture = ctx.mixture
    rec = DataRecord(
        settings=ctx.cfg.settings(*READS),
        base_fingerprint=ctx.base.fingerprint,
        datasets=[_row(d, train[d.name], ctx.cfg) for d in mixture.datasets],
        unseen=[
            _with_overlong(
                {"name": d.name, "sha256": d.file_hash, "eval": len(d.splits["eval"])}, d, ctx.cfg
            )
            for d in mixture.unseen
        ],
        dropped=mixture.dropped,
        too_long=mixture.too_long,
    )
    # Said by every command that builds it (merit demo prints no table): nothing cut unsaid.
    for line in (overlong_line(rec), too_long_line(rec)):
        if line:
            ctx.say(line)
    return rec


STAGE = STAGES.register(
    Stage(
        name="data",
        help="load, split and tokenize the mixture; print a table of it",
        reads=READS,
        artifact=DataRecord,
        path=lambda p: p.data,
        build=build,
        what="data.json",
        show=lambda _ctx, rec: data_table(rec),
        order=10,
    )
)
