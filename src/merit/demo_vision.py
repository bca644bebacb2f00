"""merit's tiny vision-language θ0 and image-text mixture, built offline: for the tests, the
benchmark of the vision pipeline and a first try of merit on images without a GPU.

θ0 is a Qwen2-VL (vision tower, merger projector, language model) with random weights, a
byte-level BPE tokenizer trained locally, Qwen's chat template and image tokens, and Qwen2-VL's
own slow (PIL) image processor with its default settings. The mixture's four tasks ask
genuinely different things of 56×56 images (4 image tokens each): the colour of a square, how
many squares there are, where one is (multiple choice), and whether two images show the same
colour (two images per example). They come in both image-text formats merit reads: TRL's vision
records (JSONL) and LLaVA / Vision-FLAN JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from merit.demo import build_tokenizer
from merit.vision import image_only_processor, save_processor

IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's chat template, without its tool and video branches.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The language model's sizes (a Llama with these is the text twin in bench/vision_pipeline.py)
# and the vision tower's: patch 14, merge 2 and temporal 2 are the image processor's defaults.
LANGUAGE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
VISION = {
    "depth": 1,
    "embed_dim": 32,
    "hidden_size": 32,  # the merger's output: the language model's width
    "num_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
SIZE = 56  # the image processor's minimum (56² pixels): 4 image tokens
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}


def _square(colour: str, where: tuple[int, int], side: int = 16):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    x, y = where
    ImageDraw.Draw(img).rectangle([x, y, x + side, y + side], fill=COLOURS[colour])
    return img


def _save(img, root: Path, rel: str) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    img.save(root / rel)
    return rel


def _user(text: str, images: int) -> dict:
    parts = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _colour(root: Path, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        c = rng.choice(list(COLOURS))
        rel = _save(_square(c, (rng.randint(4, 36), rng.randint(4, 36))), root, f"colour/{i}.png")
        msgs = [_user("What colour is the square?", 1), _assistant(c)]
        rows.append({"images": [rel], "messages": msgs})
    return rows


def _count(root: Path, rng: random.Random, n: int) -> list[dict]:
    from PIL import ImageDraw

    rows = []
    for i in range(n):
        k = rng.randint(1, 4)
        img = _square("blue", (2, 2), side=8)
        for j in range(1, k):
            x, y = 2 + 26 * (j % 2), 2 + 26 * (j // 2)
            ImageDraw.Draw(img).rectangle([x, y, x + 8, y + 8], fill=COLOURS["blue"])
        rel = _save(img, root, f"count/{i}.png")
        turns = [
            {"from": "human", "value": "<image>\nHow many squares are there?"},
            {"from": "gpt", "value": str(k)},
        ]
        rows.append({"id": f"count-{i}", "image": rel, "conversations": turns})
    return rows


def _position(root: Path, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        side = rng.choice(["left", "right"])
        x = rng.randint(2, 12) if side == "left" else rng.randint(30, 38)
        rel = _save(_square("green", (x, rng.randint(4, 36))), root, f"position/{i}.png")
        rows.append(
            {
                "images": [rel],
                "prompt": [_user("Is the square on the left or on the right?", 1)],
                "completion": [_assistant(side)],
                "choices": ["left", "right"],
            }
        )
    return rows


def _same(root: Path, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a = rng.choice(list(COLOURS))
        b = a if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != a])
        rels = [
            _save(_square(c, (rng.randint(4, 36), rng.randint(4, 36))), root, f"same/{i}-{j}.png")
            for j, c in enumerate((a, b))
        ]
        msgs = [
            _user("Do the two squares have the same colour?", 2),
            _assistant("yes" if a == b else "no"),
        ]
        rows.append({"images": rels, "messages": msgs})
    return rows


def write_image_mixture(root: str | Path, n: int = 40, seed: int = 0) -> list[dict]:
    """Write the four tasks (``n`` examples each, images in ``root/images``); return their
    ``data.datasets`` entries."""
    root = Path(root)
    images = root / "images"
    rng = random.Random(seed)
    specs = []
    for name, make in (
        ("colour", _colour),
        ("count", _count),
        ("position", _position),
        ("same", _same),
    ):
        rows = make(images, rng, n)
        if name == "count":  # LLaVA / Vision-FLAN JSON, paths relative to image_dir
            path = root / f"{name}.json"
            path.write_text(json.dumps(rows))
            specs.append({"name": name, "path": str(path), "image_dir": str(images)})
        else:  # TRL's vision records, paths relative to the file's folder
            for r in rows:
                r["images"] = [f"images/{p}" for p in r["images"]]
            path = root / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            specs.append({"name": name, "path": str(path)})
    return specs


def mixture_texts(specs: list[dict]) -> list[str]:
    """Every text of the fixture mixture, to train the tokenizer on."""
    texts = []
    for s in specs:
        raw = Path(s["path"]).read_text()
        texts.append(raw)
    return texts


def build_tiny_vlm(
    path: str | Path, texts: list[str], seed: int = 0, vocab_size: int = 400
) -> Path:
    """A tiny Qwen2-VL with random weights and a processor made locally, saved like a hub model
    (``from_pretrained`` and ``AutoProcessor`` load it)."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    tok = build_tokenizer(texts, vocab_size, IMAGE_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in (*IMAGE_TOKENS, "<|im_end|>", "<|pad|>")}
    text = {
        **LANGUAGE,
        "vocab_size": len(tok),
        # Σ mrope_section must be head_dim / 2 (8 / 2); Qwen's default fits only its own sizes.
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|pad|>"],
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|pad|>"],
    )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|pad|>"]
    )
    model.save_pretrained(path)
    processor = image_only_processor("Qwen2VLProcessor")(
        image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok, chat_template=CHAT_TEMPLATE
    )
    save_processor(processor, path)
    return path
