"""Tests for merit.merge.streaming: the streaming weighted merge of Hugging Face checkpoints
(arithmetic, task vectors, output structure, refusals, atomicity)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from merge_models import (
    UP,
    bits,
    exact_merge,
    leftovers,
    read_tensors,
    rewrite,
    save_model,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merit.lm import fingerprint
from merit.merge import arithmetic
from merit.merge.arithmetic import MergeTerms, plan_weighting
from merit.merge.errors import MergeError
from merit.merge.safetensors_io import checkpoint_tensors, read_safetensors_header
from merit.merge.streaming import MergeOptions, merge_checkpoints, plan_merge


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks far smaller than the tensors (and not dividing them): chunk edges are exercised."""
    monkeypatch.setattr(arithmetic, "_CHUNK", 37)


# -- arithmetic ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", [[0.1, 0.2, 0.7], [1 / 3] * 3, [0.1] * 10, [1.0]])
def test_identical_branches_return_input_bitwise(tmp_path, dtype, weights):
    base = save_model(tmp_path / "base", dtype=dtype)
    branch = save_model(tmp_path / "branch", seed=1, dtype=dtype)
    merge_checkpoints(base, [branch] * len(weights), weights, tmp_path / "out", progress=False)
    got, want = read_tensors(tmp_path / "out"), read_tensors(branch)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == dtype
        assert torch.equal(got[name], tensor), name


def test_unequal_weights_respected(tmp_path, base, branches, small_chunks):
    weights = [0.5, 0.3, 0.2]
    merge_checkpoints(base, branches, weights, tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")
    for name, exact in exact_merge(branches, weights).items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], exact.float(), rtol=1e-6, atol=1e-7)
    # The weights must matter: the uniform average differs.
    uniform = exact_merge(branches, [1 / 3] * 3)[UP].float()
    assert not torch.allclose(got[UP], uniform, rtol=1e-3, atol=1e-4)


def test_weights_used_as_given(tmp_path, base, branches):
    manifest = merge_checkpoints(base, branches[:2], [2.0, -1.0], tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")
    a, b = read_tensors(branches[0]), read_tensors(branches[1])
    for name in a:
        torch.testing.assert_close(got[name], 2 * a[name] - b[name], rtol=1e-6, atol=1e-6)
    assert manifest.normalized is False and manifest.weights == [2.0, -1.0]


def test_normalize(tmp_path, base, branches):
    manifest = merge_checkpoints(
        base, branches, [4, 3, 3], tmp_path / "out", normalize=True, progress=False
    )
    assert manifest.normalized is True
    assert manifest.weights_given == [4, 3, 3]
    assert manifest.weights == pytest.approx([0.4, 0.3, 0.3])
    got = read_tensors(tmp_path / "out")
    for name, exact in exact_merge(branches, [0.4, 0.3, 0.3]).items():
        torch.testing.assert_close(got[name], exact.float(), rtol=1e-6, atol=1e-7)
    with pytest.raises(MergeError, match="sum to 0"):
        merge_checkpoints(base, branches[:2], [1, -1], tmp_path / "o2", normalize=True)


def test_bf16_rounded_once_within_half_ulp(tmp_path, small_chunks):
    """fp32 accumulation, one rounding: within half a bf16 ulp of the exact sum, except where
    the exact sum is a rounding tie up to the fp32 error (weights in fp32, K fp32 roundings)."""
    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, dtype=torch.bfloat16) for k in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]
    manifest = merge_checkpoints(base, dirs, weights, tmp_path / "out", progress=False)
    assert manifest.dtype is None and manifest.output_dtypes == ["bfloat16"]
    assert manifest.accumulation == "float32, rounded once"
    got = read_tensors(tmp_path / "out")
    states = [read_tensors(d) for d in dirs]
    within = beyond = 0
    for name, exact in exact_merge(dirs, weights).items():
        assert got[name].dtype == torch.bfloat16
        g = got[name].double()
        # ulp of a bf16 value in [2^(e-1), 2^e): 2^(e-8)
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(g.abs().clamp_min(1e-30))[1] - 8)
        err = (g - exact).abs()
        far = err > ulp / 2
        magnitude = sum(w * s[name].double().abs() for w, s in zip(weights, states))
        slack = (len(weights) + 1) * 2**-24 * magnitude
        assert torch.all(err[far] <= ulp[far] / 2 + slack[far]), name
        within += int((~far).sum())
        beyond += int(far.sum())
    # Σ w_k θ_k of bf16 values with decimal weights lands on ties often, but not mostly.
    assert beyond < 0.05 * within
    assert (tmp_path / "out/config.json").read_text() == (base / "config.json").read_text()


