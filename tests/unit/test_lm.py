"""Runtime set-up that changes how fast, never what (merit.lm)."""

import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from merit.lm import keep_freed_memory
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
