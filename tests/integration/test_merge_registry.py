"""The merge-method registry: a method added by importing one module runs through
`merit merge --out`; the built-in linear and task-vector methods stay bit for bit the direct sum."""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merit.cli import main
from merit.merge import arithmetic
from merit.merge.errors import MergeError
from merit.merge.manifest import MANIFEST_FILE
from merit.merge.methods import METHODS, MergeMethod
from merit.merge.streaming import merge_checkpoints


def read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def branch_of(base: Path, out: Path, seed: int) -> Path:
    """θ0's tensors plus seeded noise, in bf16, with θ0's config."""
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).bfloat16()
        for name, t in read(base).items()
    }
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


@pytest.fixture
def base(tiny_base, tmp_path) -> Path:
    d = tmp_path / "theta0"
    shutil.copytree(tiny_base, d)
    tensors = {k: v.bfloat16() for k, v in read(d).items()}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture
def ckpts(base, tmp_path) -> list[Path]:
    return [branch_of(base, tmp_path / f"ckpt{k}", seed=k) for k in range(3)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks that do not divide the tensors: the chunk edges are exercised."""
    monkeypatch.setattr(arithmetic, "_CHUNK", 37)


@pytest.fixture
def toy_max():
    """The toy method, registered as a plugin registers it (by import) and removed after."""
    toy = importlib.import_module("toy_merge_method")
    METHODS.register(toy.METHOD, replace=True)  # again, if an earlier test removed it
    yield toy.NAME
    METHODS.unregister(toy.NAME)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("merit: error: ")
    return err[0]


def test_a_method_in_one_module_runs_through_the_cli(toy_max, ckpts, tmp_path, small_chunks):
    out = tmp_path / "max"
    assert main(["merge", "--out", str(out), "--method", toy_max, *map(str, ckpts)]) == 0
    states = [read(c) for c in ckpts]
    got = read(out)
    assert got.keys() == states[0].keys()
    for name, tensor in got.items():
        want = states[0][name]
        for state in states[1:]:
            want = torch.maximum(want, state[name])
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, want), name
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["method"] == toy_max and manifest["scale"] == 1.0
    assert "max_k" in manifest["formula"]
    assert main(["verify-merge", str(out)]) == 0


def test_a_methods_parameter_is_passed_and_validated(toy_max, ckpts, tmp_path, capsys):
    argv = ["merge", "--method", toy_max, *map(str, ckpts)]
    assert main([*argv, "--scale", "2", "--out", str(tmp_path / "x2")]) == 0
    states = [read(c) for c in ckpts]
    for name, tensor in read(tmp_path / "x2").items():
        want = torch.maximum(torch.maximum(states[0][name], states[1][name]), states[2][name])
        assert torch.equal(tensor, 2 * want), name  # doubling is exact
    capsys.readouterr()
    assert main([*argv, "--scale", "-1", "--out", str(tmp_path / "neg")]) == 2
    assert "scale must be positive" in one_error_line(capsys)
    assert not (tmp_path / "neg").exists()


@pytest.mark.parametrize(("method", "scale"), [("linear", 1.0), ("task_vector", 0.5)])
def test_builtin_methods_equal_the_unstreamed_sum_bitwise(
    base, ckpts, tmp_path, small_chunks, method, scale
):
    """c0·θ0 + Σ c_k θ_k summed over whole tensors in fp32, in order, rounded once to bf16."""
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / method
    argv = ["merge", "--method", method, "--base", str(base), "--out", str(out)]
    argv += ["--weights", ",".join(map(str, weights))]
    if method == "task_vector":
        argv += ["--scale", str(scale)]
    assert main([*argv, *map(str, ckpts)]) == 0
    coefficients = [scale * w for w in weights]
    c0 = math.fsum([1.0, *(-c for c in coefficients)]) if method == "task_vector" else 0.0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["coefficients"] == {"base": c0, "checkpoints": coefficients}
    theta0, states = read(base), [read(c) for c in ckpts]
    for name, tensor in read(out).items():
        acc = torch.zeros(tensor.shape, dtype=torch.float32)
        if c0:
            acc.add_(theta0[name].float(), alpha=c0)
        for state, c in zip(states, coefficients):
            acc.add_(state[name].float(), alpha=c)
        want = acc.to(torch.bfloat16)
        assert torch.equal(tensor.view(torch.int16), want.view(torch.int16)), name


def test_unknown_method_is_one_line_before_any_work(ckpts, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["merge", "--out", str(out), "--method", "nope", *map(str, ckpts)]) == 2
    line = one_error_line(capsys)
    assert "unknown merge method 'nope'" in line and "linear" in line and "task_vector" in line
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_scale_only_for_a_method_with_one(ckpts, tmp_path, capsys):
    argv = ["merge", "--scale", "2", "--out", str(tmp_path / "o"), *map(str, ckpts)]
    assert main(argv) == 2
    assert "--scale applies to --method task_vector" in one_error_line(capsys)
    with pytest.raises(MergeError, match="no parameter 'alpha'"):
        merge_checkpoints(ckpts[0], ckpts, [1 / 3] * 3, tmp_path / "p", params={"alpha": 1.0})
    with pytest.raises(MergeError, match="has no scale"):
        merge_checkpoints(ckpts[0], ckpts, [1 / 3] * 3, tmp_path / "p", scale=2.0)


def _deviation_stats(theta0, thetas, weights, params):
    # Whole-tensor statistics, widened one input at a time as a real method would.
    return [float((t.float() - theta0.float()).mean()) for t in thetas]


def _centred(theta0, thetas, weights, params, stats):
    out = theta0.clone()
    for theta, w, mean in zip(thetas, weights, stats):
        out.add_(theta - theta0 - mean, alpha=w)
    return out


@pytest.mark.parametrize("threads", [1, 3])
def test_whole_tensor_statistics(base, ckpts, tmp_path, small_chunks, threads):
    """θ̄ = θ0 + Σ w_k (θ_k − θ0 − mean(θ_k − θ0)): statistics of each whole tensor, then its
    chunks; θ0 is given to a method that needs it."""
    method = MergeMethod(
        name="toy_centred",
        formula="θ̄ = θ0 + Σ_k w_k (τ_k − mean τ_k)",
        needs_base=True,
        merge=_centred,
        statistics=_deviation_stats,
    )
    weights = [0.5, 0.3, 0.2]
    out = tmp_path / "centred"
    METHODS.register(method)
    try:
        merge_checkpoints(
            base, ckpts, weights, out, method=method.name, threads=threads, progress=False
        )
        with pytest.raises(MergeError, match="needs θ0"):
            merge_checkpoints(
                base, ckpts, weights, tmp_path / "o", method=method.name, base_is_theta0=False
            )
    finally:
        METHODS.unregister(method.name)
    theta0, states = read(base), [read(c) for c in ckpts]
    for name, tensor in read(out).items():
        t0 = theta0[name].double()
        taus = [s[name].double() - t0 for s in states]
        want = t0 + sum(w * (tau - tau.mean()) for w, tau in zip(weights, taus))
        torch.testing.assert_close(tensor.double(), want, rtol=2**-7, atol=1e-6)


def test_a_method_gives_coefficients_or_a_function():
    with pytest.raises(ValueError, match="not both"):
        MergeMethod(name="neither", formula="?")