def test_bitwise_equal_to_mergekits_arithmetic(tmp_path, small_chunks):
    """mergekit 0.1.5's linear merge: an fp32 zero accumulator, `addcmul_` of each checkpoint
    by its fp32 weight in order, one rounding to the input dtype. merit's is the same bits."""
    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, dtype=torch.bfloat16) for k in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]
    merge_checkpoints(base, dirs, weights, tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")
    states = [read_tensors(d) for d in dirs]
    for name, tensor in got.items():
        acc = torch.zeros(tensor.shape, dtype=torch.float32)
        for state, w in zip(states, weights):
            acc.addcmul_(state[name], torch.tensor(w, dtype=torch.float32))
        assert torch.equal(bits(tensor), bits(acc.to(torch.bfloat16))), name


@pytest.mark.parametrize(
    ("in_dtype", "out_dtype", "name"),
    [(torch.float32, torch.bfloat16, "bfloat16"), (torch.bfloat16, torch.float32, "float32")],
)
def test_dtype_override(tmp_path, in_dtype, out_dtype, name):
    base = save_model(tmp_path / "base", dtype=in_dtype)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, dtype=in_dtype) for k in range(2)]
    weights = [0.7, 0.3]
    manifest = merge_checkpoints(base, dirs, weights, tmp_path / "out", dtype=name, progress=False)
    assert manifest.dtype == name and manifest.output_dtypes == [name]
    got = read_tensors(tmp_path / "out")
    ulp = 2**-7 if out_dtype == torch.bfloat16 else 2**-23
    for tensor_name, exact in exact_merge(dirs, weights).items():
        # Accumulated wider than the output and rounded once: within one output ulp of exact.
        assert got[tensor_name].dtype == out_dtype
        torch.testing.assert_close(got[tensor_name].double(), exact, rtol=ulp, atol=1e-12)
    assert json.loads((tmp_path / "out/config.json").read_text())["dtype"] == name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == out_dtype


def test_threads_do_not_change_a_bit(tmp_path, base, branches, small_chunks):
    one = merge_checkpoints(base, branches, [0.5, 0.3, 0.2], tmp_path / "one", threads=1)
    three = merge_checkpoints(base, branches, [0.5, 0.3, 0.2], tmp_path / "three", threads=3)
    assert one.outputs["model.safetensors"] == three.outputs["model.safetensors"]


# -- task vectors -------------------------------------------------------------------------------
def test_task_vector_formula(tmp_path, base, branches, small_chunks):
    weights, scale = [0.5, 0.25, 0.5], 0.7
    manifest = merge_checkpoints(
        base, branches, weights, tmp_path / "out", method="task_vector", scale=scale
    )
    assert manifest.method == "task_vector" and manifest.scale == scale
    assert manifest.base_coefficient == pytest.approx(1 - scale * sum(weights))
    theta0 = read_tensors(base)
    states = [read_tensors(b) for b in branches]
    got = read_tensors(tmp_path / "out")
    for name, t0 in theta0.items():
        want = t0.double() + scale * sum(
            w * (s[name].double() - t0.double()) for w, s in zip(weights, states)
        )
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-6)


def test_task_vector_with_unit_weights_is_the_linear_merge_bitwise(tmp_path):
    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, dtype=torch.bfloat16) for k in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]  # not exactly 1 in binary
    lin = merge_checkpoints(base, dirs, weights, tmp_path / "lin", progress=False)
    tv = merge_checkpoints(
        base, dirs, weights, tmp_path / "tv", method="task_vector", scale=1.0, progress=False
    )
    assert tv.base_coefficient == 0.0
    assert tv.outputs["model.safetensors"] == lin.outputs["model.safetensors"]
    # ... and a scale ≠ 1 is not.
    other = merge_checkpoints(base, dirs, weights, tmp_path / "s2", method="task_vector", scale=2)
    assert other.outputs["model.safetensors"] != lin.outputs["model.safetensors"]


