"""Tests for merit.data.bigbench: the BIG-bench selection rule and its verified download."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from merit.data import bigbench
from merit.data.bigbench import fetch_bigbench, select_bigbench_tasks
from merit.data.formats import (
    load_dataset,
)
from merit.fetch import FetchError

# --------------------------------------------------------------------------- selection / fetch


def synthetic_task(n: int, input_len: int = 10, name: str = "t") -> dict[str, Any]:
    return {
        "name": name,
        "examples": [{"input": f"{i:0{input_len}d}", "target": str(i)} for i in range(n)],
    }


def test_select_bigbench_tasks_rule() -> None:
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    long_median = synthetic_task(300, input_len=10)
    for ex in long_median["examples"][:151]:  # 151 of 300 inputs are long -> median is long
        ex["input"] = "x" * 601
    at_limit = synthetic_task(300, input_len=10)
    for ex in at_limit["examples"]:
        ex["input"] = "x" * 600
    members = {
        prefix + "small/task.json": synthetic_task(249),
        prefix + "enough/task.json": synthetic_task(250),
        prefix + "long/task.json": long_median,
        prefix + "at_limit/task.json": at_limit,
        prefix + "family/task.json": synthetic_task(300),  # has subtasks: not a leaf
        prefix + "family/sub_a/task.json": synthetic_task(400),
        prefix + "family/sub_b/task.json": synthetic_task(10),
        prefix + "family_x/task.json": synthetic_task(300),  # a name prefix is not a parent
        prefix + "no_examples/task.json": {"name": "no_examples", "subtasks": []},
    }
    selected = select_bigbench_tasks(members)
    assert list(selected) == sorted(
        prefix + p
        for p in (
            "enough/task.json",
            "at_limit/task.json",
            "family/sub_a/task.json",
            "family_x/task.json",
        )
    )
    assert selected[prefix + "enough/task.json"] is members[prefix + "enough/task.json"]
    assert bigbench._output_name(prefix + "family/sub_a/task.json") == "family__sub_a.json.gz"
    assert bigbench._output_name(prefix + "enough/task.json") == "enough.json.gz"


def test_select_bigbench_tasks_caps_at_1000_reproducibly() -> None:
    path = "bigbench/benchmark_tasks/fam/sub/task.json"
    task = synthetic_task(1500)
    first = select_bigbench_tasks({path: task})[path]["examples"]
    assert len(task["examples"]) == 1500  # the input is not modified
    assert first == select_bigbench_tasks({path: task})[path]["examples"]
    ids = [int(e["target"]) for e in first]
    assert len(ids) == 1000 and ids == sorted(ids)  # a subset, original order kept
    # Seeded by "FAMILY/SUBTASK": the rule that reproduces the shared BIG-bench files.
    assert ids == sorted(random.Random("fam/sub").sample(range(1500), 1000))
    assert select_bigbench_tasks({"benchmark_tasks/fam/sub/task.json": task}) != {}
    exactly = synthetic_task(1000)
    assert select_bigbench_tasks({path: exactly})[path] is exactly


def make_sdist(path: Path, tasks: dict[str, dict[str, Any]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for rel, task in tasks.items():
            raw = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_fetch_bigbench_extracts_selected_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = make_sdist(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            "fam/task.json": {"name": "fam", "subtasks": []},
            "fam/one/task.json": synthetic_task(1200, name="fam:one"),
            "fam/two/task.json": synthetic_task(20),
            "solo/task.json": synthetic_task(260, name="solo"),
            "solo/README.md": {"not": "a task"},
        },
    )
    monkeypatch.setattr(bigbench, "_download_sdist", lambda cache_dir: tarball)
    out = fetch_bigbench(tmp_path)
    assert out == tmp_path / "bigbench"
    assert sorted(p.name for p in out.iterdir()) == ["fam__one.json.gz", "solo.json.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigbench"]  # no temp dir, sdist removed
    capped = json.loads(gzip.decompress((out / "fam__one.json.gz").read_bytes()))
    assert capped["name"] == "fam:one" and len(capped["examples"]) == 1000
    assert len(load_dataset("fam__one", out / "fam__one.json.gz").examples) == 1000

    def no_download(cache_dir: Path) -> Path:
        raise AssertionError("must not download when the folder has tasks")

    monkeypatch.setattr(bigbench, "_download_sdist", no_download)
    assert fetch_bigbench(tmp_path) == out


class FakeResponse(io.BytesIO):
    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_download_sdist_verifies_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"fake sdist bytes"
    url = "https://files.example/bigbench-1.0.0.tar.gz"

    def serve(sha: str) -> Callable[..., FakeResponse]:
        def urlopen(target: str, timeout: float = 0) -> FakeResponse:
            if target.endswith("/json"):
                meta = {
                    "urls": [
                        {
                            "filename": "bigbench-1.0.0.tar.gz",
                            "packagetype": "sdist",
                            "url": url,
                            "size": len(payload),
                            "digests": {"sha256": sha},
                        }
                    ]
                }
                return FakeResponse(json.dumps(meta).encode())
            assert target == url
            return FakeResponse(payload)

        return urlopen

    monkeypatch.setattr(urllib.request, "urlopen", serve(hashlib.sha256(payload).hexdigest()))
    got = bigbench._download_sdist(tmp_path)
    assert got == tmp_path / "bigbench-1.0.0.tar.gz" and got.read_bytes() == payload
    got.unlink()
    got.with_name(got.name + ".sha256").unlink()  # merit.fetch's record of the verified digest
    monkeypatch.setattr(urllib.request, "urlopen", serve("0" * 64))
    with pytest.raises(FetchError, match="sha256"):
        bigbench._download_sdist(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the bad download is not left behind
