"""Mapped input pages leave the merge's resident set once their tensor is written: a merge of K
branches does not hold K checkpoints of page cache in its RSS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from merit.merge.safetensors_io import MappedFiles, read_safetensors_header

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_dropped_tensors_leave_the_resident_set_and_read_back_the_same(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    tensors = {f"w{i}": torch.randn(1 << 21) for i in range(8)}  # 8 × 8 MiB
    save_file(tensors, str(path))
    specs = read_safetensors_header(path)
    mapped = MappedFiles()
    before = _rss_file_mb()
    sums = {name: float(mapped.tensor(spec).sum()) for name, spec in specs.items()}
    touched = _rss_file_mb()
    assert touched - before > 48  # every page was read through the map
    for spec in specs.values():
        mapped.drop(spec)
    assert _rss_file_mb() - before < 8
    # Read again after the drop: the same values, faulted in from the file.
    assert {name: float(mapped.tensor(spec).sum()) for name, spec in specs.items()} == sums
    assert all(torch.equal(mapped.tensor(specs[n]), t) for n, t in tensors.items())
    mapped.release()
