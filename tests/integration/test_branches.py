"""Branches that survive preemption, run under launchers, and merge only when provably right.

One planned run directory (K=2, a tiny Llama) is made once; each test copies it, so every
branch starts from the same θ0 and plan, and compares its final weights to an uninterrupted
reference run, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_mixture, write_run_config
from merit.cli import main
from merit.train.sft import CHECKPOINT_MARKER, checkpoint_dirs, checkpoint_problem

BRANCH_TRAINING = {"learning_rate": 3e-3, "batch_size": 2, "epochs": 3, "baselines": []}


def _write_config(path: Path, run_dir: Path, specs, base, training=None) -> Path:
    return write_run_config(
        path,
        run_dir,
        specs,
        base,
        training=training or BRANCH_TRAINING,
        evaluation={"max_examples": 4, "max_generate": 0, "batch_size": 16},
        runtime={"checkpoint_steps": 5},
    )


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_base):
    """A planned run (no branches yet) and the reference: both branches trained uninterrupted."""
    root = tmp_path_factory.mktemp("branches")
    specs = write_mixture(root / "mixture")  # this module's own files: one test edits one
    cfg = _write_config(root / "run.yaml", root / "planned", specs, tiny_base)
    assert main(["plan", str(cfg)]) == 0
    shutil.copytree(root / "planned", root / "reference")
    assert main(["train", str(cfg), f"run_dir={root / 'reference'}"]) == 0
    ref = {k: _weights(root / "reference", k) for k in (0, 1)}
    return {"root": root, "cfg": cfg, "ref": ref, "base": tiny_base, "specs": specs}


def _weights(run: Path, k: int) -> bytes:
    return (run / "branches" / f"branch-{k}" / "model" / "model.safetensors").read_bytes()


def _copy(planned, name: str) -> Path:
    dst = planned["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(planned["root"] / "planned", dst)
    return dst


def _merit(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, "-m", "merit.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def _progress(run: Path, k: int) -> dict:
    try:
        return json.loads((run / "branches" / f"branch-{k}" / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_step(run: Path, k: int, step: int, proc: subprocess.Popen, timeout: float = 120) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = _progress(run, k)
        if p.get("step", 0) >= step and p.get("status") == "running":
            return p
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"branch {k} never reached step {step}")


def test_sigkill_then_rerun_is_bitwise_equal(planned, capsys):
    run = _copy(planned, "sigkill")
    cfg = planned["cfg"]
    proc = _merit("train", str(cfg), f"run_dir={run}", "--branch", "0")
    _wait_step(run, 0, 12, proc)
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it where it is, then make sure it is mid-training
    p = _progress(run, 0)
    assert not (run / "branches" / "branch-0" / "manifest.json").exists()
    assert 12 <= p["step"] < p["max_steps"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = _merit("train", str(cfg), f"run_dir={run}", "--branch", "0")
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming from checkpoint-" in err
    assert _weights(run, 0) == planned["ref"][0]  # bitwise
    m = json.loads((run / "branches" / "branch-0" / "manifest.json").read_text())
    ref = json.loads((planned["root"] / "reference/branches/branch-0/manifest.json").read_text())
    assert m["resumed_from_step"] > 0 and m["steps"] == ref["steps"]
    # merit's own token count survives the restart: 3 epochs of the plan's N_k, exactly.
    plan = json.loads((run / "plan.json").read_text())
    assert m["tokens_seen"] == ref["tokens_seen"] == 3 * plan["groups"][0]["tokens"]
    # An idempotent command: once done it returns at once.
    assert main(["train", str(cfg), f"run_dir={run}", "--branch", "0"]) == 0
    assert "already trained" in capsys.readouterr().err


def test_sigterm_exits_75_with_checkpoint_then_truncated_newest_falls_back(planned, capsys):
    run = _copy(planned, "sigterm")
    cfg = planned["cfg"]
    proc = _merit("train", str(cfg), f"run_dir={run}", "--branch", "1")
    _wait_step(run, 1, 8, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    p = _progress(run, 1)
    stop = p["step"]
    assert p["status"] == "preempted" and 8 <= stop < p["max_steps"]
    assert f"preempted at step {stop}" in err
    trainer = run / "branches" / "branch-1" / "trainer"
    ckpts = checkpoint_dirs(trainer)
    assert ckpts[0][0] == stop  # the newest checkpoint is at the stop step ...
    assert checkpoint_problem(ckpts[0][1], _marker(ckpts[0][1])["run_key"]) is None  # ... intact
    assert _marker(ckpts[0][1])["tokens_seen"] == p["tokens_seen"] > 0
    assert not (run / "branches" / "branch-1" / "manifest.json").exists()

    # Truncate the newest checkpoint's weights, as an abrupt stop or a partial upload would.
    newest, previous = ckpts[0][1], ckpts[1]
    w = newest / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert "model.safetensors has" in checkpoint_problem(newest, _marker(newest)["run_key"])
    assert main(["train", str(cfg), f"run_dir={run}", "--branch", "1"]) == 0
    out = capsys.readouterr().err  # progress goes to stderr
    assert f"{newest.name} is not usable" in out
    assert f"resuming from checkpoint-{previous[0]} " in out
    assert _weights(run, 1) == planned["ref"][1]  # bitwise, despite preemption + truncation


def _marker(ckpt: Path) -> dict:
    return json.loads((ckpt / CHECKPOINT_MARKER).read_text())


@pytest.mark.slow
def test_local_launcher_parallel_retries_a_crashed_branch(planned):
    run = _copy(planned, "local")
    proc = _merit("train", str(planned["cfg"]), f"run_dir={run}", "--parallel", "2")
    p = _wait_step(run, 1, 10, proc)
    os.kill(p["pid"], signal.SIGKILL)  # a branch process crashes mid-training
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    said = out + err  # merit's messages go to stderr
    assert "branch 1: crashed (exit -9); re-running" in said
    assert "branch 0 done | branch 1 done" in said  # the progress line of both branches
    assert _weights(run, 0) == planned["ref"][0]
    assert _weights(run, 1) == planned["ref"][1]


def test_ray_two_node_cluster_survives_losing_a_node(planned, monkeypatch):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Hermetic Ray: no token file in ~/.ray, session files in a temporary directory (short: Ray
    # puts unix sockets there).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Every node and the driver on 127.0.0.1: Ray otherwise swaps loopback for this machine's
    # own address. (Read when ray is imported: the driver subprocess inherits it; for this
    # process it is set before the cluster's nodes start.)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    os.mkdir(os.path.join(tmp, "ray"))  # Ray's session directory under $RAY_TMPDIR
    run = _copy(planned, "ray")
    local = {"node_ip_address": "127.0.0.1", "num_cpus": 1}  # both "nodes" on loopback
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **local,
            "temp_dir": os.path.join(tmp, "ray"),
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2},
        },
    )
    try:
        worker = cluster.add_node(**local)
        cluster.wait_for_nodes()
        driver = _merit(
            "train",
            str(planned["cfg"]),
            f"run_dir={run}",
            "--launcher",
            "ray",
            f"runtime.ray_address={cluster.address}",
            "runtime.retries=2",
            env={
                "RAY_AUTH_MODE": "disabled",
                "RAY_TMPDIR": tmp,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            },
        )
        # Find the branch running on the worker node; remove that node mid-branch.
        victim, t0 = None, time.time()
        while victim is None:
            if time.time() - t0 > 180 or driver.poll() is not None:
                driver.kill()
                raise AssertionError(driver.communicate())
            for k in (0, 1):
                launch = run / "branches" / f"branch-{k}" / "launch.json"
                if launch.is_file() and json.loads(launch.read_text())["node_id"] == worker.node_id:
                    p = _progress(run, k)
                    # A sealed checkpoint exists: the retry has something to resume from.
                    sealed = (run / "branches" / f"branch-{k}").glob(
                        f"trainer/checkpoint-*/{CHECKPOINT_MARKER}"
                    )
                    # ... and far from its end, so it cannot finish before the node goes.
                    early = 5 <= p.get("step", 0) <= p.get("max_steps", 0) // 2
                    if p.get("status") == "running" and early and any(sealed):
                        victim = k
            time.sleep(0.02)
        cluster.remove_node(worker, allow_graceful=False)
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, err + out
        launch = json.loads((run / "branches" / f"branch-{victim}" / "launch.json").read_text())
        assert launch["node_id"] != worker.node_id  # retried on the node that is left
        m = json.loads((run / "branches" / f"branch-{victim}" / "manifest.json").read_text())
        assert m["resumed_from_step"] is not None and m["resumed_from_step"] > 0
        for k in (0, 1):
            assert _weights(run, k) == planned["ref"][k]  # the same weights as a local run
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_train_runs_each_branch_as_two_workers(planned):
    """``runtime.launcher=ray`` with 2 processes per branch: each branch is a Ray Train job of 2
    CPU workers (gloo). A worker killed mid-branch fails the attempt; Ray Train restarts both
    ranks, which resume from the sealed checkpoint to the weights of one uninterrupted process."""
    pytest.importorskip("ray.train.torch")
    run = _copy(planned, "ray-train")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    try:
        proc = _merit("train", str(planned["cfg"]), f"run_dir={run}", "--launcher", "ray",
                      "runtime.resources.gpus_per_node=2", "runtime.branch_cpus=0.5", env=env)  # fmt: skip
        p = _wait_step(run, 0, 6, proc)
        sealed = (run / "branches" / "branch-0").glob(f"trainer/checkpoint-*/{CHECKPOINT_MARKER}")
        assert any(sealed) and p["step"] < p["max_steps"]
        os.kill(p["pid"], signal.SIGKILL)  # rank 0's Ray worker process
        out, err = proc.communicate(timeout=600)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, (out + err)[-4000:]
    assert "branch 0: 2 Ray Train workers (CPU, gloo)" in out + err
    m = json.loads((run / "branches" / "branch-0" / "manifest.json").read_text())
    assert m["resumed_from_step"] is not None and m["resumed_from_step"] > 0
    _same_branch(planned, run, atol=1e-5)


def test_a_runs_merge_by_another_method_reuses_the_branches(planned, capsys):
    """``merging.method`` / ``merging.params`` re-run the merge only: the branches stay, the
    manifest records the method and its parameters; a bad one is one line before any work."""
    run = planned["root"] / "merge-methods"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(planned["root"] / "reference", run)
    cfg, at = str(planned["cfg"]), f"run_dir={run}"
    branch = run / "branches" / "branch-0" / "manifest.json"
    before = branch.stat().st_mtime_ns
    ties = ["merging.method=ties", "merging.params={density: 0.5}"]
    assert main(["merge", cfg, at, *ties]) == 0
    m = json.loads((run / "merged" / "merge_manifest.json").read_text())
    assert m["method"] == "ties" and m["params"] == {"density": 0.5, "scale": 1.0}
    capsys.readouterr()
    assert main(["merge", cfg, at, "merging.method=ties", "merging.params={density: 0.25}"]) == 0
    assert "merge: re-running (merging.params.density changed)" in capsys.readouterr().err
    assert branch.stat().st_mtime_ns == before  # nothing retrained
    for bad, words in (("merging.method=nope", "unknown merge method 'nope'"),
                       ("merging.params={density: 2}", "density must be in (0, 1]")):  # fmt: skip
        assert main(["merge", cfg, at, "merging.method=ties", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err


def test_merge_refuses_listing_every_problem(planned, capsys):
    run = planned["root"] / "refuse"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(planned["root"] / "reference", run)
    cfg = [str(planned["cfg"]), f"run_dir={run}"]
    b0, b1 = run / "branches" / "branch-0", run / "branches" / "branch-1"
    m = json.loads((b0 / "manifest.json").read_text())
    m["base_fingerprint"] = "0" * 64  # trained from another θ0
    m["tokens_seen"] += 7  # a different budget
    (b0 / "manifest.json").write_text(json.dumps(m))
    w = b0 / "model" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    w.write_bytes(bytes(data))
    (b1 / "manifest.json").unlink()  # branch 1 never finished
    assert main(["merge", *cfg]) == 2
    err = capsys.readouterr().err
    err = err[err.index("merit: error:") :]  # after the stages' progress lines
    assert err.startswith("merit: error: cannot merge: 4 problem(s)")
    assert "branch 0: trained from another θ0" in err
    assert "branch 0: saw" in err and "the plan's budget is" in err
    assert "model.safetensors differs from its manifest" in err
    assert "branch 1: unfinished (no manifest, trained at step" in err
    assert not (run / "merged").exists()
    # Another plan: every branch's manifest names the old one.
    shutil.rmtree(b1)
    plan = json.loads((run / "plan.json").read_text())
    plan["groups"][1]["tokens"] += 1
    (run / "plan.json").write_text(json.dumps(plan))
    from merit.config import load_config
    from merit.context import open_context
    from merit.errors import StageError
    from merit.merge.stage import verify_branches
    from merit.plan.stage import Plan
    from merit.run import Run

    r = open_context(Run(load_config(planned["cfg"], [f"run_dir={run}"])))
    with pytest.raises(StageError) as exc:
        verify_branches(r, Plan.from_json(plan))
    msg = str(exc.value)
    assert "branch 0: trained from another plan" in msg
    assert "branch 1: missing (never started" in msg


def test_branch_refuses_changed_dataset_or_other_plan(planned, capsys):
    run = _copy(planned, "verify")
    plan_sha = hashlib.sha256((run / "plan.json").read_bytes()).hexdigest()
    args = ["train", str(planned["cfg"]), f"run_dir={run}", "--branch", "0"]
    assert main([*args, "--plan-sha256", "f" * 64]) == 2
    assert "the launcher expected ffffffffffff" in capsys.readouterr().err
    # A dataset file edited after planning: the branch refuses before training.
    plan = json.loads((run / "plan.json").read_text())
    name = plan["groups"][0]["datasets"][0]
    path = Path(next(s["path"] for s in planned["specs"] if s["name"] == name))
    original = path.read_bytes()
    try:
        path.write_bytes(original + (b"\n" if path.suffix == ".jsonl" else b""))
        if path.suffix != ".jsonl":  # gzip: recompress with another level, same content
            import gzip

            path.write_bytes(gzip.compress(gzip.decompress(original), compresslevel=1))
        assert main([*args, "--plan-sha256", plan_sha]) == 2
    finally:
        path.write_bytes(original)
    err = capsys.readouterr().err
    assert f"dataset {name}" in err and "changed since planning" in err
    assert not (run / "branches" / "branch-0" / "progress.json").exists()


def test_print_commands_for_shell_skypilot_and_slurm(planned, tmp_path, capsys):
    run = _copy(planned, "print")
    base = [str(planned["cfg"]), f"run_dir={run}"]
    assert main(["train", *base, "--print-commands", "shell"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    plan_sha = hashlib.sha256((run / "plan.json").read_bytes()).hexdigest()
    assert len(lines) == 2 and all(f"--plan-sha256 {plan_sha}" in x for x in lines)
    assert "--branch 0" in lines[0] and "--branch 1" in lines[1]
    assert main(["train", *base, "--print-commands", "skypilot"]) == 0
    sky = yaml.safe_load(capsys.readouterr().out)
    assert sky["resources"]["job_recovery"]["recover_on_exit_codes"] == [75]
    assert '--branch "$BRANCH"' in sky["run"]
    assert main(["train", *base, "--print-commands", "slurm"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in script and "#SBATCH --signal=B:USR1@120" in script
    assert f'--branch "$SLURM_ARRAY_TASK_ID" --plan-sha256 {plan_sha}' in script
    assert (run / "branches" / "launch.yaml").is_file()  # the config the commands read
    assert not (run / "branches" / "branch-0").exists()  # printing trains nothing


@pytest.mark.slow
def test_printed_slurm_script_trains_a_branch(planned, tmp_path, capsys):
    run = _copy(planned, "slurm")
    assert main(["train", str(planned["cfg"]), f"run_dir={run}", "--print-commands", "slurm"]) == 0
    script = tmp_path / "branches.sbatch"
    script.write_text(capsys.readouterr().out)
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_ID": "42",
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert _weights(run, 1) == planned["ref"][1]


def _torchrun(cfg: Path, run: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    argv += ["-m", "merit.cli", "train", str(cfg), f"run_dir={run}", "--branch", "0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _same_branch(planned, run: Path, atol: float) -> None:
    """Branch 0 of ``run`` is the single-process reference: steps, tokens, weights."""
    m = json.loads((run / "branches" / "branch-0" / "manifest.json").read_text())
    ref = json.loads((planned["root"] / "reference/branches/branch-0/manifest.json").read_text())
    # Each batch is split over the processes: the optimizer steps and tokens are the
    # single-process ones, and the weights agree up to float reduction order.
    assert m["steps"] == ref["steps"] and m["tokens_seen"] == ref["tokens_seen"]
    assert m["tokens"] == ref["tokens"] and m["training"] == ref["training"]
    got = load_file(run / "branches" / "branch-0" / "model" / "model.safetensors")
    want = load_file(planned["root"] / "reference/branches/branch-0/model/model.safetensors")
    base = load_file(planned["base"] / "model.safetensors")
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype
        torch.testing.assert_close(got[name], t, rtol=0, atol=atol)
    moved = max((want[n] - base[n]).abs().max().item() for n in want)
    assert moved > 1e-2  # training moved the weights far more than the tolerance


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_multi_process_branch_through_torchrun_on_cpu(planned, how):
    """The multi-GPU path (DDP, FSDP2 via accelerate) on 2 CPU processes over gloo: the same
    schedule, tokens and weights as one process."""
    run = _copy(planned, how)
    proc = _torchrun(planned["cfg"], run, f"training.distributed={how}")
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert len(list(run.glob("branches/*/manifest.json"))) == 1
    # accelerate shards only on GPUs: CPU processes asked for FSDP train under DDP, and say so.
    assert "branch 0: 2 process(es) on cpu, ddp, float32 weights" in err
    assert ("accelerate shards only on GPUs" in err) == (how == "fsdp")
    _same_branch(planned, run, atol=1e-5)


def _rank_pid(run: Path, rank: int) -> int:
    """The pid of one rank of the branch training in ``run`` (from /proc: its argv and env)."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"run_dir={run}".encode() in argv and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} training in {run}")


