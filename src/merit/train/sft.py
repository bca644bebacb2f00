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
from merit.errors import StageError
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
from merit.train.logits import answer_only_applies
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
    max_length: int,
    n_examples: int,
    progress: bool,
    checkpoint_steps: int | None = None,
    keep_checkpoints: int = 2,
    vision: bool = False,
    report_to: Sequence[str] = (),
    layers: Sequence[str] = (),
):
    """The ``SFTConfig`` shared by every branch: one schedule for all (paper §3.3).

    ``n_examples`` is the length of the fixed order (:func:`schedule`), read once, sequentially.
    With ``vision`` nothing is cut (cutting into an image's tokens breaks the model's input).
    ``layers``: the model's decoder-layer classes, FSDP's wrapping unit.
    ``cfg.extra`` (validated with the config: no field merit sets itself) is passed through.
    """
    from trl import SFTConfig

    args = _sft_settings(cfg, device, max_length, n_examples, progress, vision)
    args.update(_checkpointing(checkpoint_steps, keep_checkpoints))
    args.update(_parallelism(cfg, layers, world_size(), device))
    args.update(cfg.extra)  # never a field merit sets: the config refuses those
    return SFTConfig(output_dir=str(out_dir), report_to=list(report_to), **args)


def world_size() -> int:
    """Processes training this branch together (``torchrun`` / ``accelerate launch``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def precision(cfg: TrainingConfig, device: torch.device) -> str:
    """``training.precision`` resolved: auto is bf16-mixed on a GPU, fp32 on CPU (bf16 math on
    CPU is ~6x slower)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def train_dtype(cfg: TrainingConfig, device: torch.device) -> str:
    """The dtype θ0 is loaded in to train: bf16 for pure bf16, else fp32 master weights."""
    return "bfloat16" if precision(cfg, device) == "bf16" else "float32"


def check_levers(cfg: TrainingConfig, device: torch.device) -> None:
    """A one-line error for a speed lever this process cannot pull (packages are checked with
    the config)."""
    if cfg.liger_kernel and device.type != "cuda":
        raise StageError(f"training.liger_kernel needs a GPU (Triton kernels); this is {device}")


