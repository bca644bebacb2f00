"""The scheduler commands ask for what a branch needs (``runtime.resources``)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from merit.cli import main
from merit.sections.stages import ResourcesConfig, RuntimeConfig
from merit.train.launchers import Job, print_commands
from tiny_runs import write_mixture, write_run_config

ARGV = ["merit", "train", "/runs/r/branches/launch.yaml", "run_dir=/runs/r"]
BRANCH = [*ARGV, "--branch", "{BRANCH}", "--plan-sha256", "abc"]
JOBS = [Job(f"branch {k}", [*ARGV, "--branch", str(k)], None) for k in range(4)]
BIG = ResourcesConfig(nodes=2, gpus_per_node=8, cpus=32, memory_gb=500, time="12:00:00")


def test_slurm_script_asks_for_nodes_and_gpus_and_runs_torchrun_across_them():
    script = print_commands("slurm", JOBS, BRANCH, 4, BIG.model_copy(update={"partition": "gpu"}))
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gres=gpu:8", "--cpus-per-task=32"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --mem=500G\n" in script and "#SBATCH --time=12:00:00\n" in script
    assert "#SBATCH --partition=gpu\n" in script
    assert "#SBATCH --array=0-3\n" in script  # still one array task per branch
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    (run,) = [x for x in script.splitlines() if x.startswith("srun torchrun")]
    assert "--nnodes=$SLURM_NNODES --nproc_per_node=8" in run  # 2 × 8 = 16 processes
    assert "--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=$SLURM_JOB_ID" in run
    assert run.endswith(
        "-m merit.cli train /runs/r/branches/launch.yaml run_dir=/runs/r "
        '--branch "$SLURM_ARRAY_TASK_ID" --plan-sha256 abc &'
    )
    assert "kill -TERM $pid" in script  # torchrun dies on USR1: it gets TERM


def test_default_resources_print_todays_single_process_script():
    script = print_commands("slurm", JOBS, BRANCH, 4)
    assert "--gres" not in script and "torchrun" not in script and "srun" not in script
    assert "#SBATCH --nodes=1\n" in script
    assert "--time" not in script and "--mem" not in script and "--partition" not in script
    assert script.count("merit train") == 1 and "kill -USR1 $pid" in script


def test_skypilot_yaml_asks_for_the_accelerator_and_nodes():
    sky = yaml.safe_load(
        print_commands("skypilot", JOBS, BRANCH, 4, BIG.model_copy(update={"accelerator": "H100"}))
    )
    assert sky["num_nodes"] == 2
    assert sky["resources"]["accelerators"] == "H100:8"
    assert sky["resources"]["cpus"] == "32+" and sky["resources"]["memory"] == "500+"
    assert sky["resources"]["job_recovery"]["recover_on_exit_codes"] == [75]
    run = sky["run"]
    assert 'HEAD_IP=$(echo "$SKYPILOT_NODE_IPS" | head -n 1)' in run
    assert "torchrun --nnodes=$SKYPILOT_NUM_NODES --nproc_per_node=8" in run
    assert "--node_rank=$SKYPILOT_NODE_RANK --master_addr=$HEAD_IP" in run
    assert "-m merit.cli train /runs/r/branches/launch.yaml" in run and '"$BRANCH"' in run


def test_skypilot_without_accelerator_requests_none():
    sky = yaml.safe_load(print_commands("skypilot", JOBS, BRANCH, 4, BIG))
    assert "accelerators" not in sky["resources"] and "A100" not in str(sky)
    plain = yaml.safe_load(print_commands("skypilot", JOBS, BRANCH, 4))
    assert plain["num_nodes"] == 1 and "accelerators" not in plain["resources"]
    assert "torchrun" not in plain["run"] and plain["run"].startswith("merit train ")


@pytest.mark.parametrize(
    "bad", [{"nodes": 0}, {"gpus_per_node": -1}, {"time": "12h"}, {"memory_gb": 0}, {"gpu": 8}]
)
def test_nonsense_resources_are_refused(bad):
    with pytest.raises(ValidationError):
        RuntimeConfig(resources=bad)


def test_cli_prints_a_multi_node_slurm_script(tmp_path, tiny_base, capsys):
    # configs/example-3b.yaml names a hub model and data files that are not here, so the CLI
    # path runs on the tiny config the integration tests use.
    specs = write_mixture(tmp_path / "mixture", n=20)
    run = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", run, specs, tiny_base)
    res = ["runtime.resources.nodes=2", "runtime.resources.gpus_per_node=8"]
    assert main(["train", str(cfg), "--print-commands", "slurm", *res, f"run_dir={run}"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gres=gpu:8\n" in script
    assert "srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8" in script
    assert "-m merit.cli train" in script and '--branch "$SLURM_ARRAY_TASK_ID"' in script
    launch = yaml.safe_load((run / "branches" / "launch.yaml").read_text())
    assert launch["runtime"]["resources"]["nodes"] == 2  # the branches read the same resources
    assert not (run / "branches" / "branch-0").exists()  # printing trains nothing
