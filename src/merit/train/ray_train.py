"""A branch of several processes on a Ray cluster: Ray Train's ``TorchTrainer``, one worker per GPU.

A one-process branch is a plain Ray task (:func:`merit.train.launchers.run_ray`). A branch that
asks for more (``runtime.resources``: nodes × gpus_per_node > 1) runs as a Ray Train job: Ray
places its workers (a GPU each, or CPU workers over gloo where the cluster has no GPUs), sets up
their process group and the ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` variables, and every worker
runs the branch's own ``merit train ... --branch k`` command in-process, as one rank of it. A
worker that fails (its node lost, or preempted: exit 75 after the checkpoint) fails the attempt;
Ray Train restarts the whole group (``FailureConfig``, ``runtime.retries`` times) and the ranks
resume from the newest sealed checkpoint, so the weights are those of an uninterrupted run.
Branches run side by side, each in its own driver thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from merit.train.launchers import EXIT_OK, EXIT_PREEMPTED, Job, JobResult, LaunchError


class RankFailed(RuntimeError):
    """A rank of the branch exited non-zero: Ray Train restarts the group."""


def branch_worker(config: dict) -> None:
    """One Ray Train worker: one rank of the branch command (``config["argv"]``, the arguments
    after ``merit``), in this process, in the group Ray Train set up: ``python -m merit.cli``
    run in-process, as the other launchers run it in a subprocess."""
    import os
    import runpy
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    saved, sys.argv = sys.argv, ["merit", *config["argv"]]
    try:
        runpy.run_module("merit.cli", run_name="__main__")
        rc = EXIT_OK
    except SystemExit as done:
        rc = done.code if isinstance(done.code, int) else EXIT_OK if done.code is None else 1
    finally:
        sys.argv = saved
    if rc != EXIT_OK:
        why = "preempted (checkpoint saved)" if rc == EXIT_PREEMPTED else f"exit code {rc}"
        raise RankFailed(f"{config['label']}: {why}")


def _merit_args(argv: Sequence[str]) -> list[str]:
    """The arguments after ``python -m merit.cli`` (or ``merit``) of a job's command."""
    argv = list(argv)
    if argv[1:3] == ["-m", "merit.cli"]:
        return argv[3:]
    return argv[1:]


def _fit(job: Job, workers: int, gpus: bool, cpus: float, retries: int) -> JobResult:
    """Train one branch as a Ray Train job of ``workers`` workers; its result once done."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        branch_worker,
        train_loop_config={"argv": _merit_args(job.argv), "label": job.label},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name="ray-train",
            storage_path=str((job.out_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=retries),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # out of retries: Ray Train raises the last worker error
        raise LaunchError(f"{job.label} failed on Ray Train: {err}") from None
    if getattr(result, "error", None) is not None:
        raise LaunchError(f"{job.label} failed on Ray Train: {result.error}")
    return JobResult(job.label, EXIT_OK, 1, time.perf_counter() - t0)


def run_ray_train(
    jobs: Sequence[Job],
    workers: int,
    gpus: bool,
    cpus: float = 1.0,
    retries: int = 3,
    address: str | None = None,
    say: Callable[[str], None] = print,
) -> list[JobResult]:
    """Every unfinished job as a Ray Train job of ``workers`` ranks, side by side."""
    import ray

    pending = [j for j in jobs if not j.done()]
    for j in jobs:
        if j not in pending:
            say(f"{j.label}: already trained, skipping")
    if not pending:
        return []
    started_here = not ray.is_initialized()
    if started_here:
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    try:
        if gpus and not ray.cluster_resources().get("GPU"):
            say("the Ray cluster has no GPUs: each branch's workers train on CPU over gloo")
            gpus = False
        for j in pending:
            say(f"{j.label}: {workers} Ray Train workers ({'GPU' if gpus else 'CPU, gloo'})")
        with ThreadPoolExecutor(len(pending)) as pool:
            futures = [pool.submit(_fit, j, workers, gpus, cpus, retries) for j in pending]
            return [f.result() for f in futures]
    finally:
        if started_here:
            ray.shutdown()