def test_plan_weighting():
    plan = plan_weighting([1, 1, 2], normalize=True, method="task_vector", scale=0.5)
    assert plan.weights == (0.25, 0.25, 0.5)
    assert plan.coefficients == (0.125, 0.125, 0.25)
    assert plan.base_coefficient == 0.5
    assert plan_weighting([0.4, 0.6]).base_coefficient == 0.0
    with pytest.raises(MergeError, match="method"):
        plan_weighting([1.0], method="nonesuch")
    with pytest.raises(MergeError, match="finite"):
        plan_weighting([float("nan")])


def test_task_vector_needs_theta0(tmp_path, base, branches):
    with pytest.raises(MergeError, match="θ0"):
        merge_checkpoints(
            base, branches, [0.5] * 3, tmp_path / "out", method="task_vector", base_is_theta0=False
        )


# -- structure ----------------------------------------------------------------------------------
def test_output_loads_with_transformers(tmp_path, base, branches):
    weights = [0.2, 0.5, 0.3]
    merge_checkpoints(base, branches, weights, tmp_path / "out", progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    expected = exact_merge(branches, weights)
    assert state.keys() == expected.keys()
    for name, exact in expected.items():
        torch.testing.assert_close(state[name], exact.float(), rtol=1e-6, atol=1e-7)


def test_sharded_output(tmp_path, base, branches):
    weights = [0.2, 0.5, 0.3]
    limit = 8 * 1024
    manifest = merge_checkpoints(
        base, branches, weights, tmp_path / "out", max_shard_bytes=limit, progress=False
    )
    out = tmp_path / "out"
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert index["weight_map"].keys() == read_tensors(base).keys()
    total = 0
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = set(f.keys())
            sizes = [f.get_tensor(n).numel() * 4 for n in names]
        assert names == {n for n, v in index["weight_map"].items() if v == file}
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == manifest.total_bytes
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, exact in exact_merge(branches, weights).items():
        torch.testing.assert_close(model.state_dict()[name], exact.float(), rtol=1e-6, atol=1e-7)


def test_plan_merge_reads_headers_only_and_lays_out_shards(tmp_path, base, branches):
    out = tmp_path / "out"
    plan = plan_merge(
        base, branches, [2, 1, 1], out, MergeOptions(normalize=True, max_shard_bytes=8192)
    )
    assert not out.exists() and leftovers(tmp_path) == []
    assert plan.weighting.weights == (0.5, 0.25, 0.25) and plan.threads >= 1
    names = [name for shard in plan.shards for name in shard.names]
    assert names == list(read_tensors(base)) == list(plan.base_specs)
    assert len(plan.shards) > 1
    assert all(
        shard.file.endswith(f"-of-{len(plan.shards):05d}.safetensors") for shard in plan.shards
    )
    assert plan.total_bytes == sum(
        t.numel() * t.element_size() for t in read_tensors(base).values()
    )
    single = plan_merge(base, branches, [1, 1, 1], out)
    assert [shard.file for shard in single.shards] == ["model.safetensors"]
    with pytest.raises(TypeError, match="max_shard_size"):
        merge_checkpoints(base, branches, [1, 1, 1], out, max_shard_size=8192)


def test_sharded_input(tmp_path):
    base = save_model(tmp_path / "base", max_shard_size=8000)
    dirs = [
        save_model(tmp_path / "b0", seed=1, max_shard_size=8000),
        save_model(tmp_path / "b1", seed=2),  # sharding may differ between inputs
    ]
    assert (base / "model.safetensors.index.json").exists()
    weights = [0.4, 0.6]
    manifest = merge_checkpoints(base, dirs, weights, tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")
    expected = exact_merge(dirs, weights)
    assert got.keys() == expected.keys()
    for name, exact in expected.items():
        torch.testing.assert_close(got[name], exact.float(), rtol=1e-6, atol=1e-7)
    assert len(checkpoint_tensors(base)) == len(expected)
    base_inputs = {k for k in manifest.inputs if k.startswith(str(base) + os.sep)}
    want = {str(f) for f in base.glob("*.safetensors")} | {
        str(base / "model.safetensors.index.json"),
        str(base / "config.json"),
        str(base / "generation_config.json"),
    }
    assert base_inputs == want and len(list(base.glob("*.safetensors"))) > 1


def test_tied_embeddings_stay_tied(tmp_path):
    base = save_model(tmp_path / "base", tie=True)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, tie=True) for k in range(2)]
    assert "lm_head.weight" not in read_tensors(base)
    weights = [0.3, 0.7]
    merge_checkpoints(base, dirs, weights, tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")
    assert got.keys() == read_tensors(base).keys()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    exact = exact_merge(dirs, weights)["model.embed_tokens.weight"].float()
    torch.testing.assert_close(model.lm_head.weight.detach(), exact, rtol=1e-6, atol=1e-7)


def test_untied_branch_of_a_tied_base_is_refused(tmp_path):
    base = save_model(tmp_path / "base", tie=True)
    branch = save_model(tmp_path / "b0", seed=1, tie=True)

    def untie(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    rewrite(branch, untie)
    with pytest.raises(MergeError, match=r"extra tensor 'lm_head.weight'"):
        merge_checkpoints(base, [branch], [1.0], tmp_path / "out", progress=False)


def test_checkpoint_tensors(tmp_path):
    single = save_model(tmp_path / "single")
    sharded = save_model(tmp_path / "sharded", max_shard_size=8000)
    one, many = checkpoint_tensors(single), checkpoint_tensors(sharded)
    assert one.keys() == many.keys() == read_tensors(single).keys()
    assert set(one.values()) == {single / "model.safetensors"}
    assert len(set(many.values())) > 1
    for name, file in many.items():
        with safe_open(file, framework="pt") as f:
            stored = f.keys()
        assert name in stored
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="empty"):
        checkpoint_tensors(tmp_path / "empty")


def test_header_parser_agrees_with_safetensors(tmp_path):
    path = save_model(tmp_path / "m", dtype=torch.bfloat16) / "model.safetensors"
    specs = read_safetensors_header(path)
    data = path.read_bytes()
    for name, tensor in load_file(path).items():
        spec = specs[name]
        assert spec.dtype == "BF16" and spec.shape == tuple(tensor.shape)
        assert data[spec.start : spec.end] == tensor.view(torch.uint8).numpy().tobytes()
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(MergeError, match=r"bad\.safetensors"):
        read_safetensors_header(tmp_path / "bad.safetensors")


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_tensor_and_checkpoint(tmp_path, base, branches, bad, small_chunks):
    def poison(tensors):
        tensors[UP][3, 5] = bad

    rewrite(branches[1], poison)
    with pytest.raises(MergeError) as err:
        merge_checkpoints(base, branches, [0.2, 0.3, 0.5], tmp_path / "out", progress=False)
    assert UP in str(err.value) and str(branches[1]) in str(err.value)
    assert str(branches[0]) not in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_overflow_on_rounding_is_an_error(tmp_path, base, branches):
    def huge(tensors):
        tensors[UP][0, 0] = 1e6  # finite in fp32, beyond float16's range

    for branch in branches:
        rewrite(branch, huge)
    with pytest.raises(MergeError, match=rf"{UP}.*overflow"):
        merge_checkpoints(
            base, branches, [1 / 3] * 3, tmp_path / "out", dtype="float16", progress=False
        )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _drop_up(tensors):
    del tensors[UP]


def _add_extra(tensors):
    tensors["extra.weight"] = torch.zeros(3)


def _reshape_up(tensors):
    tensors[UP] = torch.zeros(4, 4)


def _half_up(tensors):
    tensors[UP] = tensors[UP].half()


@pytest.mark.parametrize(
    ("edit", "tensor", "words"),
    [
        (_drop_up, UP, "missing tensor"),
        (_add_extra, "extra.weight", "extra tensor"),
        (_reshape_up, UP, "shape [4, 4]"),
        (_half_up, UP, "dtype F16"),
    ],
)
def test_header_mismatch_is_one_line(tmp_path, base, branches, edit, tensor, words):
    rewrite(branches[2], edit)
    with pytest.raises(MergeError) as err:
        merge_checkpoints(base, branches, [0.2, 0.3, 0.5], tmp_path / "out", progress=False)
    (line,) = str(err.value).splitlines()
    assert tensor in line and words in line and str(branches[2]) in line
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_all_problems_reported_before_writing(tmp_path, base, branches, monkeypatch):
    rewrite(branches[0], _drop_up)
    rewrite(branches[2], _half_up)
    (tmp_path / "nothing").mkdir()
    calls = []
    monkeypatch.setattr(MergeTerms, "chunk", lambda *a: calls.append(a))
    with pytest.raises(MergeError) as err:
        merge_checkpoints(
            base, [*branches, tmp_path / "nothing"], [0.25] * 4, tmp_path / "out", progress=False
        )
    lines = str(err.value).splitlines()
    assert "3 problems" in lines[0]
    assert any("missing tensor" in line and str(branches[0]) in line for line in lines)
    assert any("dtype F16" in line and str(branches[2]) in line for line in lines)
    assert any(str(tmp_path / "nothing") in line for line in lines)
    assert calls == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_non_floating_tensors(tmp_path, base, branches):
    def add_ids(tensors):
        tensors["ids"] = torch.arange(5)

    for path in [base, *branches]:
        rewrite(path, add_ids)
    merge_checkpoints(base, branches, [0.2, 0.3, 0.5], tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")["ids"]
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(5))

    def change_ids(tensors):
        tensors["ids"][0] = 7

    rewrite(branches[1], change_ids)
    with pytest.raises(MergeError, match=r"non-floating tensor 'ids'") as err:
        merge_checkpoints(base, branches, [0.2, 0.3, 0.5], tmp_path / "out2", progress=False)
    assert str(branches[1]) in str(err.value)


def _branch_layout(tmp_path: Path, name: str, seed: int, theta0: str) -> Path:
    """merit's branch layout: DIR/model (the checkpoint) and DIR/manifest.json (provenance)."""
    model = save_model(tmp_path / name / "model", seed=seed)
    (tmp_path / name / "manifest.json").write_text(json.dumps({"base_fingerprint": theta0}))
    return model


def test_branch_from_another_theta0_is_refused(tmp_path, base):
    fp = fingerprint(base)
    ours = _branch_layout(tmp_path, "ours", 1, fp)
    theirs = _branch_layout(tmp_path, "theirs", 2, "f" * 64)
    with pytest.raises(MergeError) as err:
        merge_checkpoints(base, [ours, theirs], [0.5, 0.5], tmp_path / "out", progress=False)
    (line,) = str(err.value).splitlines()
    assert str(tmp_path / "theirs" / "manifest.json") in line and "another θ0" in line
    assert not (tmp_path / "out").exists()
    # Without θ0 as the base, the checkpoints must at least agree with each other...
    with pytest.raises(MergeError, match="another θ0"):
        merge_checkpoints(ours, [ours, theirs], [0.5, 0.5], tmp_path / "out", base_is_theta0=False)
    # ... and θ0's fingerprint is then the one they record.
    m = merge_checkpoints(ours, [ours, ours], [0.5, 0.5], tmp_path / "out", base_is_theta0=False)
    assert m.base_fingerprint == fp and m.base_is_theta0 is False


def test_argument_errors(tmp_path, base, branches):
    with pytest.raises(MergeError, match="2 weights for 3 checkpoints"):
        merge_checkpoints(base, branches, [0.5, 0.5], tmp_path / "out", progress=False)
    with pytest.raises(MergeError, match="dtype"):
        merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "out", dtype="int8")
    with pytest.raises(MergeError, match="JSON"):
        merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "out", metadata={"x": object()})
    with pytest.raises(MergeError, match="one of the inputs"):
        merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "nothing" / ".." / "branch0")
    assert not (tmp_path / "out").exists()


