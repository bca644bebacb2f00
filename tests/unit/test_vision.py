"""The vision side of θ0: parameter groups, freezing, the processor, images as model inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from merit.data.formats import Example
from merit.data.mixture import encode
from merit.lm import load_model, pad_batch
from merit.vision import (
    GROUPS,
    ProcessorError,
    batch_pixels,
    freeze,
    group_sizes,
    is_vision_model,
    load_processor,
    param_group,
)

TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def _qwen25():
    from transformers import Qwen2_5_VLConfig

    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
        fullatt_block_indexes=[0],
    )  # fmt: skip
    return Qwen2_5_VLConfig(text_config={**TEXT, "rope_parameters": rope}, vision_config=vision)


def _llava():
    from transformers import LlavaConfig

    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
        projection_dim=32,
    )  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config={"model_type": "llama", **TEXT})


@pytest.mark.parametrize("make", [_qwen25, _llava], ids=["qwen2.5-vl", "llava"])
def test_groups_are_the_same_in_memory_and_on_disk(make, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(make())
    sizes = group_sizes(model)
    assert all(sizes[g] > 0 for g in GROUPS), sizes
    model.save_pretrained(tmp_path)
    assert is_vision_model(tmp_path)
    on_disk = dict.fromkeys(GROUPS, 0)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            on_disk[param_group(name)] += torch.Size(f.get_slice(name).get_shape()).numel()
    assert on_disk == sizes  # the merge reads groups off file names: they must agree


def test_tiny_qwen2_vl_groups_and_freeze(tiny_vlm):
    model = load_model(tiny_vlm, torch.device("cpu"), trainable=("projector", "language"))
    for name, p in model.named_parameters():
        assert p.requires_grad == (param_group(name) != "vision"), name
    assert any(param_group(n) == "projector" for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="leaves no parameter"):
        freeze(model, ())


def test_text_model_is_all_language(tiny_base):
    assert not is_vision_model(tiny_base)
    model = load_model(tiny_base, torch.device("cpu"))
    assert {param_group(n) for n, _ in model.named_parameters()} == {"language"}


def test_processor_loads_and_never_falls_back_to_a_tokenizer(tiny_vlm, tmp_path):
    from transformers import ProcessorMixin

    proc = load_processor(tiny_vlm)
    assert isinstance(proc, ProcessorMixin)
    assert type(proc.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_vlm, unknown)
    cfg = json.loads((unknown / "processor_config.json").read_text())
    cfg["processor_class"] = "NoSuchProcessor"
    (unknown / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ProcessorError, match="not a processor"):
        load_processor(unknown)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_vlm, bare)
    (bare / "processor_config.json").unlink()
    with pytest.raises(ProcessorError, match="TokenizersBackend"):
        load_processor(bare)


def _square(path: Path, colour) -> str:
    from PIL import Image

    Image.new("RGB", (56, 56), colour).save(path)
    return str(path)


def test_two_images_count_more_tokens_than_one(tiny_vlm, tmp_path):
    proc = load_processor(tiny_vlm)
    a, b = _square(tmp_path / "a.png", "red"), _square(tmp_path / "b.png", "blue")
    one = Example(({"role": "user", "content": "<image>Same colour?"},), "no", images=(a,))
    two = Example(({"role": "user", "content": "<image><image>Same colour?"},), "no", images=(a, b))
    text = Example(({"role": "user", "content": "Same colour?"},), "no")
    e1, e2, e0 = encode(proc, [one, two, text], max_length=16)
    pad_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 56×56 → a 4×4 patch grid, merged 2×2: 4 image tokens, plus vision start and end.
    assert [e.input_ids.count(pad_id) for e in (e0, e1, e2)] == [0, 4, 8]
    assert len(e2.input_ids) - len(e1.input_ids) == len(e1.input_ids) - len(e0.input_ids) == 6
    assert e0.answer_tokens == e1.answer_tokens == e2.answer_tokens
    # max_length is for text: an image-text example is never cut into its image tokens.
    assert len(e2.input_ids) > 16


def test_batch_pixels_concatenates_images_and_pads_token_types(tiny_vlm, tmp_path):
    proc = load_processor(tiny_vlm)
    a, b = _square(tmp_path / "a.png", "red"), _square(tmp_path / "b.png", "blue")
    two = Example(({"role": "user", "content": "<image><image>Same?"},), "no", images=(a, b))
    one = Example(({"role": "user", "content": "<image>Colour?"},), "red", images=(a,))
    text = Example(({"role": "user", "content": "Colour?"},), "red")
    enc = encode(proc, [two, text, one], max_length=64)
    batch = pad_batch(enc, proc.tokenizer.pad_token_id, "cpu")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 3  # two, then one: row order
    assert batch["pixel_values"].shape == (3 * 16, 3 * 2 * 14 * 14)
    types = batch["mm_token_type_ids"]
    assert types.shape == batch["input_ids"].shape
    assert types.sum(-1).tolist() == [8, 0, 4]  # 1 on image tokens, 0 on text and padding
    image_id = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(types.bool(), batch["input_ids"] == image_id)
    assert batch_pixels([None, None], 5) == {}


def test_a_llava_checkpoint_goes_through_the_same_code(tmp_path):
    """LLaVA: AutoProcessor (LlavaProcessor, slow CLIP image processor), image tokens counted,
    scored and decoded with its images."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessorPil, LlavaProcessor

    from merit.demo import build_tokenizer
    from merit.demo_vision import CHAT_TEMPLATE
    from merit.evaluate.scoring import greedy_decode, render
    from merit.lm import token_nll_sum

    tok = build_tokenizer(["what colour is the square? red blue same no"] * 4, 300, ("<image>",))
    tok.chat_template = CHAT_TEMPLATE.replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "<image>"
    )
    config = _llava()
    config.text_config.vocab_size = len(tok)
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path / "llava")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    ).save_pretrained(tmp_path / "llava")
    proc = load_processor(tmp_path / "llava")
    assert type(proc).__name__ == "LlavaProcessor"
    a, b = _square(tmp_path / "a.png", "red"), _square(tmp_path / "b.png", "blue")
    examples = [
        Example(({"role": "user", "content": "<image>What colour?"},), "red", images=(a,)),
        Example(({"role": "user", "content": "<image><image>Same?"},), "no", images=(a, b)),
    ]
    enc = encode(proc, examples, max_length=64)
    assert [e.input_ids.count(config.image_token_id) for e in enc] == [4, 8]  # (28/14)² each
    model = load_model(tmp_path / "llava", torch.device("cpu"), trainable=("projector", "language"))
    batch = pad_batch(enc, proc.tokenizer.pad_token_id, "cpu")
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    assert torch.isfinite(token_nll_sum(model, batch))
    prompts = [p for p, _ in render(proc, examples)]
    outs = greedy_decode(model, proc, prompts, 3, 2, 64, images=[e.images for e in examples])
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)


def test_a_pixel_budget_caps_image_tokens(tiny_vlm, tmp_path):
    from PIL import Image

    from merit.vision import limit_pixels

    Image.new("RGB", (448, 448), "red").save(tmp_path / "big.png")
    big = Example(
        ({"role": "user", "content": "<image>Colour?"},), "red", images=(str(tmp_path / "big.png"),)
    )
    proc = load_processor(tiny_vlm)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert encode(proc, [big], 64)[0].input_ids.count(pad) == 256  # (448/28)²
    limit_pixels(proc, 112 * 112)
    (enc,) = encode(proc, [big], 64)
    assert enc.input_ids.count(pad) == 16  # (112/28)²: resized down by the processor itself
    assert pad_batch([enc], 0, "cpu")["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_exif_rotated_images_are_upright(tmp_path):
    from PIL import Image

    from merit.vision import open_image

    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to view
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(str(tmp_path / "r.jpg")).size == (20, 40)  # as transformers' load_image
