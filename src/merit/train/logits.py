"""Logits only where the loss reads them: the language-model head on answer positions alone.

A branch's loss is on answer tokens (prompt labels are -100), yet a causal LM's forward projects
every position onto the whole vocabulary: for SmolLM2 (49,152 tokens) a batch of 8 × 128 tokens
makes 200 M logits, most of them for prompt tokens no loss reads. transformers' ``logits_to_keep``
takes the positions to project; merit passes the positions whose next token is an answer token
in any row of the batch, through the wrapped model's own forward (so DDP and FSDP hooks run as
usual), and takes the same summed cross-entropy over them. TRL's fused head already scores only
answer positions, in tiles, where Triton runs (CUDA, XPU); elsewhere it scores every position,
so merit uses this there.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

IGNORE = -100


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p (of the input) whose next token is labelled in some row: the logits the loss
    reads. Sorted, so ``logits[:, j]`` predicts ``labels[:, positions[j] + 1]``."""
    return torch.nonzero((labels[:, 1:] != IGNORE).any(0)).squeeze(1)


def answer_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The causal LM loss of transformers (``ForCausalLMLoss``: fp32 cross-entropy summed over the
    labelled tokens, divided by ``num_items_in_batch`` or their count) from the logits of
    ``positions`` only."""
    targets = labels[:, positions + 1].to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    count = (targets != IGNORE).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def answer_only_applies(model, device: torch.device) -> bool:
    """Whether merit projects answer positions only: a text causal LM whose forward takes
    ``logits_to_keep``, trained where TRL's fused head would score every position."""
    text_only = model.config.get_text_config() is model.config
    takes = "logits_to_keep" in inspect.signature(type(model).forward).parameters
    moe = getattr(model.config, "output_router_logits", False)  # its aux loss: TRL's path
    triton = device.type in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None
    return text_only and takes and not moe and not triton
