"""Branch training pieces on small inputs: the fixed example order, sealed checkpoints and their
fallback, preemption signals, LoRA delta averaging, and the local launcher's retries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merit.config import SFT_DEFAULTS, SFT_OWNED, config_from_dict
from merit.train.launchers import EXIT_PREEMPTED, Job, LaunchError, run_local, slurm_script
from merit.train.lora import (
    adapter_deltas,
    average_of_products,
    merge_adapters,
    product_of_averages,
)
from merit.train.sft import (
    CHECKPOINT_MARKER,
    _checkpointing,
    _parallelism,
    _sft_settings,
    checkpoint_problem,
    newest_valid_checkpoint,
    preemption_signals,
    schedule,
    seal_checkpoint,
    sft_config,
)


# -- the example order -------------------------------------------------------------------------
def test_schedule_is_fixed_by_seed_and_covers_each_epoch_once():
    lengths = [(7 * i) % 23 + 1 for i in range(50)]
    order = schedule(lengths, per_step=4, epochs=3, seed=5)
    assert len(order) == 150
    for e in range(3):
        assert sorted(order[50 * e : 50 * (e + 1)]) == list(range(50))  # a permutation per epoch
    assert order[:50] != order[50:100]  # epochs are shuffled differently
    torch.manual_seed(123)  # the global RNG plays no part: a resumed process gets the same order
    assert schedule(lengths, 4, 3, seed=5) == order
    assert schedule(lengths, 4, 3, seed=6) != order
    assert len(schedule(lengths, 4, 1.5, seed=5)) == 75  # fractional epochs: ceil(n × epochs)
    assert len(schedule(lengths, 4, 1, seed=5, max_steps=30)) == 120


def test_schedule_groups_lengths_into_batches():
    lengths = [1 + (i * 37) % 200 for i in range(400)]
    order = schedule(lengths, per_step=8, epochs=1, seed=0)
    spread = [
        max(b) - min(b) for b in ([lengths[i] for i in order[j : j + 8]] for j in range(0, 400, 8))
    ]
    rand = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    spread_random = [
        max(b) - min(b) for b in ([lengths[i] for i in rand[j : j + 8]] for j in range(0, 400, 8))
    ]
    assert sum(spread) < 0.5 * sum(spread_random)  # less padding than a plain shuffle


# -- sealed checkpoints ------------------------------------------------------------------------
def _checkpoint(root: Path, step: int, key: str = "k", seal: bool = True) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": torch.full((64,), float(step))}, str(ckpt / "model.safetensors"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        seal_checkpoint(ckpt, step, tokens_seen=10 * step, run_key=key)
    return ckpt


def test_newest_valid_checkpoint_falls_back_past_incomplete_and_corrupt_ones(tmp_path):
    _checkpoint(tmp_path, 5)
    c10 = _checkpoint(tmp_path, 10)
    assert newest_valid_checkpoint(tmp_path, "k")[0][0] == c10
    c15 = _checkpoint(tmp_path, 15, seal=False)  # killed before the marker was written
    c20 = _checkpoint(tmp_path, 20)
    w = c20 / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-9])  # truncated after sealing (partial copy or upload)
    (found, marker), skipped = newest_valid_checkpoint(tmp_path, "k")
    assert found == c10 and marker["tokens_seen"] == 100
    assert [p for p, _ in skipped] == [c20, c15]
    assert "bytes, sealed with" in skipped[0][1] and "no marker" in skipped[1][1]


def test_checkpoint_problems_are_specific(tmp_path):
    c = _checkpoint(tmp_path, 3)
    assert checkpoint_problem(c, "k") is None
    assert "another plan" in checkpoint_problem(c, "other")
    original = (c / "model.safetensors").read_bytes()
    data = bytearray(original)
    data[-1] ^= 1  # same size, one bit flipped
    (c / "model.safetensors").write_bytes(bytes(data))
    assert "sha256" in checkpoint_problem(c, "k")
    (c / "model.safetensors").write_bytes(original)
    (c / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in checkpoint_problem(c, "k")
    (c / CHECKPOINT_MARKER).write_text("{not json")
    assert "unreadable marker" in checkpoint_problem(c, "k")
    assert newest_valid_checkpoint(tmp_path / "none", "k") == (None, [])


def test_preemption_signals_set_a_flag_then_restore_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with preemption_signals() as flag:
        assert flag.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would terminate the process without the handler
        time.sleep(0.01)
        assert flag.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


# -- LoRA: average of products -------------------------------------------------------------------
def _adapter(path: Path, a: dict, b: dict, r: int, alpha: float) -> Path:
    path.mkdir(parents=True)
    tensors = {}
    for m in a:
        tensors[f"base_model.model.{m}.lora_A.weight"] = a[m]
        tensors[f"base_model.model.{m}.lora_B.weight"] = b[m]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_lora_merge_averages_products_not_factors(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = ["layers.0.q_proj", "layers.1.up_proj"]
    dirs, ab = [], []
    for k in range(3):
        a = {m: torch.randn(4, 12, generator=g) for m in mods}
        b = {m: torch.randn(10, 4, generator=g) for m in mods}
        ab.append((a, b))
        dirs.append(_adapter(tmp_path / f"a{k}", a, b, r=4, alpha=8.0))
    w = [0.5, 0.3, 0.2]
    s = 8.0 / 4
    avg = average_of_products(dirs, w)
    naive = product_of_averages(dirs, w)
    for m in mods:
        want = sum(wk * s * (b[m].double() @ a[m].double()) for wk, (a, b) in zip(w, ab))
        torch.testing.assert_close(avg[f"{m}.weight"], want)
        # The product of averaged factors misses the cross terms: a large relative error.
        rel = (naive[f"{m}.weight"] - want).norm() / want.norm()
        assert rel > 0.3
    # One adapter holding the merge exactly: rank 3 × 4, scaling 1.
    out = merge_adapters(dirs, w, tmp_path / "merged")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    for m in mods:
        torch.testing.assert_close(
            adapter_deltas(out)[f"{m}.weight"], avg[f"{m}.weight"], rtol=1e-6, atol=1e-5
        )


# -- launchers ---------------------------------------------------------------------------------
def _job(tmp_path: Path, label: str, code: str) -> Job:
    out = tmp_path / label
    return Job(label, [sys.executable, "-c", code], out)


def test_run_local_retries_preempted_and_crashed_jobs_but_not_bad_input(tmp_path):
    flaky = (
        f"import pathlib, sys; p = pathlib.Path({str(tmp_path / 'tries')!r}); "
        "n = int(p.read_text()) if p.exists() else 0; p.write_text(str(n + 1)); "
        f"sys.exit([{EXIT_PREEMPTED}, 3, 0][n])"
    )
    jobs = [_job(tmp_path, "flaky", flaky), _job(tmp_path, "ok", "print('hi')")]
    lines: list[str] = []
    res = run_local(jobs, parallel=2, threads=1, retries=2, say=lines.append, poll=0.01)
    assert {r.label: r.attempts for r in res} == {"ok": 1, "flaky": 3}
    assert any("flaky: preempted; re-running" in x for x in lines)
    assert any("flaky: crashed (exit 3); re-running" in x for x in lines)
    assert lines[-1] == "flaky done | ok done"
    with pytest.raises(LaunchError, match="exit code 2 after 1 attempt"):
        run_local([_job(tmp_path, "bad", "import sys; sys.exit(2)")], retries=5, say=lines.append)
    with pytest.raises(LaunchError, match="exit code 3 after 2 attempt"):
        run_local([_job(tmp_path, "dead", "import sys; sys.exit(3)")], retries=1, say=lines.append)


def test_run_local_skips_done_jobs_and_runs_in_parallel(tmp_path):
    # Each job waits until all three have started: one after another, they would time out.
    barrier = (
        "import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); "
        "(d / sys.argv[2]).touch(); t = time.time()\n"
        "while len(list(d.glob('j*'))) < 3:\n"
        "    time.sleep(0.01)\n"
        "    if time.time() - t > 60: sys.exit(1)\n"
    )
    jobs = [
        Job(f"j{i}", [sys.executable, "-c", barrier, str(tmp_path), f"j{i}"], tmp_path / f"o{i}")
        for i in range(3)
    ]
    jobs.append(
        Job("done", [sys.executable, "-c", "raise SystemExit(9)"], tmp_path, done=lambda: True)
    )
    res = run_local(jobs, parallel=3, retries=0, say=lambda _m: None, poll=0.05)
    assert sorted(r.label for r in res) == ["j0", "j1", "j2"]


def test_slurm_script_requeues_on_exit_75(tmp_path):
    """The generated sbatch script passes SIGUSR1 to the branch and requeues on exit 75."""
    branch = tmp_path / "branch.py"
    branch.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
        "open(f'{sys.argv[1]}/{sys.argv[2]}.started', 'w').write('started')\n"
        "time.sleep(30)\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script([sys.executable, str(branch), str(tmp_path), "{BRANCH}"], 2))
    assert "#SBATCH --array=0-1" in script.read_text()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_ID": "77",
    }
    proc = subprocess.Popen(["bash", str(script)], env=env)
    t0 = time.time()
    while not (tmp_path / "1.started").exists():
        assert time.time() - t0 < 20 and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends the batch shell
    assert proc.wait(timeout=20) == EXIT_PREEMPTED
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "77"]


# -- the SFTConfig: merit's settings, training.extra passed through ----------------------------
def _sft(tmp_path, raw_training=None, **kwargs):
    cfg = config_from_dict({"data": {"bigbench": "/x"}, "training": raw_training or {}})
    args = sft_config(cfg.training, tmp_path, torch.device("cpu"), 64, 100, False, **kwargs)
    return cfg, args


def test_training_extra_reaches_sft_config(tmp_path):
    base, default = _sft(tmp_path)
    assert (
        default.report_to == []
        and default.logging_steps == 1
        and default.optim == "adamw_torch_fused"
    )
    cfg, args = _sft(
        tmp_path, {"extra": {"optim_args": "scale_parameter=False", "adam_beta2": 0.9}}
    )
    assert args.optim_args == "scale_parameter=False" and args.adam_beta2 == 0.9
    assert cfg.experiment_hash() != base.experiment_hash()
    cfg, args = _sft(tmp_path, {"optim": "adafactor"})
    assert args.optim == "adafactor" and cfg.experiment_hash() != base.experiment_hash()
    cfg, args = _sft(tmp_path, {"extra": {"logging_steps": 7}})
    assert args.logging_steps == 7 and cfg.experiment_hash() == base.experiment_hash()
    _, args = _sft(tmp_path, report_to=["tensorboard"])
    assert args.report_to == ["tensorboard"]


def test_merit_refuses_in_extra_every_field_it_sets(tmp_path):
    """The config's list of merit-owned fields is what ``sft_config`` sets, so no user key can
    silently replace one of merit's (the schedule, checkpoints, data order)."""
    cfg, _ = _sft(tmp_path)
    sets = set(_sft_settings(cfg.training, torch.device("cpu"), 64, 100, False, False))
    sets |= set(_checkpointing(10, 2)) | {"output_dir", "report_to"}
    for how in ("fsdp", "deepspeed"):  # deepspeed itself need not be installed to list its keys
        training = cfg.training.model_copy(update={"distributed": how})
        sets |= set(_parallelism(training, ["LlamaDecoderLayer"], 2))
    assert sets - set(SFT_DEFAULTS) <= set(SFT_OWNED)
    assert not set(SFT_DEFAULTS) & set(SFT_OWNED)
