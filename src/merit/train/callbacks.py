"""What runs inside the Trainer's loop for a branch: preemption signals, token counting, sealing
checkpoints and progress reports.

SIGTERM / SIGUSR1 only set a flag; at the end of the current step the callback asks the Trainer
to save and stop, seals the checkpoint (:mod:`merit.train.checkpoints`) and the caller raises
:class:`Preempted`. The Trainer and callback classes subclass TRL / transformers classes, which
are imported only when a branch trains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from merit.artifacts import write_json
from merit.train.checkpoints import seal_checkpoint
from merit.train.logits import answer_loss, answer_positions

PROGRESS_FILE = "progress.json"
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after checkpointing; re-running resumes it."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"preempted at step {step}; checkpoint {checkpoint} saved, re-run the same command to "
            "resume"
        )


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signum = signum


@contextlib.contextmanager
def preemption_signals() -> Iterator[StopFlag]:
    """SIGTERM / SIGUSR1 set a flag (checked at each step end) instead of killing the process."""
    flag = StopFlag()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPT_SIGNALS:
            previous[sig] = signal.signal(sig, flag)
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def world_sum(values: list[int], device: torch.device) -> list[int]:
    """Sum over the processes of a distributed (accelerate) run; identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(x) for x in t.tolist()]


def trainer_class():
    from trl import SFTTrainer

    class BranchTrainer(SFTTrainer):
        """SFTTrainer that counts the tokens of every micro-batch it trains on.

        TRL's own ``num_input_tokens_seen`` restarts on resume; this count is restored from the
        checkpoint marker, so the manifest's tokens seen covers the whole branch.
        """

        merit_tokens_since_step = 0

        merit_answer_only = False  # set by merit.train.sft when merit.train.logits applies

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if not self.merit_answer_only or labels is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            keep = answer_positions(labels)
            rest = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**rest, use_cache=False, logits_to_keep=keep)
            loss = answer_loss(outputs.logits, labels, keep, num_items_in_batch)
            # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP
            # averages the gradients over ranks.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            n = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self.merit_tokens_since_step += n
            return super().training_step(model, inputs, *args, **kwargs)

    return BranchTrainer


class BranchHooks:
    """Counts tokens, stops on a preemption signal, seals checkpoints, reports progress.

    The hooks of the branch's ``TrainerCallback`` (:func:`branch_callback` adds the base class).
    """

    def __init__(
        self,
        trainer_ref: list,
        flag: StopFlag,
        run_key: str,
        tokens_start: int,
        progress_path: Path | None,
        label: str,
    ) -> None:
        self.trainer_ref = trainer_ref
        self.flag = flag
        self.run_key = run_key
        self.progress_path = progress_path
        self.label = label
        self.tokens_seen = tokens_start
        self.last_loss: float | None = None
        self.last_write = 0.0
        self.stopped_by: int | None = None

    def on_step_end(self, args, state, control, **kw):
        trainer = self.trainer_ref[0]
        stop, tokens = world_sum(
            [int(self.flag.signum is not None), trainer.merit_tokens_since_step], args.device
        )
        trainer.merit_tokens_since_step = 0
        self.tokens_seen += tokens
        if stop and state.global_step < state.max_steps:
            self.stopped_by = self.flag.signum or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
        self._progress(state, "running", force=bool(control.should_save))

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seal_checkpoint(ckpt, state.global_step, self.tokens_seen, self.run_key)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def _progress(self, state, status: str, force: bool = False) -> None:
        now = time.time()
        if self.progress_path is None or not state.is_world_process_zero:
            return
        if not force and now - self.last_write < 0.2:
            return
        self.last_write = now
        write_json(
            self.progress_path,
            {
                "label": self.label,
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


def branch_callback(
    trainer_ref: list,
    flag: StopFlag,
    run_key: str,
    tokens_start: int,
    progress_path: Path | None,
    label: str,
) -> BranchHooks:
    """The branch's callback: :class:`BranchHooks` as a transformers ``TrainerCallback``."""
    from transformers import TrainerCallback

    class BranchCallback(BranchHooks, TrainerCallback):
        """Counts tokens, stops on a preemption signal, seals checkpoints, reports progress."""

    return BranchCallback(trainer_ref, flag, run_key, tokens_start, progress_path, label)
