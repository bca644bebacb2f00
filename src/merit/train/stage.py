"""Stage 3 (paper §3.3): every branch from θ0, independently, plus the baselines.

Each job (a branch or the joint baseline) is idempotent: it skips when its manifest says it is
done for this plan, θ0 and training settings, resumes from its newest checkpoint after a
preemption, and writes its manifest last. Launchers only run the same command per job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from merit.artifacts import atomic_path, read_json, sha256_file
from merit.calibrate.sketch import parameter_layout
from merit.config import EXPERIMENT, save_config
from merit.errors import StageError
from merit.graph import STAGES, Context, Stage
from merit.plan.stage import READS as PLAN_READS
from merit.plan.stage import Plan, plan_hash
from merit.run import RunPaths
from merit.train import launchers as orch
from merit.train.artifact import BranchManifest, Trained
from merit.train.estimate import branch_line
from merit.train.launchers import LaunchError
from merit.train.processes import ranks_to_start, run_ranks
from merit.train.ray_train import run_ray, run_ray_train
from merit.train.sft import Preempted, check_levers, train_dtype, train_sft, world_size

READS = EXPERIMENT


@dataclass
class Job:
    """One training job: a branch (``group`` = k) or a baseline (``group`` = None)."""

    kind: str  # "branch" or "baseline"
    ident: int | str
    out: Path
    datasets: list[str]
    label: str
    tokens: int  # planned N_k
    group: int | None = None
    argv: list[str] = field(default_factory=list)


def _pinned_plan(run: Context, plan_sha256: str) -> Plan:
    """The existing plan, if it is the one the launcher saw; a branch command never re-plans."""
    if not run.paths.plan.is_file():
        raise StageError(f"no plan at {run.paths.plan}: run `merit plan` before the branches")
    got = plan_hash(run)
    if got != plan_sha256:
        raise StageError(
            f"{run.paths.plan} has sha256 {got[:12]}…, the launcher expected {plan_sha256[:12]}… "
            "(re-planned since the branches were launched?)"
        )
    plan = Plan.load(run.paths.plan)
    if plan.settings != run.cfg.settings(*PLAN_READS):
        raise StageError(f"{run.paths.plan} was made from other settings")
    return plan


def _verify_job_inputs(run: Context, plan: Plan, names: list[str], label: str) -> None:
    """θ0's fingerprint and every dataset's sha256 must be the plan's; else one error."""
    problems = []
    if plan.base_fingerprint != run.base.fingerprint:
        problems.append(
            f"θ0 {run.base.dir} has fingerprint {run.base.fingerprint[:12]}…, the plan was made "
            f"from {plan.base_fingerprint[:12]}…"
        )
    rows = {d.name: d for d in plan.datasets}
    have = {d.name: d for d in run.mixture.datasets}
    for n in names:
        if n not in rows or n not in have:
            problems.append(f"dataset {n} is not in both the plan and the mixture")
        elif rows[n].sha256 != have[n].file_hash:
            problems.append(f"dataset {n} ({have[n].data.path}) changed since planning")
    if problems:
        raise StageError(f"{label}: " + "; ".join(problems))


def finished(run: Context, out: Path, p_hash: str) -> BranchManifest | None:
    """The job's manifest if it is complete for this plan, θ0 and training settings."""
    mp = RunPaths.manifest(out)
    if not mp.is_file():
        return None
    m = BranchManifest.load(mp)
    if not m.matches(p_hash, run.base.fingerprint, run.cfg.experiment_hash()):
        return None
    if not all((out / rel).is_file() for rel in m.weights):
        return None
    return m


