"""FSDP2 on CPU processes, driven directly: accelerate (and so the Trainer) shards only on GPUs,
so merit's FSDP rule (shard units from the model, full state dict gathered) is checked here
with torch's own ``fully_shard`` over gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parents[1] / "fsdp_worker.py"


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_matches_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path / "two.safetensors")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    want, got = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert got.keys() == want.keys()
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=1e-9)
    assert max((want[n] - got[n]).abs().max().item() for n in want) < 1e-9
