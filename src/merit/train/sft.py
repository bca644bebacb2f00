"""Fine-tuning one branch (or a baseline) from θ0 with TRL's ``SFTTrainer`` (paper §3.3).

Every branch gets the same hyper-parameters and the same trainable parameters; only its data
differs. The data is handed to TRL already tokenized (``input_ids`` + ``labels`` with -100 on
prompt tokens), so the loss is on answer tokens only and the token count N_k that weights the merge
is exactly what the branch trained on.

A branch survives preemption. Hugging Face Trainer checkpoints (weights in safetensors; optimizer,
scheduler and RNG state) are written every ``checkpoint_steps`` optimizer steps, each sealed by a
small ``merit-checkpoint.json`` written after the Trainer finished it (file sizes and sha256, step,
tokens seen). A re-run resumes from the newest *sealed and intact* checkpoint and produces weights
bitwise equal to an uninterrupted run: merit fixes the whole example order up front (a seeded
length-grouped permutation per epoch) and the Trainer reads it sequentially, so skipping the
batches already trained is exact. SIGTERM / SIGUSR1 checkpoint at the end of the current step and
raise :class:`Preempted`. The checkpoints are :mod:`merit.train.checkpoints`, what runs in the
Trainer's loop (signals, token counts, progress) :mod:`merit.train.callbacks`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merit.config import TrainingConfig
from merit.data.formats import Example
from merit.data.mixture import vision_messages
from merit.lm import Encoded

# Checkpoints and preemption, imported from here by the CLI, the train stage and the tests.
from merit.train.callbacks import (  # noqa: F401
    PREEMPT_SIGNALS,
    PROGRESS_FILE,
    Preempted,
    branch_callback,
    preemption_signals,
    trainer_class,
)
from merit.train.checkpoints import (  # noqa: F401
    CHECKPOINT_MARKER,
    checkpoint_dirs,
    checkpoint_problem,
    newest_valid_checkpoint,
    resume_point,
    seal_checkpoint,
)
from merit.train.lora import save_lora_branch, wrap_lora
from merit.vision import is_processor, save_processor


@dataclass
class TrainResult:
    steps: int
    examples: int
    tokens: int  # tokens of the distinct training examples (the plan's N_k)
    answer_tokens: int
    losses: list[tuple[int, float]]  # (step, mean train loss over the logging window)
    final_loss: float | None
    tokens_seen: int = 0  # counted by merit batch by batch, across resumes
    tokens_scheduled: int = 0  # what the schedule feeds: epochs × N_k for whole epochs
    resumed_from: int | None = None  # step of the checkpoint this run resumed from
    dropped_checkpoints: list[str] = field(default_factory=list)


# -- the example order -------------------------------------------------------------------------
def schedule(
    lengths: Sequence[int],
    per_step: int,
    epochs: float,
    seed: int,
    max_steps: int | None = None,
) -> list[int]:
    """Indices of every example the run trains on, in order, fixed before training starts.

    Each epoch is a length-grouped permutation (batches of similar length, less padding on CPU),
    seeded by (seed, epoch) alone: the order never depends on a global RNG, so a resumed run
    skips exactly the batches it already trained. ``epochs`` may be fractional; ``max_steps``
    (if given) instead asks for ``max_steps × per_step`` examples, cycling through epochs.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    n = len(lengths)
    if n == 0:
        return []
    total = max_steps * per_step if max_steps else math.ceil(n * epochs)
    order: list[int] = []
    epoch = 0
    while len(order) < total:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order.extend(
            int(i) for i in get_length_grouped_indices(list(lengths), per_step, generator=g)
        )
        epoch += 1
    return order[:total]


