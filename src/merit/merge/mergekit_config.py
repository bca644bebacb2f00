"""``merit merge --mergekit-config FILE --out DIR``: a mergekit YAML (``merge_method``,
``base_model``, ``models`` with their ``parameters``, ``parameters``, ``dtype``/``out_dtype``)
run by merit's engine, for the methods merit implements as mergekit 0.1.5 computes them. Anything
merit would compute differently is refused in one line naming it, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from merit.merge.errors import MergeError

# mergekit's method -> merit's, and mergekit's defaults of the switches merit fixes.
METHODS = {
    "linear": {},
    "task_arithmetic": {"normalize": False},
    "ties": {"normalize": True},
    "dare_linear": {"normalize": False, "rescale": True},
    "dare_ties": {"normalize": False, "rescale": True},
    "model_stock": {"filter_wise": False},
}
_IGNORED = {"int8_mask"}  # how mergekit stores a mask: no effect on the values


@dataclass
class MergekitJob:
    method: str
    checkpoints: list[str]
    weights: list[float]
    base: str | None
    params: dict[str, float] = field(default_factory=dict)
    normalize: bool = False
    dtype: str | None = None


def read_mergekit_config(path: str | Path) -> MergekitJob:
    """The merge a mergekit YAML asks for, in merit's terms; :class:`MergeError` in one line."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MergeError(f"--mergekit-config {path}: cannot read it ({err})") from None
    if not isinstance(cfg, dict):
        raise MergeError(f"--mergekit-config {path}: not a mapping")
    for key in ("slices", "tokenizer_source", "tokenizer", "chat_template"):
        if cfg.get(key) is not None:
            raise MergeError(f"mergekit config: {key} is not supported by merit merge")
    method = cfg.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"mergekit config: merge_method {method!r} is not one merit implements "
                         f"({', '.join(METHODS)})")  # fmt: skip
    base = cfg.get("base_model")
    models = [m for m in cfg.get("models") or [] if _name(m) != base]  # mergekit skips θ0
    if not models:
        raise MergeError("mergekit config: no models to merge")
    shared = dict(cfg.get("parameters") or {})
    per = [{**shared, **(m.get("parameters") or {})} if isinstance(m, dict) else dict(shared)
           for m in models]  # fmt: skip
    switches = _switches(method, shared)
    weights = _weights(method, per)
    params = _params(method, shared, per)
    return MergekitJob(
        method=method,
        checkpoints=[_name(m) for m in models],
        weights=weights,
        base=base,
        params=params,
        normalize=switches.get("normalize", False) if method == "linear" else False,
        dtype=cfg.get("out_dtype") or cfg.get("dtype"),
    )


def _name(entry) -> str:
    return entry if isinstance(entry, str) else str((entry or {}).get("model"))


def _switches(method: str, shared: dict) -> dict:
    """mergekit's boolean switches; for all but linear's normalize, merit computes the default."""
    fixed = METHODS[method]
    if method == "linear":
        return {"normalize": bool(shared.get("normalize", True))}
    for key, default in fixed.items():
        if key in shared and bool(shared[key]) != default:
            raise MergeError(f"mergekit config: {method} with {key}: {shared[key]} is not "
                             f"implemented by merit (only {key}: {default})")  # fmt: skip
    return {}


def _weights(method: str, per: list[dict]) -> list[float]:
    if method == "model_stock":
        return [1.0 / len(per)] * len(per)
    missing = [i for i, p in enumerate(per) if "weight" not in p]
    if missing:
        raise MergeError(f"mergekit config: models[{missing[0]}] has no weight")
    return [_number(p["weight"], "weight") for p in per]


def _params(method: str, shared: dict, per: list[dict]) -> dict[str, float]:
    known = {"weight", "density", "lambda", "normalize", "rescale", "filter_wise", *_IGNORED}
    unknown = sorted({k for p in per for k in p} - known)
    if unknown:
        raise MergeError(f"mergekit config: parameter {unknown[0]!r} is not supported")
    out = {}
    if "lambda" in shared and method != "linear":
        out["scale"] = _number(shared["lambda"], "lambda")
    densities = {_number(p["density"], "density") for p in per if "density" in p}
    if densities and method in ("ties", "dare_linear", "dare_ties"):
        if len(densities) > 1:
            raise MergeError("mergekit config: merit applies one density to every model, got "
                             f"{sorted(densities)}")  # fmt: skip
        out["density"] = densities.pop()
    return out


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MergeError(f"mergekit config: {name} must be a number (gradients and per-layer "
                         f"values are not supported), got {value!r}")  # fmt: skip
    return float(value)
