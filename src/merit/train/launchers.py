"""Launchers for branches: each one only runs the idempotent branch command.

A branch is ``merit train CONFIG --branch k --plan-sha256 H``: it verifies θ0, the plan and the
datasets, returns at once if the branch is done, resumes from its newest valid checkpoint
otherwise, and on SIGTERM / SIGUSR1 checkpoints and exits with :data:`EXIT_PREEMPTED` (75,
``EX_TEMPFAIL``: "preempted, re-run me"). Because the command is idempotent, every launcher is
just "run these commands until each exits 0":

- :func:`run_local`: subprocesses on this machine, ``parallel`` at once, each with its own thread
  budget, re-run on exit 75 or a crash;
- :func:`run_ray`: one Ray task per branch (CPU/GPU/memory requests), retried by Ray when its node
  dies or it exits 75/crashes; the driver skips branches that are already done;
- :func:`print_commands`: the same commands as a shell list, a SLURM job array or SkyPilot
  managed jobs (``examples/`` has the templates), for schedulers merit does not drive.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merit.artifacts import write_json

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: the branch checkpointed; re-run the same command

PROGRESS_FILE = "progress.json"
LAUNCH_FILE = "launch.json"


@dataclass
class Job:
    """One branch (or baseline) command and the directory it writes to."""

    label: str
    argv: list[str]
    out_dir: Path
    done: Callable[[], bool] = field(default=lambda: False, repr=False)


@dataclass
class JobResult:
    label: str
    returncode: int
    attempts: int
    seconds: float


class LaunchError(RuntimeError):
    """A branch failed for good (bad input, or out of retries)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the branch gets SIGTERM (checkpoint and exit 75) if its launcher dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment for a branch process limited to ``threads`` CPU threads."""
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def read_progress(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def progress_line(jobs: Sequence[Job], states: dict[str, str]) -> str:
    """``branch 0 12/40 (loss 1.23) | branch 1 done | joint queued``."""
    parts = []
    for job in jobs:
        state = states.get(job.label, "queued")
        if state == "running":
            p = read_progress(job.out_dir)
            if p and p.get("max_steps"):
                loss = f", loss {p['loss']:.3f}" if p.get("loss") is not None else ""
                state = f"{p['step']}/{p['max_steps']}{loss}"
            else:
                state = "starting"
        parts.append(f"{job.label} {state}")
    return " | ".join(parts)


def run_local(
    jobs: Sequence[Job],
    parallel: int = 1,
    threads: int | None = None,
    retries: int = 3,
    say: Callable[[str], None] = print,
    poll: float = 2.0,
) -> list[JobResult]:
    """Run ``jobs`` as subprocesses, ``parallel`` at once, each limited to ``threads`` threads.

    A job that exits 75 (preempted) or crashes is re-run (it resumes from its checkpoint) up to
    ``retries`` times; exit 2 (bad input) is final. SIGTERM / SIGINT to the launcher is passed
    on to the running branches, which checkpoint; then the launcher raises ``KeyboardInterrupt``
    for SIGINT or exits 75 for SIGTERM.
    """
    pool = _LocalPool(jobs, thread_env(threads), retries, say)
    stop: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, lambda s, _f: stop.append(s))
    last_line, last_time = "", 0.0
    try:
        while pool.pending or pool.running:
            while pool.pending and len(pool.running) < parallel and not stop:
                pool.start(pool.pending.pop(0))
            if stop:
                pool.stop_all()
                raise SystemExit(EXIT_PREEMPTED)
            time.sleep(0.05)
            pool.reap()
            now = time.perf_counter()
            if now - last_time >= poll:
                line = progress_line(jobs, pool.states)
                if line != last_line:
                    say(line)
                    last_line = line
                last_time = now
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say(progress_line(jobs, pool.states))
    return pool.results


class _LocalPool:
    """The local launcher's jobs: queued, running (one subprocess each), done."""

    def __init__(self, jobs: Sequence[Job], env: dict, retries: int, say) -> None:
        self.pending = [j for j in jobs if not j.done()]
        for j in jobs:
            if j not in self.pending:
                say(f"{j.label}: already trained, skipping")
        self.states = {j.label: "queued" if j in self.pending else "done" for j in jobs}
        self.running: dict[str, tuple[Job, subprocess.Popen, float, int]] = {}
        self.attempts: dict[str, int] = {}
        self.results: list[JobResult] = []
        self.env, self.retries, self.say = env, retries, say

    def start(self, job: Job) -> None:
        self.attempts[job.label] = n = self.attempts.get(job.label, 0) + 1
        job.out_dir.mkdir(parents=True, exist_ok=True)
        log = open(job.out_dir / "launch.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            job.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self.running[job.label] = (job, proc, time.perf_counter(), n)
        self.states[job.label] = "running"

    def stop_all(self) -> None:
        """Pass SIGTERM on: every running branch checkpoints and exits."""
        for _job, proc, _t, _a in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _job, proc, _t, _a in self.running.values():
            proc.wait()

    def reap(self) -> None:
        """Collect finished subprocesses: done, re-queued (preempted or crashed), or failed."""
        for label, (job, proc, t0, n) in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.running[label]
            if rc == EXIT_OK:
                self.states[label] = "done"
                self.results.append(JobResult(label, rc, n, time.perf_counter() - t0))
            elif rc == EXIT_USAGE or n > self.retries:
                self.states[label] = f"failed (exit {rc})"
                tail = _tail(job.out_dir / "launch.log")
                raise LaunchError(
                    f"{label} failed with exit code {rc} after {n} attempt(s):\n{tail}"
                )
            else:
                why = "preempted" if rc == EXIT_PREEMPTED else f"crashed (exit {rc})"
                self.say(f"{label}: {why}; re-running (attempt {n + 1} of {self.retries + 1})")
                self.states[label] = "queued"
                self.pending.insert(0, job)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- Ray ---------------------------------------------------------------------------------------
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
    import ray

    pending = [j for j in jobs if not j.done()]
    for j in jobs:
        if j not in pending:
            say(f"{j.label}: already trained, skipping")
    if not pending:
        return []
    started_here = not ray.is_initialized()
    if started_here:
        # A local instance (no address) listens on loopback only.
        local = {} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)
    try:
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