@pytest.mark.slow
def test_two_processes_started_by_merit_survive_sigterm_to_one_rank(planned):
    """``runtime.resources.gpus_per_node=2`` on a machine without GPUs: merit starts 2 gloo
    ranks itself; SIGTERM to one rank checkpoints both, exits 75, and the re-run resumes to the
    weights of one uninterrupted process."""
    run = _copy(planned, "ranks")
    args = ("train", str(planned["cfg"]), f"run_dir={run}", "--branch", "0")
    proc = _merit(*args, "runtime.resources.gpus_per_node=2")
    _wait_step(run, 0, 6, proc)
    os.kill(_rank_pid(run, 1), signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "starting 2 processes on this node" in err
    p = _progress(run, 0)
    assert p["status"] == "preempted" and 6 <= p["step"] < p["max_steps"]
    assert checkpoint_dirs(run / "branches" / "branch-0" / "trainer")[0][0] == p["step"]
    again = _merit(*args, "runtime.resources.gpus_per_node=2")
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from checkpoint-{p['step']}" in err
    _same_branch(planned, run, atol=1e-5)


def test_lora_branches_merge_the_average_of_products(tmp_path, mixture_specs, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from merit.train.lora import adapter_deltas, average_of_products, product_of_averages

    training = {
        "learning_rate": 2e-2,
        "batch_size": 4,
        "baselines": [],
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    }
    cfg = _write_config(
        tmp_path / "lora.yaml", tmp_path / "run", mixture_specs, tiny_base, training
    )
    assert main(["train", str(cfg)]) == 0
    assert main(["merge", str(cfg)]) == 0
    run = tmp_path / "run"
    plan = json.loads((run / "plan.json").read_text())
    w = [g["weight"] for g in plan["groups"]]
    adapters = [run / "branches" / f"branch-{k}" / "adapter" for k in (0, 1)]
    base = load_file(tiny_base / "model.safetensors")
    merged = load_file(run / "merged" / "model.safetensors")
    branch0 = load_file(run / "branches" / "branch-0" / "model" / "model.safetensors")
    avg = average_of_products(adapters, w)
    naive = product_of_averages(adapters, w)
    assert len(avg) == 2 * 3  # 2 layers × 3 adapted modules
    gap = []
    for name, delta in avg.items():
        # Each branch's full weights are θ0 + s·B·A; the merge is θ0 + Σ w_k s B_k A_k.
        torch.testing.assert_close(
            (branch0[name] - base[name]).double(),
            adapter_deltas(adapters[0])[name],
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close((merged[name] - base[name]).double(), delta, rtol=0, atol=1e-6)
        gap.append(((naive[name] - delta).norm() / delta.norm()).item())
    # Averaging A and B separately is measurably wrong, far beyond float error.
    assert max(gap) > 1e-3, gap
    for name, t in merged.items():  # modules without adapters are θ0's
        if name not in avg:
            torch.testing.assert_close(t, base[name], rtol=0, atol=1e-7)
    # The merge as one adapter (rank 2r) reproduces the merged model on θ0.
    cfg_a = json.loads((run / "merged-adapter" / "adapter_config.json").read_text())
    assert cfg_a["r"] == 8
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    full = PeftModel.from_pretrained(model, run / "merged-adapter").merge_and_unload()
    got = dict(full.named_parameters())
    for name in avg:
        torch.testing.assert_close(got[name].detach(), merged[name], rtol=0, atol=1e-6)
