"""Runtime set-up that changes how fast, never what (merit.lm)."""

import subprocess
import sys

import pytest
import torch

from merit.config import RuntimeConfig
from merit.lm import DeviceError, resolve_device

CHILD = """
import sys, torch
from merit.memory import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
x = torch.ones(5 << 20)  # a 20 MiB tensor, as a training step allocates and frees many
held = rss_mib()
del x
print(held - rss_mib())  # MiB handed back to the kernel by the free
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_keeps_freed_tensors_in_the_process():
    def returned_mib(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    # By default glibc maps a big block for the tensor and unmaps it on free, so the next step
    # faults in (and the kernel zeroes) every page again; kept, the memory stays for reuse.
    assert returned_mib("default") >= 18
    assert returned_mib("keep") <= 2


@pytest.mark.parametrize(
    ("setting", "local_rank", "want"),
    [
        ("auto", "3", "cuda:3"),
        ("cuda", "1", "cuda:1"),
        ("cuda:2", "1", "cuda:2"),  # an explicit index is the user's choice
        ("auto", None, "cuda"),
        ("cpu", "5", "cpu"),
    ],
)
def test_each_rank_resolves_the_gpu_its_local_rank_names(monkeypatch, setting, local_rank, want):
    """Under torchrun / accelerate launch every process loads θ0 onto its own GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device(RuntimeConfig(device=setting)) == torch.device(want)


def test_a_local_rank_beyond_the_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match=r"LOCAL_RANK=2\): this machine has 2 CUDA"):
        resolve_device(RuntimeConfig(device="cuda"))