def _to_dataset(
    records: Sequence[Encoded],
    order: Sequence[int] | None = None,
    examples: Sequence[Example] | None = None,
):
    """The rows TRL trains on, in the fixed order: merit's tokens (``input_ids`` + ``labels``),
    or for image-text ``examples`` TRL's vision prompt/completion rows, which its vision
    collator tokenizes and processes batch by batch (completion-only loss: the answer tokens)."""
    from datasets import Dataset

    order = range(len(records)) if order is None else order
    if examples is not None:
        return Dataset.from_list(
            [
                {
                    "prompt": vision_messages(examples[i]),
                    "completion": vision_messages(examples[i], answer=True),
                    "images": list(examples[i].images),
                }
                for i in order
            ]
        )
    return Dataset.from_dict(
        {
            "input_ids": [records[i].input_ids for i in order],
            "labels": [records[i].labels for i in order],
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
    checkpoint_steps: int | None = None,
    keep_checkpoints: int = 2,
    vision: bool = False,
    report_to: Sequence[str] = (),
):
    """The ``SFTConfig`` shared by every branch: one schedule for all (paper §3.3).

    ``n_examples`` is the length of the fixed order (:func:`schedule`), read once, sequentially.
    With ``vision`` nothing is cut (cutting into an image's tokens breaks the model's input).
    ``cfg.extra`` (validated with the config: no field merit sets itself) is passed through.
    """
    from trl import SFTConfig

    args = _sft_settings(cfg, device, model_dtype, max_length, n_examples, progress, vision)
    args.update(_checkpointing(checkpoint_steps, keep_checkpoints))
    args.update(cfg.extra)  # never a field merit sets: the config refuses those
    return SFTConfig(output_dir=str(out_dir), report_to=list(report_to), **args)


def _sft_settings(
    cfg: TrainingConfig,
    device: torch.device,
    model_dtype: torch.dtype,
    max_length: int,
    n_examples: int,
    progress: bool,
    vision: bool,
) -> dict:
    """The ``SFTConfig`` fields merit sets (``merit.config.SFT_OWNED``) and the defaults it picks
    that ``training.extra`` may change (``merit.config.SFT_DEFAULTS``)."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps = max(1, math.ceil(n_examples / per_step))
    on_gpu = device.type == "cuda"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return dict(
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=1,  # one pass over the fixed order, which already holds every epoch
        max_steps=-1,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # TRL turns bf16 and gradient checkpointing on by default; on CPU that is ~6x slower.
        bf16=on_gpu and model_dtype == torch.bfloat16,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=device.type == "cpu",
        max_length=None if vision else max_length,
        packing=False,
        completion_only_loss=None,
        train_sampling_strategy="sequential",
        # Under accelerate (DDP/FSDP) each batch of `batch_size` is split across the processes,
        # so a branch has the same optimizer steps and schedule on 1 GPU or 8.
        accelerator_config={"split_batches": True} if distributed else None,
        disable_tqdm=not progress,
        # A vision-language batch without images leaves the projector without gradients.
        ddp_find_unused_parameters=(None if vision else False) if distributed else None,
        remove_unused_columns=True,
        logging_steps=max(1, steps // 40),
        dataloader_num_workers=0,
    )


def _checkpointing(checkpoint_steps: int | None, keep_checkpoints: int) -> dict:
    """The ``SFTConfig`` settings for checkpoints: every ``checkpoint_steps`` steps (if any),
    the newest ``keep_checkpoints`` kept, with optimizer state; callbacks' state not restored."""
    return {
        "save_strategy": "steps" if checkpoint_steps else "no",
        "save_steps": checkpoint_steps or 500,
        "save_total_limit": keep_checkpoints if checkpoint_steps else None,
        "save_only_model": False,
        "restore_callback_states_from_checkpoint": False,
    }


# -- training ----------------------------------------------------------------------------------
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
    *,
    checkpoint_steps: int | None = None,
    keep_checkpoints: int = 2,
    run_key: str = "",
    label: str = "branch",
    log: Callable[[str], None] | None = None,
    examples: Sequence[Example] | None = None,
    report_to: Sequence[str] = (),
) -> TrainResult:
    """Train ``model`` on ``records`` and save it (safetensors) to ``out_dir/model``.

    For a vision-language model ``tokenizer`` is its processor and ``examples`` (aligned with
    ``records``, which fix the order and the token count) are what TRL's vision collator reads.

    Weights are saved in ``save_dtype`` (θ0's layout); with ``cfg.lora`` PEFT LoRA adapters
    train, saved to ``out_dir/adapter``, and ``out_dir/model`` holds θ0 + s·B·A (merit.train.lora).

    With ``checkpoint_steps``, sealed checkpoints go to ``out_dir/trainer`` and a call resumes
    from the newest valid one whose ``run_key`` matches (newer incomplete ones are deleted);
    SIGTERM / SIGUSR1 save a checkpoint at the end of the current step and raise
    :class:`Preempted`. ``report_to``: the Trainer's metric integrations (``runtime.report_to``).
    """
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    p0 = next(model.parameters())  # θ0's device and dtype
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    order = schedule([len(r.input_ids) for r in records], per_step, cfg.epochs, cfg.seed, max_steps)
    trainer_dir = out_dir / "trainer"
    args = sft_config(
        cfg,
        trainer_dir,
        p0.device,
        p0.dtype,
        max_length,
        len(order),
        progress,
        checkpoint_steps=checkpoint_steps,
        keep_checkpoints=keep_checkpoints,
        vision=examples is not None,
        report_to=report_to,
    )
    resume, tokens_start, dropped = (
        resume_point(trainer_dir, run_key, label, say) if checkpoint_steps else (None, 0, [])
    )
    hooks = (run_key, tokens_start, out_dir / PROGRESS_FILE if checkpoint_steps else None, label)
    data = (records, order, examples)
    trainer, callback = _fit(model, tokenizer, cfg, args, data, hooks, resume, trainer_dir)
    _save_final(trainer, tokenizer, out_dir, p0.dtype, save_dtype, lora=cfg.lora is not None)
    callback._progress(trainer.state, "trained", force=True)
    return _result(trainer.state, records, order, callback.tokens_seen, resume, dropped)


