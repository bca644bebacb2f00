"""Tiny Llama checkpoints for the merge tests: θ0, seeded branches, and exact references."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
UP = "model.layers.0.mlp.up_proj.weight"


def save_model(
    path: Path,
    *,
    seed: int | None = None,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | None = None,
) -> Path:
    """Save θ0 (seed None) or a branch: θ0 plus seeded noise on every parameter."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.to(dtype)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def exact_merge(dirs: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k θ_k in float64, computed directly from the branch files."""
    states = [read_tensors(d) for d in dirs]
    return {
        name: sum(w * state[name].double() for w, state in zip(weights, states))
        for name in states[0]
    }


def rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to the tensor dict of a single-file checkpoint and save it back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit pattern (so that -0.0 != 0.0 and NaN == NaN)."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32}[tensor.element_size()])
