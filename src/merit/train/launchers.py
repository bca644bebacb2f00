"""Launchers for branches: each one only runs the idempotent branch command.

A branch is ``merit train CONFIG --branch k --plan-sha256 H``: it verifies θ0, the plan and the
datasets, returns at once if the branch is done, resumes from its newest valid checkpoint
otherwise, and on SIGTERM / SIGUSR1 checkpoints and exits with :data:`EXIT_PREEMPTED` (75,
``EX_TEMPFAIL``: "preempted, re-run me"). Because the command is idempotent, every launcher is
just "run these commands until each exits 0":

- :func:`run_local`: subprocesses on this machine, ``parallel`` at once, each with its own thread
  budget, re-run on exit 75 or a crash;
- :mod:`merit.train.ray_train`: Ray tasks, or Ray Train jobs for branches of several GPUs;
- :func:`print_commands`: the same commands as a shell list, a SLURM job array or SkyPilot
  managed jobs (``examples/`` has the templates), for schedulers merit does not drive; each
  branch asks for ``runtime.resources`` and runs under ``torchrun`` when it has several GPUs.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merit.sections.stages import ResourcesConfig

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


# -- commands for other schedulers --------------------------------------------------------------
def shell_commands(jobs: Sequence[Job]) -> str:
    return "\n".join(shlex.join(j.argv) for j in jobs)


def _template(argv: list[str], branch: str) -> str:
    """A shell command line with the scheduler's branch variable in place of ``{BRANCH}``."""
    return shlex.join(argv).replace("'{BRANCH}'", "{BRANCH}").replace("{BRANCH}", branch)


RDZV_PORT = 29500  # torchrun's c10d rendezvous on the branch's first node


def _merit_module(argv: list[str]) -> list[str]:
    """``merit train ...`` as ``-m merit.cli train ...``: what torchrun runs on every GPU."""
    rest = argv[1:] if argv and Path(argv[0]).name == "merit" else argv
    return ["-m", "merit.cli", *rest]


def _torchrun(res: ResourcesConfig, nnodes: str, rdzv: str) -> str:
    """A torchrun prefix (shell text: the scheduler's variables stay unquoted)."""
    return f"torchrun --nnodes={nnodes} --nproc_per_node={max(1, res.gpus_per_node)} {rdzv}"


def _slurm_resources(res: ResourcesConfig) -> list[str]:
    mem = f"{math.ceil(res.memory_gb)}G" if res.memory_gb else None
    gres = f"gpu:{res.gpus_per_node}" if res.gpus_per_node > 0 else None
    opts = {"nodes": res.nodes, "ntasks-per-node": 1, "gres": gres, "cpus-per-task": res.cpus}
    opts.update({"mem": mem, "time": res.time, "partition": res.partition})
    return [f"#SBATCH --{name}={value}" for name, value in opts.items() if value]


def _slurm_launch(branch_argv: list[str], res: ResourcesConfig) -> list[str]:
    """The lines that start the branch in the background as ``$pid``."""
    branch = '"$SLURM_ARRAY_TASK_ID"'
    if res.processes == 1:
        return [f"{_template(branch_argv, branch)} &"]
    rdzv = f"--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:{RDZV_PORT} --rdzv_id=$SLURM_JOB_ID"
    torchrun = _torchrun(res, "$SLURM_NNODES", rdzv)
    return [
        "# one torchrun per node (--ntasks-per-node=1), one process per GPU, rendezvous on node 0",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        f"srun {torchrun} {_template(_merit_module(branch_argv), branch)} &",
    ]


