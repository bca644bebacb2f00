"""Benchmark: K=2 branches in parallel vs one after another, and Ray's overhead.

    python bench/branches.py            # ~5 min on 2 CPU cores; prints the figures

A small Llama θ0 (built from a ``LlamaConfig``, with merit's locally trained ChatML tokenizer) and
8 BIG-bench multiemo tasks of similar length (``$MERIT_BIGBENCH`` or ../shared/data/bigbench),
planned once into K=2 groups under ``/tmp/merit-bench-branches``. Then the same two branches are
trained from scratch, each time through the real CLI (``merit train CONFIG --launcher ...``),
every branch a subprocess with its own thread budget:

* sequential, 1 thread per branch (``--parallel 1 runtime.threads=1``);
* sequential, 2 threads per branch (the same total threads as the parallel run);
* parallel, 2 branches at once with 1 thread each (``--parallel 2 runtime.threads=1``);
* Ray, 2 tasks of 1 CPU with 1 thread each on a local ``ray.init()``.

Wall times are of the whole ``merit train`` command (process starts and model loading
included). Reported: the speed-up of parallel over each sequential run (target ≥ 1.7× over the
1-thread one), and Ray's overhead per branch, (Ray − local parallel) / K. The final weights of
every launcher are checked to be bitwise equal: launchers change how, never what.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path("/tmp/merit-bench-branches")


def bigbench_dir() -> Path:
    env = os.environ.get("MERIT_BIGBENCH")
    for p in (env, Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench"):
        if p and Path(p).is_dir():
            return Path(p)
    sys.exit("bench/branches.py: no BIG-bench folder ($MERIT_BIGBENCH or ../shared/data/bigbench)")


def build_base(path: Path, data: Path, tasks: list[str], hidden: int, layers: int) -> Path:
    """θ0: an untrained Llama of the given size with merit's ChatML tokenizer (timing only)."""
    if (path / "config.json").is_file():
        return path
    from merit.config import DemoBaseConfig
    from merit.data.formats import load_dataset
    from merit.demo import build_model, build_tokenizer, example_texts

    texts = example_texts(
        ex
        for t in tasks
        for ex in load_dataset(t, str(data / f"{t}.json.gz"), "bigbench").examples[:200]
    )
    tok = build_tokenizer(texts, 4096)
    cfg = DemoBaseConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers)
    build_model(cfg, tok, 256, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def merit(*args: str) -> float:
    """Wall time of one ``merit`` command (it must succeed)."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "merit.cli", *args], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        sys.exit(f"merit {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def weights_digest(run: Path) -> list[str]:
    return [
        hashlib.sha256(
            (run / f"branches/branch-{k}/model/model.safetensors").read_bytes()
        ).hexdigest()
        for k in (0, 1)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train", type=int, default=96, help="train examples per task")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    # Ray ≥ 2.5x writes an auth token to ~/.ray for a local instance unless told not to.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    data = bigbench_dir()
    # Eight sentence-level multiemo subtasks (same format, prompts of 235-272 characters on
    # average), so that both branches carry nearly the same work whatever the plan: the figure
    # measures the launcher, not the plan's token imbalance (K branches in parallel can never
    # beat Σ work / max work; that ceiling is printed too).
    tasks = [
        f"multiemo__{domain}_sentence_{lang}"
        for domain in ("hotels", "medicine", "products", "reviews")
        for lang in ("en", "pt")
    ]
    ROOT.mkdir(parents=True, exist_ok=True)
    base = build_base(
        ROOT / f"base-{args.hidden}x{args.layers}-multiemo", data, tasks, args.hidden, args.layers
    )
    cfg = {
        "run_dir": str(ROOT / "run"),
        "model": {"path": str(base), "max_length": 256},
        "data": {
            "datasets": [
                {"name": t, "path": str(data / f"{t}.json.gz"), "format": "bigbench"} for t in tasks
            ],
            "split": {"eval": 8, "calibration": 16, "train": args.train},
        },
        "calibration": {"batch_size": 16, "sketch_dim": 65536},
        "planning": {"rank": 1},
        "training": {"batch_size": 16, "epochs": args.epochs, "baselines": []},
        "runtime": {"device": "cpu", "progress": False},
    }
    config = ROOT / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = ROOT / "run"
    print(
        f"planning {len(tasks)} BIG-bench tasks into K=2 groups (θ0: {args.hidden}×{args.layers} Llama)"
    )
    merit("plan", str(config))
    tokens = [g["tokens"] for g in json.loads((run / "plan.json").read_text())["groups"]]
    ceiling = sum(tokens) / max(tokens)
    print(f"  branch tokens {tokens}: parallel speed-up ceiling Σ/max = {ceiling:.2f}×")

    def fresh() -> None:
        shutil.rmtree(run / "branches", ignore_errors=True)

    runs = [
        ("sequential, 1 thread/branch", ["--parallel", "1", "runtime.threads=1"]),
        ("sequential, 2 threads/branch", ["--parallel", "1", "runtime.threads=2"]),
        ("parallel 2 × 1 thread", ["--parallel", "2", "runtime.threads=1"]),
    ]
    if not args.no_ray:
        runs.append(
            (
                "Ray, 2 tasks × 1 CPU",
                ["--launcher", "ray", "runtime.threads=1", "runtime.branch_cpus=1"],
            )
        )
    times, digests = {}, {}
    for name, extra in runs:
        fresh()
        times[name] = merit("train", str(config), *extra)
        digests[name] = weights_digest(run)
        print(f"  {name:<30} {times[name]:7.1f} s")
    par = times["parallel 2 × 1 thread"]
    print()
    print(f"K=2 branches, {os.cpu_count()} CPU cores, one `merit train` each (wall time):")
    for name in ("sequential, 1 thread/branch", "sequential, 2 threads/branch"):
        print(f"  parallel speed-up over {name}: {times[name] / par:.2f}×")
    print(f"  (ceiling set by the branches' token imbalance: {ceiling:.2f}×)")
    if not args.no_ray:
        ray = times["Ray, 2 tasks × 1 CPU"]
        print(
            f"  Ray overhead: {ray - par:.1f} s in all, {(ray - par) / 2:.1f} s per branch "
            f"(Ray / local parallel = {ray / par:.2f}×)"
        )
    one_thread = [d for name, d in digests.items() if "2 threads" not in name]
    same = len({tuple(d) for d in one_thread}) == 1
    print(f"  final weights bitwise equal across the 1-thread launchers: {same}")


if __name__ == "__main__":
    main()
