"""The Gram matrices RegMean merges with (:mod:`merit.merge.methods.regmean`): for every linear
layer of a branch, G = mean over the branch's training tokens of x xᵀ, x the layer's input.

One forward pass of the branch over (a seeded sample of) its own training examples, with a hook
on each ``nn.Linear``; padding is masked out. Layers fed the same input (q/k/v, gate/up) share
one Gram, stored once. A branch's Grams are kept beside it as ``grams.safetensors`` with what
they were computed from, and reused while that is unchanged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merit.artifacts import atomic_path
from merit.lm import Encoded, load_model, pad_batch

GRAMS_FILE = "grams.safetensors"


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The model's linear layers by weight name, less any whose weight is tied to another
    parameter (a tied ``lm_head`` is the embedding, merged as such)."""
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), name)
    out = {}
    for name, module in model.named_modules():
        w = f"{name}.weight"
        if isinstance(module, torch.nn.Linear) and seen.get(id(module.weight)) == w:
            out[w] = module
    return out


@torch.no_grad()
def input_grams(
    model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(Grams by key, weight name -> its Gram's key, tokens): G = Σ x xᵀ / tokens over the
    unpadded tokens of ``batches``, in float64 sums."""
    layers = linear_layers(model)
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    state: dict = {"mask": None, "last": (None, "")}

    def hook(name: str):
        def run(_module, args) -> None:
            x = args[0]
            last, last_key = state["last"]
            key = last_key if x is last else name  # q/k/v (gate/up) run in turn on one input
            state["last"] = (x, key)
            alias.setdefault(name, key)
            if key != name:
                return
            flat = x.reshape(-1, x.shape[-1])[state["mask"]].to(torch.float64)
            g = flat.T @ flat
            sums[key] = g if key not in sums else sums[key].add_(g)

        return run

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    tokens = 0
    try:
        model.eval()
        for b in batches:
            state["mask"], state["last"] = b["attention_mask"].reshape(-1).bool(), (None, "")
            tokens += int(state["mask"].sum())
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {k: (g / max(tokens, 1)).to(torch.float32) for k, g in sums.items()}, alias, tokens


def examples_for(encoded: dict[str, list[Encoded]], datasets: Sequence[str], n: int, seed: int):
    """A seeded sample of at most ``n`` of the datasets' training examples."""
    pool = [e for d in datasets for e in encoded.get(d, [])]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def branch_grams(
    model_dir: Path, examples: list[Encoded], stamp: dict, pad_id: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """The Grams of one branch by weight name, read from ``<job>/grams.safetensors`` while its
    stamp (what they were computed from) is the same, else computed and written there."""
    path = model_dir.parent / GRAMS_FILE
    if (cached := _read(path, stamp)) is not None:
        return cached
    model = load_model(model_dir, torch.device("cpu"), "float32")
    batches = [
        pad_batch(examples[s : s + batch_size], pad_id, torch.device("cpu"))
        for s in range(0, len(examples), batch_size)
    ]
    grams, alias, tokens = input_grams(model, batches)
    meta = {"stamp": json.dumps(stamp, sort_keys=True), "alias": json.dumps(alias)}
    meta["tokens"] = str(tokens)
    with atomic_path(path) as tmp:
        save_file(grams, str(tmp), metadata=meta)
    return {name: grams[key] for name, key in alias.items()}


def _read(path: Path, stamp: dict) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("stamp") != json.dumps(stamp, sort_keys=True):
            return None
        alias = json.loads(meta["alias"])
        grams = {k: f.get_tensor(k) for k in set(alias.values())}
    return {name: grams[key] for name, key in alias.items()}
