"""Fine-tuning one branch (or a baseline) from θ0 with TRL's ``SFTTrainer`` (paper §3.3).

Every branch gets the same hyper-parameters and the same trainable parameters; only its data
differs. The data is handed to TRL already tokenized (``input_ids`` + ``labels`` with -100 on
prompt tokens), so the loss is on answer tokens only and the token count N_k that weights the merge
is exactly what the branch trained on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merit.config import TrainingConfig
from merit.mixture import Encoded


@dataclass
class TrainResult:
    steps: int
    examples: int
    tokens: int
    answer_tokens: int
    losses: list[tuple[int, float]]  # (step, mean train loss over the logging window)
    final_loss: float | None


def _to_dataset(records: Sequence[Encoded]):
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [r.input_ids for r in records],
            "labels": [r.labels for r in records],
            "length": [len(r.input_ids) for r in records],
        }
    )


def sft_config(
    cfg: TrainingConfig,
    out_dir: Path,
    device: torch.device,
    model_dtype: torch.dtype,
    max_length: int,
    n_examples: int,
    progress: bool,
    max_steps: int | None = None,
):
    """The ``SFTConfig`` shared by every branch: one schedule for all (paper §3.3)."""
    from trl import SFTConfig

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps = max_steps or max(1, math.ceil(n_examples * cfg.epochs / per_step))
    on_gpu = device.type == "cuda"
    return SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # TRL turns bf16 and gradient checkpointing on by default; on CPU that is ~6x slower.
        bf16=on_gpu and model_dtype == torch.bfloat16,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=device.type == "cpu",
        max_length=max_length,
        packing=False,
        completion_only_loss=None,
        # Less padding on CPU: batches of similar length (still shuffled, seeded).
        train_sampling_strategy="group_by_length",
        logging_steps=max(1, steps // 40),
        save_strategy="no",
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


def train_sft(
    model,
    tokenizer,
    records: Sequence[Encoded],
    cfg: TrainingConfig,
    out_dir: str | Path,
    max_length: int,
    progress: bool = True,
    max_steps: int | None = None,
    save_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``records`` and save it (safetensors) to ``out_dir/model``.

    Weights are saved in ``save_dtype`` (θ0's dtype), so every branch has θ0's tensor layout.
    """
    from trl import SFTTrainer

    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    args = sft_config(
        cfg, out_dir / "trainer", device, dtype, max_length, len(records), progress, max_steps
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=_to_dataset(records), processing_class=tokenizer
    )
    trainer.train()
    model = trainer.model
    if save_dtype is not None and save_dtype != dtype:
        model = model.to(save_dtype)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    losses = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    return TrainResult(
        steps=int(trainer.state.global_step),
        examples=len(records),
        tokens=sum(len(r.input_ids) for r in records),
        answer_tokens=sum(r.answer_tokens for r in records),
        losses=losses,
        final_loss=losses[-1][1] if losses else None,
    )
