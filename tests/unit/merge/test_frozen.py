"""Frozen parameters (a vision tower that never trained): θ0's bytes in the merge, and a branch
whose frozen tensors moved is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_models import UP, exact_merge, read_tensors, save_model
from safetensors.torch import save_file

from merit.merge.errors import MergeError
from merit.merge.streaming import merge_checkpoints


def _frozen_branch(base: Path, out: Path, seed: int, keep: set[str]) -> Path:
    """A branch that trained every tensor but ``keep`` (which stay θ0's, byte for byte)."""
    save_model(out, seed=seed, dtype=torch.bfloat16)
    theta0 = read_tensors(base)
    tensors = {n: theta0[n] if n in keep else t for n, t in read_tensors(out).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_frozen_tensors_are_theta0s_bytes(tmp_path):
    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    keep = {UP}
    dirs = [_frozen_branch(base, tmp_path / f"b{k}", k + 1, keep) for k in range(3)]
    weights = [0.2, 0.3, 0.5]  # Σ w_k θ0 rounds back to θ0 only by luck in bf16
    merge_checkpoints(base, dirs, weights, tmp_path / "out", keep=frozenset(keep), progress=False)
    out, theta0 = read_tensors(tmp_path / "out"), read_tensors(base)
    assert torch.equal(out[UP], theta0[UP])
    want = exact_merge(dirs, weights)
    for name in out:
        if name != UP:
            torch.testing.assert_close(out[name].double(), want[name], rtol=8e-3, atol=1e-6)


def test_a_branch_whose_frozen_tensor_moved_is_refused(tmp_path):
    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    good = _frozen_branch(base, tmp_path / "good", 1, {UP})
    moved = save_model(tmp_path / "moved", seed=2, dtype=torch.bfloat16)  # trained UP too
    with pytest.raises(MergeError, match=f"frozen tensor '{UP}' differs from base"):
        merge_checkpoints(
            base, [good, moved], [0.5, 0.5], tmp_path / "out", keep=frozenset({UP}), progress=False
        )
    assert not (tmp_path / "out").exists()


def test_frozen_tensors_are_cast_once_to_another_output_dtype(tmp_path):
    base = save_model(tmp_path / "base", dtype=torch.float32)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1) for k in range(2)]
    for d in dirs:  # UP frozen: θ0's in every branch
        t = read_tensors(d) | {UP: read_tensors(base)[UP]}
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    keep = frozenset({UP})
    merge_checkpoints(base, dirs, [0.3, 0.7], out, keep=keep, dtype="bfloat16", progress=False)
    assert torch.equal(read_tensors(out)[UP], read_tensors(base)[UP].bfloat16())