def _branch_lock(out: Path, label: str, say):
    """An exclusive lock on the job directory: a re-run (say a Ray retry on another node while
    the preempted process still writes its checkpoint) waits instead of training alongside."""

    @contextlib.contextmanager
    def lock():
        out.mkdir(parents=True, exist_ok=True)
        if not _main_process():  # under accelerate, the first process holds it for all
            yield
            return
        held = FileLock(out / ".lock")
        try:
            held.acquire(timeout=0)
        except Timeout:
            say(f"{label}: another process is training it; waiting for it to stop")
            held.acquire()
        try:
            yield
        finally:
            held.release()

    return lock()


def _main_process() -> bool:
    """False on the other processes of a multi-GPU branch (``accelerate launch``)."""
    return int(os.environ.get("RANK", "0")) == 0


def _save_dtype(run: Context) -> torch.dtype:
    """θ0's stored dtype: every branch is saved with θ0's tensor layout."""
    config = read_json(run.base.dir / "config.json")
    saved = config.get("dtype") or config.get("torch_dtype")
    if isinstance(saved, str) and isinstance(getattr(torch, saved, None), torch.dtype):
        return getattr(torch, saved)
    return torch.float32


def _load_for_training(run: Context):
    """θ0 in the dtype ``training.precision`` trains in, on this process's device; under FSDP on
    the CPU, which ``fully_shard`` moves to the device shard by shard."""
    tc = run.cfg.training
    check_levers(tc, run.device)
    if run.device.type == "cuda" and _main_process():
        run.say(f"{branch_line(run.base.dir, run.cfg, world_size())} (merit train --estimate)")
    sharded = tc.distributed == "fsdp" and world_size() > 1 and run.device.type != "cpu"
    device = torch.device("cpu") if sharded else run.device
    return run.base.load(dtype=train_dtype(tc, run.device), device=device)


def _already_trained(run: Context, job: Job, p_hash: str) -> BranchManifest | None:
    """The job's manifest if it is done (and said so), else None."""
    if m := finished(run, job.out, p_hash):
        run.say(f"{job.label}: already trained, skipping")
    return m


