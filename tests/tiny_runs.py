"""The tiny planted mixture, tiny θ0 and run configs every CLI test shares (plain functions;
the fixtures in conftest.py build them once per session). Import from here, by this module's
unique name: a package's own conftest.py may shadow the top-level one."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import yaml

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "ocean",
    "maple",
    "rocket",
    "candle",
    "forest",
]


def make_tasks(seed: int = 0, n: int = 60) -> dict[str, list[dict]]:
    """Four small tasks in two conflicting families (string copying vs string reversing)."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    tasks: dict[str, list[dict]] = {}
    tasks["copy_words"] = [
        {"prompt": f"Copy: {(w := words(3))}", "completion": w} for _ in range(n)
    ]
    tasks["copy_upper"] = [
        {"prompt": f"Copy in capitals: {(w := words(2))}", "completion": w.upper()}
        for _ in range(n)
    ]
    tasks["reverse_words"] = [
        {
            "messages": [
                {"role": "user", "content": f"Reverse the words: {(w := words(3))}"},
                {"role": "assistant", "content": " ".join(reversed(w.split()))},
            ]
        }
        for _ in range(n)
    ]
    tasks["reverse_letters"] = [
        {"prompt": f"Reverse: {(w := rng.choice(WORDS))}", "completion": w[::-1]} for _ in range(n)
    ]
    return tasks


def write_mixture(root: Path, n: int = 60) -> list[dict]:
    """JSONL files for the four tasks plus one BIG-bench multiple-choice task; returns specs."""
    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, rows in make_tasks(n=n).items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs.append({"name": name, "path": str(p)})
    rng = random.Random(1)
    examples = []
    for _ in range(n):
        w = rng.choice(WORDS)
        scores = {w: 1, w[::-1]: 0, w.upper(): 0}
        examples.append({"input": f"Which is the word {w}?", "target_scores": scores})
    task = {
        "name": "pick_word",
        "description": "pick the word",
        "keywords": [],
        "metrics": ["multiple_choice_grade"],
        "preferred_score": "multiple_choice_grade",
        "examples": examples,
    }
    bb = root / "pick_word.json.gz"
    bb.write_bytes(gzip.compress(json.dumps(task).encode()))
    specs.append({"name": "pick_word", "path": str(bb)})
    return specs


def build_tiny_base(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny Llama with a locally trained tokenizer and chat template, saved like a hub model."""
    from merit.config import DemoBaseConfig
    from merit.demo import build_model, build_tokenizer

    tok = build_tokenizer(texts, vocab_size=400)
    arch = DemoBaseConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    model = build_model(arch, tok, max_length=128, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# The sections every CLI test's tiny run shares; each test updates the sections it varies.
TINY_RUN = {
    "model": {"max_length": 96},
    "data": {"split": {"eval": 6, "calibration": 8, "train": 24}},
    "calibration": {"batch_size": 8, "sketch_dim": 4096},
    "planning": {"rank": 1},
    "runtime": {"device": "cpu", "threads": 1, "progress": False},
}


def write_run_config(path: Path, run_dir: Path, specs, base: Path, **sections: dict) -> Path:
    """Write a tiny run's YAML at ``path``: ``TINY_RUN`` with each of ``sections`` merged in."""
    cfg: dict = {"run_dir": str(run_dir), **{k: dict(v) for k, v in TINY_RUN.items()}}
    cfg["model"]["path"] = str(base)
    cfg["data"]["datasets"] = specs
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path