# -- commands for other schedulers --------------------------------------------------------------
def shell_commands(jobs: Sequence[Job]) -> str:
    return "\n".join(shlex.join(j.argv) for j in jobs)


def _template(argv: list[str], branch: str) -> str:
    """A shell command line with the scheduler's branch variable in place of ``{BRANCH}``."""
    return shlex.join(argv).replace("'{BRANCH}'", "{BRANCH}").replace("{BRANCH}", branch)


def slurm_script(branch_argv: list[str], k: int, extra: Sequence[Job] = ()) -> str:
    """An sbatch job array over the K branches; exit 75 requeues the array task.

    ``branch_argv`` is the branch command with ``{BRANCH}`` in place of the branch number.
    """
    cmd = _template(branch_argv, '"$SLURM_ARRAY_TASK_ID"')
    lines = [
        "#!/bin/bash",
        "# merit branches as a SLURM job array: one array task per branch (examples/slurm-branches.sbatch).",
        "# Two minutes before the time limit SLURM signals the batch shell (B:USR1), which passes it on;",
        "# the branch checkpoints and exits 75, and the task requeues itself and later resumes.",
        "#SBATCH --job-name=merit-branches",
        f"#SBATCH --array=0-{k - 1}",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=merit-branch-%a.log",
        "",
        f"{cmd} &",
        "pid=$!",
        "trap 'kill -USR1 $pid 2>/dev/null' USR1 TERM",
        "# a trapped signal interrupts wait: keep waiting until the branch has exited",
        "while wait $pid; rc=$?; kill -0 $pid 2>/dev/null; do :; done",
        'if [ "$rc" -gt 128 ]; then wait $pid; rc=$?; fi',
        'if [ "$rc" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$rc"',
    ]
    for job in extra:
        lines.append(f"# then, once: {shlex.join(job.argv)}")
    return "\n".join(lines) + "\n"


def skypilot_yaml(branch_argv: list[str], k: int, gpus: float, workdir: str) -> str:
    """A SkyPilot managed-job task; launch one per branch with ``--env BRANCH=k``."""
    cmd = _template(branch_argv, '"$BRANCH"')
    accel = f"\n  accelerators: {{A100: {int(gpus)}}}" if gpus >= 1 else ""
    return (
        "# merit branch as a SkyPilot managed job (see examples/skypilot-branch.yaml).\n"
        f"# for k in $(seq 0 {k - 1}); do sky jobs launch -n merit-branch-$k --env BRANCH=$k -y THIS.yaml; done\n"
        "# Exit code 75 = preempted after a checkpoint: SkyPilot restarts the job, which resumes.\n"
        "name: merit-branch\n"
        f"workdir: {workdir}\n"
        "envs:\n"
        "  BRANCH: 0\n"
        "resources:\n"
        "  use_spot: true"
        f"{accel}\n"
        "  job_recovery:\n"
        "    strategy: FAILOVER\n"
        "    max_restarts_on_errors: 3\n"
        "    recover_on_exit_codes: [75]\n"
        "setup: pip install -e .\n"
        "run: |\n"
        f"  {cmd}\n"
    )


def print_commands(
    kind: str, jobs: Sequence[Job], branch_argv: list[str], k: int, gpus: float = 0.0
) -> str:
    """The branch commands for another scheduler: ``shell``, ``slurm`` or ``skypilot``."""
    if kind == "shell":
        return shell_commands(jobs)
    if kind == "slurm":
        return slurm_script(branch_argv, k, [j for j in jobs if "--branch" not in j.argv])
    if kind == "skypilot":
        return skypilot_yaml(branch_argv, k, gpus, os.getcwd())
    raise ValueError(f"unknown scheduler {kind!r}: shell, slurm or skypilot")


__all__ = [
    "EXIT_PREEMPTED",
    "Job",
    "JobResult",
    "LaunchError",
    "print_commands",
    "run_local",
    "run_ray",
]
