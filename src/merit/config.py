"""Run configuration: one YAML file per run, validated completely before any work starts.

The config separates *what* the experiment is (model, data, calibration, planning, training,
merging, evaluation) from *how* it runs (``runtime``: device, threads, progress bars). Each stage's
artifacts record the hash of exactly the settings it reads (the sections its stage declares), so
changing an evaluation setting re-runs evaluation only, and ``runtime`` never re-runs anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from merit.errors import ConfigError
from merit.registry import registered, registry


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
        512,
        ge=16,
        description="tokens per example; longer prompts are cut on the left (image-text "
        "examples are never cut: an image's tokens cannot be; a vision-language θ0's text-only "
        "examples are not cut either)",
    )
    demo: DemoBaseConfig = Field(default_factory=DemoBaseConfig)
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


class DatasetSpec(_Section):
    name: str = Field(min_length=1)
    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "hf", "bigbench"] = "auto"
    image_dir: str | None = Field(
        None,
        description="folder that image paths in the records are relative to; null = the "
        "dataset file's folder",
    )


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

    @model_validator(mode="after")
    def _some_data(self) -> DataConfig:
        if not self.datasets and not self.bigbench:
            raise ValueError("no datasets: give data.datasets or data.bigbench")
        both = sorted({d.name for d in self.datasets} & {d.name for d in self.unseen_datasets})
        if both:
            raise ValueError(
                f"unseen tasks overlap the training tasks: {', '.join(both)} is in both "
                "data.datasets and data.unseen_datasets"
            )
        names = [d.name for d in self.datasets + self.unseen_datasets]
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
    models: list[Literal["base", "branches", "merged", "joint", "shrink"]] = Field(
        default_factory=lambda: ["base", "branches", "merged", "joint"]
    )
    # Statistics of the results table: recomputed from the per-example scores, never re-scored.
    bootstrap_samples: int = Field(1000, ge=10)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(0, description="seed of the bootstrap resamples")


class DiagnosticsConfig(_Section):
    """``merit diagnose`` / ``merit report``: measurements of a finished run (paper §4).

    They read the run and change none of its artifacts: changing them re-runs diagnose only. The defaults are sized for the demo on 2 CPU cores (diagnose + report in
    under 4 minutes): 46 loss evaluations and 8 Hessian-vector products on 32 held-out examples.
    """

    examples: int = Field(
        32,
        ge=1,
        description="held-out (eval split) examples, spread over datasets; the same "
        "number of train examples for the train-loss figure",
    )
    batch_size: int = Field(32, ge=1)
    alphas: int = Field(5, ge=3, description="points of the α grid on [0, 1], endpoints included")
    perturbation_scales: list[float] = Field(
        default_factory=lambda: [0.0, 1.0, 2.0, 4.0],
        description="perturbation norms as multiples of ‖θ̄ − θ0‖ (σ = scale·‖θ̄ − θ0‖/√n)",
    )
    perturbation_draws: int = Field(1, ge=1, description="antithetic pairs (ε, −ε) per scale")
    lanczos_iters: int = Field(4, ge=0, description="Hessian-vector products for Lanczos; 0 = off")
    hvp: Literal["exact", "finite_difference"] = Field(
        "finite_difference",
        description="Hessian-vector products: central differences of gradients (fused attention, "
        "~2× faster; ~1e-3 relative error on the demo) or exact double back-propagation",
    )
    hvp_step: float = Field(1e-2, gt=0, description="finite-difference step, parameter units")
    top_eigen: int = Field(3, ge=1, description="top Hessian eigen-directions in the gain split")
    seed: int = 0
    # When a premise counts as holding (see merit.diagnose.verdicts).
    barrier_tolerance: float = Field(0.02, ge=0, description="barrier / endpoint loss")
    flatness_tolerance: float = Field(
        0.05, ge=0, description="loss rise at perturbation scale 1, relative"
    )
    distance_ratio: float = Field(1.5, gt=0, description="‖θ_joint − θ0‖ / ‖θ̄ − θ0‖ at least")
    gain_agreement: float = Field(0.5, gt=0, description="|predicted − measured| / |measured|")


# The default rows of ``merit compare``, in table order; any registered row may be named.
COMPARE_ROWS = (
    "base", "joint", "joint-2ep", "joint-lr", "shrink", "random", "soup",
    "merit-1d", "merit-2d", "merit-3d", "gain",
)  # fmt: skip


class CompareConfig(_Section):
    """``merit compare``: the paper's table (§5) with its controls, every row at one token budget.

    Rows: θ0; joint training for 1 and 2 epochs; joint training at the learning rate best on the
    validation split; the shrinkage control θ0 + α(θ_joint − θ0) with α best on the validation
    split; random splits; a uniform soup of joint runs with other seeds; MERIT-rD (K = 2^r, the
    paper's median splits) and the gain planner. Nothing is chosen on the eval split or the
    unseen tasks.
    """

    rows: list[str] = Field(
        default_factory=lambda: list(COMPARE_ROWS),
        description="which rows (any registered compare row), in table order",
    )
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="seeds of data order, random splits and soups; null = [training.seed]",
    )
    learning_rates: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0],
        min_length=1,
        description="joint-lr: multiples of training.learning_rate tried (1 = the joint row)",
    )
    alphas: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        min_length=1,
        description="shrink: the α grid for θ0 + α(θ_joint − θ0)",
    )
    random_k: int = Field(4, ge=2, description="random: K of the random balanced split")
    random_draws: int = Field(3, ge=1, description="random: splits drawn per seed")
    soup_runs: int = Field(
        4, ge=2, description="soup: joint runs with other seeds, each 1/soup_runs of the budget"
    )
    gain_k: int = Field(4, ge=2, description="gain: K of merit's gain planner")
    train_loss_examples: int = Field(
        64, ge=1, description="train examples for the train-loss gap (diagnostics)"
    )

    @field_validator("rows")
    @classmethod
    def _known_rows(cls, rows: list[str]) -> list[str]:
        known = registered("compare row")
        bad = [r for r in rows if r not in known]
        if bad:
            raise ValueError(f"unknown row {bad[0]!r} (known: {', '.join(known)})")
        return rows

    @model_validator(mode="after")
    def _grids(self) -> CompareConfig:
        if any(a <= 0 or a > 1.5 for a in self.alphas):
            raise ValueError("alphas must lie in (0, 1.5]")
        if any(m <= 0 for m in self.learning_rates):
            raise ValueError("learning_rates are positive multiples")
        return self


class RuntimeConfig(_Section):
    """How to run; never changes results, so no stage's artifacts depend on it."""

    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; null = torch default"
    )
    progress: bool = True
    keep_freed_memory: bool = Field(
        True,
        description="keep freed memory in glibc's heap instead of unmapping it (CPU training spends "
        "far less time in the kernel; see merit.lm.keep_freed_memory)",
    )
    cache_dir: str | None = Field(None, description="null = $MERIT_CACHE or ~/.cache/merit")
    # Branch checkpoints and launchers. Resume is exact, so none of these changes a
    # result: they are "how", not "what".
    checkpoint_steps: int | None = Field(
        50, ge=1, description="checkpoint a branch every N optimizer steps; null = never"
    )
    keep_checkpoints: int = Field(2, ge=2, description="newest checkpoints kept per branch")
    launcher: Literal["inline", "local", "ray"] = Field(
        "inline",
        description="how `merit train` runs branches: inline (this process, one after another), "
        "local (subprocesses, `parallel` at once) or ray",
    )
    parallel: int = Field(1, ge=1, description="branches at once (local launcher)")
    retries: int = Field(3, ge=0, description="re-runs of a branch that crashed or was preempted")
    ray_address: str | None = Field(None, description="existing Ray cluster; null = ray.init()")
    branch_cpus: float = Field(1.0, gt=0, description="CPUs per branch task (Ray)")
    branch_gpus: float = Field(0.0, ge=0, description="GPUs per branch task (Ray)")
    branch_memory_gb: float | None = Field(None, gt=0, description="memory per branch task (Ray)")


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
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    def settings(self, *sections: str) -> dict[str, Any]:
        """The settings of ``sections`` (a stage's declared reads), defaults left out: a new
        setting whose default keeps the old behaviour changes no stage's hash."""
        return _prune(
            self.model_dump(mode="json", include=set(sections), exclude=_HOW, exclude_defaults=True)
        )

    def settings_hash(self, *sections: str) -> str:
        """sha256 of :meth:`settings`: what a stage's artifacts record, and are reused by."""
        blob = json.dumps(self.settings(*sections), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def experiment_hash(self) -> str:
        """sha256 of the experiment: the settings the trained branches depend on."""
        return self.settings_hash(*EXPERIMENT)


# A run directory holds one experiment: the sections up to training (changing them means
# retraining); merging, evaluation, diagnostics and runtime may change between commands and
# re-run only the stages that read them (each stage declares the sections it reads).
EXPERIMENT = ("seed", "model", "data", "calibration", "planning", "training")
# Settings inside "what" sections that only change how fast a stage runs, or which jobs run,
# never what any job computes: a joint baseline added later leaves the branches valid.
_HOW: dict[str, Any] = {"calibration": {"streaming"}, "training": {"baselines"}}


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ; a section absent on one side (all defaults) is an
    empty one, so the message names the setting, not its section."""
    if (isinstance(a, dict) and b is None) or (isinstance(b, dict) and a is None):
        a, b = a or {}, b or {}
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _prune(d: dict) -> dict:
    """Without empty sections: a section whose only non-default setting is excluded is absent."""
    out = {}
    for k, v in d.items():
        v = _prune(v) if isinstance(v, dict) else v
        if v != {}:
            out[k] = v
    return out


def experiment_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """The experiment settings (dotted keys, with old and new values) that differ."""
    a = old.model_dump(mode="json", include=set(EXPERIMENT), exclude=_HOW)
    b = new.model_dump(mode="json", include=set(EXPERIMENT), exclude=_HOW)
    return [f"{k} ({_lookup(a, k)!r} -> {_lookup(b, k)!r})" for k in changed_keys(a, b)]


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def appended_datasets(old: RunConfig, new: RunConfig) -> list[str]:
    """Names of the datasets ``new`` appends to ``old``'s ``data.datasets``, when that is the only
    change to the experiment (``merit plan --add``); else a ConfigError naming what else changed."""
    n = len(old.data.datasets)
    trimmed = new.model_copy(deep=True)
    trimmed.data.datasets = trimmed.data.datasets[:n]
    if trimmed.experiment_hash() == old.experiment_hash():
        return [d.name for d in new.data.datasets[n:]]
    changed = experiment_changes(old, trimmed)
    raise ConfigError(
        "only appending to data.datasets is allowed when adding datasets, but "
        + (", ".join(changed) or "the experiment")
        + " changed"
    )


def _parse_value(text: str) -> Any:
    """An override value is YAML: ``3`` is an int, ``[a, b]`` a list, ``null`` None."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"override value {text!r} is not valid YAML ({problem})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key.sub=value`` overrides to a raw config dict (returns a new dict)."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        try:
            parsed = _parse_value(value)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parsed
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
        for spec in cfg.data.datasets + cfg.data.unseen_datasets:
            p = Path(spec.path).expanduser()
            if not p.is_absolute() and not (base_dir / p).exists() and p.exists():
                continue  # relative to the working directory, as the user typed it
            spec.path = str(p if p.is_absolute() else base_dir / p)
            if spec.image_dir is not None:
                d = Path(spec.image_dir).expanduser()
                spec.image_dir = str(d if d.is_absolute() else base_dir / d)
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