def _threads(run: Context, processes: int) -> int:
    """Torch threads for each of ``processes`` at once: ``runtime.threads``, else a share of
    the cores."""
    return run.cfg.runtime.threads or max(1, (os.cpu_count() or 1) // max(1, processes))


def _train_one(run: Context, plan: Plan, job: Job) -> BranchManifest:
    """Train one job idempotently: skip if done, else resume, then write its manifest.

    Raises :class:`merit.train.sft.Preempted` after checkpointing on SIGTERM / SIGUSR1.
    """
    p_hash = plan_hash(run)
    _verify_job_inputs(run, plan, job.datasets, job.label)
    if m := _already_trained(run, job, p_hash):
        return m
    with _branch_lock(job.out, job.label, run.say):
        if m := _already_trained(run, job, p_hash):  # finished while we waited
            return m
        manifest_path = RunPaths.manifest(job.out)
        if manifest_path.is_file() and _main_process():  # another plan, θ0 or schedule
            manifest_path.unlink()
            for sub in ("model", "adapter"):
                shutil.rmtree(job.out / sub, ignore_errors=True)
        t0 = time.perf_counter()
        res, layout = _fit(run, job, p_hash, plan.K)
        manifest = _manifest(run, job, p_hash, res, time.perf_counter() - t0, layout)
        if _main_process():
            manifest.save(manifest_path)  # last: a manifest means the job is complete
            shutil.rmtree(job.out / "trainer", ignore_errors=True)  # checkpoints: not needed
    return manifest


def _fit(run: Context, job: Job, p_hash: str, k: int):
    """Run TRL on the job's examples; check merit's own token count against the schedule."""
    train = run.encoded("train")
    records = [e for n in job.datasets for e in train[n]]
    tokens = sum(len(e.input_ids) for e in records)
    if tokens != job.tokens:
        raise StageError(f"{job.label}: {tokens} tokens to train but the plan says {job.tokens}")
    run.say(
        f"training {job.label}: {len(job.datasets)} datasets, {len(records)} examples, "
        f"{tokens} tokens"
    )
    # A checkpoint is resumed only by the same job: plan, θ0, training settings, datasets.
    key = [p_hash, run.base.fingerprint, run.cfg.experiment_hash(), job.label, job.datasets]
    model = _load_for_training(run)
    layout = parameter_layout(model)
    rt, tc = run.cfg.runtime, run.cfg.training
    res = train_sft(
        model,
        run.base.processor,
        records,
        tc,
        job.out,
        run.cfg.model.max_length,
        run.progress,
        # The joint baseline takes the steps of all K branches: the same token budget (§4).
        max_steps=tc.max_steps and tc.max_steps * (k if job.group is None else 1),
        save_dtype=_save_dtype(run),
        checkpoint_steps=rt.checkpoint_steps,
        keep_checkpoints=rt.keep_checkpoints,
        report_to=rt.report_to,
        run_key=hashlib.sha256(json.dumps(key).encode()).hexdigest(),
        label=job.label,
        log=run.say,
        examples=(
            [ex for n in job.datasets for ex in run.mixture[n].examples("train")]
            if run.base.is_vision
            else None
        ),
    )
    # merit's own count of what the job was fed, across resumes, must be what the fixed schedule
    # holds (epochs × N_k for whole epochs): the merge weights assume it (paper eq. 3).
    if res.tokens_seen != res.tokens_scheduled:
        raise StageError(
            f"{job.label}: trained on {res.tokens_seen} tokens but its schedule holds "
            f"{res.tokens_scheduled}"
        )
    return res, layout


def _manifest(
    run: Context, job: Job, p_hash: str, res, seconds: float, layout: str
) -> BranchManifest:
    weights = {
        str(f.relative_to(job.out)): sha256_file(f)
        for sub in ("model", "adapter")
        for f in sorted((job.out / sub).glob("*"))
        if f.is_file() and f.suffix in (".safetensors", ".json")
    }
    losses = [v for _s, v in res.losses]
    return BranchManifest(
        label=job.label,
        group=job.group,
        plan_sha256=p_hash,
        base_fingerprint=run.base.fingerprint,
        training=run.cfg.experiment_hash(),
        datasets=job.datasets,
        examples=res.examples,
        tokens=res.tokens,
        tokens_seen=res.tokens_seen,
        tokens_scheduled=res.tokens_scheduled,
        epochs=run.cfg.training.epochs,
        answer_tokens=res.answer_tokens,
        steps=res.steps,
        lora=run.cfg.training.lora is not None,
        resumed_from_step=res.resumed_from,
        final_loss=res.final_loss,
        loss_summary={
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "min": min(losses) if losses else None,
            "logged": len(losses),
        },
        losses=res.losses,
        seconds=seconds,
        weights=weights,
        trainable=list(run.base.trainable) if run.base.trainable else None,
        layout=layout,
    )


def jobs(
    run: Context,
    plan: Plan,
    branch: int | None = None,
    baseline: str | None = None,
    baselines: list[str] | None = None,
) -> list[Job]:
    """The requested jobs: every branch and baseline (``baselines``, default
    ``training.baselines``), or one of them."""
    out = []
    if baseline is None:
        for k in range(plan.K) if branch is None else [branch]:
            if not 0 <= k < plan.K:
                raise StageError(f"branch {k} does not exist: the plan has K={plan.K} branches")
            g = plan.groups[k]
            out.append(
                Job("branch", k, run.paths.branch(k), g.datasets, f"branch {k}", g.tokens, k)
            )
    if baseline is not None or branch is None:
        if baselines is None:
            baselines = run.cfg.training.baselines
        for name in [baseline] if baseline else baselines:
            if name != "joint":
                raise StageError(f"unknown baseline {name!r}")
            # Joint training: one branch on every dataset, the same total tokens (paper §4).
            everything = [d.name for d in plan.datasets]
            total = sum(g.tokens for g in plan.groups)
            out.append(Job("baseline", name, run.paths.baseline(name), everything, name, total))
    return out


def _job_command(run: Context, kind: str, ident, p_hash: str, merit: list[str]) -> list[str]:
    """The idempotent command that trains one job (what every launcher runs)."""
    root = run.paths.root.resolve()
    launch_cfg = root / run.paths.launch_config.relative_to(run.paths.root)
    return [
        *merit,
        "train",
        str(launch_cfg),
        f"run_dir={root}",
        f"--{kind}",
        str(ident),
        "--plan-sha256",
        p_hash,
    ]


def _write_launch_config(run: Context) -> None:
    """The resolved config the branch commands read (atomically: branches may be reading it)."""
    with atomic_path(run.paths.launch_config) as tmp:
        save_config(run.cfg, tmp)


def branch_commands(run: Context, plan: Plan, kind: str) -> str:
    """The branch (and baseline) commands for another scheduler: shell, slurm or skypilot."""
    p_hash = plan_hash(run)
    _write_launch_config(run)
    launch = [
        orch.Job(j.label, _job_command(run, j.kind, j.ident, p_hash, ["merit"]), j.out)
        for j in jobs(run, plan)
    ]
    template = _job_command(run, "branch", "{BRANCH}", p_hash, ["merit"])
    return orch.print_commands(kind, launch, template, plan.K, run.cfg.runtime.resources)


def run_jobs(run: Context, plan: Plan, todo: list[Job], one: bool = False) -> list[BranchManifest]:
    """Train ``todo`` from θ0, each idempotently: here, one after another, when ``one`` job was
    asked for or ``runtime.launcher`` is inline; else as their own ``merit train`` processes
    through the local launcher (``runtime.parallel`` at once) or Ray."""
    rt = run.cfg.runtime
    ray_train = rt.launcher == "ray" and rt.resources.processes > 1
    if one or rt.launcher == "inline" or (len(todo) < 2 and not ray_train):
        res = rt.resources
        if ranks := ranks_to_start(res.processes, res.nodes):
            return [_train_ranks(run, plan, job, ranks) for job in todo]
        return [_train_one(run, plan, job) for job in todo]
    return _launch(run, plan, todo)


def _train_ranks(run: Context, plan: Plan, job: Job, ranks: int) -> BranchManifest:
    """One job as ``ranks`` processes on this node (``runtime.resources.gpus_per_node``), each
    running the job's own command; its manifest once they finished."""
    p_hash = plan_hash(run)
    _verify_job_inputs(run, plan, job.datasets, job.label)
    if m := _already_trained(run, job, p_hash):
        return m
    _write_launch_config(run)
    argv = _job_command(run, job.kind, job.ident, p_hash, ["-m", "merit.cli"])
    run.say(f"{job.label}: starting {ranks} processes on this node")
    rc = run_ranks([*argv, f"runtime.threads={_threads(run, ranks)}"], ranks)
    if rc == orch.EXIT_PREEMPTED:
        step = (orch.read_progress(job.out) or {}).get("step", 0)
        raise Preempted(step, None)
    if rc != 0 or (m := finished(run, job.out, p_hash)) is None:
        raise LaunchError(f"{job.label}: its {ranks} processes failed (exit code {rc})")
    return m


def _launch(run: Context, plan: Plan, todo: list[Job]) -> list[BranchManifest]:
    """Every job as its own ``merit train`` process, through the local or Ray launcher."""
    rt = run.cfg.runtime
    p_hash = plan_hash(run)
    _write_launch_config(run)
    merit = [sys.executable, "-m", "merit.cli"]
    threads = _threads(run, rt.parallel)
    launch = []
    for job in todo:
        _verify_job_inputs(run, plan, job.datasets, job.label)
        argv = _job_command(run, job.kind, job.ident, p_hash, merit)
        argv += [f"runtime.threads={threads}", "runtime.progress=false", "runtime.launcher=inline"]
        done = lambda d=job.out: finished(run, d, p_hash) is not None  # noqa: E731
        launch.append(orch.Job(job.label, argv, job.out, done=done))
    with run.timed(f"train ({rt.launcher} launcher)"):
        if rt.launcher == "local":
            orch.run_local(launch, rt.parallel, threads, rt.retries, say=run.say)
        elif rt.resources.processes > 1:  # each branch a Ray Train job, a worker per GPU
            res = rt.resources
            workers, gpus = res.processes, res.gpus_per_node > 0
            run_ray_train(launch, workers, gpus, rt.branch_cpus, rt.retries, rt.ray_address,
                          say=run.say)  # fmt: skip
        else:
            run_ray(
                launch,
                rt.ray_address,
                rt.branch_cpus,
                rt.branch_gpus,
                rt.branch_memory_gb,
                threads,
                rt.retries,
                say=run.say,
            )
    out = [finished(run, job.out, p_hash) for job in todo]
    missing = [job.label for job, m in zip(todo, out) if m is None]
    if missing:
        raise StageError(f"{', '.join(missing)}: the launcher finished but left no manifest")
    return out


def _trained(run: Context, todo: list[Job], done: list[BranchManifest]) -> Trained:
    root = run.paths.root
    return Trained(
        manifests={
            str(j.out.relative_to(root)): sha256_file(RunPaths.manifest(j.out)) for j in todo
        },
        tokens_seen={m.label: m.tokens_seen for m in done},
    )


def build_branches(ctx: Context, inputs: dict) -> Trained:
    """Every branch of the plan from θ0 (paper §3.3)."""
    todo = jobs(ctx, inputs["plan"], baselines=[])
    return _trained(ctx, todo, run_jobs(ctx, inputs["plan"], todo))


def build_joint(ctx: Context, inputs: dict) -> Trained:
    """Joint training: one branch on every dataset, the same tokens (paper §4)."""
    todo = jobs(ctx, inputs["plan"], baseline="joint")
    return _trained(ctx, todo, run_jobs(ctx, inputs["plan"], todo))


def train_command(ctx: Context, args) -> int:
    """``merit train``: the requested jobs, one line each; exit 1 if a launched job failed."""
    if args.print_commands:
        plan = ctx.executor.get("plan")
        print(branch_commands(ctx, plan, args.print_commands))
        return 0
    pinned = args.plan_sha256
    plan = _pinned_plan(ctx, pinned) if pinned else ctx.executor.get("plan")
    todo = jobs(ctx, plan, args.branch, args.baseline)
    one = args.branch is not None or args.baseline is not None
    try:
        done = run_jobs(ctx, plan, todo, one)
    except LaunchError as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return 1
    if not one and not pinned:  # record what is trained, as the stages downstream read it
        ctx.executor.get("train")
        if "joint" in ctx.cfg.training.baselines:
            ctx.executor.get("joint")
    for m in done:
        print(f"{m.label}: {m.steps} steps, {m.tokens} tokens, final loss {m.final_loss}")
    return 0


def _training_stage(name: str, help_: str, path, build, what: str, order: int) -> Stage:
    """A stage that trains jobs from the plan: the experiment is what it reads."""
    intact = lambda ctx, t: t.intact(ctx.paths)  # noqa: E731
    return Stage(name, help_, READS, Trained, path, build, needs=("plan",), what=what,
                 intact=intact, order=order)  # fmt: skip


STAGES.register(
    _training_stage("train", "train branches (all, or --branch k) and baselines from θ0",
                    lambda p: p.trained, build_branches, "trained branches", 40)
)  # fmt: skip
STAGES.register(
    _training_stage("joint", "train the joint baseline: one branch on every dataset, the same tokens",
                    lambda p: p.joint_trained, build_joint, "the joint baseline", 41)
)  # fmt: skip
