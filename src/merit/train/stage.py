"""Stage 3 (paper §3.3): every branch from θ0, independently, plus the baselines."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from merit.artifacts import read_json, sha256_file, write_json
from merit.plan.stage import make_plan, plan_hash
from merit.run import Run, StageError


def _pinned_plan(run: Run, plan_sha256: str) -> dict:
    """The existing plan, if it is the one the launcher saw; a branch command never re-plans."""
    if not run.paths.plan.is_file():
        raise StageError(f"no plan at {run.paths.plan}: run `merit plan` before the branches")
    got = plan_hash(run)
    if got != plan_sha256:
        raise StageError(
            f"{run.paths.plan} has sha256 {got[:12]}…, the launcher expected {plan_sha256[:12]}… "
            "(re-planned since the branches were launched?)"
        )
    plan = read_json(run.paths.plan)
    if plan.get("config_hash") != run.cfg.experiment_hash():
        raise StageError(f"{run.paths.plan} was made from another config")
    return plan


def _verify_job_inputs(run: Run, plan: dict, names: list[str], label: str) -> None:
    """θ0's fingerprint and every dataset's sha256 must be the plan's; else one error."""
    problems = []
    if plan.get("base_fingerprint") != run.base_fingerprint:
        problems.append(
            f"θ0 {run.base_dir} has fingerprint {run.base_fingerprint[:12]}…, the plan was made "
            f"from {str(plan.get('base_fingerprint'))[:12]}…"
        )
    rows = {d["name"]: d for d in plan["datasets"]}
    have = {d.name: d for d in run.mixture.datasets}
    for n in names:
        if n not in rows or n not in have:
            problems.append(f"dataset {n} is not in both the plan and the mixture")
        elif rows[n].get("sha256") != have[n].file_hash:
            problems.append(f"dataset {n} ({have[n].data.path}) changed since planning")
    if problems:
        raise StageError(f"{label}: " + "; ".join(problems))


def _finished(out: Path, p_hash: str, base_fp: str) -> dict | None:
    """The branch's manifest if it is complete for this plan and θ0 (files present)."""
    mp = out / "manifest.json"
    if not mp.is_file():
        return None
    m = read_json(mp)
    if m.get("plan_sha256") != p_hash or m.get("base_fingerprint") != base_fp:
        return None
    if not all((out / rel).is_file() for rel in m.get("weights", {})):
        return None
    return m


