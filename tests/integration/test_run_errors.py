"""Common mistakes end in one line on stderr and exit code 2, before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_run_config
from merit.cli import main


def _config(tmp_path: Path, specs, base, **sections) -> Path:
    return write_run_config(tmp_path / "run.yaml", tmp_path / "run", specs, base, **sections)


def _cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "merit.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **env},
    )


def _one_line(res: subprocess.CompletedProcess, *words: str) -> None:
    err = res.stderr.strip()
    assert res.returncode == 2, res.stderr
    assert err.startswith("merit: error:") and "\n" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize(
    ("override", "words"),
    [
        # Without "./" a relative path is a hub id: not cached, and the hub cannot be reached.
        ("model.path=foo/bar", ["model.path=foo/bar", "not in the Hugging Face cache"]),
        ("model.path=./nowhere/model", ["model.path=./nowhere/model", "no such directory"]),
        ("planning.rank=[1", ["planning.rank", "not valid YAML"]),
        ("runtime.device=cuda", ["runtime.device=cuda", "CUDA device"]),
    ],
)
def test_bad_setting_writes_nothing(tmp_path, mixture_specs, tiny_base, override, words):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    _one_line(_cli("data", str(cfg), override, HF_HUB_OFFLINE="1"), *words)
    assert not (tmp_path / "run").exists()  # the corrected command is not refused later
    assert main(["data", str(cfg)]) == 0  # the corrected command works


def test_unwritable_run_dir(tmp_path, mixture_specs, tiny_base):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a folder must go: unwritable even for root
    _one_line(_cli("data", str(cfg), f"run_dir={blocker / 'run'}"), "cannot write there")


def test_ray_launcher_without_ray(tmp_path, mixture_specs, tiny_base, monkeypatch, capsys):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["train", str(cfg), "--launcher", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs Ray" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_bigbench_fetch_offline(tmp_path, tiny_base):
    cfg = write_run_config(tmp_path / "run.yaml", tmp_path / "run", [], tiny_base)
    env = {
        "MERIT_CACHE": str(tmp_path / "cache"),
        "MERIT_BIGBENCH": "",
        # No network: every request goes to a closed port on this machine.
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    res = _cli("data", str(cfg), "data.bigbench=auto", cwd=tmp_path, **env)
    _one_line(res, "cannot fetch bigbench", "MERIT_BIGBENCH")
    assert not (tmp_path / "run").exists()


def test_unknown_training_extra_key_writes_nothing(tmp_path, mixture_specs, tiny_base):
    cfg = _config(tmp_path, mixture_specs, tiny_base)
    res = _cli("plan", str(cfg), "training.extra={bogus: 1}")
    _one_line(res, "training.extra.bogus: not a field of trl's SFTConfig")
    assert not (tmp_path / "run").exists()
