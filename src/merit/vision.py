"""The vision side of a vision-language θ0 (Qwen2-VL, Qwen2.5-VL, LLaVA): whether θ0 is one, its
processor, which of its parameters train, and an example's images turned into model inputs.

A vision-language model has three parameter groups: the ``vision`` tower (a ViT), the
``projector`` that maps its features into the language model's embedding space (Qwen's
``visual.merger``, LLaVA's ``multi_modal_projector``), and the ``language`` model (with its
embeddings and head). Which of them train is one setting (``model.trainable``) that calibration,
every branch and the joint baseline honour identically: calibration sketches the gradients of
exactly the parameters that will train, so the conflict geometry is measured in the space the
branches move in (paper §3.1), and the merge copies the frozen ones from θ0 byte for byte.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merit.config import ConfigError

GROUPS = ("vision", "projector", "language")
# Names match both layouts: in memory (``model.visual.merger.``, ``model.vision_tower.``) and
# on disk (``visual.merger.``, ``vision_tower.``), so the merge can read groups off file names.
_PROJECTOR = re.compile(
    r"(^|\.)(multi_modal_projector|visual\.merger|visual\.deepstack_merger_list|mm_projector|connector)\."
)
_VISION = re.compile(r"(^|\.)(visual|vision_tower|vision_model)\.")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Processors whose stock class needs torchvision (a video processor) even for still images.
_IMAGE_ONLY = {"Qwen2VLProcessor", "Qwen2_5_VLProcessor"}


class ProcessorError(ValueError):
    """θ0's processor cannot be loaded as a processor (one line: which and why)."""


def param_group(name: str) -> str:
    """``vision``, ``projector`` or ``language`` for a parameter or tensor name."""
    if _PROJECTOR.search(name):
        return "projector"
    if _VISION.search(name):
        return "vision"
    return "language"


def default_trainable(lora: bool) -> tuple[str, ...]:
    """What trains when ``model.trainable`` is not set.

    Full fine-tuning trains the projector and the language model with the vision tower frozen,
    the usual recipe for instruction-tuning an already instruction-tuned Qwen2.5-VL or LLaVA.
    The paper's setting is Qwen2.5-VL (§5); which parts it trains is not confirmed here, so
    this is a default to check against one's own recipe. LoRA adapts only the language model's
    linear layers.
    """
    return ("language",) if lora else ("projector", "language")


def freeze(model: torch.nn.Module, groups: Sequence[str]) -> None:
    """Set ``requires_grad`` by group.

    Raises:
        ConfigError: no parameter of ``model`` is in ``groups`` (``model.trainable``).
    """
    for name, p in model.named_parameters():
        p.requires_grad_(param_group(name) in groups)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.trainable={list(groups)} leaves no parameter of θ0 to train")


def frozen_tensors(names: Iterable[str], groups: Sequence[str]) -> frozenset[str]:
    """The tensor names (any layout) outside the trainable ``groups``."""
    return frozenset(n for n in names if param_group(n) not in groups)


def group_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per group (each shared tensor once)."""
    sizes = dict.fromkeys(GROUPS, 0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            sizes[param_group(name)] += p.numel()
    return sizes


# -- is θ0 a vision-language model ---------------------------------------------------------------
def is_vision_config(config: dict, model_dir: Path | None = None) -> bool:
    """Whether a config (``config.json`` as a dict) is an image-text-to-text model's.

    A few architectures (Gemma 3) are both a causal LM and an image-text model; they count as
    vision-language when their directory holds a processor config.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = config.get("model_type")
    if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return False
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    return model_dir is not None and any((model_dir / f).is_file() for f in _PROCESSOR_FILES)


def is_vision_model(model_dir: str | Path) -> bool:
    model_dir = Path(model_dir)
    return is_vision_config(json.loads((model_dir / "config.json").read_text()), model_dir)


# -- the processor -------------------------------------------------------------------------------
@functools.cache
def image_only_processor(name: str):
    """The stock processor class ``name`` without its video processor (which needs torchvision;
    images alone do not): the slow (PIL) image processor and the tokenizer."""
    import transformers

    parent = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        parent.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    # ProcessorMixin reads a processor's parts off its __init__ signature: no video processor.
    return type(f"{name}ImageOnly", (parent,), {"__init__": __init__, "merit_saves_as": name})


def _has_video_processor(model_dir: Path) -> bool:
    if (model_dir / "video_preprocessor_config.json").is_file():
        return True
    f = model_dir / "processor_config.json"
    return f.is_file() and "video_processor" in json.loads(f.read_text())


def _saved_class(model_dir: Path) -> str | None:
    for name in _PROCESSOR_FILES:
        f = model_dir / name
        if f.is_file():
            found = json.loads(f.read_text()).get("processor_class")
            if found:
                return found
    return None


