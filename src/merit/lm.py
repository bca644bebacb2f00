"""The language model: finding and loading θ0 and its tokenizer, devices and dtypes, θ0's
fingerprint, and the answer-token loss every stage shares.

A hub id, a local directory, a GGUF file and a named model all end as a local Hugging Face
directory that the same ``from_pretrained`` code loads; merit's own tiny θ0 is one in the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from merit.artifacts import read_json, sha256_files, write_json
from merit.config import RunConfig, RuntimeConfig
from merit.errors import StageError
from merit.gguf import NAMED_MODELS, ModelSourceError, convert_gguf, is_gguf, named_model
from merit.memory import keep_freed_memory
from merit.vision import (
    Pixels,
    batch_pixels,
    default_trainable,
    freeze,
    is_vision_model,
    limit_pixels,
    load_processor,
    text_tokenizer,
)

WEIGHT_SUFFIX = ".safetensors"
IGNORE = -100


@dataclass
class Encoded:
    """One tokenized example: ``labels`` is ``IGNORE`` on prompt tokens; ``pixels``, for an
    example with images, its images (``input_ids`` already hold their expanded image tokens)."""

    input_ids: list[int]
    labels: list[int]
    pixels: Pixels | None = None

    @property
    def answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def cache_dir(runtime: RuntimeConfig) -> Path:
    root = runtime.cache_dir or os.environ.get("MERIT_CACHE") or "~/.cache/merit"
    return Path(root).expanduser()


class DeviceError(ValueError):
    """``runtime.device`` names a device this machine does not have."""


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """The device this process computes on. Under a launcher of several processes per node
    (``torchrun``, ``accelerate launch``: ``LOCAL_RANK`` set) a CUDA device without an index is
    this process's own GPU, so N ranks never load N copies of θ0 onto GPU 0."""
    name = runtime.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"runtime.device={runtime.device}: not a device name") from None
    local = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local is not None:
        device = torch.device("cuda", int(local))
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= max(count, 1) or count == 0:
            where = f" (LOCAL_RANK={local})" if local is not None else ""
            raise DeviceError(
                f"runtime.device={runtime.device}{where}: this machine has {count} CUDA "
                "device(s); use runtime.device=auto or cpu"
            )
    return device


def apply_runtime(runtime: RuntimeConfig) -> None:
    """Process-wide settings of ``runtime``: torch's threads and the allocator's behaviour."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    if runtime.keep_freed_memory:
        keep_freed_memory()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | str:
    """'auto' keeps the checkpoint's dtype, except that CPU math runs in fp32 (bf16 is ~6x slower)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, name)


class ModelPathError(ValueError):
    """``model.path`` names no model merit can find (one line: what was tried)."""


def _hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and all(parts) and not path.startswith((".", "/", "~"))


def check_model_path(path: str) -> None:
    """Cheap checks of ``model.path`` before any work: a directory with a config, a GGUF file, a
    known name, or a hub id. Building the demo θ0 and downloads come later."""
    if path == "demo" or path in NAMED_MODELS:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelPathError(f"model.path={path}: a directory without config.json")
        return
    if p.is_file():
        if not is_gguf(p):
            raise ModelSourceError(f"model.path={path}: not a GGUF file (no GGUF magic)")
        return
    if not _hub_id(path):
        known = ", ".join(["demo", *NAMED_MODELS])
        raise ModelPathError(
            f"model.path={path}: no such directory or .gguf file, not a known name ({known}), "
            "and not a hub id (owner/name)"
        )


def local_model_dir(path: str, cache: Path, progress: bool = True) -> Path:
    """θ0's local Hugging Face directory: the directory itself; a GGUF file or a named model
    converted once into the cache (:mod:`merit.gguf`); a hub id's snapshot (cached, else
    downloaded)."""
    check_model_path(path)
    if path in NAMED_MODELS:
        return named_model(path, cache, progress)
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return convert_gguf(p, cache, progress)
    return _hub_snapshot(path)


