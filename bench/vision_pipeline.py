"""Benchmark: the whole pipeline on merit's tiny vision-language θ0, stage by stage, against the
same pipeline on the same questions without their images.

    python bench/vision_pipeline.py            # ~2 min on 2 CPU cores; prints the figures

The image-text run: merit's tiny Qwen2-VL (:mod:`merit.demo_vision`) on its four image tasks
(colour, count, position, two-image comparison; ``--n`` examples each, 56×56 images, 4 image
tokens per image). The text run: the same records with the images left out (no ``<image>``), on
a Llama with the VLM's language-model sizes and a tokenizer trained on the same texts. Both go
through the real CLI (``merit run`` then ``merit diagnose``) with the same split, schedule and
settings. Reported per stage: the image-text time, the text time and their ratio (the cost of
the vision tower, the image processor and the image tokens), and the image tokens' share of the
training tokens. Times are from each run's ``timings.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path("/tmp/merit-bench-vision")
STAGES = ["data", "calibrate", "plan", "train branches", "train joint", "merge", "evaluate"]
STAGES += ["diagnose"]


def text_twin(specs: list[dict], out: Path) -> list[dict]:
    """The same examples as TRL text records: the prompt without its images, the same answer."""
    from merit.data.formats import IMAGE, load_dataset

    out.mkdir(parents=True, exist_ok=True)
    twins = []
    for s in specs:
        rows = []
        for ex in load_dataset(s["name"], s["path"], image_dir=s.get("image_dir")).examples:
            msgs = [{**m, "content": m["content"].replace(IMAGE, "").strip()} for m in ex.messages]
            row = {"prompt": msgs, "completion": ex.answer}
            if ex.choices:
                row |= {"choices": list(ex.choices), "targets": list(ex.targets)}
            rows.append(row)
        path = out / f"{s['name']}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        twins.append({"name": s["name"], "path": str(path)})
    return twins


def text_base(path: Path, texts: list[str]) -> Path:
    """A Llama with the tiny VLM's language-model sizes (merit.demo_vision.build_tiny_vlm)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from merit.demo import build_tokenizer
    from merit.demo_vision import LANGUAGE

    tok = build_tokenizer(texts, 400)
    config = LlamaConfig(
        **LANGUAGE,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(name: str, base: Path, specs: list[dict]) -> dict:
    cfg = {
        "run_dir": str(ROOT / name),
        "model": {"path": str(base), "max_length": 256},
        "data": {"datasets": specs, "split": {"eval": 10, "calibration": 16}},
        "calibration": {"batch_size": 8, "sketch_dim": 4096},
        "planning": {"rank": 1},
        "training": {"learning_rate": 3e-3, "batch_size": 8},
        "evaluation": {"max_examples": 10, "max_generate": 5, "max_new_tokens": 6},
        "runtime": {"device": "cpu", "threads": 2, "progress": False},
    }
    path = ROOT / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("run", "diagnose"):
        subprocess.run(
            [sys.executable, "-m", "merit.cli", command, str(path)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    timings = json.loads((ROOT / name / "timings.json").read_text())
    data = json.loads((ROOT / name / "data.json").read_text())
    timings["tokens"] = sum(d["train_tokens"] for d in data["datasets"])
    timings["images"] = sum(d.get("train_images", 0) for d in data["datasets"])
    return timings


def main() -> None:
    from merit.demo_vision import build_tiny_vlm, mixture_texts, write_image_mixture

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="examples per task")
    args = parser.parse_args()
    shutil.rmtree(ROOT, ignore_errors=True)
    specs = write_image_mixture(ROOT / "images", n=args.n)
    texts = mixture_texts(specs)
    vlm = build_tiny_vlm(ROOT / "vlm", texts)
    twins = text_twin(specs, ROOT / "text")
    llm = text_base(ROOT / "llm", texts)
    vision, text = run("vision", vlm, specs), run("text", llm, twins)
    print(
        f"4 tasks × {args.n} examples; train tokens: image-text {vision['tokens']}, text "
        f"{text['tokens']} ({vision['images']} training images)"
    )
    print(f"{'stage':<16} {'image-text s':>12} {'text s':>8} {'ratio':>6}")
    for stage in [*STAGES, "total"]:
        v, t = vision.get(stage), text.get(stage)
        if v is None or t is None:
            continue
        if stage == "total":  # merit run's total; diagnose ran after it
            v, t = v + vision["diagnose"], t + text["diagnose"]
        print(f"{stage:<16} {v:>12.2f} {t:>8.2f} {v / t:>6.2f}")


if __name__ == "__main__":
    main()
