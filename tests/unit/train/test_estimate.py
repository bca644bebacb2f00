"""``merit train CONFIG --estimate``: memory per GPU from θ0's config alone, checked against a 7B
model's published sizes and against the peak memory of a real training step on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from merit import commands
from merit.config import load_config
from merit.train.estimate import (
    GIB,
    activation_bytes,
    advice,
    branch_line,
    model_shape,
    row,
    rows,
)
from tiny_runs import write_run_config

# Qwen2.5-7B's published config (the sizes that matter; no weights).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 32768,
}

# One AdamW training step of a model in a fresh process: the growth of peak RSS over the RSS
# before the step (weights already loaded) is what the step's gradients, optimizer states and
# activations took.
STEP = """
import gc, resource, sys
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
path, batch, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, model.config.vocab_size, (batch, length))
gc.collect()
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def test_qwen25_7b_estimate_from_config_alone(tmp_path, mixture_specs, capsys):
    base = tmp_path / "qwen2.5-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(QWEN25_7B))
    run_dir = tmp_path / "run"
    cfg = write_run_config(
        tmp_path / "run.yaml",
        run_dir,
        mixture_specs,
        base,
        model={"max_length": 2048},
        training={"batch_size": 1},
    )

    assert commands.main(["train", str(cfg), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert not run_dir.exists()  # nothing planned, trained or written

    shape = model_shape(base, load_config(cfg, []))
    assert shape.params == pytest.approx(7.6e9, rel=0.02)
    assert shape.trainable == shape.params and shape.weight_bytes == 2 and shape.mixed
    by_name = {r.name: r for r in rows(shape)}
    assert by_name["DDP×1"].total > 80 * GIB
    assert by_name["FSDP×8"].total < 80 * GIB and by_name["ZeRO-3×8"].total < 80 * GIB
    assert "7.62 B parameters" in out
    assert "DDP×1: does not fit: fits with FSDP on" in out
    assert "FSDP×8: fits" in out and "ZeRO-3×8: fits" in out


def test_estimate_advice_is_computed(tmp_path, mixture_specs, capsys):
    base = tmp_path / "qwen2.5-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(QWEN25_7B))
    cfg = write_run_config(
        tmp_path / "run.yaml", tmp_path / "run", mixture_specs, base, training={"batch_size": 16}
    )
    args = ["train", str(cfg), "--estimate", "--gpu-memory", "40", "model.max_length=16384",
            "training.gradient_checkpointing=true"]  # fmt: skip
    assert commands.main(args) == 0
    out = capsys.readouterr().out
    # 16 sequences of 16k tokens do not fit in 40 GiB however the states are sharded.
    assert "FSDP×8: does not fit: reduce training.batch_size to" in out


def _step_bytes(model_dir, batch: int, length: int) -> int:
    cmd = [sys.executable, "-c", STEP, str(model_dir), str(batch), str(length)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return int(done.stdout.split()[-1])


@pytest.mark.slow  # a measurement: peak RSS depends on what else the machine runs (-m slow)
def test_estimate_matches_a_cpu_training_step(tmp_path, tiny_base, mixture_specs):
    """Measured on CPU (fp32, sdpa attention, length 128): the step at batch 64 grew peak RSS by
    ~106 MB against an estimate of ~127 MB, and batch 8 → 64 by ~86 MB against ~111 MB of
    activations (the Korthikanti formula counts the attention scores that sdpa does not keep; with
    eager attention the same difference measured ~124 MB). So the estimate is an upper bound
    within about 30% for the tiny model; asserted with margin for allocator noise."""
    length, small, large = 128, 8, 64
    cfg = write_run_config(
        tmp_path / "run.yaml",
        tmp_path / "run",
        mixture_specs,
        tiny_base,
        model={"max_length": length, "dtype": "float32"},
        training={"batch_size": large, "precision": "fp32"},
    )
    shape = model_shape(tiny_base, load_config(cfg, []))
    assert shape.weight_bytes == 4
    r = rows(shape)[0]
    estimated = r.grads + r.optimizer + r.activations  # the weights were loaded before the step
    estimated_diff = activation_bytes(shape, large) - activation_bytes(shape, small)

    measured = _step_bytes(tiny_base, large, length)
    measured_diff = measured - _step_bytes(tiny_base, small, length)

    assert 0.7 < estimated / measured < 1.5, (estimated, measured)
    assert 0.7 < estimated_diff / measured_diff < 1.6, (estimated_diff, measured_diff)


def test_levers_in_the_estimate(tmp_path, mixture_specs):
    """Gradient checkpointing keeps a layer's input per layer, pure bf16 halves the states, and
    the line a branch prints on a GPU is the row of its own strategy and GPU count."""
    base = tmp_path / "qwen2.5-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(QWEN25_7B))
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", mixture_specs, base,
                           model={"max_length": 4096}, training={"batch_size": 8})  # fmt: skip
    plain = load_config(cfg, [])
    recompute = load_config(cfg, ["training.gradient_checkpointing=true"])
    a, b = model_shape(base, plain), model_shape(base, recompute)
    assert activation_bytes(b, 1) < activation_bytes(a, 1) / 4
    assert "fits with training.gradient_checkpointing=true" in advice(
        a, row(a, "FSDP", 8), 80 * GIB
    )
    bf16 = model_shape(base, load_config(cfg, ["training.precision=bf16"]))
    assert row(bf16, "DDP", 1).optimizer == row(a, "DDP", 1).optimizer / 3  # 4 vs 8 + 4 bytes
    line = branch_line(base, load_config(cfg, ["training.distributed=fsdp"]), 8)
    assert line.startswith("estimated GiB per GPU (FSDP×8): weights 1.8,")
