"""Tests for merit.merging: streaming weighted merge of Hugging Face checkpoints."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from merit import merging
from merit.merging import MergeError, checkpoint_tensors, merge_checkpoints

TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
UP = "model.layers.0.mlp.up_proj.weight"


def save_model(
    path: Path,
    *,
    seed: int | None = None,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | None = None,
) -> Path:
    """Save θ0 (seed None) or a branch: θ0 plus seeded noise on every parameter."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.to(dtype)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def exact_merge(dirs: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k θ_k in float64, computed directly from the branch files."""
    states = [read_tensors(d) for d in dirs]
    return {
        name: sum(w * state[name].double() for w, state in zip(weights, states))
        for name in states[0]
    }


def rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to the tensor dict of a single-file checkpoint and save it back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return save_model(tmp_path / "base")


@pytest.fixture
def branches(tmp_path: Path) -> list[Path]:
    return [save_model(tmp_path / f"branch{k}", seed=k + 1) for k in range(3)]


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


def test_unequal_weights_respected(tmp_path, base, branches):
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
    merge_checkpoints(base, branches[:2], [2.0, -1.0], tmp_path / "out", progress=False)
    got = read_tensors(tmp_path / "out")
    a, b = read_tensors(branches[0]), read_tensors(branches[1])
    for name in a:
        torch.testing.assert_close(got[name], 2 * a[name] - b[name], rtol=1e-6, atol=1e-6)


def test_bf16_kept(tmp_path):
    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, dtype=torch.bfloat16) for k in range(3)]
    weights = [0.6, 0.25, 0.15]
    manifest = merge_checkpoints(base, dirs, weights, tmp_path / "out", progress=False)
    assert manifest["dtype"] is None
    got = read_tensors(tmp_path / "out")
    for name, exact in exact_merge(dirs, weights).items():
        assert got[name].dtype == torch.bfloat16
        # One rounding of an fp32 sum: within one bf16 ulp (2^-7 relative) of the exact sum.
        torch.testing.assert_close(got[name].double(), exact, rtol=2**-7, atol=1e-12)
    assert (tmp_path / "out/config.json").read_text() == (base / "config.json").read_text()


@pytest.mark.parametrize(
    ("in_dtype", "out_dtype", "name"),
    [(torch.float32, torch.bfloat16, "bfloat16"), (torch.bfloat16, torch.float32, "float32")],
)
def test_dtype_override(tmp_path, in_dtype, out_dtype, name):
    base = save_model(tmp_path / "base", dtype=in_dtype)
    dirs = [save_model(tmp_path / f"b{k}", seed=k + 1, dtype=in_dtype) for k in range(2)]
    weights = [0.7, 0.3]
    manifest = merge_checkpoints(base, dirs, weights, tmp_path / "out", dtype=name, progress=False)
    assert manifest["dtype"] == name
    got = read_tensors(tmp_path / "out")
    ulp = 2**-7 if out_dtype == torch.bfloat16 else 2**-23
    for tensor_name, exact in exact_merge(dirs, weights).items():
        # Accumulated wider than the output and rounded once: within one output ulp of exact.
        assert got[tensor_name].dtype == out_dtype
        torch.testing.assert_close(got[tensor_name].double(), exact, rtol=ulp, atol=1e-12)
    assert json.loads((tmp_path / "out/config.json").read_text())["dtype"] == name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == out_dtype


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
    assert index["metadata"]["total_size"] == total == manifest["total_bytes"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, exact in exact_merge(branches, weights).items():
        torch.testing.assert_close(model.state_dict()[name], exact.float(), rtol=1e-6, atol=1e-7)


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
    shard_inputs = [k for k in manifest["inputs"] if k.startswith(str(base))]
    assert len(shard_inputs) == len(list(base.glob("*.safetensors"))) > 1


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_names_tensor_and_checkpoint(tmp_path, base, branches, bad):
    def poison(tensors):
        tensors[UP][0, 0] = bad

    rewrite(branches[1], poison)
    with pytest.raises(MergeError) as err:
        merge_checkpoints(base, branches, [0.2, 0.3, 0.5], tmp_path / "out", progress=False)
    assert UP in str(err.value) and str(branches[1]) in str(err.value)
    assert str(branches[0]) not in str(err.value)
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
def test_header_mismatch(tmp_path, base, branches, edit, tensor, words):
    rewrite(branches[2], edit)
    with pytest.raises(MergeError) as err:
        merge_checkpoints(base, branches, [0.2, 0.3, 0.5], tmp_path / "out", progress=False)
    lines = str(err.value).splitlines()
    assert len(lines) == 2  # summary + exactly one problem
    assert tensor in lines[1] and words in lines[1] and str(branches[2]) in lines[1]
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_all_problems_reported_before_writing(tmp_path, base, branches, monkeypatch):
    rewrite(branches[0], _drop_up)
    rewrite(branches[2], _half_up)
    (tmp_path / "nothing").mkdir()
    calls = []
    monkeypatch.setattr(merging, "_merge_tensor", lambda *a: calls.append(a))
    with pytest.raises(MergeError) as err:
        merge_checkpoints(
            base, [*branches, tmp_path / "nothing"], [0.25] * 4, tmp_path / "out", progress=False
        )
    lines = str(err.value).splitlines()
    assert "3 problem(s)" in lines[0]
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


def test_argument_errors(tmp_path, base, branches):
    with pytest.raises(MergeError, match="2 weights for 3 checkpoints"):
        merge_checkpoints(base, branches, [0.5, 0.5], tmp_path / "out", progress=False)
    with pytest.raises(MergeError, match="dtype"):
        merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "out", dtype="int8")
    with pytest.raises(MergeError, match="JSON"):
        merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "out", metadata={"x": object()})
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


