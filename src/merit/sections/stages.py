"""The sections read after training (merging, evaluation, diagnostics, compare) and how a run
runs (runtime): they may change between commands and re-run only the stages that read them."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from merit.registry import registered
from merit.sections import Section as _Section


class MergingConfig(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="output dtype; null = θ0's"
    )
    max_shard_bytes: int = Field(2 * 1024**3, ge=1024)
    method: str = Field(
        "linear",
        description="how the branches merge (a registered merge method: linear, task_arithmetic, "
        "ties, dare_linear, dare_ties, model_stock, ...); the weights are always N_k / Σ N_j",
    )
    params: dict[str, float] = Field(
        default_factory=dict, description="the method's parameters, e.g. {density: 0.3, scale: 2}"
    )

    gram_examples: int = Field(
        64, ge=1, description="regmean: training examples per branch its Grams are computed on"
    )
    select: Literal["none", "validation"] = Field(
        "none",
        description="validation: try every point of `grid` and keep the merge of the lowest "
        "validation loss (data.split.validation; never the eval split or unseen tasks)",
    )
    grid: dict[str, list[float]] = Field(
        default_factory=dict,
        description="with select: validation, values per parameter, e.g. {scale: [1, 2, 3]}",
    )

    def grid_points(self) -> list[dict[str, float]]:
        """Every combination of ``grid`` over ``params``, in the grid's order."""
        import itertools

        keys = list(self.grid)
        return [{**self.params, **dict(zip(keys, values))}
                for values in itertools.product(*(self.grid[k] for k in keys))]  # fmt: skip

    @model_validator(mode="after")
    def _known_method(self) -> MergingConfig:
        if self.select == "validation" and not any(self.grid.values()):
            raise ValueError("select: validation needs a grid, e.g. grid: {scale: [1, 2, 3]}")
        if self.method == "linear" and not self.params and not self.grid:
            return self  # the default: no need to load the merge methods
        from merit.registry import registry

        methods = registry("merge method")
        if self.method not in methods:
            known = ", ".join(registered("merge method"))
            raise ValueError(f"unknown merge method {self.method!r} (known: {known})")
        try:  # two branches of equal weight: the parameters' own checks, at every grid point
            for params in self.grid_points():
                methods.get(self.method).validate((0.5, 0.5), params)
        except Exception as err:  # MergeError, from the merge package: one line
            raise ValueError(str(err)) from None
        return self


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

    They read the run and change none of its artifacts: changing them re-runs diagnose only.
    The defaults make 46 loss evaluations and 8 Hessian-vector products on 32 held-out examples:
    21 minutes for SmolLM2-135M on 2 CPU cores (examples=8 takes about a quarter of that).
    """

    examples: int = Field(
        32,
        ge=1,
        description="held-out (eval split) examples, spread over datasets; the same "
        "number of train examples for the train-loss figure",
    )
    batch_size: int = Field(32, ge=1)
    backward_batch: int = Field(
        4, ge=1, description="examples per backward pass of a gradient or Hessian-vector "
        "product (memory: activations of every layer are kept; the sum is the same)",
    )  # fmt: skip
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
    sensitivity_datasets: int = Field(
        8, ge=1, description="merit sensitivity: datasets sampled for the calibration-size curve"
    )
    sensitivity_reference: int | None = Field(
        None, ge=2, description="reference examples per dataset (training split, never the "
        "calibration's); null = 4 × the calibration size",
    )  # fmt: skip
    sensitivity_draws: int = Field(20, ge=1, description="random part subsets per point")
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
    merge_scales: list[float] = Field(
        default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0],
        min_length=1,
        description="merges of trained branches (merit-2d+ta, +ties, random+...): the λ grid, "
        "multiples of the merged task vector (1 = the average's step)",
    )
    merge_densities: list[float] = Field(
        default_factory=lambda: [0.2, 0.5, 1.0],
        min_length=1,
        description="+ties rows: the density grid",
    )
    merge_params: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="+regmean / +learned rows: the method's parameters, e.g. "
        "{learned: {steps: 12}, regmean: {alpha: 0.9}}",
    )
    lr_sweep: list[float] = Field(
        default_factory=list,
        description="multiples of training.learning_rate at which joint training and the "
        "config's own MERIT are both trained and scored (compare/lr_sweep.png); [] = off",
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
        if any(d <= 0 or d > 1 for d in self.merge_densities):
            raise ValueError("merge_densities must lie in (0, 1]")
        if any(s <= 0 for s in self.merge_scales):
            raise ValueError("merge_scales are positive multiples")
        if any(m <= 0 for m in self.lr_sweep):
            raise ValueError("lr_sweep: positive multiples of training.learning_rate")
        if any(m <= 0 for m in self.learning_rates):
            raise ValueError("learning_rates are positive multiples")
        return self


class ResourcesConfig(_Section):
    """What one branch asks a scheduler for (``--print-commands slurm|skypilot``).

    Part of ``runtime``: resume is exact and the schedule is fixed by the plan, so the same branch
    on one GPU or on 2 nodes × 8 GPUs trains the same steps on the same tokens.
    """

    nodes: int = Field(1, ge=1, description="nodes per branch")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node; nodes × this > 1 = torchrun")
    cpus: int | None = Field(None, ge=1, description="CPUs per node (per torchrun / branch task)")
    memory_gb: float | None = Field(None, gt=0, description="memory per node, GB")
    time: str | None = Field(
        None, description="time limit per branch task, SLURM format ('12:00:00', '1-00:00:00')"
    )
    accelerator: str | None = Field(
        None, description="GPU type for SkyPilot ('H100', 'A100-80GB'); null = none requested"
    )
    partition: str | None = Field(None, description="SLURM partition; null = the default")

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, v: str | None) -> str | None:
        # SLURM's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; a typo would only fail at sbatch.
        if v is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", v.strip()):
            raise ValueError(
                f"time {v!r} is not a SLURM time limit like '12:00:00' or '1-00:00:00'"
            )
        return v

    @property
    def processes(self) -> int:
        """Training processes per branch (one per GPU; one on CPU)."""
        return self.nodes * max(1, self.gpus_per_node)


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
        "far less time in the kernel; see merit.memory.keep_freed_memory)",
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
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="nodes / GPUs / time per branch for the SLURM and SkyPilot commands",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="where the Trainer reports training metrics (its integrations); [] = none",
    )
