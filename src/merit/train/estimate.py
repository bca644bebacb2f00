"""Memory per GPU of one branch before any training: ``merit train CONFIG --estimate``.

Everything comes from θ0's config: the model is built on the meta device (:func:`merit.lm.meta_model`),
so no weights are read and a 7B model is counted in seconds. For each strategy and GPU count the
estimate is the bytes per GPU of weights, gradients, optimizer states and activations:

* DDP: every GPU holds all weights, gradients and optimizer states.
* FSDP full shard and DeepSpeed ZeRO-3 on N GPUs: weights, gradients and optimizer states are
  divided by N (the one layer gathered at a time during forward/backward is left out).
* Activations are never sharded. Under accelerate merit splits each batch of
  ``training.batch_size`` across the processes (``split_batches``), so a GPU of N holds the
  activations of ⌈batch / N⌉ examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from merit.config import RunConfig
from merit.gguf import NAMED_MODELS
from merit.lm import ModelPathError, check_model_path, local_model_dir, meta_model
from merit.train.sft import precision
from merit.vision import default_trainable, is_vision_model

GIB = 1024**3
GPU_COUNTS = (1, 8)
# (strategy, GPU count) rows printed: the whole node under each strategy, and one GPU.
STRATEGIES = ("DDP", "FSDP", "ZeRO-3")
SHARDED = ("FSDP", "ZeRO-3")
# AdamW keeps two fp32 moments (exp_avg, exp_avg_sq) per trainable parameter.
ADAM_BYTES = 2 * 4
# Under bf16/fp16 mixed precision the optimizer steps an fp32 master copy of each trainable weight
# (FSDP's fp32 upcast under accelerate, ZeRO's fp32 partition; mixed-precision accounting of Rajbhandari
# et al. 2020, "ZeRO", 2 + 2 + 12 bytes per parameter). Plain torch AdamW on bf16 weights under DDP
# keeps its moments in bf16 and no master copy, so for DDP this is an upper bound.
MASTER_BYTES = 4
# PEFT keeps LoRA adapters in fp32 whatever θ0's dtype (autocast_adapter_dtype).
ADAPTER_BYTES = 4


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of θ0 and the run: sizes, parameter counts, precision, batch."""

    params: int  # θ0's parameters (plus LoRA adapters, when set)
    trainable: int  # the parameters that train (the adapters alone under LoRA)
    hidden: int
    layers: int
    heads: int
    vocab: int
    precision: str  # training.precision on a GPU: fp32, bf16 or bf16-mixed
    lora: bool
    batch: int
    length: int
    checkpointing: bool = False  # training.gradient_checkpointing

    @property
    def weight_bytes(self) -> int:
        """Bytes per value of the weights the GPU computes with (16-bit unless fp32)."""
        return 4 if self.precision == "fp32" else 2

    @property
    def mixed(self) -> bool:
        """fp32 master weights beside the 16-bit compute (bf16-mixed)."""
        return self.precision == "bf16-mixed"


@dataclass(frozen=True)
class Row:
    """Bytes per GPU of one strategy on ``gpus`` GPUs."""

    strategy: str
    gpus: int
    micro_batch: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def name(self) -> str:
        return f"{self.strategy}×{self.gpus}"

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def config_dir(path: str, cache: Path, progress: bool = True) -> Path:
    """A directory holding θ0's ``config.json``: a local directory as is; for a hub id only its
    config is fetched (no weights); a GGUF file or named model as :func:`merit.lm.local_model_dir`
    converts it."""
    check_model_path(path)
    if path == "demo":
        raise ModelPathError(
            "model.path=demo: merit builds that θ0 during the run; --estimate needs a model "
            "directory or hub id"
        )
    p = Path(path).expanduser()
    if path in NAMED_MODELS or p.exists():
        return local_model_dir(path, cache, progress)
    # huggingface_hub is heavy and only a hub id needs it.
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, "config.json")).parent
    except Exception as err:  # offline, not found, gated: one line whatever the cause
        raise ModelPathError(
            f"model.path={path}: its config.json could not be fetched ({type(err).__name__})"
        ) from None


