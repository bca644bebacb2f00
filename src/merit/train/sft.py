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
raise :class:`Preempted`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merit.artifacts import sha256_file, write_json
from merit.config import TrainingConfig
from merit.data.formats import Example
from merit.lm import Encoded

CHECKPOINT_MARKER = "merit-checkpoint.json"
PROGRESS_FILE = "progress.json"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after checkpointing; re-running resumes it."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"preempted at step {step}; checkpoint {checkpoint} saved, re-run the same command to "
            "resume"
        )


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
        from merit.data.mixture import vision_messages

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
):
    """The ``SFTConfig`` shared by every branch: one schedule for all (paper §3.3).

    ``n_examples`` is the length of the fixed order (:func:`schedule`), read once, sequentially.
    With ``vision`` nothing is cut (cutting into an image's tokens breaks the model's input).
    """
    from trl import SFTConfig

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps = max(1, math.ceil(n_examples / per_step))
    on_gpu = device.type == "cuda"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=1,  # one pass over the fixed order, which already holds every epoch
        max_steps=-1,
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
        max_length=None if vision else max_length,
        packing=False,
        completion_only_loss=None,
        train_sampling_strategy="sequential",
        # Under accelerate (DDP/FSDP) each batch of `batch_size` is split across the processes,
        # so a branch has the same optimizer steps and schedule on 1 GPU or 8.
        accelerator_config={"split_batches": True} if distributed else None,
        logging_steps=max(1, steps // 40),
        save_strategy="steps" if checkpoint_steps else "no",
        save_steps=checkpoint_steps or 500,
        save_total_limit=keep_checkpoints if checkpoint_steps else None,
        save_only_model=False,
        restore_callback_states_from_checkpoint=False,
        report_to=[],
        disable_tqdm=not progress,
        # A vision-language batch without images leaves the projector without gradients.
        ddp_find_unused_parameters=(None if vision else False) if distributed else None,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


# -- checkpoints -------------------------------------------------------------------------------
def checkpoint_dirs(trainer_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoint-N`` directory, newest first."""
    trainer_dir = Path(trainer_dir)
    if not trainer_dir.is_dir():
        return []
    found = []
    for p in trainer_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def seal_checkpoint(ckpt: Path, step: int, tokens_seen: int, run_key: str) -> dict:
    """Write the marker that makes a checkpoint valid: every file's size and sha256.

    Called after the Trainer has finished writing the checkpoint, so a checkpoint without it
    (killed mid-write, or still being uploaded) is never resumed from.
    """
    files = {
        str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(ckpt.rglob("*"))
        if f.is_file() and f.name != CHECKPOINT_MARKER and not f.name.startswith(".")
    }
    marker = {"step": step, "tokens_seen": tokens_seen, "run_key": run_key, "files": files}
    write_json(ckpt / CHECKPOINT_MARKER, marker)
    return marker


def checkpoint_problem(ckpt: Path, run_key: str) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None if it is complete and intact."""
    mp = ckpt / CHECKPOINT_MARKER
    try:
        marker = json.loads(mp.read_text())
    except FileNotFoundError:
        return "incomplete (no marker)"
    except (OSError, ValueError) as err:
        return f"unreadable marker ({err.__class__.__name__})"
    if marker.get("run_key") != run_key:
        return "from another plan, θ0 or schedule"
    m = _CHECKPOINT_RE.match(ckpt.name)
    if not m or int(m.group(1)) != marker.get("step"):
        return "marker names another step"
    for name, rec in marker.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != rec["size"]:
            return f"{name} has {f.stat().st_size} bytes, sealed with {rec['size']}"
        if sha256_file(f) != rec["sha256"]:
            return f"{name} differs from its sealed sha256"
    return None


def newest_valid_checkpoint(
    trainer_dir: str | Path, run_key: str
) -> tuple[tuple[Path, dict] | None, list[tuple[Path, str]]]:
    """The newest complete, intact checkpoint (path, marker) and the newer ones passed over."""
    skipped = []
    for _step, ckpt in checkpoint_dirs(trainer_dir):
        problem = checkpoint_problem(ckpt, run_key)
        if problem is None:
            return (ckpt, json.loads((ckpt / CHECKPOINT_MARKER).read_text())), skipped
        skipped.append((ckpt, problem))
    return None, skipped


# -- signals, token counting, progress ---------------------------------------------------------
class _StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signum = signum


@contextlib.contextmanager
def preemption_signals() -> Iterator[_StopFlag]:
    """SIGTERM / SIGUSR1 set a flag (checked at each step end) instead of killing the process."""
    flag = _StopFlag()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPT_SIGNALS:
            previous[sig] = signal.signal(sig, flag)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _world_sum(values: list[int], device: torch.device) -> list[int]:
    """Sum over the processes of a distributed (accelerate) run; identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(x) for x in t.tolist()]


def _trainer_class():
    from trl import SFTTrainer

    class BranchTrainer(SFTTrainer):
        """SFTTrainer that counts the tokens of every micro-batch it trains on.

        TRL's own ``num_input_tokens_seen`` restarts on resume; this count is restored from the
        checkpoint marker, so the manifest's tokens seen covers the whole branch.
        """

        merit_tokens_since_step = 0

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            n = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self.merit_tokens_since_step += n
            return super().training_step(model, inputs, *args, **kwargs)

    return BranchTrainer


def _branch_callback(
    trainer_ref: list,
    flag: _StopFlag,
    run_key: str,
    tokens_start: int,
    progress_path: Path | None,
    label: str,
):
    from transformers import TrainerCallback

    class BranchCallback(TrainerCallback):
        """Counts tokens, stops on a preemption signal, seals checkpoints, reports progress."""

        def __init__(self) -> None:
            self.tokens_seen = tokens_start
            self.last_loss: float | None = None
            self.last_write = 0.0
            self.stopped_by: int | None = None

        def on_step_end(self, args, state, control, **kw):
            trainer = trainer_ref[0]
            stop, tokens = _world_sum(
                [int(flag.signum is not None), trainer.merit_tokens_since_step], args.device
            )
            trainer.merit_tokens_since_step = 0
            self.tokens_seen += tokens
            if stop and state.global_step < state.max_steps:
                self.stopped_by = flag.signum or signal.SIGTERM
                control.should_save = True
                control.should_training_stop = True
            self._progress(state, "running", force=bool(control.should_save))

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                seal_checkpoint(ckpt, state.global_step, self.tokens_seen, run_key)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])

        def _progress(self, state, status: str, force: bool = False) -> None:
            now = time.time()
            if progress_path is None or not state.is_world_process_zero:
                return
            if not force and now - self.last_write < 0.2:
                return
            self.last_write = now
            write_json(
                progress_path,
                {
                    "label": label,
                    "status": status,
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "tokens_seen": self.tokens_seen,
                    "loss": self.last_loss,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "time": now,
                },
            )

    return BranchCallback()


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
) -> TrainResult:
    """Train ``model`` on ``records`` and save it (safetensors) to ``out_dir/model``.

    For a vision-language model ``tokenizer`` is its processor and ``examples`` (aligned with
    ``records``, which fix the order and the token count) are what TRL's vision collator reads.

    Weights are saved in ``save_dtype`` (θ0's dtype), so every branch has θ0's tensor layout.
    With ``cfg.lora`` the model is wrapped in PEFT LoRA adapters; the adapter is saved to
    ``out_dir/adapter`` and ``out_dir/model`` holds θ0 + s·B·A (see :mod:`merit.train.lora`).

    With ``checkpoint_steps``, sealed checkpoints go to ``out_dir/trainer`` and a call resumes
    from the newest valid one whose ``run_key`` matches (newer incomplete ones are deleted);
    SIGTERM / SIGUSR1 save a checkpoint at the end of the current step and raise
    :class:`Preempted`.
    """
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    order = schedule([len(r.input_ids) for r in records], per_step, cfg.epochs, cfg.seed, max_steps)
    trainer_dir = out_dir / "trainer"
    args = sft_config(
        cfg,
        trainer_dir,
        device,
        dtype,
        max_length,
        len(order),
        progress,
        checkpoint_steps=checkpoint_steps,
        keep_checkpoints=keep_checkpoints,
        vision=examples is not None,
    )
    resume, tokens_start, dropped = (
        _resume_point(trainer_dir, run_key, label, say) if checkpoint_steps else (None, 0, [])
    )
    if cfg.lora is not None:
        from merit.train.lora import wrap_lora

        model = wrap_lora(model, cfg.lora)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer_ref: list = []
    with preemption_signals() as flag:
        progress_file = out_dir / PROGRESS_FILE if checkpoint_steps else None
        callback = _branch_callback(trainer_ref, flag, run_key, tokens_start, progress_file, label)
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=_to_dataset(records, order, examples),
            processing_class=tokenizer,
            callbacks=[callback],
        )
        trainer_ref.append(trainer)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    if callback.stopped_by is not None and state.global_step < state.max_steps:
        callback._progress(state, "preempted", force=True)
        raise Preempted(state.global_step, trainer_dir / f"checkpoint-{state.global_step}")
    _save_final(trainer, tokenizer, out_dir, dtype, save_dtype, lora=cfg.lora is not None)
    callback._progress(state, "trained", force=True)
    return _result(state, records, order, callback.tokens_seen, resume, dropped)


def _resume_point(
    trainer_dir: Path, run_key: str, label: str, say: Callable[[str], None]
) -> tuple[Path | None, int, list[str]]:
    """The newest sealed checkpoint of this job (and the tokens it had seen); unusable newer
    ones are deleted and named."""
    found, skipped = newest_valid_checkpoint(trainer_dir, run_key)
    dropped = []
    for ckpt, why in skipped:
        say(f"{label}: {ckpt.name} is not usable ({why}); falling back to an older one")
        dropped.append(ckpt.name)
        shutil.rmtree(ckpt, ignore_errors=True)
    if found is None:
        return None, 0, dropped
    resume, marker = found
    say(f"{label}: resuming from {resume.name} (step {marker['step']})")
    return resume, int(marker["tokens_seen"]), dropped


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
            from merit.train.lora import save_lora_branch

            save_lora_branch(model, out_dir, save_dtype or dtype)
        else:
            if save_dtype is not None and save_dtype != dtype:
                model = model.to(save_dtype)
            model.save_pretrained(out_dir / "model")
        _save_processing(tokenizer, out_dir / "model")
    acc.wait_for_everyone()


def _save_processing(tokenizer, out: Path) -> None:
    """The tokenizer, or a vision-language model's processor, beside the weights."""
    from merit.vision import is_processor, save_processor

    if is_processor(tokenizer):
        save_processor(tokenizer, out)
    else:
        tokenizer.save_pretrained(out)