def _hub_snapshot(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache: download below
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as err:  # offline, not found, gated: one line whatever the cause
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelPathError(
            f"model.path={repo}: no directory ./{repo}, no .gguf file, not a known name, not in "
            f"the Hugging Face cache, and the hub download failed ({type(err).__name__}: {why})"
        ) from None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_class(model_dir: str | Path):
    """``AutoModelForImageTextToText`` for a vision-language θ0, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    local = (Path(model_dir) / "config.json").is_file()
    vision = local and is_vision_model(model_dir)
    return AutoModelForImageTextToText if vision else AutoModelForCausalLM


def load_model(
    path: str | Path,
    device: torch.device,
    dtype: str = "auto",
    trainable: tuple[str, ...] | None = None,
    attn_implementation: str = "sdpa",
):
    """θ0 (or a model trained from it) with ``from_pretrained``, moved to ``device``; with
    ``trainable`` (groups of :mod:`merit.vision`), only those parameters require grad."""
    cls = model_class(path)
    model = cls.from_pretrained(
        str(path), dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation
    ).to(device)
    if trainable is not None:
        freeze(model, trainable)
    return model


def meta_model(model_dir: str | Path, trainable: tuple[str, ...] | None = None):
    """θ0's architecture on the meta device (names and shapes, no weights read)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = model_class(model_dir).from_config(config)
    if trainable is not None:
        freeze(model, trainable)
    return model


def fingerprint(model_dir: str | Path) -> str:
    """sha256 over θ0's weight files and config (:func:`merit.artifacts.sha256_files`): branches
    and merges verify they share θ0."""
    model_dir = Path(model_dir)
    files = [*sorted(model_dir.glob(f"*{WEIGHT_SUFFIX}")), model_dir / "config.json"]
    if not files[:-1]:
        raise FileNotFoundError(f"{model_dir}: no safetensors weights")
    return sha256_files(files)[1]


# -- answer-token language-model loss -------------------------------------------------------------
def pad_batch(batch: Sequence[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels tensors, and the images' inputs."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out.update(batch_pixels([e.pixels for e in batch], n))
    return {k: v.to(device) for k, v in out.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes of a batch: everything but the labels (which merit shifts
    and masks itself)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def token_nll_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed NLL of the label tokens (labels are shifted inside: position t predicts t+1)."""
    logits = model(**model_inputs(batch)).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Named trainable parameters, each shared (tied) tensor once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


class Base:
    """θ0 as every stage sees it: its local directory, fingerprint, processor (or tokenizer),
    the parameter groups that train, and the model itself, each found once and on demand.

    ``find`` returns θ0's directory (a download, a GGUF conversion, or the demo's build);
    ``record`` is where the fingerprint is cached by the files' sizes and mtimes.
    """

    def __init__(self, cfg: RunConfig, find: Callable[[], Path], record: Path, say=print):
        self.cfg = cfg
        self._find = find
        self._record = record
        self._say = say
        self.device = resolve_device(cfg.runtime)

    @cached_property
    def dir(self) -> Path:
        return self._find()

    @cached_property
    def fingerprint(self) -> str:
        d = self.dir
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(d.glob("*"))]
        if self._record.is_file():
            rec = read_json(self._record)
            if rec.get("path") == str(d) and rec.get("stamp") == [list(s) for s in stamp]:
                return rec["fingerprint"]
        fp = fingerprint(d)
        write_json(self._record, {"path": str(d), "fingerprint": fp, "stamp": stamp})
        return fp

    @cached_property
    def is_vision(self) -> bool:
        """Whether θ0 is a vision-language model (:mod:`merit.vision`)."""
        return is_vision_model(self.dir)

    @cached_property
    def processor(self):
        """What encodes examples: a vision-language θ0's processor, else its tokenizer."""
        from transformers.utils import is_torchvision_available  # transformers is heavy

        if not self.is_vision:
            return load_tokenizer(self.dir)
        processor = load_processor(self.dir)
        if not is_torchvision_available():  # transformers' fast image processors need it
            name = type(processor.image_processor).__name__
            self._say(f"θ0's image processor: {name}, the slow (PIL) one (no usable torchvision)")
        if self.cfg.model.max_image_pixels:
            limit_pixels(processor, self.cfg.model.max_image_pixels)
        return processor

    @property
    def tokenizer(self):
        return text_tokenizer(self.processor)

    @cached_property
    def trainable(self) -> tuple[str, ...] | None:
        """The parameter groups that train (the same for calibration, branches and joint);
        None for a text-only θ0, which trains every parameter."""
        groups = self.cfg.model.trainable
        if not self.is_vision:
            if groups is not None and "language" not in groups:
                raise StageError(
                    f"model.trainable={groups}: θ0 is a text-only model, all of it language"
                )
            return None
        return tuple(groups) if groups else default_trainable(self.cfg.training.lora is not None)

    def load(self, dtype: str | None = None, device: torch.device | None = None):
        """A fresh copy of θ0 on the run's device (or ``device``), in ``model.dtype`` (or
        ``dtype``), its frozen groups frozen."""
        return load_model(
            self.dir,
            device or self.device,
            dtype or self.cfg.model.dtype,
            self.trainable,
            self.cfg.model.attn_implementation,
        )