def _sft_settings(
    cfg: TrainingConfig,
    device: torch.device,
    max_length: int,
    n_examples: int,
    progress: bool,
    vision: bool,
) -> dict:
    """The ``SFTConfig`` fields merit sets (``merit.config.SFT_OWNED``) and the defaults it picks
    that ``training.extra`` may change (``merit.config.SFT_DEFAULTS``)."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps = max(1, math.ceil(n_examples / per_step))
    distributed = world_size() > 1
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
        bf16=precision(cfg, device) != "fp32",
        fp16=False,
        gradient_checkpointing=cfg.gradient_checkpointing and cfg.distributed != "fsdp",
        # Only with checkpointing on: transformers ≥ 5.2x warns about any value of this alias.
        gradient_checkpointing_kwargs={"use_reentrant": False}
        if cfg.gradient_checkpointing
        else None,
        use_liger_kernel=cfg.liger_kernel,
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


def _parallelism(
    cfg: TrainingConfig, layers: Sequence[str], world: int, device: torch.device | None = None
) -> dict:
    """FSDP or DeepSpeed for a branch that several processes train (DDP needs nothing: accelerate
    wraps the model when launched so). One process trains alone, whatever ``distributed`` says,
    and CPU processes train under DDP (:func:`sharding_refused`)."""
    if world < 2 or cfg.distributed in ("none", "ddp") or sharding_refused(cfg, device):
        return {}
    if cfg.distributed == "fsdp":
        # FSDP2, one shard unit per decoder layer (the model's own `_no_split_modules`); the full
        # state dict is gathered on save, so the branch is an ordinary safetensors model.
        fsdp = {
            "version": 2,
            "transformer_layer_cls_to_wrap": list(layers),
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": cfg.gradient_checkpointing,
        }
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp}
    return {"deepspeed": deepspeed_config(cfg.deepspeed_config)}


def fsdp_layers(model) -> list[str]:
    """FSDP's shard units: the model's decoder-layer classes, as transformers declares them
    (``_no_split_modules``: the blocks never split across devices), never a hard-coded list."""
    return sorted(set(getattr(model, "_no_split_modules", None) or ()))


def sharding_refused(cfg: TrainingConfig, device: torch.device | None) -> str | None:
    """Why ``training.distributed`` cannot shard on this device, or None.

    accelerate (1.16, ``AcceleratorState``) turns FSDP on only for accelerator process groups
    (MULTI_GPU, MULTI_NPU, ...) and DeepSpeed only when not on CPU: CPU processes given either
    would silently train under DDP, so merit says so and asks for DDP itself."""
    if cfg.distributed in ("fsdp", "deepspeed") and device is not None and device.type == "cpu":
        return (
            f"training.distributed={cfg.distributed}: accelerate shards only on GPUs "
            "(it runs CPU processes under DDP); these CPU processes train under DDP, which "
            "gives the same weights"
        )
    return None


def deepspeed_config(name: str) -> str:
    """The DeepSpeed JSON for ``training.deepspeed_config``: a shipped template or a path."""
    shipped = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"{name}.json"
    return str(shipped if shipped.is_file() else Path(name))


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
    args = sft_config(cfg, trainer_dir, p0.device, max_length, len(order), progress,
                      checkpoint_steps=checkpoint_steps, keep_checkpoints=keep_checkpoints,
                      vision=examples is not None, report_to=report_to, layers=fsdp_layers(model))  # fmt: skip
    if world_size() > 1 and (why := sharding_refused(cfg, p0.device)):
        say(why)
    resume, tokens_start, dropped = (
        resume_point(trainer_dir, run_key, label, say) if checkpoint_steps else (None, 0, [])
    )
    hooks = (run_key, tokens_start, out_dir / PROGRESS_FILE if checkpoint_steps else None, label)
    data = (records, order, examples)
    trainer, callback = _fit(model, tokenizer, cfg, args, data, hooks, resume, trainer_dir, say)
    _save_final(trainer, tokenizer, out_dir, p0.dtype, save_dtype, lora=cfg.lora is not None)
    callback._progress(trainer.state, "trained", force=True)
    return _result(trainer.state, records, order, callback.tokens_seen, resume, dropped)


def _fit(
    model, tokenizer, cfg: TrainingConfig, args, data: tuple, hooks: tuple, resume, trainer_dir, say
):
    """Train ``model`` (wrapped in LoRA adapters with ``cfg.lora``) on ``data`` (``_to_dataset``'s
    arguments) under the preemption signals; returns (trainer, callback), or raises
    :class:`Preempted` when a signal stopped training early (after the checkpoint of the current
    step). ``hooks``: ``branch_callback``'s last four arguments."""
    answer_only = answer_only_applies(model, args.device)  # PEFT passes logits_to_keep through
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
        trainer.merit_answer_only = answer_only
        trainer_ref.append(trainer)
        _say_placement(trainer, hooks[-1], say)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    if callback.stopped_by is not None and state.global_step < state.max_steps:
        callback._progress(state, "preempted", force=True)
        raise Preempted(state.global_step, trainer_dir / f"checkpoint-{state.global_step}")
    return trainer, callback


def _say_placement(trainer, label: str, say) -> None:
    """Where the branch trains: its processes, how they share it, its precision and levers."""
    acc = trainer.accelerator
    if not acc.is_main_process:
        return
    how = "ddp" if acc.num_processes > 1 else "one process"
    how = "deepspeed" if trainer.is_deepspeed_enabled else how
    how = "fsdp" if trainer.is_fsdp_enabled else how
    mixed = {"bf16": "bf16 autocast", "no": "no autocast"}.get(acc.mixed_precision)
    dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
    levers = [f"{acc.num_processes} process(es) on {acc.device.type}", how, f"{dtype} weights"]
    levers.append(mixed or f"{acc.mixed_precision} autocast")
    if trainer.args.gradient_checkpointing:
        levers.append("gradient checkpointing")
    if getattr(trainer, "merit_answer_only", False):
        levers.append("answer-only logits")
    say(f"{label}: " + ", ".join(levers))


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
    """The branch's final weights: ``model/`` (full, θ0's dtype) and for LoRA ``adapter/``.

    A sharded model (FSDP, ZeRO-3) is gathered first, which every process takes part in; only
    the first process writes."""
    acc = trainer.accelerator
    save_dtype = save_dtype or dtype
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        state_dict = acc.get_state_dict(trainer.model_wrapped)
        if acc.is_main_process:
            state_dict = {k: v.to(save_dtype) for k, v in state_dict.items()}
            model = acc.unwrap_model(trainer.model)
            model.save_pretrained(out_dir / "model", state_dict=state_dict)
            _save_processing(tokenizer, out_dir / "model")
        acc.wait_for_everyone()
        return
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if lora:
            save_lora_branch(model, out_dir, save_dtype)
        else:
            model.to(save_dtype).save_pretrained(out_dir / "model")
        _save_processing(tokenizer, out_dir / "model")
    acc.wait_for_everyone()


def _save_processing(tokenizer, out: Path) -> None:
    """The tokenizer, or a vision-language model's processor, beside the weights."""
    if is_processor(tokenizer):
        save_processor(tokenizer, out)
    else:
        tokenizer.save_pretrained(out)