def load_processor(model_dir: str | Path):
    """θ0's processor (``AutoProcessor``), never a bare tokenizer.

    Qwen2-VL and Qwen2.5-VL processors are built from their image processor and tokenizer alone
    where the stock class cannot be: without torchvision (the CPU torch here has no matching
    one; the slow PIL image processor is used) or without a saved video processor config (a
    processor merit saved from such a build). The stock classes insist on a video processor,
    which needs torchvision, even for images.

    Raises:
        ProcessorError: what ``AutoProcessor`` returned is no processor (transformers falls
            back to the tokenizer when a directory's processor class is unknown).
    """
    from transformers import AutoProcessor, ProcessorMixin
    from transformers.utils import is_torchvision_available

    model_dir = Path(model_dir)
    saved = _saved_class(model_dir)
    try:
        video = is_torchvision_available() and _has_video_processor(model_dir)
        if saved in _IMAGE_ONLY and not video:
            proc = image_only_processor(saved).from_pretrained(str(model_dir))
        else:
            proc = AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError, AttributeError, ImportError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProcessorError(f"{model_dir}: cannot load its processor ({why})") from None
    if not isinstance(proc, ProcessorMixin):
        raise ProcessorError(
            f"{model_dir}: AutoProcessor returned a {type(proc).__name__}, not a processor "
            f"(processor_class {saved!r} unknown to transformers, or no processor config): "
            "a vision-language θ0 needs its image processor"
        )
    if getattr(proc.tokenizer, "pad_token", None) is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc


def save_processor(processor, out_dir: str | Path) -> None:
    """``save_pretrained``, recording the stock class name, never merit's image-only subclass:
    ``AutoProcessor`` fails loudly on a class it does not know only by returning a bare tokenizer.
    :func:`load_processor` loads it anywhere; ``AutoProcessor`` where a video processor config
    sits beside it (θ0's own files from the hub, which merged models copy, have one)."""
    processor.save_pretrained(str(out_dir))
    stock = getattr(processor, "merit_saves_as", None)
    f = Path(out_dir) / "processor_config.json"
    if stock and f.is_file():
        config = json.loads(f.read_text())
        config["processor_class"] = stock
        f.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def limit_pixels(processor, max_pixels: int) -> None:
    """Cap every image's pixels, so its tokens (Qwen: pixels / 28²): larger images are resized
    down, keeping their aspect, by the processor itself wherever it is used (calibration,
    TRL's collator, evaluation).

    Raises:
        ProcessorError: the image processor resizes to a fixed size (LLaVA's CLIP), with no
            pixel budget to cap.
    """
    import dataclasses

    ip = processor.image_processor
    size = getattr(ip, "size", None)  # a dict, or transformers' SizeDict dataclass
    if getattr(size, "longest_edge", None) is None and not (
        isinstance(size, dict) and "longest_edge" in size
    ):
        raise ProcessorError(
            f"model.max_image_pixels: {type(ip).__name__} resizes every image to a fixed size; "
            "it has no pixel budget to cap"
        )
    if dataclasses.is_dataclass(size):
        ip.size = dataclasses.replace(size, longest_edge=max_pixels)
    else:
        ip.size = {**size, "longest_edge": max_pixels}
    if getattr(ip, "max_pixels", None) is not None:
        ip.max_pixels = max_pixels


def text_tokenizer(tokenizer_or_processor):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def is_processor(obj) -> bool:
    return getattr(obj, "image_processor", None) is not None


# -- images as model inputs ----------------------------------------------------------------------
def open_image(path: str):
    """An image as RGB, turned upright by its EXIF orientation as transformers' ``load_image``
    (what TRL's collator uses on paths) does: calibration, training and evaluation see one image."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


@dataclass(frozen=True)
class Pixels:
    """An example's images, turned into the model's vision inputs only when a batch is built:
    holding pixel values for every example of a large mixture would not fit in memory.

    ``token_types`` are the processor's per-token inputs of the prompt (Qwen's
    ``mm_token_type_ids``, which mRoPE needs), zero over the answer.
    """

    paths: tuple[str, ...]
    image_processor: Any = field(repr=False, compare=False)
    token_types: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        images = [open_image(p) for p in self.paths]
        return dict(self.image_processor(images=images, return_tensors="pt"))


def batch_pixels(pixels: Sequence[Pixels | None], length: int) -> dict[str, torch.Tensor]:
    """The vision inputs of a right-padded batch: per-image tensors concatenated in row order
    (the layout Qwen2-VL and LLaVA both read), per-token ones padded with 0."""
    rows = [p for p in pixels if p is not None]
    if not rows:
        return {}
    parts = [p.tensors() for p in rows]
    out = {k: torch.cat([t[k] for t in parts]) for k in parts[0]}
    for key in dict.fromkeys(k for p in rows for k in p.token_types):
        t = torch.zeros((len(pixels), length), dtype=torch.long)
        for i, p in enumerate(pixels):
            if p is not None and key in p.token_types:
                t[i, : len(p.token_types[key])] = torch.tensor(p.token_types[key])
        out[key] = t
    return out
