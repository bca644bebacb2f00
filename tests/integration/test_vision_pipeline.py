"""MERIT on a vision-language θ0: every stage through the CLI on a tiny Qwen2-VL and an
image-text mixture (TRL vision records and LLaVA JSON, one or two images per example)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_run_config
from merit.cli import main
from merit.vision import param_group

STAGES = ("calibrate", "plan", "train", "merge", "evaluate", "diagnose")


def _config(tmp_path: Path, specs, base: Path, name: str = "run", **sections) -> Path:
    sections = {
        "training": {"learning_rate": 3e-3, "batch_size": 8},
        "evaluation": {"max_examples": 6, "max_generate": 3, "max_new_tokens": 6, "batch_size": 16},
        **sections,
    }
    return write_run_config(tmp_path / f"{name}.yaml", tmp_path / name, specs, base, **sections)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory, vlm_specs, tiny_vlm) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("vision-run")
    cfg = _config(tmp, vlm_specs, tiny_vlm)
    for stage in STAGES:
        assert main([stage, str(cfg)]) == 0, stage
    return cfg, tmp / "run"


def _groups(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in tensors:
        out.setdefault(param_group(name), []).append(name)
    return out


def test_every_stage_on_images(vision_run, vlm_specs, tiny_vlm):
    _cfg, run = vision_run
    plan = json.loads((run / "plan.json").read_text())
    assert plan["K"] == 2 and plan["trainable"] == ["projector", "language"]
    assert sorted(n for g in plan["groups"] for n in g["datasets"]) == sorted(
        s["name"] for s in vlm_specs
    )
    # Every branch trained its group's tokens (image tokens included: TRL's vision collator fed
    # exactly merit's count, or training would have stopped) with the plan's parameters.
    for g in plan["groups"]:
        m = json.loads((run / "branches" / f"branch-{g['id']}" / "manifest.json").read_text())
        assert m["tokens"] == g["tokens"] == m["tokens_seen"]
        assert m["trainable"] == ["projector", "language"]
        assert m["layout"] == plan["sketch"]["layout"]
    joint = json.loads((run / "baselines" / "joint" / "manifest.json").read_text())
    assert joint["tokens"] == sum(g["tokens"] for g in plan["groups"])

    base = load_file(tiny_vlm / "model.safetensors")
    merged = load_file(run / "merged" / "model.safetensors")
    branches = [
        load_file(run / "branches" / f"branch-{k}" / "model" / "model.safetensors") for k in (0, 1)
    ]
    groups = _groups(base)
    assert set(groups) == {"vision", "projector", "language"}
    # The frozen vision tower: θ0's bytes in every branch and in the merge.
    for name in groups["vision"]:
        assert torch.equal(merged[name], base[name])
        assert all(torch.equal(b[name], base[name]) for b in branches)
    # The trained groups moved, and the merge is Σ w_k θ_k.
    w = [g["weight"] for g in plan["groups"]]
    for name in groups["projector"] + groups["language"]:
        want = w[0] * branches[0][name].double() + w[1] * branches[1][name].double()
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(merged[n], base[n]) for n in groups["projector"])
    assert any(not torch.equal(merged[n], base[n]) for n in groups["language"])

    # The processor, chat template and preprocessor files are θ0's, beside the weights.
    for f in ("processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (run / "merged" / f).read_bytes() == (tiny_vlm / f).read_bytes()
    stock = json.loads((run / "merged" / "processor_config.json").read_text())
    assert stock["processor_class"] == "Qwen2VLProcessor"  # the stock class, not merit's build

    # Diagnostics measure the space the branches moved in: the trainable parameters only.
    diag = json.loads((run / "diagnostics" / "diagnostics.json").read_text())
    trained = groups["projector"] + groups["language"]
    assert diag["parameters"] == sum(base[n].numel() for n in trained)
    assert diag["distances"]["merged"] > 0

    results = json.loads((run / "eval" / "results.json").read_text())
    per = results["models"]["merged"]["datasets"]
    assert set(per) == {s["name"] for s in vlm_specs}
    assert per["position"]["kind"] == "multiple_choice" and per["position"]["n_accuracy"] == 6
    assert per["colour"]["kind"] == "generative" and per["colour"]["n_accuracy"] == 3
    assert all(v["nll"] > 0 for v in per.values())
    base_nll = results["models"]["base"]["datasets"]["colour"]["nll"]
    assert results["models"]["joint"]["datasets"]["colour"]["nll"] < base_nll


def test_merged_model_reloads_and_generates_from_an_image(vision_run, vlm_specs):
    from transformers import AutoModelForImageTextToText, ProcessorMixin

    from merit.data.formats import load_dataset
    from merit.vision import load_processor, open_image

    _cfg, run = vision_run
    model = AutoModelForImageTextToText.from_pretrained(run / "merged").eval()
    processor = load_processor(run / "merged")
    assert isinstance(processor, ProcessorMixin)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    ex = load_dataset("colour", vlm_specs[0]["path"]).examples[0]
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}
    ]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[open_image(ex.images[0])], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # 56×56 → 2×2
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_merge_refuses_a_branch_that_trained_other_parameters(
    vision_run, vlm_specs, tiny_vlm, tmp_path, capsys
):
    cfg, run = vision_run
    # Branch 1 trained elsewhere with the vision tower unfrozen, then copied into this run.
    other = _config(
        tmp_path,
        vlm_specs,
        tiny_vlm,
        "other",
        model={
            "max_length": 96,
            "path": str(tiny_vlm),
            "trainable": ["vision", "projector", "language"],
        },
    )
    assert main(["train", str(other), "--branch", "1"]) == 0
    capsys.readouterr()
    target = run / "branches" / "branch-1"
    saved = tmp_path / "saved-branch-1"
    shutil.copytree(target, saved)
    try:
        shutil.rmtree(target)
        shutil.copytree(tmp_path / "other" / "branches" / "branch-1", target)
        assert main(["merge", str(cfg)]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("[merit]")]
        assert len(err) == 1 and err[0].startswith("merit: error: cannot merge"), err
        assert "branch 1 trained another parameter set (vision, projector, language)" in err[0]
        assert "(projector, language)" in err[0]
    finally:
        shutil.rmtree(target)
        shutil.copytree(saved, target)


def test_bad_image_data_stops_before_any_work(tmp_path, vlm_specs, tiny_vlm, tiny_base, capsys):
    src = Path(vlm_specs[0]["path"])
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for r in rows:
        r["images"] = [str(src.parent / p) for p in r["images"]]
    rows[5]["images"] = [str(src.parent / "images" / "nowhere.png")]
    broken = tmp_path / "colour.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [{"name": "colour", "path": str(broken)}, *vlm_specs[1:]]
    cfg = _config(tmp_path, specs, tiny_vlm)
    assert main(["run", str(cfg)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("[merit]")]
    missing = src.parent / "images" / "nowhere.png"
    assert err == [f"merit: error: colour: record 5: image {missing} is missing"]
    assert not list((tmp_path / "run").glob("calibration*"))

    text_only = _config(tmp_path, vlm_specs, tiny_base, "text")
    assert main(["calibrate", str(text_only)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("[merit]")]
    assert len(err) == 1 and "the data has images but θ0" in err[0] and "text-only" in err[0]


def test_lora_branches_adapt_the_language_model_only(tmp_path, vlm_specs, tiny_vlm, capsys):
    cfg = _config(
        tmp_path,
        vlm_specs,
        tiny_vlm,
        training={"learning_rate": 1e-2, "batch_size": 8, "lora": {"r": 2}},
    )
    for stage in ("train", "merge"):
        assert main([stage, str(cfg)]) == 0
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():  # as here: merit says it uses the slow image processor
        assert "Qwen2VLImageProcessorPil, the slow (PIL) one" in capsys.readouterr().err
    run = tmp_path / "run"
    assert json.loads((run / "plan.json").read_text())["trainable"] == ["language"]
    base = load_file(tiny_vlm / "model.safetensors")
    merged = load_file(run / "merged" / "model.safetensors")
    moved = {param_group(n) for n in base if not torch.equal(base[n], merged[n])}
    assert moved == {"language"}
    adapter = load_file(run / "merged-adapter" / "adapter_model.safetensors")
    assert adapter and {param_group(n.removeprefix("base_model.model.")) for n in adapter} == {
        "language"
    }
