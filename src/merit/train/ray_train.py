"""Branches on a Ray cluster: a Ray task per one-process branch, a Ray Train job per larger one.

A one-process branch is a Ray task that runs the branch command (:func:`run_ray`); Ray retries a
task whose node died or that exited 75, and the branch resumes from its checkpoint. A branch that
asks for more (``runtime.resources``: nodes × gpus_per_node > 1) runs as a Ray Train job
(:func:`run_ray_train`): Ray places its workers (a GPU each, or CPU workers over gloo where the
cluster has no GPUs), sets up their process group and the ``RANK`` / ``LOCAL_RANK`` /
``WORLD_SIZE`` variables, and every worker runs the branch's own ``merit train ... --branch k``
command in-process, as one rank of it. A worker that fails (its node lost, or preempted: exit 75
after the checkpoint) fails the attempt; Ray Train restarts the whole group (``FailureConfig``,
``runtime.retries`` times) and the ranks resume from the newest sealed checkpoint, so the weights
are those of an uninterrupted run. Branches run side by side, each in its own driver thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from merit.artifacts import write_json
from merit.train.launchers import (
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    LAUNCH_FILE,
    Job,
    JobResult,
    LaunchError,
    _die_with_parent,
    _tail,
    progress_line,
    thread_env,
)


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
    pending = pending_jobs(jobs, say)
    if not pending:
        return []
    with ray_session(address) as ray:
        if gpus and not ray.cluster_resources().get("GPU"):
            say("the Ray cluster has no GPUs: each branch's workers train on CPU over gloo")
            gpus = False
        for j in pending:
            say(f"{j.label}: {workers} Ray Train workers ({'GPU' if gpus else 'CPU, gloo'})")
        with ThreadPoolExecutor(len(pending)) as pool:
            futures = [pool.submit(_fit, j, workers, gpus, cpus, retries) for j in pending]
            return [f.result() for f in futures]


# -- one-process branches: Ray tasks --------------------------------------------------------
class BranchNotDone(RuntimeError):
    """A branch task exited 75 (preempted) or crashed: Ray retries it."""


def _ray_branch(argv: list[str], out_dir: str, env: dict[str, str], cwd: str) -> int:
    """Body of a Ray task: run the branch command on whatever node Ray chose."""
    import ray

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ray.get_runtime_context()
    info = {"node_id": ctx.get_node_id(), "pid": os.getpid(), "started": time.time()}
    write_json(out / LAUNCH_FILE, info, indent=None)
    with open(out / "launch.log", "ab") as log:
        proc = subprocess.run(
            argv,
            env={**os.environ, **env},
            cwd=cwd if Path(cwd).is_dir() else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            check=False,
        )
    if proc.returncode in (EXIT_OK, EXIT_USAGE):
        return proc.returncode
    raise BranchNotDone(f"exit code {proc.returncode}")


def run_ray(
    jobs: Sequence[Job],
    address: str | None = None,
    cpus: float = 1.0,
    gpus: float = 0.0,
    memory_gb: float | None = None,
    threads: int | None = None,
    retries: int = 3,
    say: Callable[[str], None] = print,
    poll: float = 2.0,
) -> list[JobResult]:
    """One Ray task per unfinished job; Ray retries a task whose node died or that exited 75.

    ``address`` None starts a local Ray instance (``ray.init()``); otherwise it connects to an
    existing cluster (``auto``, ``ray://host:10001`` or ``host:6379``). Every node must see the
    run directory at the same path (shared storage) and have merit installed. Re-submitting the
    driver only runs what is missing: finished branches are skipped here, and a branch command
    returns at once if its manifest is valid.
    """
    pending = pending_jobs(jobs, say)
    if not pending:
        return []
    with ray_session(address) as ray:
        task = ray.remote(_ray_branch).options(
            num_cpus=cpus,
            num_gpus=gpus,
            memory=int(memory_gb * 1024**3) if memory_gb else None,
            max_retries=retries,
            retry_exceptions=[BranchNotDone],
        )
        env = {k: v for k, v in thread_env(threads).items() if k.endswith("_THREADS")}
        env["TOKENIZERS_PARALLELISM"] = "false"
        refs = {}
        t0 = time.perf_counter()
        for job in pending:
            refs[task.remote(job.argv, str(job.out_dir), env, os.getcwd())] = job
        states = {j.label: ("done" if j not in pending else "running") for j in jobs}
        return _await_ray(ray, refs, jobs, states, t0, say, poll)


def pending_jobs(jobs: Sequence[Job], say: Callable[[str], None]) -> list[Job]:
    """The jobs not done yet; each done one is said to be skipped."""
    pending = [j for j in jobs if not j.done()]
    for j in jobs:
        if j not in pending:
            say(f"{j.label}: already trained, skipping")
    return pending


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for the block: the cluster at ``address``, or a local instance (listening on
    loopback only) started here and shut down after."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _await_ray(ray, refs: dict, jobs: Sequence[Job], states: dict[str, str], t0: float, say, poll):
    """Wait for every task of ``refs`` (object ref → job), saying the progress line when it
    changes; a task that failed for good (out of retries, or exit 2) is a :class:`LaunchError`."""
    results = []
    last_line = ""
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=poll)
        for ref in ready:
            job = refs[ref]
            try:
                rc = ray.get(ref)
            except Exception as err:  # a task that ran out of retries
                raise LaunchError(f"{job.label} failed: {err}") from None
            if rc != EXIT_OK:
                tail = _tail(job.out_dir / "launch.log")
                raise LaunchError(f"{job.label} failed with exit code {rc}:\n{tail}")
            states[job.label] = "done"
            results.append(JobResult(job.label, rc, 0, time.perf_counter() - t0))
        line = progress_line(jobs, states)
        if line != last_line:
            say(line)
            last_line = line
    return results
