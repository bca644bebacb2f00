"""One branch as N processes on this node: what ``runtime.resources.gpus_per_node > 1`` asks for.

``merit train CONFIG --branch k`` started by hand (not already one rank of ``torchrun`` /
``accelerate launch`` / ``srun``) starts its own ranks through torch's elastic launcher, the
machinery behind ``torchrun --standalone``: one process per GPU, or on a machine without GPUs N
CPU processes over gloo (how the tests and a user without GPUs try the multi-GPU path). Unlike the
``torchrun`` command, whose exit status is 1 whatever its ranks said, this returns the ranks' own
status, so a preempted branch still exits 75 and launchers re-run it.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Sequence

from merit.train.launchers import EXIT_PREEMPTED, LaunchError


def ranks_to_start(processes: int, nodes: int) -> int:
    """How many ranks this command starts itself: ``processes`` unless it already is a rank
    (``WORLD_SIZE`` set by a launcher) or there is only one; several nodes need a scheduler."""
    if processes < 2 or "WORLD_SIZE" in os.environ:
        return 0
    if nodes > 1:
        raise LaunchError(
            f"runtime.resources asks for {nodes} nodes: start the branch on them with "
            "`merit train CONFIG --print-commands slurm` (or skypilot), not from one machine"
        )
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < processes:  # without GPUs the ranks are CPU processes over gloo
        raise LaunchError(
            f"runtime.resources.gpus_per_node={processes} but this machine has {gpus} GPUs"
        )
    return processes


def run_ranks(args: Sequence[str], nproc: int) -> int:
    """Run ``python ARGS`` as ``nproc`` ranks on this node; their exit status: 0 when all
    finished, 75 when they stopped on a preemption signal (after their checkpoint), else the
    first other failure's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this node
        max_restarts=0,  # merit's launchers re-run a branch; the ranks resume its checkpoint
        monitor_interval=0.1,
    )
    # The launcher forwards SIGTERM to its ranks (which checkpoint and exit 75); SLURM's early
    # warning SIGUSR1 would kill it outright, so it becomes a SIGTERM here.
    previous = signal.signal(signal.SIGUSR1, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        elastic_launch(config, entrypoint=sys.executable)(*args)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return EXIT_PREEMPTED if all(c == EXIT_PREEMPTED for c in codes) else codes[0]
    except SignalException:
        return EXIT_PREEMPTED  # the ranks got the signal and saved their checkpoint
    finally:
        signal.signal(signal.SIGUSR1, previous)
    return 0