def _branch_lock(out: Path, label: str, say):
    """An exclusive lock on the branch directory: a re-run (say a Ray retry on another node while
    the preempted process still writes its checkpoint) waits instead of training alongside."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def lock():
        out.mkdir(parents=True, exist_ok=True)
        if not _main_process():  # under accelerate, the first process holds it for all
            yield
            return
        with open(out / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"{label}: another process is training it; waiting for it to stop")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return lock()


def _main_process() -> bool:
    """False on the other processes of a multi-GPU branch (``accelerate launch``)."""
    return int(os.environ.get("RANK", "0")) == 0


def _train_one(
    run: Run,
    plan: dict,
    out: Path,
    names: list[str],
    label: str,
    expect_tokens: int,
    group: int | None = None,
) -> dict:
    """Train one branch (or baseline) idempotently: skip if done, else resume, then a manifest.

    Raises :class:`merit.train.sft.Preempted` after checkpointing on SIGTERM / SIGUSR1.
    """
    import shutil

    from merit.train.sft import train_sft

    p_hash = plan_hash(run)
    _verify_job_inputs(run, plan, names, label)
    manifest_path = out / "manifest.json"
    if m := _finished(out, p_hash, run.base_fingerprint):
        run.say(f"{label}: already trained, skipping")
        return m
    with _branch_lock(out, label, run.say):
        if m := _finished(out, p_hash, run.base_fingerprint):  # finished while we waited
            run.say(f"{label}: already trained, skipping")
            return m
        if manifest_path.is_file() and _main_process():  # another plan or θ0: start over
            manifest_path.unlink()
            for sub in ("model", "adapter"):
                shutil.rmtree(out / sub, ignore_errors=True)
        train = run.encoded("train")
        records = [e for n in names for e in train[n]]
        tokens = sum(len(e.input_ids) for e in records)
        if tokens != expect_tokens:
            raise StageError(f"{label}: {tokens} tokens to train but the plan says {expect_tokens}")
        run.say(
            f"training {label}: {len(names)} datasets, {len(records)} examples, {tokens} tokens"
        )
        # A checkpoint is resumed only by the same job: plan (hence config and datasets), θ0, data.
        run_key = hashlib.sha256(
            json.dumps([p_hash, run.base_fingerprint, label, names]).encode()
        ).hexdigest()
        model = run.load_base()
        base_dtype = next(model.parameters()).dtype
        saved = read_json(run.base_dir / "config.json").get("dtype") or read_json(
            run.base_dir / "config.json"
        ).get("torch_dtype")
        save_dtype = (
            getattr(torch, saved)
            if isinstance(saved, str) and hasattr(torch, saved)
            else base_dtype
        )
        t0 = time.perf_counter()
        rt = run.cfg.runtime
        res = train_sft(
            model,
            run.tokenizer,
            records,
            run.cfg.training,
            out,
            run.cfg.model.max_length,
            run.progress,
            save_dtype=save_dtype,
            checkpoint_steps=rt.checkpoint_steps,
            keep_checkpoints=rt.keep_checkpoints,
            run_key=run_key,
            label=label,
            log=run.say,
        )
        # Token accounting (issue 4): merit's own count of what the branch was fed, across
        # resumes, must be what the fixed schedule holds (epochs × N_k for whole epochs).
        if res.tokens_seen != res.tokens_scheduled:
            raise StageError(
                f"{label}: trained on {res.tokens_seen} tokens but its schedule holds "
                f"{res.tokens_scheduled}"
            )
        weights = {
            str(f.relative_to(out)): sha256_file(f)
            for sub in ("model", "adapter")
            for f in sorted((out / sub).glob("*"))
            if f.is_file() and f.suffix in (".safetensors", ".json")
        }
        losses = [v for _s, v in res.losses]
        manifest = {
            "label": label,
            "group": group,
            "plan_sha256": p_hash,
            "base_fingerprint": run.base_fingerprint,
            "datasets": names,
            "examples": res.examples,
            "tokens": res.tokens,
            "tokens_seen": res.tokens_seen,
            "tokens_scheduled": res.tokens_scheduled,
            "epochs": run.cfg.training.epochs,
            "answer_tokens": res.answer_tokens,
            "steps": res.steps,
            "lora": run.cfg.training.lora is not None,
            "resumed_from_step": res.resumed_from,
            "final_loss": res.final_loss,
            "loss_summary": {
                "first": losses[0] if losses else None,
                "last": losses[-1] if losses else None,
                "min": min(losses) if losses else None,
                "logged": len(losses),
            },
            "losses": res.losses,
            "seconds": time.perf_counter() - t0,
            "weights": weights,
        }
        if _main_process():
            # Written last and atomically: a manifest means the branch is complete.
            write_json(manifest_path, manifest)
            shutil.rmtree(out / "trainer", ignore_errors=True)  # checkpoints no longer needed
    return manifest


def _jobs(run: Run, plan: dict, branch: int | None, baseline: str | None) -> list[tuple]:
    """(kind, id, out dir, datasets, label, planned tokens, group) of the requested jobs."""
    jobs = []
    if baseline is None:
        ks = range(plan["K"]) if branch is None else [branch]
        for k in ks:
            if not 0 <= k < plan["K"]:
                raise StageError(f"branch {k} does not exist: the plan has K={plan['K']} branches")
            g = plan["groups"][k]
            jobs.append(
                ("branch", k, run.paths.branch(k), g["datasets"], f"branch {k}", g["tokens"], k)
            )
    if baseline is not None or branch is None:
        for name in [baseline] if baseline else run.cfg.training.baselines:
            if name != "joint":
                raise StageError(f"unknown baseline {name!r}")
            # Joint training: one branch on every dataset, the same total tokens (paper §4).
            everything = [d["name"] for d in plan["datasets"]]
            total = sum(g["tokens"] for g in plan["groups"])
            jobs.append(("baseline", name, run.paths.baseline(name), everything, name, total, None))
    return jobs


def _job_command(run: Run, kind: str, ident, p_hash: str, merit: list[str]) -> list[str]:
    """The idempotent command that trains one job (what every launcher runs)."""
    root = run.paths.root.resolve()
    launch_cfg = root / "branches" / "launch.yaml"
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


def _write_launch_config(run: Run) -> None:
    """The resolved config the branch commands read (atomically: branches may be reading it)."""
    import yaml

    path = run.paths.root / "branches" / "launch.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".launch.yaml.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, path)


def branch_commands(run: Run, kind: str) -> str:
    """The branch (and baseline) commands for another scheduler: shell, slurm or skypilot."""
    from merit.train.launchers import Job, print_commands

    plan = make_plan(run)
    p_hash = plan_hash(run)
    _write_launch_config(run)
    jobs = [
        Job(label, _job_command(run, kind_, ident, p_hash, ["merit"]), out)
        for kind_, ident, out, _n, label, _t, _g in _jobs(run, plan, None, None)
    ]
    template = _job_command(run, "branch", "{BRANCH}", p_hash, ["merit"])
    return print_commands(kind, jobs, template, plan["K"], run.cfg.runtime.branch_gpus)


def train(
    run: Run,
    branch: int | None = None,
    baseline: str | None = None,
    plan_sha256: str | None = None,
) -> list[dict]:
    """Train plan branches (all, or only ``branch``) and/or a baseline, each from θ0.

    One job (``branch`` or ``baseline``) runs here. All of them run through
    ``runtime.launcher``: inline (here, one after another), local (subprocesses,
    ``runtime.parallel`` at once) or ray. With ``plan_sha256`` (what launchers pass) the
    existing plan must have that hash; it is never recomputed.
    """
    plan = _pinned_plan(run, plan_sha256) if plan_sha256 else make_plan(run)
    jobs = _jobs(run, plan, branch, baseline)
    rt = run.cfg.runtime
    if branch is not None or baseline is not None or rt.launcher == "inline":
        out = []
        for kind, _ident, d, names, label, tokens, group in jobs:
            with run.timed("train branches" if kind == "branch" else f"train {label}"):
                out.append(_train_one(run, plan, d, names, label, tokens, group))
        return out
    from merit.train import launchers as orch

    p_hash = plan_hash(run)
    _write_launch_config(run)
    base_fp = run.base_fingerprint
    merit = [sys.executable, "-m", "merit.cli"]
    threads = rt.threads or max(1, (os.cpu_count() or 1) // max(1, rt.parallel))
    launch = []
    for kind, ident, d, names, label, _tokens, _group in jobs:
        _verify_job_inputs(run, plan, names, label)
        argv = _job_command(run, kind, ident, p_hash, merit)
        argv += [f"runtime.threads={threads}", "runtime.progress=false", "runtime.launcher=inline"]
        launch.append(
            orch.Job(label, argv, d, done=lambda d=d: _finished(d, p_hash, base_fp) is not None)
        )
    with run.timed(f"train ({rt.launcher} launcher)"):
        if rt.launcher == "local":
            orch.run_local(launch, rt.parallel, threads, rt.retries, say=run.say)
        else:
            orch.run_ray(
                launch,
                rt.ray_address,
                rt.branch_cpus,
                rt.branch_gpus,
                rt.branch_memory_gb,
                threads,
                rt.retries,
                say=run.say,
            )
    out = []
    for _kind, _ident, d, _names, label, _tokens, _group in jobs:
        m = _finished(d, p_hash, base_fp)
        if m is None:
            raise StageError(f"{label}: the launcher finished but the branch has no manifest")
        out.append(m)
    return out


def train_command(
    run: Run, branch: int | None, baseline: str | None, plan_sha256: str | None
) -> int:
    """``merit train``: the requested jobs, one line each; exit 1 if a launched job failed."""
    from merit.train.launchers import LaunchError

    try:
        done = train(run, branch=branch, baseline=baseline, plan_sha256=plan_sha256)
    except LaunchError as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return 1
    for m in done:
        print(
            f"{m['label']}: {m['steps']} steps, {m['tokens']} tokens, final loss {m['final_loss']}"
        )
    return 0