def test_failure_mid_write_leaves_nothing(tmp_path, base, branches, monkeypatch):
    real = merging._merge_tensor
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 12:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(merging, "_merge_tensor", flaky)
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_checkpoints(base, branches, [1 / 3] * 3, out, max_shard_bytes=4096, progress=False)
    assert len(calls) == 12  # some shards were complete when it failed
    assert not out.exists()
    assert leftovers(out.parent) == []

    monkeypatch.undo()
    merge_checkpoints(base, branches, [1 / 3] * 3, out, max_shard_bytes=4096, progress=False)
    assert read_tensors(out).keys() == read_tensors(base).keys()


def test_manifest(tmp_path, base, branches):
    weights = [0.2, 0.5, 0.3]
    meta = {"plan_hash": "abc", "tokens": [2, 5, 3]}
    out = tmp_path / "out"
    manifest = merge_checkpoints(
        base, branches, weights, out, max_shard_bytes=8192, metadata=meta, progress=False
    )
    assert json.loads((out / "merge_manifest.json").read_text()) == manifest
    assert manifest["method"] == "linear"
    assert manifest["weights"] == weights
    assert manifest["metadata"] == meta
    assert manifest["base"] == str(base)
    assert manifest["checkpoints"] == [str(b) for b in branches]
    written = {p.name for p in out.iterdir()} - {"merge_manifest.json"}
    assert set(manifest["outputs"]) == written
    for name, digest in manifest["outputs"].items():
        assert sha256(out / name) == digest, name
    inputs = [*base.glob("*.safetensors"), *(f for b in branches for f in b.glob("*.safetensors"))]
    assert manifest["inputs"] == {str(f): sha256(f) for f in inputs}
    tensors = read_tensors(out)
    assert manifest["num_tensors"] == len(tensors)
    assert manifest["total_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_side_files_copied_training_state_skipped(tmp_path, base, branches):
    copied = {"chat_template.jinja": "{{ messages }}", "tokenizer.json": "{}"}
    skipped = [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "training_args.bin",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "merge_manifest.json",
    ]
    for name, text in copied.items():
        (base / name).write_text(text)
    for name in skipped:
        (base / name).write_text("stale")
    (base / "runs").mkdir()
    merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        *copied,
        "model.safetensors",
        "merge_manifest.json",
    }
    for name in ["config.json", "generation_config.json", *copied]:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert json.loads((out / "merge_manifest.json").read_text())["method"] == "linear"