def slurm_script(
    branch_argv: list[str], k: int, extra: Sequence[Job] = (), res: ResourcesConfig | None = None
) -> str:
    """An sbatch job array over the K branches, each task asking for ``res``; exit 75 requeues.

    ``branch_argv`` is the branch command with ``{BRANCH}`` in place of the branch number. More
    than one process per branch runs it under ``srun torchrun`` across the task's nodes.
    """
    res = res or ResourcesConfig()
    many = res.processes > 1
    lines = [
        "#!/bin/bash",
        "# merit branches as a SLURM job array: one array task per branch (examples/slurm-branches.sbatch).",
        "# Two minutes before the time limit SLURM signals the batch shell (B:USR1), which passes it on;",
        "# the branch checkpoints and exits 75, and the task requeues itself and later resumes.",
        "#SBATCH --job-name=merit-branches",
        f"#SBATCH --array=0-{k - 1}",
        *_slurm_resources(res),
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=merit-branch-%a.log",
        "",
        *_slurm_launch(branch_argv, res),
        "pid=$!",
    ]
    if many:
        # torchrun dies on USR1 and reports a signalled run as a failure, not 75: send srun TERM
        # (passed on to torchrun and by it to every rank, which checkpoint together) and requeue
        # on any failed exit after the signal; the branch command is idempotent.
        lines.append("trap 'stop=1; kill -TERM $pid 2>/dev/null' USR1 TERM")
    else:
        lines.append("trap 'kill -USR1 $pid 2>/dev/null' USR1 TERM")
    lines += [
        "# a trapped signal interrupts wait: keep waiting until the branch has exited",
        "while wait $pid; rc=$?; kill -0 $pid 2>/dev/null; do :; done",
        'if [ "$rc" -gt 128 ]; then wait $pid; rc=$?; fi',
    ]
    if many:
        lines.append('if [ -n "$stop" ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then rc=75; fi')
    lines += ['if [ "$rc" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi', 'exit "$rc"']
    for job in extra:
        lines.append(f"# then, once: {shlex.join(job.argv)}")
    return "\n".join(lines) + "\n"


def _skypilot_resources(res: ResourcesConfig) -> list[str]:
    lines = ["resources:", "  use_spot: true"]
    if res.gpus_per_node > 0 and res.accelerator:
        lines.append(f"  accelerators: {res.accelerator}:{res.gpus_per_node}")
    elif res.gpus_per_node > 0:
        # SkyPilot cannot ask for "any GPU": without a type the task would get a CPU instance.
        lines.append(
            f"  # accelerators: GPU:{res.gpus_per_node}  (set runtime.resources.accelerator)"
        )
    if res.cpus:
        lines.append(f"  cpus: {res.cpus}+")
    if res.memory_gb:
        lines.append(f"  memory: {res.memory_gb:g}+")
    return lines


def _skypilot_run(branch_argv: list[str], res: ResourcesConfig) -> list[str]:
    branch = '"$BRANCH"'
    if res.processes == 1:
        return [f"  {_template(branch_argv, branch)}"]
    rdzv = f"--node_rank=$SKYPILOT_NODE_RANK --master_addr=$HEAD_IP --master_port={RDZV_PORT}"
    torchrun = _torchrun(res, "$SKYPILOT_NUM_NODES", rdzv)
    return [
        "  # one torchrun per node, one process per GPU; the first listed node is the head",
        '  HEAD_IP=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)',
        f"  {torchrun} {_template(_merit_module(branch_argv), branch)}",
    ]


def skypilot_yaml(
    branch_argv: list[str], k: int, workdir: str, res: ResourcesConfig | None = None
) -> str:
    """A SkyPilot managed-job task asking for ``res``; launch one per branch with ``--env BRANCH=k``."""
    res = res or ResourcesConfig()
    lines = [
        "# merit branch as a SkyPilot managed job (see examples/skypilot-branch.yaml).",
        f"# for k in $(seq 0 {k - 1}); do sky jobs launch -n merit-branch-$k --env BRANCH=$k -y THIS.yaml; done",
        "# Exit code 75 = preempted after a checkpoint: SkyPilot restarts the job, which resumes.",
        "name: merit-branch",
        f"workdir: {workdir}",
        f"num_nodes: {res.nodes}",
        "envs:",
        "  BRANCH: 0",
        *_skypilot_resources(res),
        "  job_recovery:",
        "    strategy: FAILOVER",
        "    max_restarts_on_errors: 3",
        "    recover_on_exit_codes: [75]",
        "setup: pip install -e .",
        "run: |",
        *_skypilot_run(branch_argv, res),
    ]
    return "\n".join(lines) + "\n"


def print_commands(
    kind: str, jobs: Sequence[Job], argv: list[str], k: int, res: ResourcesConfig | None = None
) -> str:
    """The branch commands for another scheduler: ``shell``, ``slurm`` or ``skypilot``; ``argv``
    is the branch command with ``{BRANCH}``, each branch asks for ``res`` (default: 1 process)."""
    res = res or ResourcesConfig()
    if kind == "shell":
        return shell_commands(jobs)
    if kind == "slurm":
        return slurm_script(argv, k, [j for j in jobs if "--branch" not in j.argv], res)
    if kind == "skypilot":
        return skypilot_yaml(argv, k, os.getcwd(), res)
    raise ValueError(f"unknown scheduler {kind!r}: shell, slurm or skypilot")


__all__ = [
    "EXIT_PREEMPTED",
    "Job",
    "JobResult",
    "LaunchError",
    "print_commands",
    "run_local",
]
