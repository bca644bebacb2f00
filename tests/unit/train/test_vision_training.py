"""Training a vision-language branch: TRL's vision collator trains exactly merit's tokens, and
LoRA adapts only the trainable groups."""

from __future__ import annotations

import pytest
import torch

from merit.config import LoraConfig
from merit.data.formats import load_dataset
from merit.data.mixture import encode
from merit.lm import IGNORE, load_model
from merit.train.lora import wrap_lora
from merit.train.sft import _to_dataset
from merit.vision import load_processor, param_group


def test_vision_collator_feeds_merits_tokens_and_answer_labels(tiny_vlm, vlm_specs):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    proc = load_processor(tiny_vlm)
    examples = []
    for spec in vlm_specs:  # one or two images, TRL records and LLaVA JSON
        examples += load_dataset(
            spec["name"], spec["path"], image_dir=spec.get("image_dir")
        ).examples[:2]
    records = encode(proc, examples, max_length=96)
    rows = _to_dataset(records, None, examples)
    collate = DataCollatorForVisionLanguageModeling(proc, completion_only_loss=True)
    batch = collate([dict(r) for r in rows])
    for i, rec in enumerate(records):
        keep = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][keep].tolist() == rec.input_ids
        assert batch["labels"][i][keep].tolist() == rec.labels
    answers = sum(r.answer_tokens for r in records)
    assert int((batch["labels"] != IGNORE).sum()) == answers  # loss on answer tokens only
    assert int(batch["attention_mask"].sum()) == sum(len(r.input_ids) for r in records)


def test_lora_adapts_the_language_model_only(tiny_vlm):
    model = load_model(tiny_vlm, torch.device("cpu"), trainable=("language",))
    peft = wrap_lora(model, LoraConfig(r=2))
    adapted = {n.split(".lora_")[0] for n, p in peft.named_parameters() if p.requires_grad}
    assert adapted and all(".lora_" in n for n, p in peft.named_parameters() if p.requires_grad)
    assert {param_group(n.removeprefix("base_model.model.")) for n in adapted} == {"language"}
    assert not any("lm_head" in n for n in adapted)


def test_lora_names_never_reach_a_frozen_tower(tiny_vlm):
    from merit.config import ConfigError

    # "qkv" and "fc1"/"fc2" name linear layers of the vision tower only; "mlp.0" the projector.
    model = load_model(tiny_vlm, torch.device("cpu"), trainable=("language",))
    peft = wrap_lora(model, LoraConfig(r=2, target_modules=["q_proj", "qkv", "fc1"]))
    adapted = {n.split(".lora_")[0] for n, p in peft.named_parameters() if p.requires_grad}
    assert adapted and all(n.endswith("q_proj") for n in adapted)
    model = load_model(tiny_vlm, torch.device("cpu"), trainable=("language",))
    with pytest.raises(ConfigError, match="no linear layer of the trainable groups"):
        wrap_lora(model, LoraConfig(r=2, target_modules=["qkv"]))