def test_existing_output(tmp_path, base, branches):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not an empty directory"):
        merge_checkpoints(base, branches, [1 / 3] * 3, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    merge_checkpoints(base, branches, [1 / 3] * 3, out, progress=False)
    assert (out / "model.safetensors").is_file()


# -- atomicity ----------------------------------------------------------------------------------
def test_failure_mid_write_leaves_nothing(tmp_path, base, branches, monkeypatch, small_chunks):
    real = MergeTerms.chunk
    calls = []

    def flaky(self, *args):
        calls.append(args[0])
        if len(calls) == 40:
            raise RuntimeError("disk on fire")
        return real(self, *args)

    monkeypatch.setattr(MergeTerms, "chunk", flaky)
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_checkpoints(base, branches, [1 / 3] * 3, out, max_shard_bytes=4096, threads=1)
    assert len(calls) >= 40  # some shards were complete when it failed
    assert not out.exists()
    assert leftovers(out.parent) == []

    monkeypatch.undo()
    merge_checkpoints(base, branches, [1 / 3] * 3, out, max_shard_bytes=4096, progress=False)
    assert read_tensors(out).keys() == read_tensors(base).keys()


def test_stale_temporary_directories_of_dead_merges_are_removed(tmp_path, base, branches):
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-0123abcd"  # no such pid
    alive = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"  # a concurrent merge: kept
    for d in (dead, alive):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    merge_checkpoints(base, branches, [1 / 3] * 3, out, progress=False)
    assert not dead.exists() and alive.exists()
