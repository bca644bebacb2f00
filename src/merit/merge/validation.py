"""What makes checkpoints unmergeable, found before anything is written: one line per problem.

Paper eq. 3 sums the branches tensor by tensor, so every branch must hold exactly θ0's tensors
(names, shapes, dtypes) and have been trained from the same θ0.
"""

from __future__ import annotations

from pathlib import Path

from merit.merge.manifest import recorded_theta0
from merit.merge.safetensors_io import MappedFiles, TensorSpec


def header_problems(
    base_dir: Path,
    base_specs: dict[str, TensorSpec],
    branch_dir: Path,
    specs: dict[str, TensorSpec],
) -> list[str]:
    """One line per tensor of a branch whose name, shape or dtype disagrees with θ0."""
    problems = [
        f"{branch_dir}: missing tensor {name!r} (present in base {base_dir})"
        for name in base_specs
        if name not in specs
    ]
    for name, spec in specs.items():
        want = base_specs.get(name)
        if want is None:
            problems.append(f"{spec.file}: extra tensor {name!r} (not in base {base_dir})")
        elif spec.shape != want.shape:
            problems.append(
                f"{spec.file}: tensor {name!r} has shape {list(spec.shape)}, base has {list(want.shape)}"
            )
        elif spec.dtype != want.dtype:
            problems.append(
                f"{spec.file}: tensor {name!r} has dtype {spec.dtype}, base has {want.dtype}"
            )
    return problems


def kept_problems(
    base_specs: dict[str, TensorSpec],
    branch_specs: list[dict[str, TensorSpec]],
    keep: frozenset[str] = frozenset(),
) -> list[str]:
    """θ0's bytes are kept for integer/bool buffers (they cannot be averaged) and for the frozen
    parameters ``keep`` (they never trained), so every branch must hold exactly θ0's."""
    problems = []
    mapped = MappedFiles()
    try:
        for name, spec in base_specs.items():
            if spec.is_floating and name not in keep:
                continue
            expected = mapped.raw(spec)
            what = "frozen" if spec.is_floating else "non-floating"
            for specs in branch_specs:
                if mapped.raw(specs[name]) != expected:
                    problems.append(
                        f"{specs[name].file}: {what} tensor {name!r} differs from base {spec.file}"
                    )
    finally:
        mapped.release()
    return problems


def provenance_problems(
    base_dir: Path, theta0: str | None, branch_dirs: list[Path]
) -> tuple[list[str], str | None]:
    """Checkpoints that merit recorded as trained from another θ0 than the others (or the base).

    Returns the problems and θ0's fingerprint as far as it is known.
    """
    problems = []
    first: tuple[str, Path] | None = None
    for branch_dir in branch_dirs:
        rec = recorded_theta0(branch_dir)
        if rec is None:
            continue
        fp, record = rec
        if theta0 is not None and fp != theta0:
            problems.append(
                f"{record}: {branch_dir} was trained from another θ0 "
                f"(fingerprint {fp[:12]}…, base {base_dir} is {theta0[:12]}…)"
            )
        elif theta0 is None and first is not None and fp != first[0]:
            problems.append(
                f"{record}: {branch_dir} was trained from another θ0 "
                f"(fingerprint {fp[:12]}…, {first[1]} records {first[0][:12]}…)"
            )
        first = first or rec
    return problems, theta0 if theta0 is not None else (first[0] if first else None)
