"""Tests for the merge's proof: merit.merge.manifest, .card, .verify and .hashing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from merge_models import UP, read_tensors, rewrite, sha256

from merit import hashing
from merit.hashing import HashCache, cached_sha256
from merit.lm import fingerprint
from merit.merge.errors import MergeError
from merit.merge.manifest import MANIFEST_FILE, MergeManifest
from merit.merge.streaming import merge_checkpoints
from merit.merge.verify import verify_merge


# -- proof --------------------------------------------------------------------------------------
def test_manifest(tmp_path, base, branches):
    weights = [0.2, 0.5, 0.3]
    meta = {"plan_hash": "abc", "tokens": [2, 5, 3]}
    out = tmp_path / "out"
    manifest = merge_checkpoints(
        base,
        branches,
        weights,
        out,
        max_shard_bytes=8192,
        metadata=meta,
        weights_from="plan tokens",
        progress=False,
    )
    assert json.loads((out / "merge_manifest.json").read_text()) == manifest.to_json()
    assert manifest.method == "linear" and manifest.formula == "θ̄ = Σ_k w_k θ_k"
    assert manifest.weights == weights and manifest.weights_from == "plan tokens"
    assert manifest.metadata == meta
    assert manifest.base == str(base)
    assert manifest.base_fingerprint == fingerprint(base)
    assert manifest.checkpoints == [str(b) for b in branches]
    written = {p.name for p in out.iterdir()} - {"merge_manifest.json"}
    assert set(manifest.outputs) == written
    for name, digest in manifest.outputs.items():
        assert sha256(out / name) == digest, name
    inputs = [
        *base.iterdir(),
        *(f for b in branches for f in b.glob("*.safetensors")),
    ]
    assert manifest.inputs == {str(f): sha256(f) for f in inputs}
    tensors = read_tensors(out)
    assert manifest.num_tensors == len(tensors)
    assert manifest.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


# The keys of merge_manifest.json, in order, as merit has always written them.
MANIFEST_KEYS = [
    "format",
    "method",
    "formula",
    "weights",
    "weights_given",
    "normalized",
    "weights_from",
    "scale",
    "params",
    "coefficients",
    "accumulation",
    "dtype",
    "output_dtypes",
    "base",
    "base_is_theta0",
    "base_fingerprint",
    "checkpoints",
    "inputs",
    "outputs",
    "num_tensors",
    "total_bytes",
    "metadata",
    "created_by",
]


def test_merge_manifest_round_trip(tmp_path, base, branches):
    out = tmp_path / "out"
    manifest = merge_checkpoints(
        base, branches, [2, 1, 1], out, method="task_vector", scale=0.5, normalize=True
    )
    assert isinstance(manifest, MergeManifest)
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert list(on_disk) == MANIFEST_KEYS and list(manifest.to_json()) == MANIFEST_KEYS
    assert list(on_disk["coefficients"]) == ["base", "checkpoints"]
    assert on_disk["format"] == "merit-merge/1"
    assert MergeManifest.from_json(manifest.to_json()) == manifest
    assert MergeManifest.from_json(on_disk) == manifest == MergeManifest.load(out)
    assert MergeManifest.load(out).to_json() == on_disk
    assert manifest.base_coefficient == on_disk["coefficients"]["base"] == pytest.approx(0.5)
    assert manifest.coefficients == on_disk["coefficients"]["checkpoints"]
    assert manifest.coefficients == pytest.approx([0.25, 0.125, 0.125])


def test_merge_manifest_reads_todays_files_and_refuses_others(tmp_path, base, branches):
    out = tmp_path / "out"
    merge_checkpoints(base, branches, [1 / 3] * 3, out, metadata={"plan_sha256": "abc"})
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    # A key a later merit might add is ignored; the rest reads as before.
    loaded = MergeManifest.from_json({**on_disk, "future_key": 1})
    assert loaded.metadata["plan_sha256"] == "abc" and loaded.weights == on_disk["weights"]
    assert loaded.to_json() == on_disk
    with pytest.raises(MergeError, match="outputs"):
        MergeManifest.from_json({k: v for k, v in on_disk.items() if k != "outputs"})
    with pytest.raises(MergeError, match="must be objects"):
        MergeManifest.from_json({**on_disk, "inputs": ["not", "a", "mapping"]})
    (out / MANIFEST_FILE).write_text(json.dumps({**on_disk, "coefficients": 1}))
    with pytest.raises(MergeError, match=MANIFEST_FILE):
        MergeManifest.load(out)
    with pytest.raises(MergeError, match="no readable merge manifest"):
        MergeManifest.load(tmp_path)


def test_model_card(tmp_path, base, branches):
    (base / "README.md").write_text("# θ0's own card")
    manifest = merge_checkpoints(
        base, branches, [2, 1, 1], tmp_path / "out", normalize=True, progress=False
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "θ0's own card" not in card
    assert "normalised: divided by their sum 4" in card
    assert manifest.base_fingerprint in card
    for branch, w in zip(branches, [0.5, 0.25, 0.25]):
        assert f"| `{branch}` | {w:g} |" in card
    for file, digest in manifest.inputs.items():
        assert f"| `{file}` | `{digest}` |" in card


def test_side_files_copied_training_state_skipped(tmp_path, base, branches):
    copied = {
        "chat_template.jinja": "{{ messages }}",
        "tokenizer.json": "{}",
        "preprocessor_config.json": "{}",
    }
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
        "README.md",
    }
    for name in ["config.json", "generation_config.json", *copied]:
        assert (out / name).read_bytes() == (base / name).read_bytes()


def test_verify_merge(tmp_path, base, branches):
    out = tmp_path / "out"
    merge_checkpoints(base, branches, [0.2, 0.5, 0.3], out, max_shard_bytes=8192)
    report = verify_merge(out)
    assert report["problems"] == [] and report["missing_inputs"] == []
    assert report["outputs"] == len(list(out.iterdir())) - 1
    assert report["inputs"] == len(json.loads((out / "merge_manifest.json").read_text())["inputs"])

    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (out / "extra.bin").write_bytes(b"x")
    rewrite(branches[1], lambda t: t[UP].mul_(2))
    problems = verify_merge(out)["problems"]
    assert len(problems) == 3
    assert any(str(shard) in p and "sha256" in p for p in problems)
    assert any(str(out / "extra.bin") in p and "not listed" in p for p in problems)
    assert any(str(branches[1] / "model.safetensors") in p and "input" in p for p in problems)
    assert len(verify_merge(out, check_inputs=False)["problems"]) == 2

    (branches[1] / "model.safetensors").unlink()
    assert str(branches[1] / "model.safetensors") in verify_merge(out)["missing_inputs"]
    with pytest.raises(MergeError, match="manifest"):
        verify_merge(tmp_path)


def test_hash_cache(tmp_path, monkeypatch):
    cache = HashCache(tmp_path / "cache")
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    # Just written: too recent to trust its time stamps, so hashed but not cached.
    assert cached_sha256(f, cache) == sha256(f)
    assert cache.get("sha256", [f]) is None
    monkeypatch.setattr(hashing, "_RACY_NS", 0)
    assert cached_sha256(f, cache) == sha256(f)
    assert cache.get("sha256", [f]) == sha256(f)
    # A hit is the recorded hash, without reading the file ...
    entry = next((tmp_path / "cache").iterdir())
    rec = json.loads(entry.read_text())
    entry.write_text(json.dumps({**rec, "sha256": "recorded"}))
    assert cached_sha256(f, cache) == "recorded"
    # ... and any change to the file (even of the same size, mtime restored) misses.
    st = f.stat()
    f.write_bytes(b"two")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached_sha256(f, cache) == sha256(f) != "recorded"


def test_merge_uses_and_fills_the_hash_cache(tmp_path, base, branches, monkeypatch):
    monkeypatch.setattr(hashing, "_RACY_NS", 0)
    cache = tmp_path / "cache"
    first = merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "a", hash_cache=cache)
    second = merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "b", hash_cache=cache)
    assert first.inputs == second.inputs
    assert first.base_fingerprint == second.base_fingerprint == fingerprint(base)
    # θ0's and the branches' weights, θ0's config.json (fingerprinted) and the fingerprint
    assert len(list(cache.iterdir())) == 4 + 1 + 1
    rewrite(branches[0], lambda t: t[UP].mul_(2))
    third = merge_checkpoints(base, branches, [1 / 3] * 3, tmp_path / "c", hash_cache=cache)
    f = str(branches[0] / "model.safetensors")
    assert third.inputs[f] == sha256(Path(f)) != first.inputs[f]
