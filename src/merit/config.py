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
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from merit.errors import ConfigError
from merit.sections import Section as _Section
from merit.sections.experiment import (
    EXTRA_NOT_EXPERIMENT,
    SFT_DEFAULTS,
    SFT_OWNED,
    CalibrationConfig,
    DataConfig,
    DatasetSpec,
    DemoBaseConfig,
    LoraConfig,
    ModelConfig,
    PlanningConfig,
    SplitConfig,
    TrainingConfig,
)
from merit.sections.stages import (
    COMPARE_ROWS,
    CompareConfig,
    DiagnosticsConfig,
    EvaluationConfig,
    MergingConfig,
    RuntimeConfig,
)

# The sections are defined in merit.sections; callers import them with the config.
__all__ = [
    "COMPARE_ROWS", "EXTRA_NOT_EXPERIMENT", "SFT_DEFAULTS", "SFT_OWNED", "CalibrationConfig",
    "CompareConfig", "ConfigError", "DataConfig", "DatasetSpec", "DemoBaseConfig",
    "DiagnosticsConfig", "EvaluationConfig", "LoraConfig", "MergingConfig", "ModelConfig",
    "PlanningConfig", "RunConfig", "RuntimeConfig", "SplitConfig", "TrainingConfig",
]  # fmt: skip


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

    @model_validator(mode="after")
    def _merge_needs_validation(self) -> RunConfig:
        """A merge chosen or fitted on the validation split needs one, refused at load."""
        m = self.merging
        if m.method == "learned" and m.select == "validation":
            raise ValueError("merging.method learned fits its coefficients on the validation "
                             "split itself: drop merging.select")  # fmt: skip
        wants = m.method == "learned" or m.select == "validation"
        if wants and self.data.split.validation == 0:
            what = "learned" if m.method == "learned" else "select: validation"
            raise ValueError(
                f"merging {what} needs a validation split: set data.split.validation (examples "
                "per dataset carved from the training examples)"
            )
        return self

    def settings(self, *sections: str) -> dict[str, Any]:
        """The settings of ``sections`` (a stage's declared reads), defaults left out: a new
        setting whose default keeps the old behaviour changes no stage's hash."""
        return _prune(
            _experiment_extra(
                self.model_dump(
                    mode="json", include=set(sections), exclude=_HOW, exclude_defaults=True
                )
            )
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
_HOW: dict[str, Any] = {
    "calibration": {"streaming"},
    "model": {"attn_implementation"},
    "training": {"baselines", "distributed", "deepspeed_config", "gradient_checkpointing",
                 "liger_kernel"},
}  # fmt: skip


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


def _experiment_extra(dump: dict) -> dict:
    """``dump`` with ``training.extra`` cut to the keys that are part of the experiment."""
    extra = (dump.get("training") or {}).get("extra")
    if extra:
        dump["training"]["extra"] = {
            k: v
            for k, v in extra.items()
            if k not in EXTRA_NOT_EXPERIMENT and not k.startswith("logging_")
        }
    return dump


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
    a = _experiment_extra(old.model_dump(mode="json", include=set(EXPERIMENT), exclude=_HOW))
    b = _experiment_extra(new.model_dump(mode="json", include=set(EXPERIMENT), exclude=_HOW))
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
            if not (p.is_absolute() or (base_dir / p).exists()) and spec.is_hub(exists=False):
                continue  # a hub id, not a path
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
