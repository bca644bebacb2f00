"""A whole run whose θ0 is a GGUF file: converted once, scored like the GGUF itself, merged
with its tie kept; with whole tasks kept out of training and the shrinkage control."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_run_config
from gguf_fixture import build_model, build_tokenizer, write_gguf
from merit.cli import main


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, mixture_specs):
    root = tmp_path_factory.mktemp("gguf-run")
    tokenizer = build_tokenizer()
    gguf_file = write_gguf(root / "tiny.gguf", build_model(tokenizer, seed=0), tokenizer)
    cfg = write_run_config(
        root / "run.yaml",
        root / "run",
        mixture_specs,
        gguf_file,
        data={"split": {"eval": 6, "calibration": 8, "train": 24}, "unseen": 1},
        training={"learning_rate": 3e-3, "batch_size": 8},
        evaluation={
            "max_examples": 6,
            "max_generate": 2,
            "max_new_tokens": 4,
            "models": ["base", "joint", "merged", "shrink"],
        },
        runtime={"cache_dir": str(root / "cache")},
    )
    assert main(["run", str(cfg)]) == 0
    return {"root": root, "run": root / "run", "gguf": gguf_file, "cfg": cfg}


def test_scores_equal_the_gguf_loaded_directly(gguf_run):
    """θ0's per-example answer log-probabilities are the GGUF's own, to 1e-4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gguf_fixture import dequantize_kwargs
    from merit.config import load_config
    from merit.context import open_context
    from merit.evaluate.scoring import evaluate_model
    from merit.run import Run

    path = gguf_run["gguf"]
    direct = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=str(path), dtype=torch.float32, **dequantize_kwargs()
    )
    run = open_context(Run(load_config(gguf_run["cfg"])))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    assert tok.chat_template == run.base.tokenizer.chat_template
    ec = run.cfg.evaluation
    want = evaluate_model(
        direct, run.base.tokenizer, run.mixture, 96, ec.max_examples, 0, 4, ec.batch_size, False
    )
    got = json.loads((gguf_run["run"] / "eval" / "base.json").read_text())["datasets"]
    assert set(got) == set(want)
    for name, rec in want.items():
        torch.testing.assert_close(
            torch.tensor(got[name]["example_nll"]),
            torch.tensor(rec["example_nll"]),
            atol=1e-4,
            rtol=0,
        )


def test_merged_model_keeps_tie_and_generates(gguf_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = gguf_run["run"] / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(merged / "model.safetensors")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "copy: apple river"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = tok(text)["input_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(prompt)


def test_unseen_tasks_and_shrinkage_control(gguf_run, mixture_specs):
    run = gguf_run["run"]
    data = json.loads((run / "data.json").read_text())
    trained = {d["name"] for d in data["datasets"]}
    unseen = {d["name"] for d in data["unseen"]}
    assert len(unseen) == 1 and not unseen & trained
    assert trained | unseen == {s["name"] for s in mixture_specs}
    plan = json.loads((run / "plan.json").read_text())
    assert {d["name"] for d in plan["datasets"]} == trained  # never calibrated or planned
    joint = json.loads((run / "baselines" / "joint" / "manifest.json").read_text())
    assert set(joint["datasets"]) == trained  # never trained on
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert set(results) == {"base", "joint", "merged", "shrink"}
    for rec in results.values():
        assert set(rec["unseen"]) == unseen and rec["unseen_summary"]["datasets"] == 1
    # The control is θ0 + α(θ_joint − θ0) with α = ‖θ̄ − θ0‖ / ‖θ_joint − θ0‖.
    meta = json.loads((run / "controls" / "shrink" / "merge_manifest.json").read_text())
    alpha = meta["metadata"]["alpha"]
    assert 0 < alpha < 1
    assert alpha == pytest.approx(
        meta["metadata"]["merged_distance"] / meta["metadata"]["joint_distance"]
    )
    base_dir = json.loads((run / "base.json").read_text())["path"]
    t0 = load_file(f"{base_dir}/model.safetensors")
    tj = load_file(run / "baselines" / "joint" / "model" / "model.safetensors")
    ts = load_file(run / "controls" / "shrink" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    expect = t0[name].double() + alpha * (tj[name].double() - t0[name].double())
    torch.testing.assert_close(ts[name].double(), expect, atol=1e-6, rtol=0)
    shrink_dist = (ts[name].double() - t0[name].double()).norm()
    assert shrink_dist < (tj[name].double() - t0[name].double()).norm()
    table = (run / "eval" / "results.md").read_text()
    assert "unseen-task NLL" in table and "θ0 + " in table
    # A second evaluation reuses the control: nothing is merged or scored again.
    made = (run / "controls" / "shrink" / "merge_manifest.json").stat().st_mtime_ns
    scored = (run / "eval" / "shrink.json").stat().st_mtime_ns
    assert main(["evaluate", str(gguf_run["cfg"])]) == 0
    assert (run / "controls" / "shrink" / "merge_manifest.json").stat().st_mtime_ns == made
    assert (run / "eval" / "shrink.json").stat().st_mtime_ns == scored
