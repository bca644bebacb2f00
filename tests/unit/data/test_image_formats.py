"""Image-text records: TRL's vision form and LLaVA / Vision-FLAN JSON, images checked up front."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from merit.config import DataConfig
from merit.data.formats import DataError, load_dataset
from merit.data.mixture import load_mixture, vision_messages


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), "red").save(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_vision_records(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    parts = [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " and "},
        {"type": "image"},
    ]
    rows = [
        {
            "images": ["img/a.png", "img/b.png"],
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": [{"type": "text", "text": "same"}]},
            ],
        },
        # String content: the images go before the first user message, as TRL puts them.
        {"image": "img/a.png", "prompt": "What colour?", "completion": "red"},
    ]
    ds = load_dataset("t", _jsonl(tmp_path / "t.jsonl", rows))
    first, second = ds.examples
    assert first.messages[0]["content"] == "Compare <image> and <image>"
    assert first.answer == "same"
    assert first.images == (str(tmp_path / "img/a.png"), str(tmp_path / "img/b.png"))
    assert second.messages[0]["content"] == "<image>What colour?"
    assert second.images == (str(tmp_path / "img/a.png"),)
    # Back to the structured form processors read, images where they were.
    assert vision_messages(first)[0]["content"] == [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " and "},
        {"type": "image"},
    ]
    assert vision_messages(first, answer=True) == [
        {"role": "assistant", "content": [{"type": "text", "text": "same"}]}
    ]


def test_llava_conversations_with_an_image_folder(tmp_path):
    _png(tmp_path / "pics" / "coco" / "1.png")
    rows = [
        {
            "id": "x1",
            "image": "coco/1.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A square."},
                {"from": "human", "value": "Which colour?"},
                {"from": "gpt", "value": "Red."},
            ],
        }
    ]
    path = tmp_path / "flan.json"
    path.write_text(json.dumps(rows))
    (ex,) = load_dataset("flan", path, image_dir=tmp_path / "pics").examples
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user"]
    assert ex.messages[0]["content"] == "<image>\nWhat is it?"
    assert ex.answer == "Red."  # the last answer carries the loss; earlier turns are context
    assert ex.images == (str(tmp_path / "pics" / "coco" / "1.png"),)


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"images": ["a.png"], "messages": [
                {"role": "user", "content": "<image><image>two?"},
                {"role": "assistant", "content": "no"},
            ]},
            "2 image placeholder(s) but 1 image(s)",
        ),
        ({"image": 3, "prompt": "p", "completion": "c"}, "images must be file paths"),
        (
            {"conversations": [{"from": "robot", "value": "hi"}]},
            "turn 0 of 'conversations' needs 'from'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]},
                          {"role": "assistant", "content": "x"}]},
            "neither text nor an image",
        ),
    ],
)  # fmt: skip
def test_bad_image_records_are_one_line_errors(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_dataset("bad", path)
    assert "\n" not in str(err.value) and f"{path}:1" in str(err.value)


def _mixture_with(tmp_path: Path, broken: str) -> DataConfig:
    rows = []
    for i in range(12):
        name = f"img/{i}.png"
        if i != 7:
            _png(tmp_path / name)
        rows.append({"images": [name], "prompt": "Colour?", "completion": "red"})
    (tmp_path / "img" / "7.png").parent.mkdir(exist_ok=True)
    if broken == "unreadable":
        (tmp_path / "img" / "7.png").write_bytes(b"not an image at all")
    path = _jsonl(tmp_path / "colour.jsonl", rows)
    return DataConfig(
        datasets=[{"name": "colour", "path": str(path)}],
        split={"eval": 2, "calibration": 2},
    )


@pytest.mark.parametrize("broken, why", [("missing", "is missing"), ("unreadable", "unreadable")])
def test_a_missing_or_unreadable_image_names_dataset_record_and_path(tmp_path, broken, why):
    cfg = _mixture_with(tmp_path, broken)
    with pytest.raises(DataError) as err:
        load_mixture(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("colour: record 7: image ") and str(tmp_path / "img" / "7.png") in msg
    assert why in msg


def test_images_stored_inside_a_saved_dataset(tmp_path):
    """A datasets Image feature keeps the image's bytes; merit writes them to a file named by
    their sha256 (the same on every run) instead of chasing the original path."""
    import datasets

    _png(tmp_path / "a.png")
    rows = {"images": [[str(tmp_path / "a.png")]] * 3, "prompt": ["Colour?"] * 3}
    rows["completion"] = ["red"] * 3
    ds = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "a.png").unlink()  # only the dataset's own copy is left
    first, second, _ = load_dataset("saved", tmp_path / "saved").examples
    assert first.images == second.images and Path(first.images[0]).is_file()
    assert Path(first.images[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_image_replaced_is_new_data(tmp_path):
    from PIL import Image

    cfg = _mixture_with(tmp_path, "none")
    _png(tmp_path / "img" / "7.png")
    before = load_mixture(cfg).datasets[0].file_hash
    assert load_mixture(cfg).datasets[0].file_hash == before
    Image.new("RGB", (112, 56), "blue").save(tmp_path / "img" / "3.png")
    assert load_mixture(cfg).datasets[0].file_hash != before
