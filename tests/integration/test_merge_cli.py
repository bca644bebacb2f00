"""`merit merge --out DIR CKPT ...` and `merit verify-merge DIR` end to end on tiny models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merit.cli import main
from merit.lm import fingerprint
from merit.merge.manifest import MANIFEST_FILE

UP = "model.layers.0.mlp.up_proj.weight"


def branch_of(base: Path, out: Path, seed: int, dtype=torch.bfloat16) -> Path:
    """A fine-tune-like checkpoint of ``base``: its tensors plus seeded noise, its config."""
    out.mkdir(parents=True)
    tensors = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        tensors[name] = (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


def read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture
def base(tiny_base, tmp_path) -> Path:
    """θ0 in bf16: the tied tiny Llama with its tokenizer and chat template."""
    d = tmp_path / "theta0"
    shutil.copytree(tiny_base, d)
    tensors = {k: v.bfloat16() for k, v in load_file(d / "model.safetensors").items()}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture
def ckpts(base, tmp_path) -> list[Path]:
    return [branch_of(base, tmp_path / f"ckpt{k}", seed=k) for k in range(4)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("merit: error: ")
    return err[0]


def test_standalone_merge(base, ckpts, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", "--weights", "4,3,2,1", "--normalize", "--base", str(base), "--out", str(out)]
    assert main([*argv, *map(str, ckpts)]) == 0
    stdout = capsys.readouterr().out
    assert "normalised: divided by their sum 10" in stdout and "0.4, 0.3, 0.2, 0.1" in stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["normalized"] is True and manifest["weights_given"] == [4, 3, 2, 1]
    assert manifest["weights_from"] == "explicit (--weights)"
    assert manifest["base_fingerprint"] == fingerprint(base)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    # θ0's tie and tensor set, and its tokenizer and chat template.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert read(out).keys() == read(base).keys()
    tok, tok0 = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base)
    assert tok.chat_template == tok0.chat_template and tok.get_vocab() == tok0.get_vocab()
    states = [read(c) for c in ckpts]
    for name, tensor in read(out).items():
        exact = sum(w * s[name].double() for w, s in zip([0.4, 0.3, 0.2, 0.1], states))
        torch.testing.assert_close(tensor.double(), exact, rtol=2**-8, atol=1e-6)

    assert main(["verify-merge", str(out)]) == 0
    assert "match" in capsys.readouterr().out


def test_weights_as_given_and_default_base(ckpts, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--weights", "1,1", "--out", str(out), str(ckpts[0]), str(ckpts[1])]) == 0
    stdout = capsys.readouterr().out
    assert "used as given (not normalised; they sum to 2)" in stdout
    assert "the first checkpoint" in stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["base_is_theta0"] is False and manifest["base"] == str(ckpts[0])
    a, b = read(ckpts[0]), read(ckpts[1])
    for name, tensor in read(out).items():
        torch.testing.assert_close(tensor, (a[name].float() + b[name].float()).bfloat16())


def test_task_vector_form(base, ckpts, tmp_path, capsys):
    argv = ["merge", "--method", "task_vector", "--base", str(base), *map(str, ckpts)]
    w = ["--weights", "0.4,0.3,0.2,0.1"]
    assert main([*argv, *w, "--out", str(tmp_path / "tv1")]) == 0
    assert main([*argv, *w, "--scale", "0.5", "--out", str(tmp_path / "tv05")]) == 0
    linear = ["merge", *w, "--base", str(base), "--out", str(tmp_path / "lin"), *map(str, ckpts)]
    assert main(linear) == 0
    capsys.readouterr()
    # s = 1 and Σw = 1: exactly the plain weighted average.
    assert (tmp_path / "tv1/model.safetensors").read_bytes() == (
        tmp_path / "lin/model.safetensors"
    ).read_bytes()
    theta0, half, states = read(base), read(tmp_path / "tv05"), [read(c) for c in ckpts]
    for name, t0 in theta0.items():
        t0 = t0.double()
        delta = sum(w * (s[name].double() - t0) for w, s in zip([0.4, 0.3, 0.2, 0.1], states))
        torch.testing.assert_close(half[name].double(), t0 + 0.5 * delta, rtol=2**-8, atol=1e-6)


def test_sparse_task_vector_merges_from_the_cli(base, ckpts, tmp_path, capsys):
    """--method ties / dare_* / model_stock with --density, --scale and --seed; a density outside
    (0, 1] or an option the method does not take is one line, exit 2, nothing written."""
    argv = ["merge", "--base", str(base), *map(str, ckpts)]
    ties = [*argv, "--method", "ties", "--density", "0.5", "--scale", "1.5"]
    assert main([*ties, "--out", str(tmp_path / "ties")]) == 0
    manifest = json.loads((tmp_path / "ties" / "merge_manifest.json").read_text())
    assert manifest["method"] == "ties" and manifest["params"] == {"density": 0.5, "scale": 1.5}
    dare = [*argv, "--method", "dare_ties", "--density", "0.5", "--seed", "3"]
    assert main([*dare, "--out", str(tmp_path / "d1")]) == 0
    assert main([*dare, "--out", str(tmp_path / "d2")]) == 0  # the same seed, the same bytes
    assert (tmp_path / "d1/model.safetensors").read_bytes() == (
        tmp_path / "d2/model.safetensors"
    ).read_bytes()
    assert main([*argv, "--method", "model_stock", "--out", str(tmp_path / "ms")]) == 0
    capsys.readouterr()
    out = str(tmp_path / "bad")
    assert main([*argv, "--method", "ties", "--density", "1.5", "--out", out]) == 2
    assert "density must be in (0, 1]" in one_error_line(capsys)
    assert main([*argv, "--density", "0.5", "--out", out]) == 2
    assert "--density applies to --method ties or dare_linear or dare_ties" in one_error_line(
        capsys
    )
    assert main([*argv, "--method", "nonesuch", "--out", out]) == 2
    assert "nonesuch" in one_error_line(capsys)
    assert not Path(out).exists()


def test_a_mergekit_config_runs_on_merits_engine(base, ckpts, tmp_path, capsys):
    """--mergekit-config: the same bytes as the equivalent options; what merit would compute
    differently (another method, per-model densities, a switch off mergekit's default, a fitted
    method standalone) is one line, exit 2, nothing written."""
    models = [{"model": str(c), "parameters": {"weight": w, "density": 0.5}}
              for c, w in zip(ckpts, (0.4, 0.3, 0.2, 0.1))]  # fmt: skip
    doc = {"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 1.5},
           "models": [{"model": str(base)}, *models], "dtype": "bfloat16"}  # fmt: skip
    cfg = tmp_path / "mergekit.yaml"
    cfg.write_text(json.dumps(doc))  # JSON is YAML
    assert main(["merge", "--mergekit-config", str(cfg), "--out", str(tmp_path / "mk")]) == 0
    argv = ["merge", "--base", str(base), "--method", "ties", "--density", "0.5", "--scale",
            "1.5", "--weights", "0.4,0.3,0.2,0.1", *map(str, ckpts)]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "opts")]) == 0
    assert read(tmp_path / "mk").keys() == read(tmp_path / "opts").keys()
    for name, t in read(tmp_path / "mk").items():
        assert torch.equal(t, read(tmp_path / "opts")[name]), name
    capsys.readouterr()
    out = str(tmp_path / "bad")
    for change, words in (
        ({"merge_method": "slerp"}, "merge_method 'slerp' is not one merit implements"),
        ({"parameters": {"normalize": False}}, "ties with normalize: False is not implemented"),
        ({"models": [models[0], {**models[1], "parameters": {"weight": 1, "density": 0.9}}]},
         "one density to every model"),
        ({"models": [{"model": str(ckpts[0])}]}, "models[0] has no weight"),
    ):  # fmt: skip
        cfg.write_text(json.dumps({**doc, **change}))
        assert main(["merge", "--mergekit-config", str(cfg), "--out", out]) == 2
        assert words in one_error_line(capsys)
    assert main(["merge", "--mergekit-config", str(cfg), "--out", out, str(ckpts[0])]) == 2
    assert "drop checkpoints" in one_error_line(capsys)
    for method in ("regmean", "learned"):
        assert main(["merge", "--base", str(base), "--method", method, *map(str, ckpts),
                     "--out", out]) == 2  # fmt: skip
        assert "merging.method: " + method in one_error_line(capsys)
    assert not Path(out).exists()


def test_task_vector_needs_base(ckpts, tmp_path, capsys):
    argv = ["merge", "--method", "task_vector", "--out", str(tmp_path / "o"), *map(str, ckpts)]
    assert main(argv) == 2
    assert "--base" in one_error_line(capsys)


def _nan(t):
    t[UP][1, 2] = float("nan")


def _reshape(t):
    t[UP] = torch.zeros(3, 3, dtype=torch.bfloat16)


def _drop(t):
    del t[UP]


def _extra(t):
    t["model.extra"] = torch.zeros(2, dtype=torch.bfloat16)


def _dtype(t):
    t[UP] = t[UP].float()


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_nan, [UP, "NaN"]),
        (_reshape, [UP, "shape [3, 3]"]),
        (_drop, [UP, "missing tensor"]),
        (_extra, ["model.extra", "extra tensor"]),
        (_dtype, [UP, "dtype F32"]),
    ],
)
def test_bad_input_is_one_line_naming_tensor_and_file(base, ckpts, tmp_path, capsys, edit, words):
    tensors = read(ckpts[2])
    edit(tensors)
    save_file(tensors, ckpts[2] / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(base), "--out", str(out), *map(str, ckpts)]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert str(ckpts[2]) in line
    for word in words:
        assert word in line
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_branch_from_another_theta0_is_one_line(base, ckpts, tmp_path, capsys):
    # merit's branch layout: BRANCH/model is the checkpoint, BRANCH/manifest.json its record.
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d, fp in ((ours, fingerprint(base)), (theirs, "0" * 64)):
        d.mkdir()
        shutil.copytree(ckpts[0], d / "model")
        (d / "manifest.json").write_text(json.dumps({"base_fingerprint": fp}))
    argv = ["merge", "--base", str(base), "--out", str(tmp_path / "m")]
    assert main([*argv, str(ours / "model"), str(theirs / "model")]) == 2
    line = one_error_line(capsys)
    assert str(theirs / "manifest.json") in line and "another θ0" in line
    assert main([*argv, str(ours / "model"), str(ours / "model")]) == 0


def test_usage_errors(ckpts, tmp_path, capsys):
    assert main(["merge", "--weights", "1,2", str(ckpts[0]), str(ckpts[1])]) == 2
    assert "--out" in one_error_line(capsys)
    assert main(["merge", str(ckpts[0]), str(ckpts[1])]) == 2
    assert "is a checkpoint" in one_error_line(capsys)
    out = str(tmp_path / "o")
    assert main(["merge", "--weights", "1,2,3", "--out", out, str(ckpts[0]), str(ckpts[1])]) == 2
    assert "3 values for 2 checkpoints" in one_error_line(capsys)
    assert main(["merge", "--weights", "a,b", "--out", out, str(ckpts[0]), str(ckpts[1])]) == 2
    assert "--weights" in one_error_line(capsys)
    assert main(["merge", "--max-shard-size", "lots", "--out", out, str(ckpts[0])]) == 2
    assert "--max-shard-size" in one_error_line(capsys)
    assert main(["merge", "--out", out, str(tmp_path / "nothing")]) == 2
    assert "nothing" in one_error_line(capsys)
    assert not Path(out).exists()


def test_verify_merge_detects_a_flipped_byte(ckpts, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", "--max-shard-size", "20KB", "--out", str(out), *map(str, ckpts)]
    assert main(argv) == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert main(["verify-merge", str(out)]) == 0
    capsys.readouterr()
    data = bytearray(shards[-1].read_bytes())
    data[-3] ^= 0x10  # one bit of one weight
    shards[-1].write_bytes(bytes(data))
    assert main(["verify-merge", str(out)]) == 2
    assert str(shards[-1]) in one_error_line(capsys)
    assert main(["verify-merge", str(tmp_path)]) == 2
    assert "manifest" in one_error_line(capsys)


CHILD = textwrap.dedent(
    """
    import sys, time
    from merit.merge import arithmetic, safetensors_io

    arithmetic._CHUNK = 64  # many chunks per tensor: the kill lands inside a tensor
    real, calls = safetensors_io.ShardWriter.write_now, []

    def write_now(self, data):  # stall after the header and the first chunk of the first shard
        real(self, data)
        calls.append(1)
        if len(calls) == 2:
            self.file.flush()
            print("mid-write", flush=True)
            time.sleep(600)

    safetensors_io.ShardWriter.write_now = write_now
    from merit.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_killed_mid_write_leaves_nothing_and_rerun_succeeds(ckpts, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["merge", "--max-shard-size", "20KB", "--out", str(out), *map(str, ckpts)]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "mid-write"
        (tmp,) = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        (shard,) = tmp.glob("*.safetensors")  # the first shard, being written
        partial = shard.stat().st_size
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing at the target: only the dead merge's temporary directory

    assert main(argv) == 0
    assert 0 < partial < (out / shard.name).stat().st_size
    assert not tmp.exists()  # the re-run removed it
    assert main(["verify-merge", str(out)]) == 0
    assert read_all(out).keys() == read(ckpts[0]).keys()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def test_merge_path_imports_nothing_heavy(ckpts, tmp_path):
    """No transformers, datasets, TRL, accelerate or pydantic at merge time: only torch."""
    code = textwrap.dedent(
        f"""
        import sys
        from merit.cli import main
        out = {str(tmp_path / "m")!r}
        assert main(["merge", "--out", out, *{[str(c) for c in ckpts]!r}]) == 0
        assert main(["verify-merge", out]) == 0
        heavy = {{"transformers", "datasets", "trl", "accelerate", "pydantic"}} & set(sys.modules)
        print(sorted(heavy))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
