"""``merit verify-merge``: re-check a merge against the sha256s its manifest records."""

from __future__ import annotations

from pathlib import Path

from merit.artifacts import sha256_file
from merit.merge.manifest import MANIFEST_FILE, MergeManifest


def verify_merge(path: str | Path, *, check_inputs: bool = True) -> dict:
    """Recompute the sha256 of every file a merge manifest lists and compare.

    Every output file must be present and match; files in the directory that the manifest does
    not list are problems too. Input files are checked when still present (missing ones are
    reported as such, not as problems). Returns ``{"outputs": n_ok, "inputs": n_ok,
    "missing_inputs": [...], "problems": [one line per problem, naming the file]}``; raises
    :class:`~merit.merge.errors.MergeError` if there is no readable manifest.
    """
    path = Path(path)
    manifest = MergeManifest.load(path)
    problems: list[str] = []
    ok_outputs = 0
    for name, want in manifest.outputs.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: listed in the manifest but missing")
        elif (got := sha256_file(file)) != want:
            problems.append(f"{file}: sha256 {got[:16]}… differs from the manifest's {want[:16]}…")
        else:
            ok_outputs += 1
    for file in sorted(path.iterdir()):
        if file.name != MANIFEST_FILE and file.name not in manifest.outputs:
            problems.append(f"{file}: not listed in the manifest")
    ok_inputs, missing = _check_inputs(manifest, problems) if check_inputs else (0, [])
    return {
        "outputs": ok_outputs,
        "inputs": ok_inputs,
        "missing_inputs": missing,
        "problems": problems,
    }


def _check_inputs(manifest: MergeManifest, problems: list[str]) -> tuple[int, list[str]]:
    """Inputs still present that match (count), and those gone; changed ones go to ``problems``."""
    ok, missing = 0, []
    for name, want in manifest.inputs.items():
        file = Path(name)
        if not file.is_file():
            missing.append(name)
        elif (got := sha256_file(file)) != want:
            problems.append(
                f"{file}: input changed since the merge (sha256 {got[:16]}…, manifest {want[:16]}…)"
            )
        else:
            ok += 1
    return ok, missing
