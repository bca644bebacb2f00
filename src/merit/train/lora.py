"""LoRA branches (PEFT): train low-rank adapters per branch, merge their weight deltas.

A LoRA branch k changes each adapted weight by ΔW_k = s_k · B_k A_k (s = alpha / r, or
alpha / sqrt(r) with rsLoRA). MERIT's merge θ̄ = Σ_k w_k θ_k (paper eq. 3) with θ_k = θ0 + ΔW_k and
Σ_k w_k = 1 is θ0 + Σ_k w_k s_k B_k A_k: the average of the *products*. Averaging A and B
separately gives s (Σ w_k B_k)(Σ w_k A_k) instead, which has cross terms B_j A_k that no branch
trained (the average of products is not the product of averages).

So each LoRA branch writes its adapter (``adapter/``) and the full weights θ0 + ΔW_k
(``model/``, PEFT's ``merge_and_unload``); the ordinary streaming merge of those full models is the
correct average of deltas. :func:`merge_adapters` also writes the merge as one adapter: stacking
the ranks, A = [A_1; …; A_K] and B = [w_1 s_1 B_1, …, w_K s_K B_K] give B A = Σ_k w_k s_k B_k A_k
exactly, with rank Σ_k r_k.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from merit.config import ConfigError, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def wrap_lora(model, cfg: LoraConfig):
    """θ0 with fresh PEFT LoRA adapters; only the adapters train.

    With frozen parameters (a vision-language θ0's ``model.trainable``), adapters go only on the
    linear layers of the trainable groups (by default the language model's), never the head:
    PEFT would otherwise match ``all-linear``, or names like ``q_proj``, in the vision tower
    too, which calibration did not sketch and the merge keeps as θ0's.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    if any(not p.requires_grad for p in model.parameters()):
        targets = _trainable_linears(model, targets)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def _trainable_linears(model, targets: list[str] | str) -> list[str]:
    """Full names of the linear layers ``targets`` names (PEFT's rule: the name or its last
    parts; ``all-linear``: every one but the head) whose weights may train."""
    head = model.get_output_embeddings()
    out = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and m.weight.requires_grad
        and m is not head
        and (targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets))
    ]
    if not out:
        raise ConfigError(
            f"training.lora.target_modules={targets}: no linear layer of the trainable groups"
        )
    return out


def save_lora_branch(peft_model, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Write ``adapter/`` (PEFT format) and ``model/`` = θ0 + s·B·A in θ0's dtype."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir / "adapter")
    full = peft_model.merge_and_unload()
    full.to(dtype).save_pretrained(out_dir / "model")


def _scale(config: dict) -> float:
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _module_key(name: str) -> str:
    """``base_model.model.model.layers.0.q_proj.lora_A.weight`` → ``model.layers.0.q_proj``."""
    return name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]


def read_adapter(
    adapter_dir: str | Path,
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter config, {module: (A, B)}) of a PEFT LoRA adapter directory (safetensors)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: not a LoRA adapter ({config.get('peft_type')})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-module ranks are not supported")
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if ".lora_A." in name:
            pairs.setdefault(_module_key(name), {})["A"] = t
        elif ".lora_B." in name:
            pairs.setdefault(_module_key(name), {})["B"] = t
    return config, {k: (v["A"], v["B"]) for k, v in pairs.items()}


def adapter_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """ΔW = s · B A per adapted module (``<module>.weight`` → delta, float64)."""
    config, pairs = read_adapter(adapter_dir)
    s = _scale(config)
    return {f"{m}.weight": s * (b.double() @ a.double()) for m, (a, b) in pairs.items()}


def average_of_products(adapter_dirs: Sequence[str | Path], weights: Sequence[float]):
    """Σ_k w_k s_k B_k A_k per module: what MERIT's merge adds to θ0."""
    out: dict[str, torch.Tensor] = {}
    for d, w in zip(adapter_dirs, weights):
        for name, delta in adapter_deltas(d).items():
            out[name] = out.get(name, 0) + w * delta
    return out


def product_of_averages(adapter_dirs: Sequence[str | Path], weights: Sequence[float]):
    """s (Σ_k w_k B_k)(Σ_k w_k A_k) per module: naive factor averaging (wrong; for comparison)."""
    read = [read_adapter(d) for d in adapter_dirs]
    s = _scale(read[0][0])
    out = {}
    for m in read[0][1]:
        a = sum(w * pairs[m][0].double() for (_c, pairs), w in zip(read, weights))
        b = sum(w * pairs[m][1].double() for (_c, pairs), w in zip(read, weights))
        out[f"{m}.weight"] = s * (b @ a)
    return out


def merge_adapters(
    adapter_dirs: Sequence[str | Path], weights: Sequence[float], out: str | Path
) -> Path:
    """One adapter equal to the merge: rank-stacked A and weighted, scaled B (exact, rank Σ r_k).

    Loaded on θ0 with PEFT it gives θ0 + Σ_k w_k s_k B_k A_k, the same weights as the merged
    model. The scale is folded into B (alpha = r, plain LoRA scaling 1).
    """
    from safetensors.torch import save_file

    out = Path(out)
    read = [read_adapter(d) for d in adapter_dirs]
    modules = list(read[0][1])
    for d, (_c, pairs) in zip(adapter_dirs, read):
        if list(pairs) != modules:
            raise ValueError(f"{d}: adapts other modules than {adapter_dirs[0]}")
    tensors = {}
    for m in modules:
        a = torch.cat([pairs[m][0].float() for _c, pairs in read], dim=0)
        b = torch.cat(
            [w * _scale(c) * pairs[m][1].float() for (c, pairs), w in zip(read, weights)], dim=1
        )
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
    rank = sum(int(c["r"]) for c, _p in read)
    config = dict(read[0][0])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