def lora_parameters(model, r: int, targets: list[str] | str) -> int:
    """r × (in + out) per adapted linear layer (A is r × in, B is out × r); ``all-linear`` adapts
    every linear layer but the head, as PEFT does."""
    head = model.get_output_embeddings()
    n = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head or not m.weight.requires_grad:
            continue
        if targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets):
            n += r * (m.in_features + m.out_features)
    return n


def gpu_precision(cfg: RunConfig) -> str:
    """The precision a branch trains in on a GPU (:func:`merit.train.sft.precision`)."""
    return precision(cfg.training, torch.device("cuda"))


def model_shape(model_dir: str | Path, cfg: RunConfig) -> Shape:
    """θ0's sizes from its config alone (meta device), with the run's batch, length and LoRA."""
    lora = cfg.training.lora
    trainable = None
    if is_vision_model(model_dir):
        groups = cfg.model.trainable
        trainable = tuple(groups) if groups else default_trainable(lora is not None)
    model = meta_model(model_dir, trainable)
    text = model.config.get_text_config()
    params = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if lora is not None:
        train = lora_parameters(model, lora.r, lora.target_modules)
        params += train
    return Shape(
        params=params,
        trainable=train,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        precision=gpu_precision(cfg),
        lora=lora is not None,
        batch=cfg.training.batch_size,
        length=cfg.model.max_length,
        checkpointing=cfg.training.gradient_checkpointing,
    )


def activation_bytes(shape: Shape, batch: int) -> float:
    """Activations kept for the backward pass of ``batch`` examples of ``shape.length`` tokens.

    Per decoder layer s·b·h·(34 + 5·a·s/h) bytes in 16-bit without recomputation (Korthikanti
    et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 2: s tokens,
    b examples, h hidden size, a heads), twice that in fp32. With gradient checkpointing each
    layer keeps only its input (s·b·h values) and one layer at a time recomputes the rest. Plus
    the logits b·s·vocab in fp32 (an upper bound: merit and TRL's fused head project only
    answer positions).
    """
    s, h, a = shape.length, shape.hidden, shape.heads
    per_layer = s * batch * h * (34 + 5 * a * s / h)
    scale = 2 if shape.precision == "fp32" else 1
    if shape.checkpointing:
        kept = shape.layers * s * batch * h * 2 * scale + per_layer * scale
    else:
        kept = shape.layers * per_layer * scale
    return kept + batch * s * shape.vocab * 4


def row(shape: Shape, strategy: str, gpus: int) -> Row:
    """Bytes per GPU of ``strategy`` on ``gpus`` GPUs."""
    shard = gpus if strategy in SHARDED else 1
    micro = math.ceil(shape.batch / gpus)
    frozen = shape.params - shape.trainable
    if shape.lora:
        weights = frozen * shape.weight_bytes + shape.trainable * ADAPTER_BYTES
        grads = shape.trainable * ADAPTER_BYTES
        optimizer = shape.trainable * ADAM_BYTES
    else:
        weights = shape.params * shape.weight_bytes
        grads = shape.trainable * shape.weight_bytes
        master = MASTER_BYTES if shape.mixed else 0
        # Pure bf16: torch's AdamW keeps its moments in the parameters' dtype.
        moments = ADAM_BYTES if shape.precision != "bf16" else ADAM_BYTES // 2
        optimizer = shape.trainable * (moments + master)
    return Row(
        strategy,
        gpus,
        micro,
        weights / shard,
        grads / shard,
        optimizer / shard,
        activation_bytes(shape, micro),
    )


def rows(shape: Shape, gpu_counts: tuple[int, ...] = GPU_COUNTS) -> list[Row]:
    """DDP on each GPU count, and the sharded strategies on every count above one."""
    out = [row(shape, "DDP", n) for n in gpu_counts]
    out += [row(shape, s, n) for s in SHARDED for n in gpu_counts if n > 1]
    return out


