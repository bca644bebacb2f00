"""Accumulate or stream: the choice by free memory, what each records, how free memory is read."""

import math

import pytest
import torch
from tiny_lm import TinyLM, examples

from merit.calibrate import memory
from merit.calibrate.sketch import (
    ACCUMULATE_SHARE,
    CountSketch,
    SketchSpec,
    accumulate_bytes,
    calibrate_model,
    mean_gradient_sketch,
    resolve_streaming,
)
from merit.lm import trainable_parameters


def test_accumulate_bytes_is_an_fp32_gradient_plus_the_largest_parameter():
    model = TinyLM()
    sizes = [p.numel() for _, p in trainable_parameters(model)]
    assert accumulate_bytes(model) == 4 * (sum(sizes) + max(sizes))
    # bf16 weights still count 4 bytes an element: the budget is the fp32 gradient's.
    assert accumulate_bytes(TinyLM().to(torch.bfloat16)) == accumulate_bytes(model)


def test_auto_accumulates_only_when_the_gradient_fits_in_half_the_free_memory():
    model = TinyLM()
    need = accumulate_bytes(model)
    assert ACCUMULATE_SHARE == 0.5
    fits = math.ceil(need / ACCUMULATE_SHARE)
    assert resolve_streaming("auto", model, free=fits) is False  # accumulate
    assert resolve_streaming("auto", model, free=fits - 1) is True  # stream
    assert resolve_streaming("auto", model, free=10 * need) is False
    assert resolve_streaming("auto", model, free=0) is True
    assert resolve_streaming("auto", model, free=need, share=1.0) is False
    # An explicit choice is kept whatever the memory.
    assert resolve_streaming(True, model, free=10**15) is True
    assert resolve_streaming(False, model, free=0) is False
    with pytest.raises(ValueError, match="auto"):
        resolve_streaming("sometimes", model)


def test_auto_streams_when_free_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: None)
    assert resolve_streaming("auto", TinyLM()) is True
    monkeypatch.setattr(memory, "free_memory", lambda device: 10**12)
    assert resolve_streaming("auto", TinyLM()) is False


@pytest.mark.parametrize(("free", "mode"), [(10**12, "accumulate"), (1, "stream")])
def test_calibrate_model_records_the_mode_it_chose(monkeypatch, free, mode):
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    model, ex = TinyLM(), examples()
    cal = calibrate_model(
        model, {"a": ex[:5], "b": ex[5:]}, SketchSpec(1024, 0), 2, 0, progress=False, parts=2
    )
    assert [c.mode for c in cal.values()] == [mode, mode]
    assert all(c.sq_norm_exact == (mode == "accumulate") for c in cal.values())
    assert all(p.grad is None for p in model.parameters())


def test_streamed_sq_norm_estimates_the_exact_one():
    """|g|² of the mean gradient cannot be exact when streamed (``GradientStream``): the estimate
    |S g|² must be within the sketch's error of the accumulate path's exact value, and say so."""
    model, ex = TinyLM(width=16), examples(12)
    dim = 2**14
    args = (model, ex, CountSketch(SketchSpec(dim, 3)), 3, 0)
    parts = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    exact = mean_gradient_sketch(*args, parts=parts, streaming=False)
    streamed = mean_gradient_sketch(*args, parts=parts, streaming=True)
    assert exact.mode == "accumulate" and exact.sq_norm_exact
    assert streamed.mode == "stream" and not streamed.sq_norm_exact
    assert streamed.sq_norm == pytest.approx(exact.sq_norm, rel=5 * math.sqrt(2 / dim))
    # The exact value is |Σ_b g_b|², not Σ_b |g_b|²: the cross terms between passes count.
    per_pass = sum(
        mean_gradient_sketch(*args[:1], [ex[i] for i in p], *args[2:]).sq_norm
        * (sum(ex[i].answer_tokens for i in p) / exact.tokens) ** 2
        for p in parts
    )
    assert abs(per_pass - exact.sq_norm) > 1e-3 * exact.sq_norm


def test_meminfo_and_cgroup_are_read(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       32000000 kB\nMemAvailable:    2048 kB\n")
    assert memory._meminfo_available(str(info)) == 2048 * 1024
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("1000000\n")
    usage.write_text("400000\n")
    assert memory._cgroup_headroom([(str(limit), str(usage))]) == 600000
    limit.write_text("max\n")
    assert memory._cgroup_headroom([(str(limit), str(usage))]) is None
    assert memory._cgroup_headroom([(str(tmp_path / "none"), str(usage))]) is None


def test_free_memory_of_devices():
    free = memory.free_memory("cpu")
    assert free is None or free > 0
    assert memory.free_memory("meta") is None


def test_cuda_free_memory_counts_what_the_allocator_caches(monkeypatch):
    """No GPU needed: the driver's free bytes plus the caching allocator's reserved-but-unused."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (7_000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2_500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1_000)
    assert memory.free_memory("cuda:0") == 7_000 + 1_500
