"""Losses that choose and diagnose: the validation split picks joint training's learning rate
and the shrinkage control's α; a sample of training examples gives the train-loss gap.

Losses here are the mean NLL over every answer token of the examples (the quantity training
minimises), computed through :class:`merit.diagnose.premises.LMObjective`. Nothing is ever
chosen on the eval split or on the unseen tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from merit.diagnose.premises import LMObjective, lm_batches
from merit.errors import StageError
from merit.graph import Context
from merit.lm import load_model


def objective(run: Context, split: str, examples: int | None = None, seed: int = 0) -> LMObjective:
    """θ0 as a loss over ``split``'s examples (all, or ``examples`` spread over datasets)."""
    enc = run.sample(split, examples, seed)
    if not enc:
        raise StageError(f"no {split} examples to choose on")
    pad = run.base.tokenizer.pad_token_id
    batches = lm_batches(enc, run.cfg.evaluation.batch_size, pad, run.device)
    return LMObjective(run.base.load(), batches)


def vector(obj: LMObjective, path: Path, dtype: str) -> torch.Tensor:
    """A saved model's parameters in the objective's order."""
    return obj.vector(load_model(path, torch.device("cpu"), dtype))


def losses(obj: LMObjective, models: Mapping[str, Path], dtype: str) -> dict[str, float]:
    """L of each saved model (key -> loss)."""
    return {k: obj.loss(vector(obj, p, dtype)) for k, p in models.items()}


def alpha_curve(
    obj: LMObjective, theta0: torch.Tensor, theta: torch.Tensor, alphas: list[float]
) -> dict[float, float]:
    """L(θ0 + α(θ − θ0)) for each α of the grid, smallest α first (so :func:`best_key` breaks
    ties toward the shorter move)."""
    return {a: obj.loss(theta0 + a * (theta - theta0)) for a in sorted(alphas)}


def best_key(curve: Mapping):
    """The key of the lowest loss (the first of equals, in the grid's order)."""
    return min(curve, key=lambda k: curve[k])
