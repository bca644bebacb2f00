"""Merges fitted to data, run by a run's merge stage (and ``merit compare``'s merge rows): RegMean
on each branch's own training inputs, learned coefficients on the validation split. Each returns
the engine's per-tensor weightings and what to record in the merge manifest.

``run`` is a stage context (:class:`merit.graph.Context`): its θ0, data, config and console.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merit.diagnose.coefficients import Coefficients, fit_coefficients, layer_groups
from merit.diagnose.premises import LMObjective, lm_batches
from merit.errors import StageError
from merit.hashing import cached_sha256
from merit.lm import load_model
from merit.merge.arithmetic import Weighting, plan_weighting
from merit.merge.errors import MergeError
from merit.merge.grams import branch_grams, examples_for
from merit.merge.methods import get_method
from merit.merge.methods.regmean import tensor_method
from merit.merge.safetensors_io import read_specs
from merit.run import RunPaths


def fitted_overrides(
    run, datasets: list[list[str]], dirs: list[Path], weights: list[float], method: str, params
) -> tuple[dict[str, Weighting], dict]:
    """Per-tensor weightings and a manifest record for a fitted ``method`` ({} and {} for any
    other); ``datasets[k]`` are branch k's training datasets."""
    if not get_method(method).fitted:
        return {}, {}
    if method == "regmean":
        return _regmean(run, datasets, dirs, weights, params)
    return _learned(run, dirs, weights, params)


def _regmean(run, datasets, dirs, weights, params) -> tuple[dict[str, Weighting], dict]:
    n, seed = run.cfg.merging.gram_examples, run.cfg.seed
    encoded = run.encoded("train")
    pad = run.base.tokenizer.pad_token_id
    grams = []
    for names, d in zip(datasets, dirs):
        examples = examples_for(encoded, names, n, seed)
        if not examples:
            raise StageError(f"regmean: no training examples of {', '.join(names)} for Grams")
        stamp = {"job": cached_sha256(RunPaths.manifest(d.parent), run.cache / "sha256"),
                 "examples": n, "seed": seed}  # fmt: skip
        run.say(f"regmean: Grams of {d.parent.name} on {len(examples)} training examples")
        grams.append(branch_grams(d, examples, stamp, pad, run.cfg.evaluation.batch_size))
    specs, _ = read_specs(run.base.dir)
    shapes = {name: spec.shape for name, spec in specs.items()}
    out = regmean_overrides(weights, params, shapes, grams)
    return out, {"regmean": {"layers": len(out), "gram_examples": n}}


def _objectives(run) -> tuple[LMObjective, LMObjective]:
    """The validation split cut in two, by a seeded shuffle: a quarter (at least one example)
    decides when to stop, the rest is fitted on."""
    examples = run.sample("validation", None, 0)
    if len(examples) < 2:
        raise StageError("learned: the validation split needs at least 2 examples")
    order = list(range(len(examples)))
    random.Random(run.cfg.seed).shuffle(order)
    cut = max(1, len(order) // 4)
    module = run.base.load()
    pad, bs = run.base.tokenizer.pad_token_id, run.cfg.evaluation.batch_size
    make = lambda idx: LMObjective(  # noqa: E731
        module, lm_batches([examples[i] for i in idx], bs, pad, run.device)
    )
    return make(order[cut:]), make(order[:cut])


def _learned(run, dirs, weights, params) -> tuple[dict[str, Weighting], dict]:
    fit, stop = _objectives(run)
    theta0 = fit.vector()
    cpu, dtype = torch.device("cpu"), run.cfg.model.dtype
    deltas = [fit.vector(load_model(d, cpu, dtype)).sub_(theta0) for d in dirs]
    labels = layer_groups(fit.names, int(params["groups"]))
    space = Coefficients(theta0, deltas, fit.names, [p.numel() for p in fit.params], labels)
    init = torch.tensor([[params["scale"] * w] * len(space.groups) for w in weights])
    steps = int(params["steps"])
    with tqdm(total=steps, desc="learned", unit="step", disable=not run.progress) as bar:
        result = fit_coefficients(fit, stop, space, init, steps, params["lr"], tick=bar.update)
    whole = _whole(fit, stop, space, init, torch.tensor(result.coefficients))
    lowered = whole["fitted"] < whole["start"]
    run.say(
        f"learned: validation loss {whole['start']:.4f} at the start (λ = {params['scale']:g}·w), "
        f"{whole['fitted']:.4f} fitted (step {result.best_step}): "
        + ("lowered" if lowered else "did not lower it")
    )
    specs, _ = read_specs(run.base.dir)
    missing = [n for n in fit.names if n not in specs]
    if missing:
        raise StageError(f"learned: θ0's files have no tensor {missing[0]!r}")
    out = {
        name: plan_weighting([row[space.groups.index(g)] for row in result.coefficients],
                             method="task_vector")
        for name, g in zip(fit.names, labels)
    }  # fmt: skip
    record = {"groups": result.by_group(), "best_step": result.best_step,
              "validation_loss": whole, "lowered": lowered, "history": result.history}  # fmt: skip
    return out, {"learned": record}


def _whole(fit, stop, space, start, fitted) -> dict[str, float]:
    """The whole validation split's loss at the starting and the fitted coefficients."""
    n_fit, n_stop = fit.count, stop.count

    def loss(lam) -> float:
        theta = space.theta(lam)
        return (fit.loss(theta) * n_fit + stop.loss(theta) * n_stop) / (n_fit + n_stop)

    return {"start": loss(start), "fitted": loss(fitted)}


def regmean_overrides(
    weights: Sequence[float],
    params: Mapping[str, float],
    shapes: Mapping[str, tuple[int, ...]],
    grams: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, Weighting]:
    """The per-tensor weightings of every linear layer that each branch has a Gram for
    (``grams[k][tensor name]``); :class:`MergeError` if the branches' Grams disagree."""
    names = set(grams[0])
    if any(set(g) != names for g in grams[1:]):
        raise MergeError("regmean: the branches' Grams cover different layers")
    out = {}
    for name in sorted(names):
        shape = tuple(shapes[name])
        gs = [g[name] for g in grams]
        if len(shape) != 2 or any(tuple(g.shape) != (shape[1], shape[1]) for g in gs):
            raise MergeError(f"regmean: {name} is {list(shape)}, its Grams {list(gs[0].shape)}")
        spec = tensor_method((shape[0], shape[1]), gs)
        plan = plan_weighting(weights, method="regmean", params=params)
        out[name] = dataclasses.replace(plan, spec=spec, base_coefficient=0.0)
    return out
