"""merit's own small instruction-tuned base model θ0, for the embedded demo and benchmarks.

The paper starts from an instruction-tuned model sitting in a flat, "merge-ready" basin. Nothing
can be downloaded here, so merit builds one: a byte-level BPE tokenizer trained locally with a
ChatML template, and a small Llama pre-instruction-tuned on examples reserved for it (the ``base``
split, disjoint from every calibration/train/eval example of the run). The result is an ordinary
Hugging Face model directory, cached by a hash of everything that defines it, and loaded through
the same ``from_pretrained`` code as a hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from merit.config import DemoBaseConfig, TrainingConfig
from merit.data.mixture import Mixture, encode, render
from merit.train.sft import train_sft

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def example_texts(examples: Iterable) -> list[str]:
    """The texts a tokenizer is trained on: every message of each example, and its answer."""
    texts = []
    for ex in examples:
        texts.extend(m["content"] for m in ex.messages)
        texts.append(ex.answer)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int, extra_special: tuple[str, ...] = ()):
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast`` with ChatML;
    ``extra_special`` are further special tokens (a vision model's image markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>", *extra_special],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: DemoBaseConfig, tokenizer, max_length: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def demo_base_key(cfg: DemoBaseConfig, mixture: Mixture, max_length: int, seed: int) -> str:
    """Cache key: everything that defines the demo θ0 (its data included)."""
    what = {
        "demo": cfg.model_dump(mode="json"),
        "max_length": max_length,
        "seed": seed,
        "data": [
            (d.name, d.file_hash, d.splits["base"], d.splits["train"]) for d in mixture.datasets
        ],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def build_demo_base(
    cfg: DemoBaseConfig,
    mixture: Mixture,
    cache: Path,
    max_length: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> Path:
    """Build (or find in ``cache``) the demo θ0 and return its model directory."""

    key = demo_base_key(cfg, mixture, max_length, seed)
    target = cache / "base" / f"demo-{key}"
    if (target / "config.json").is_file():
        return target
    texts = example_texts(
        ex for d in mixture.datasets for split in ("base", "train") for ex in d.examples(split)
    )
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
    model = build_model(cfg, tokenizer, max_length, seed).to(device)
    examples = [ex for d in mixture.datasets for ex in d.examples("base")]
    if not examples:
        raise ValueError("the demo base model needs examples: model.demo.examples_per_dataset > 0")
    records = encode(tokenizer, examples, max_length)
    schedule = TrainingConfig(
        learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, warmup_ratio=0.05, seed=seed
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        result = train_sft(
            model, tokenizer, records, schedule, work, max_length, progress, cfg.steps
        )
        (work / "model" / "merit_demo_base.json").write_text(
            json.dumps(
                {"key": key, "steps": result.steps, "final_loss": result.final_loss}, indent=2
            )
        )
        os.replace(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


__all__ = ["CHAT_TEMPLATE", "build_demo_base", "build_model", "build_tokenizer", "render"]