def _fit(
    model, tokenizer, cfg: TrainingConfig, args, data: tuple, hooks: tuple, resume, trainer_dir
):
    """Train ``model`` (wrapped in LoRA adapters with ``cfg.lora``) on ``data`` (``_to_dataset``'s
    arguments) under the preemption signals; returns (trainer, callback), or raises
    :class:`Preempted` when a signal stopped training early (after the checkpoint of the current
    step). ``hooks``: ``branch_callback``'s last four arguments."""
    if cfg.lora is not None:
        model = wrap_lora(model, cfg.lora)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer_ref: list = []
    with preemption_signals() as flag:
        callback = branch_callback(trainer_ref, flag, *hooks)
        trainer = trainer_class()(
            model=model,
            args=args,
            train_dataset=_to_dataset(*data),
            processing_class=tokenizer,
            callbacks=[callback],
        )
        trainer_ref.append(trainer)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    if callback.stopped_by is not None and state.global_step < state.max_steps:
        callback._progress(state, "preempted", force=True)
        raise Preempted(state.global_step, trainer_dir / f"checkpoint-{state.global_step}")
    return trainer, callback


def _result(state, records, order, tokens_seen: int, resume, dropped) -> TrainResult:
    losses = [(int(h["step"]), float(h["loss"])) for h in state.log_history if "loss" in h]
    return TrainResult(
        steps=int(state.global_step),
        examples=len(records),
        tokens=sum(len(r.input_ids) for r in records),
        answer_tokens=sum(r.answer_tokens for r in records),
        losses=losses,
        final_loss=losses[-1][1] if losses else None,
        tokens_seen=tokens_seen,
        tokens_scheduled=sum(len(records[i].input_ids) for i in order),
        resumed_from=int(resume.name.split("-")[1]) if resume else None,
        dropped_checkpoints=dropped,
    )


def _save_final(trainer, tokenizer, out_dir: Path, dtype, save_dtype, lora: bool) -> None:
    """The branch's final weights: ``model/`` (full, θ0's dtype) and for LoRA ``adapter/``."""
    acc = trainer.accelerator
    if trainer.is_fsdp_enabled:
        # Gathering a sharded model is collective: every process takes part, the first writes.
        state_dict = acc.get_state_dict(trainer.model_wrapped)
        if acc.is_main_process:
            model = acc.unwrap_model(trainer.model)
            model.save_pretrained(out_dir / "model", state_dict=state_dict)
            _save_processing(tokenizer, out_dir / "model")
        acc.wait_for_everyone()
        return
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if lora:
            save_lora_branch(model, out_dir, save_dtype or dtype)
        else:
            if save_dtype is not None and save_dtype != dtype:
                model = model.to(save_dtype)
            model.save_pretrained(out_dir / "model")
        _save_processing(tokenizer, out_dir / "model")
    acc.wait_for_everyone()


def _save_processing(tokenizer, out: Path) -> None:
    """The tokenizer, or a vision-language model's processor, beside the weights."""
    if is_processor(tokenizer):
        save_processor(tokenizer, out)
    else:
        tokenizer.save_pretrained(out)