def advice(shape: Shape, r: Row, limit: float) -> str:
    """What would make ``r`` fit in ``limit`` bytes: gradient checkpointing, more GPUs sharding
    the states, a smaller batch, or a shorter length, each computed from the same estimate."""
    # Recomputing activations costs time but no GPUs: asked first.
    if not shape.checkpointing:
        recompute = replace(shape, checkpointing=True)
        if row(recompute, r.strategy, r.gpus).total <= limit:
            return "fits with training.gradient_checkpointing=true"
    strategy = r.strategy if r.strategy in SHARDED else "FSDP"
    for n in (2, 4, 8, 16, 32, 64):
        more = n > r.gpus or strategy != r.strategy
        if more and row(shape, strategy, n).total <= limit:
            return f"fits with {strategy} on {n} GPUs"
    states = r.weights + r.grads + r.optimizer
    per_example = activation_bytes(shape, 1)
    if states + per_example <= limit:
        fit = int((limit - states) // per_example)  # activations are linear in the batch
        return f"reduce training.batch_size to {fit * r.gpus}"
    length = shape.length
    while length > 16:
        length //= 2
        if states + activation_bytes(replace(shape, length=length), 1) <= limit:
            return f"reduce training.batch_size to {r.gpus} and model.max_length to {length}"
    return "its weights, gradients and optimizer states alone are too large: more GPUs or LoRA"


def report(shape: Shape, model_dir: str | Path, gpu_memory_gib: float = 80.0) -> str:
    """The table ``merit train --estimate`` prints (GiB per GPU) and a fit line per row."""
    limit = gpu_memory_gib * GIB
    dtype = f"training.precision {shape.precision} ({shape.weight_bytes * 8}-bit compute)"
    moments = "bf16" if shape.precision == "bf16" else "fp32"
    states = f"AdamW {moments} moments" + (" + fp32 master weights" if shape.mixed else "")
    if shape.checkpointing:
        states += ", gradient checkpointing"
    kind = "LoRA adapters" if shape.lora else "trainable"
    lines = [
        f"θ0 {model_dir}: {shape.params / 1e9:.2f} B parameters, {shape.trainable / 1e9:.3g} B "
        f"{kind}; {dtype}, {states}",
        f"training.batch_size {shape.batch} (split across GPUs), model.max_length "
        f"{shape.length}; GiB per GPU, {gpu_memory_gib:g} GiB each:",
        f"{'setup':<10}{'weights':>9}{'grads':>9}{'optimizer':>11}{'activations':>13}{'total':>9}",
    ]
    for r in rows(shape):
        values = (r.weights, r.grads, r.optimizer, r.activations, r.total)
        widths = (9, 9, 11, 13, 9)
        cells = "".join(f"{v / GIB:>{w}.1f}" for v, w in zip(values, widths))
        lines.append(f"{r.name:<10}{cells}")
    lines.append("")
    for r in rows(shape):
        fits = r.total <= limit
        why = "fits" if fits else f"does not fit: {advice(shape, r, limit)}"
        lines.append(f"{r.name}: {why}")
    return "\n".join(lines)


def estimate(model_dir: str | Path, cfg: RunConfig, gpu_memory_gib: float = 80.0) -> str:
    """The printed estimate for a run config's branch on θ0 at ``model_dir``."""
    return report(model_shape(model_dir, cfg), model_dir, gpu_memory_gib)


def branch_line(model_dir: str | Path, cfg: RunConfig, processes: int) -> str:
    """The estimate of one branch as it starts on ``processes`` GPUs, in one line."""
    how = cfg.training.distributed if processes > 1 else "none"
    strategy = {"fsdp": "FSDP", "deepspeed": "ZeRO-3"}.get(how, "DDP")
    r = row(model_shape(model_dir, cfg), strategy, processes)
    parts = zip(("weights", "gradients", "optimizer", "activations"),
                (r.weights, r.grads, r.optimizer, r.activations))  # fmt: skip
    each = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts)
    return f"estimated GiB per GPU ({r.name}): {each}; total {r.total / GIB:.1f}"
