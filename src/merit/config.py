"""Run configuration: one YAML file per run, validated completely before any work starts.

The config separates *what* the experiment is (model, data, calibration, planning, training,
merging, evaluation) from *how* it runs (``runtime``: device, threads, progress bars). Changing
``runtime`` never changes a result, so it is excluded from the config hash that artifacts record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """Invalid run configuration (one line per problem)."""


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        512, ge=16, description="tokens per example; longer prompts are cut on the left"
    )
    demo: DemoBaseConfig = Field(default_factory=DemoBaseConfig)


class DatasetSpec(_Section):
    name: str = Field(min_length=1)
    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "hf", "bigbench"] = "auto"


class SplitConfig(_Section):
    """Per-dataset deterministic split (seeded by ``seed`` and the dataset name; disjoint)."""

    eval: int = Field(50, ge=1, description="held-out examples per dataset (at most 1/5 of it)")
    calibration: int = Field(200, ge=1, description="calibration examples (at most 1/5 of it)")
    train: int | None = Field(None, ge=1, description="train examples per dataset; null = the rest")
    seed: int = 0


class DataConfig(_Section):
    datasets: list[DatasetSpec] = Field(default_factory=list)
    bigbench: str | None = Field(
        None,
        description="folder of BIG-bench task files, each one dataset; 'auto' = $MERIT_BIGBENCH, "
        "else ../shared/data/bigbench, else fetched from PyPI into the cache",
    )
    max_datasets: int | None = Field(None, ge=1, description="keep the first N datasets (by name)")
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _some_data(self) -> DataConfig:
        if not self.datasets and not self.bigbench:
            raise ValueError("no datasets: give data.datasets or data.bigbench")
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two datasets have the same name: {', '.join(dupes)}")
        return self


class CalibrationConfig(_Section):
    """Representative gradients g_t at θ0 (paper §3.1), kept as CountSketches."""

    batch_size: int = Field(8, ge=1)
    sketch_dim: int = Field(2**18, ge=16, description="CountSketch buckets d")
    seed: int = 0


class PlanningConfig(_Section):
    """Conflict-aware split (paper §3.2): PCA of the cosine matrix, recursive median splits."""

    rank: int = Field(2, ge=0, le=10, description="r PCA axes; K = 2^r groups")


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


class MergingConfig(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="output dtype; null = θ0's"
    )
    max_shard_bytes: int = Field(2 * 1024**3, ge=1024)


class EvaluationConfig(_Section):
    max_examples: int | None = Field(
        None, ge=1, description="eval examples per dataset; null = all"
    )
    max_generate: int = Field(
        16, ge=0, description="generative examples per dataset decoded for exact match"
    )
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(32, ge=1)
    models: list[Literal["base", "branches", "merged", "joint"]] = Field(
        default_factory=lambda: ["base", "branches", "merged", "joint"]
    )


class RuntimeConfig(_Section):
    """How to run; never changes results, so not part of the config hash."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; null = torch default"
    )
    progress: bool = True
    cache_dir: str | None = Field(None, description="null = $MERIT_CACHE or ~/.cache/merit")


class RunConfig(_Section):
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    planning: PlanningConfig = Field(default_factory=PlanningConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    merging: MergingConfig = Field(default_factory=MergingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def experiment_hash(self) -> str:
        """sha256 of the experiment (everything but ``runtime`` and ``run_dir``)."""
        what = self.model_dump(mode="json", exclude={"runtime", "run_dir"})
        blob = json.dumps(what, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _parse_value(text: str) -> Any:
    """An override value is YAML: ``3`` is an int, ``[a, b]`` a list, ``null`` None."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key.sub=value`` overrides to a raw config dict (returns a new dict)."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "no such config key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a raw dict; relative data paths are resolved against ``base_dir``."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
    if base_dir is not None:
        for spec in cfg.data.datasets:
            p = Path(spec.path).expanduser()
            if not p.is_absolute() and not (base_dir / p).exists() and p.exists():
                continue  # relative to the working directory, as the user typed it
            spec.path = str(p if p.is_absolute() else base_dir / p)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, base_dir=path.resolve().parent)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default spelled out) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
