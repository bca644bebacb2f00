"""The sections that define an experiment (what a run directory holds): θ0, the data,
calibration, planning and training. Changing one means retraining."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from merit.registry import registered, registry
from merit.sections import Section as _Section


class DemoBaseConfig(_Section):
    """How merit builds its own small instruction-tuned θ0 when ``model.path`` is ``demo``."""

    vocab_size: int = Field(4096, ge=300)
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(384, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    steps: int = Field(600, ge=1, description="pre-instruction-tuning optimizer steps")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    examples_per_dataset: int = Field(
        96, ge=1, description="examples per dataset reserved for θ0 (disjoint from all splits)"
    )


class ModelConfig(_Section):
    path: str = Field(
        "demo",
        description="Hugging Face hub id or local directory of the instruction-tuned base model θ0; "
        "'demo' builds (and caches) merit's own small Llama.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(
        512,
        ge=16,
        description="tokens per example; what happens to a longer one is data.overlong "
        "(image-text examples are never cut: an image's tokens cannot be; a vision-language "
        "θ0's text-only examples are not cut either)",
    )
    demo: DemoBaseConfig = Field(default_factory=DemoBaseConfig)
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="transformers' attention kernel for every model merit loads (how, not what: "
        "the same math); flash_attention_2 needs the flash-attn package and a GPU",
    )
    max_image_pixels: int | None = Field(
        None,
        ge=3136,
        description="a vision-language θ0's pixel budget per image (Qwen: tokens = pixels / 28²; "
        "larger images are resized down); null = its processor's own (Qwen2.5-VL: 12.8 M)",
    )
    trainable: list[Literal["vision", "projector", "language"]] | None = Field(
        None,
        min_length=1,
        description="a vision-language θ0's parameter groups that train (calibration, branches "
        "and joint alike); null = projector and language with the vision tower frozen (LoRA: "
        "language only). A text-only θ0 is all language",
    )

    @field_validator("attn_implementation")
    @classmethod
    def _kernel_installed(cls, name: str) -> str:
        import importlib.util

        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "flash_attention_2 needs the flash-attn package (pip install flash-attn)"
            )
        return name


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_FILE_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".arrow", ".csv")


class DatasetSpec(_Section):
    """One dataset of the mixture (or, with ``group_by``, one per value of a field)."""

    name: str | None = Field(
        None, min_length=1, description="the dataset's name; with group_by, each group's "
        "name is its value and this one is optional",
    )  # fmt: skip
    path: str = Field(
        description="a local file or folder, or a hub dataset id (owner/name) read through "
        "datasets.load_dataset"
    )
    format: Literal["auto", "jsonl", "json", "parquet", "hf", "bigbench", "hub", "alpaca"] = Field(
        "auto",
        description="auto: by the file's suffix or folder; a hub id that is not a local "
        "path is read from the hub (or its cache); alpaca: a json/jsonl/parquet file of "
        "Alpaca records (instruction, input, output)",
    )
    image_dir: str | None = Field(
        None,
        description="folder that image paths in the records are relative to; null = the "
        "dataset file's folder",
    )
    # datasets.load_dataset's own arguments, for a hub dataset (or a local dataset folder).
    subset: str | None = Field(None, description="hub: the configuration (load_dataset's name)")
    split: str = Field("train", description="hub: which split holds the records")
    revision: str | None = Field(None, description="hub: a branch, tag or commit")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="hub: load_dataset's data_files"
    )
    group_by: str | None = Field(
        None,
        min_length=1,
        description="one dataset per value of this record field (Vision-FLAN's task_name), "
        "each named after its value",
    )

    @model_validator(mode="after")
    def _named(self) -> DatasetSpec:
        if self.name is None and self.group_by is None:
            raise ValueError("a dataset needs a name (or group_by, to name each group)")
        return self

    def is_hub(self, exists: bool) -> bool:
        """Whether ``path`` is read from the hub: said so, or an owner/name id that is not a
        local path (``exists``) and has no data-file suffix."""
        if self.format == "hub":
            return True
        guess = _HUB_ID.match(self.path) and not self.path.lower().endswith(_FILE_SUFFIXES)
        return self.format == "auto" and not exists and bool(guess)


class SplitConfig(_Section):
    """Per-dataset deterministic split (seeded by ``seed`` and the dataset name; disjoint)."""

    eval: int = Field(50, ge=1, description="held-out examples per dataset (at most 1/5 of it)")
    calibration: int = Field(200, ge=1, description="calibration examples (at most 1/5 of it)")
    train: int | None = Field(None, ge=1, description="train examples per dataset; null = the rest")
    validation: int = Field(
        0,
        ge=0,
        description="examples per dataset carved from the training examples and never trained "
        "on: where `merit compare` chooses joint training's learning rate and the shrinkage "
        "control's α (never on the eval split)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _validation_fits(self) -> SplitConfig:
        if self.train is not None and self.validation >= self.train:
            raise ValueError(
                f"validation={self.validation} is carved from the {self.train} training examples "
                "per dataset and must be smaller"
            )
        return self


class DataConfig(_Section):
    datasets: list[DatasetSpec] = Field(default_factory=list)
    bigbench: str | None = Field(
        None,
        description="folder of BIG-bench task files, each one dataset; 'auto' = $MERIT_BIGBENCH, "
        "else ../shared/data/bigbench, else fetched from PyPI into the cache",
    )
    max_datasets: int | None = Field(
        None, ge=1, description="keep the first N datasets (in `order`) for training"
    )
    order: Literal["name", "hash"] = Field(
        "name",
        description="which datasets `max_datasets` keeps: the first by name, or a seeded sample "
        "(the smallest sha256 of 'order:<split.seed>:<name>')",
    )
    unseen: int = Field(
        0,
        ge=0,
        description="whole datasets kept out of training — never calibrated, trained on or used "
        "for θ0 — and evaluated as unseen tasks: the N with the smallest sha256 of "
        "'unseen:<split.seed>:<name>'",
    )
    unseen_datasets: list[DatasetSpec] = Field(
        default_factory=list,
        description="whole datasets evaluated as unseen tasks besides `unseen`'s; they must share "
        "no name, file or example with the training datasets",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    loss_on: Literal["final", "all_assistant"] = Field(
        "all_assistant",
        description="what a `messages` record trains on (calibration and N_k count the same): "
        "every assistant turn, as TRL's assistant_only_loss, or the final answer only; "
        "evaluation always scores the final answer",
    )
    overlong: Literal["error", "drop", "truncate"] = Field(
        "drop",
        description="an example over model.max_length tokens: refused (naming its dataset and "
        "line), dropped from its split (counted in data.json and `merit data`), or truncated "
        "(the oldest tokens first; the final answer keeps at least half the budget)",
    )

    @model_validator(mode="after")
    def _some_data(self) -> DataConfig:
        if not self.datasets and not self.bigbench:
            raise ValueError("no datasets: give data.datasets or data.bigbench")
        both = sorted(
            {d.name for d in self.datasets if d.name}
            & {d.name for d in self.unseen_datasets if d.name}
        )
        if both:
            raise ValueError(
                f"unseen tasks overlap the training tasks: {', '.join(both)} is in both "
                "data.datasets and data.unseen_datasets"
            )
        names = [d.name for d in self.datasets + self.unseen_datasets if d.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two datasets have the same name: {', '.join(dupes)}")
        return self


class CalibrationConfig(_Section):
    """Representative gradients g_t at θ0 (paper §3.1), kept as CountSketches."""

    batch_size: int = Field(8, ge=1)
    sketch_dim: int = Field(2**18, ge=16, description="CountSketch buckets d")
    seed: int = 0
    microbatches: int = Field(
        8,
        ge=1,
        description="disjoint parts of each dataset's calibration examples whose sketches are "
        "kept too, to measure plan stability (1 = none)",
    )
    microbatch_dim: int = Field(
        2**14, ge=16, description="buckets kept per part sketch (folded; must divide sketch_dim)"
    )
    streaming: bool | Literal["auto"] = Field(
        "auto",
        description="auto: accumulate each part's gradient and sketch it once where it fits in "
        "free memory (exact |g|²), else stream; true: sketch each parameter's gradient as "
        "autograd accumulates it (no full gradient copy; |g|² estimated from the sketch); false: "
        "always accumulate",
    )

    @model_validator(mode="after")
    def _fold(self) -> CalibrationConfig:
        if self.microbatch_dim < self.sketch_dim and self.sketch_dim % self.microbatch_dim:
            raise ValueError(
                f"microbatch_dim={self.microbatch_dim} must divide sketch_dim={self.sketch_dim}"
            )
        return self


class PlanningConfig(_Section):
    """Conflict-aware split (paper §3.2): PCA of the cosine matrix, recursive median splits."""

    rank: int = Field(2, ge=0, le=10, description="r PCA axes; K = 2^r groups")
    k: int | None = Field(
        None, ge=1, description="K groups, any number (splitters gain, random); null = 2^rank"
    )
    splitter: str = Field(
        "median",
        description="a registered splitter — median (paper), sign, random (balanced), gain (any-K "
        "partition maximising the predicted merging gain), or a plugin's — or auto (the best "
        "candidate under `objective`)",
    )
    objective: Literal["gain", "merged_loss"] = Field(
        "gain",
        description="what `auto` optimises: the predicted merging gain (paper) or the predicted "
        "merged loss on held-out calibration batches (needs hessian: true)",
    )
    balance_tolerance: float = Field(
        0.1, ge=0, lt=1, description="each group's samples within (1 ± this) × total / K"
    )
    bootstrap: int = Field(
        20, ge=0, description="resampled plans for stability (needs microbatches ≥ 2; 0 = off)"
    )
    stability_threshold: float = Field(
        0.8, ge=0, le=1, description="warn when resampled plans agree below this ARI"
    )
    hessian: bool = Field(
        False,
        description="predict gain and merged loss with the true Hessian (HVPs at θ0); holds one "
        "gradient per dataset, so small models only",
    )
    hessian_examples: int = Field(
        4, ge=1, description="held-out calibration examples per dataset for the HVPs"
    )
    horizon: float | None = Field(
        None,
        gt=0,
        description="gradient-flow time τ of a branch for absolute predictions; null = the "
        "held-out line-search step along the mean gradient",
    )
    seed: int = 0

    @property
    def groups(self) -> int:
        """K: ``k`` if set, else 2^rank."""
        return self.k if self.k is not None else 2**self.rank

    @model_validator(mode="after")
    def _consistent(self) -> PlanningConfig:
        k = self.groups
        if self.splitter != "auto" and self.splitter not in registered("splitter"):
            known = ", ".join((*registered("splitter"), "auto"))
            raise ValueError(f"unknown splitter {self.splitter!r} (known: {known})")
        fixed = self.splitter != "auto" and not registry("splitter").get(self.splitter).any_k
        if fixed and k & (k - 1):
            raise ValueError(
                f"splitter={self.splitter} makes K = 2^r groups, not K={k}; use gain or random"
            )
        if self.splitter == "auto" and self.objective == "merged_loss" and not self.hessian:
            raise ValueError(
                "objective=merged_loss needs hessian: true (under H = I the predicted merged "
                "loss does not depend on the split)"
            )
        return self


class LoraConfig(_Section):
    """LoRA branches (PEFT): each branch trains low-rank adapters ΔW = s·B·A on θ0's linear layers.

    Merging averages the scaled products s·B_k·A_k, not A and B separately (the average of
    products is not the product of averages); see ``merit.train.lora``.
    """

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(
        16.0, gt=0, description="scale s = alpha / r (alpha / sqrt(r) with rslora)"
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt; 'all-linear' = every linear but the head"
    )
    rslora: bool = False


class TrainingConfig(_Section):
    """One schedule for every branch and for the joint baseline (paper §3.3)."""

    learning_rate: float = Field(5e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    baselines: list[Literal["joint"]] = Field(default_factory=lambda: ["joint"])
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters per branch instead of every weight; null = full"
    )
    optim: str = Field(
        "adamw_torch_fused", description="the Trainer's optimizer (transformers' OptimizerNames)"
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="optimizer steps per branch instead of `epochs` (the joint baseline takes K× "
        "as many: the same token budget); null = epochs",
    )
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed"] = Field(
        "auto",
        description="fp32; bf16 (weights, gradients and Adam states in bf16); bf16-mixed (fp32 "
        "master weights, bf16 autocast); auto = bf16-mixed on a GPU, fp32 on CPU",
    )
    # How, not what (left out of the experiment, see merit.config._HOW): the same branch either way.
    distributed: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none",
        description="how the processes of one branch share it (torchrun / accelerate launch / "
        "runtime.resources.gpus_per_node > 1): ddp replicates θ0, fsdp (FSDP2, full shard by "
        "decoder layer) and deepspeed (ZeRO, `deepspeed_config`) shard it; none = ddp when "
        "several processes run",
    )
    deepspeed_config: str = Field(
        "zero3",
        description="with distributed: deepspeed, a shipped template (zero2, zero3) or the path "
        "of a DeepSpeed JSON config",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, ~30% slower)"
    )
    liger_kernel: bool = Field(
        False, description="Liger's fused Triton kernels (GPU only; the liger-kernel package)"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="any other field of trl's SFTConfig, passed through; logging and dataloader "
        "keys are not part of the experiment, every other key is",
    )

    @field_validator("optim")
    @classmethod
    def _known_optim(cls, optim: str) -> str:
        if optim == "adamw_torch_fused":
            return optim  # the default: no need to import transformers
        # transformers is heavy: imported only when a non-default optimizer is named.
        from transformers.training_args import OptimizerNames

        known = [o.value for o in OptimizerNames]
        if optim not in known:
            raise ValueError(f"unknown optimizer {optim!r} (e.g. adamw_torch, adafactor, sgd)")
        return optim

    @field_validator("extra")
    @classmethod
    def _sft_fields(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if not extra:
            return extra
        # trl is heavy: imported only when there is something to check.
        from trl import SFTConfig

        fields = {f.name for f in dataclasses.fields(SFTConfig)}
        bad = [
            (key, "not a field of trl's SFTConfig" if key not in fields else SFT_OWNED[key])
            for key in extra
            if key not in fields or key in SFT_OWNED
        ]
        if bad:
            raise ValidationError.from_exception_data(
                "training.extra",
                [{"type": PydanticCustomError("sft_field", msg), "loc": (key,), "input": extra[key]}
                 for key, msg in bad],
            )  # fmt: skip
        return extra

    @model_validator(mode="after")
    def _packages(self) -> TrainingConfig:
        import importlib.util

        need = {"liger_kernel": self.liger_kernel, "deepspeed": self.distributed == "deepspeed"}
        for package, wanted in need.items():
            if wanted and importlib.util.find_spec(package) is None:
                setting = (
                    "training.liger_kernel"
                    if package == "liger_kernel"
                    else ("training.distributed=deepspeed")
                )
                raise ValueError(f"{setting} needs the {package.replace('_', '-')} package")
        return self

    @model_validator(mode="after")
    def _one_optimizer(self) -> TrainingConfig:
        # `training.extra.optim` is the Trainer's own spelling of `training.optim`: either, not both.
        if "optim" in self.extra and self.optim != "adamw_torch_fused":
            raise ValueError("training.extra.optim and training.optim both set: keep one")
        return self


# The SFTConfig fields merit's `sft_config` sets itself, refused in `training.extra`: each with
# the setting to use instead (the schedule, checkpoints and data order are merit's to fix).
_FIXED = "merit sets it (the fixed example order and exact resume depend on it)"
SFT_OWNED: dict[str, str] = {
    "output_dir": "set run_dir instead",
    "per_device_train_batch_size": "set training.batch_size instead",
    "gradient_accumulation_steps": "set training.gradient_accumulation_steps instead",
    "learning_rate": "set training.learning_rate instead",
    "num_train_epochs": "set training.epochs instead",
    "max_steps": "set training.max_steps instead",
    "lr_scheduler_type": "set training.lr_scheduler instead",
    "warmup_steps": "set training.warmup_ratio instead",
    "weight_decay": "set training.weight_decay instead",
    "max_grad_norm": "set training.max_grad_norm instead",
    "seed": "set training.seed instead",
    "data_seed": "set training.seed instead",
    "bf16": "set training.precision instead",
    "fp16": "set training.precision instead",
    "bf16_full_eval": "set training.precision instead",
    "fsdp": "set training.distributed instead",
    "fsdp_config": "set training.distributed instead",
    "deepspeed": "set training.distributed and training.deepspeed_config instead",
    "use_liger_kernel": "set training.liger_kernel instead",
    "use_cpu": "set runtime.device instead",
    "max_length": "set model.max_length instead",
    "report_to": "set runtime.report_to instead",
    "disable_tqdm": "set runtime.progress instead",
    "save_strategy": "set runtime.checkpoint_steps instead",
    "save_steps": "set runtime.checkpoint_steps instead",
    "save_total_limit": "set runtime.keep_checkpoints instead",
    "gradient_checkpointing": "set training.gradient_checkpointing instead",
    "activation_checkpointing": "set training.gradient_checkpointing instead",
    "gradient_checkpointing_kwargs": "set training.gradient_checkpointing instead",
    **dict.fromkeys(
        ("packing", "completion_only_loss", "train_sampling_strategy", "accelerator_config",
         "ddp_find_unused_parameters", "remove_unused_columns", "save_only_model",
         "restore_callback_states_from_checkpoint"),
        _FIXED,
    ),
}  # fmt: skip
# SFTConfig fields `sft_config` sets as defaults that `training.extra` may change.
SFT_DEFAULTS = ("logging_steps", "dataloader_num_workers", "optim")
# `training.extra` keys that only change what is logged or how data is loaded, never what a branch
# computes: left out of the experiment. Every other key (optimizer and schedule: optim_args,
# adam_beta1/2, adam_epsilon, lr_scheduler_kwargs, label_smoothing_factor, ...) is part of it.
EXTRA_NOT_EXPERIMENT = (
    "run_name", "project", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "skip_memory_metrics",
)  # fmt: skip
