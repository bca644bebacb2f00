"""Free memory on a device: what calibration may spend on holding a full gradient.

CPU: the kernel's ``MemAvailable`` (what can be allocated without swapping), capped by the
cgroup's limit when the process runs in a container whose limit is below the host's memory
(``MemAvailable`` reports the host). CUDA: the driver's free memory plus what PyTorch's caching
allocator holds but does not use. ``None`` when it cannot be told (another device type, or no
``/proc`` and no psutil): callers then take the choice that needs no memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

# (limit, usage) files of cgroup v2, then v1; "max" or a huge number means no limit.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cgroup_headroom(files=_CGROUP_FILES) -> int | None:
    """Limit minus usage of this process's memory cgroup, or None without a limit."""
    for limit_file, usage_file in files:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes ~2^63 for "no limit"
            return None
        return max(0, int(limit) - usage)
    return None


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that tensors on ``device`` can still take, or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    known = [x for x in (_meminfo_available(), _cgroup_headroom()) if x is not None]
    return min(known) if known else None
