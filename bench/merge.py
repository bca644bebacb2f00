"""Benchmark: `merit merge` vs mergekit 0.1.5's linear merge vs the disk floor.

    python bench/merge.py            # builds/reuses everything it needs, prints the figures

Four bf16 checkpoints of a 267M-parameter Llama (3 safetensors shards each, ~536 MB) are built
once under ``/tmp/merit-bench-merge`` and reused (a stamp file records how they were built).
mergekit 0.1.5 is installed into its own virtual environment (default ``/tmp/mergekit-venv``,
made with ``--system-site-packages`` so that it reuses this torch; pip is checked not to touch
torch) so it cannot disturb merit's dependencies. The one command above creates it if missing;
by hand it is::

    python -m venv --system-site-packages /tmp/mergekit-venv &&
        /tmp/mergekit-venv/bin/pip install mergekit==0.1.5

Every contender runs in its own child process, page cache warm, weights .4/.3/.2/.1:

* floor: read every input file once and write one file as large as the output (a cat-like
  loop over a reused 16 MiB buffer), timed inside the child;
* ``merit merge`` end to end (the CLI, wall time of the process);
* merit in-process: ``merge_checkpoints`` timed inside a child after ``import merit.merge.streaming``
  (that is: interpreter start-up and imports excluded);
* ``mergekit-yaml`` end to end (linear, normalize false: the weights already sum to one).

Peak anonymous memory is RssAnon of the child sampled every 2 ms from /proc/PID/status (VmHWM
would count the page-cache pages the inputs are mmap-ed from). Each contender runs ``--repeats``
times interleaved; the best run of each is reported, as a ratio to the floor's best. Finally
merit's output is compared with mergekit's bit for bit and with Σ w_k θ_k computed in fp64.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path("/tmp/merit-bench-merge")
VENV = Path("/tmp/mergekit-venv")
MERGEKIT = "mergekit==0.1.5"
WEIGHTS = [0.4, 0.3, 0.2, 0.1]
SHARDS = 3
# 267.9M parameters: the Llama geometry of the issue (bf16: 536 MB per checkpoint).
LLAMA = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2752,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "tie_word_embeddings": False,
}
STAMP = {"llama": LLAMA, "shards": SHARDS, "seed": 0, "noise": 0.002, "version": 2}


# -- checkpoints ---------------------------------------------------------------------------------
def build_checkpoints(root: Path, k: int) -> list[Path]:
    """K bf16 checkpoints θ_k = θ + small noise (fine-tunes of one model), 3 shards each."""
    dirs = [root / f"ckpt-{i}" for i in range(k)]
    stamp = root / "stamp.json"
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == {**STAMP, "k": k}
        and all((d / "model.safetensors.index.json").is_file() for d in dirs)
    ):
        return dirs
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**LLAMA, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(STAMP["seed"])
    common = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            common[name] = torch.ones(shape)
        else:
            common[name] = torch.randn(shape, generator=gen) * 0.02
    total = sum(t.numel() for t in common.values()) * 2
    for d in dirs:
        print(f"building {d} ({total / 1e6:.0f} MB)", file=sys.stderr)
        d.mkdir()
        config.save_pretrained(d)
        names, shards, size = list(shapes), [[]], 0
        for name in names:
            nbytes = common[name].numel() * 2
            if shards[-1] and size + nbytes > total / SHARDS and len(shards) < SHARDS:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        weight_map = {}
        for j, shard in enumerate(shards, 1):
            file = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                noise = torch.randn(shapes[name], generator=gen) * STAMP["noise"]
                tensors[name] = (common[name] + noise).bfloat16()
                weight_map[name] = file
            save_file(tensors, d / file, metadata={"format": "pt"})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    stamp.write_text(json.dumps({**STAMP, "k": k}))
    return dirs


# -- mergekit's environment ----------------------------------------------------------------------
def ensure_mergekit(venv: Path) -> Path:
    """The venv's python with mergekit 0.1.5, created if missing, sharing this torch.

    pip's plan is checked first: if it would replace torch or transformers, mergekit is
    installed with --no-deps plus those of its dependencies that are missing.
    """
    python = venv / "bin" / "python"
    probe = "import importlib.metadata as m, torch; print(m.version('mergekit'), torch.__version__)"
    import torch

    def installed() -> bool:
        if not python.is_file():
            return False
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.split() == [
            MERGEKIT.split("==")[1],
            torch.__version__,
        ]

    if installed():
        return python
    print(f"installing {MERGEKIT} into {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    report = subprocess.run(
        [*pip, "--dry-run", "--report", "-", MERGEKIT], capture_output=True, text=True, check=True
    )
    plan = [i["metadata"]["name"].lower() for i in json.loads(report.stdout)["install"]]
    heavy = {"torch", "transformers", "accelerate", "safetensors", "tokenizers"}
    if heavy & set(plan):
        subprocess.run([*pip, "--no-deps", MERGEKIT], check=True)
        light = [n for n in plan if n not in heavy and n != "mergekit"]
        if light:
            subprocess.run([*pip, "--no-deps", *light], check=True)
    else:
        subprocess.run([*pip, MERGEKIT], check=True)
    if not installed():
        raise SystemExit(f"{venv}: {MERGEKIT} did not install next to torch {torch.__version__}")
    return python


# -- measuring a child process -------------------------------------------------------------------
def measure(cmd: list, env: dict | None = None) -> dict:
    """Wall time of a child process, its peak RssAnon (sampled every 2 ms) and VmHWM, and the
    last line of its stdout parsed as JSON when it is JSON."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    peak = {"RssAnon": 0, "VmHWM": 0}

    def sample() -> None:
        status = Path(f"/proc/{child.pid}/status")
        while child.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in peak:
                        peak[key] = max(peak[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = child.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{cmd[0]} ... failed ({child.returncode}):\n{err[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result = {"wall": wall, "cpu": cpu, "anon": peak["RssAnon"], "hwm": peak["VmHWM"]}
    lines = out.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
    return result


FLOOR = """
import json, os, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
inputs, out, size = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
buf = bytearray(16 * 1024**2)
view = memoryview(buf)
for path in inputs:  # read every input once, like cat
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
with open(out, "wb", buffering=0) as f:  # write one output-sized file
    while size > 0:
        size -= f.write(view[: min(size, len(buf))])
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_inside": cpu() - c0}))
"""

IN_PROCESS = """
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.perf_counter()
from merit.merge.streaming import merge_checkpoints
t1, c1 = time.perf_counter(), cpu()
ckpts, weights, out, cache = json.loads(sys.argv[1])
merge_checkpoints(
    ckpts[0], ckpts, weights, out, base_is_theta0=False, hash_cache=cache, progress=False
)
print(json.dumps({"seconds": time.perf_counter() - t1, "import": t1 - t0, "cpu_inside": cpu() - c1}))
"""


def mergekit_config(dirs: list[Path], path: Path) -> Path:
    import yaml

    config = {
        "merge_method": "linear",
        "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs, WEIGHTS)],
        # The weights sum to one: no normalisation (a division by the fp32 weight sum would
        # add a second rounding in mergekit).
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(config))
    return path


# -- checking the outputs ------------------------------------------------------------------------
def tensors_of(path: Path) -> dict:
    """name -> (file, key) of a safetensors checkpoint directory."""
    files = sorted(path.glob("*.safetensors"))
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle)
                out[k] = f
    return out


def compare(merit_dir: Path, mergekit_dir: Path, dirs: list[Path]) -> dict:
    """Bitwise equality with mergekit; distance to Σ w_k θ_k computed in fp64, in bf16 ulps."""
    import torch
    from safetensors import safe_open

    ours, theirs = tensors_of(merit_dir), tensors_of(mergekit_dir)
    inputs = [tensors_of(d) for d in dirs]
    differ, names_equal = 0, ours.keys() == theirs.keys()
    numel = within = ties = cancellations = worse = 0
    max_ulps = 0.0
    for name, f in ours.items():
        with safe_open(f, framework="pt") as h:
            got = h.get_tensor(name)
        if name in theirs:
            with safe_open(theirs[name], framework="pt") as h:
                other = h.get_tensor(name)
            differ += int((got.view(torch.int16) != other.view(torch.int16)).sum())
        exact = torch.zeros(got.shape, dtype=torch.float64)
        magnitude = torch.zeros(got.shape, dtype=torch.float64)
        for w, tensors in zip(WEIGHTS, inputs):
            with safe_open(tensors[name], framework="pt") as h:
                x = h.get_tensor(name).double()
            exact.add_(x, alpha=w)
            magnitude.add_(x.abs(), alpha=w)
        g = got.double()
        # The bf16 ulp where the exact sum lies: values in [2^(e-1), 2^e) have ulp 2^(e-8).
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.abs().clamp_min(1e-38))[1] - 8)
        err = (g - exact).abs()
        beyond = err > ulp / 2
        # fp32 weights and one fp32 rounding per term: the fp32 sum is within `slack` of exact.
        slack = (len(WEIGHTS) + 1) * 2.0**-24 * magnitude
        explained = beyond & (err <= ulp / 2 + slack)
        # A tie: the exact sum within a small fraction of an ulp of a rounding midpoint, so the
        # fp32 sum may fall on either side. Otherwise the slack is large against the result's
        # ulp: cancellation (|Σ w θ| ≪ Σ |w θ|), where no fp32 accumulation is correctly rounded.
        tie = explained & (slack < ulp / 8)
        numel += got.numel()
        within += int((~beyond).sum())
        ties += int(tie.sum())
        cancellations += int((explained & ~tie).sum())
        worse += int((beyond & ~explained).sum())
        max_ulps = max(max_ulps, float((err / ulp)[~beyond | tie].max()))
    return {
        "names_equal": names_equal,
        "elements": numel,
        "bits_differ_from_mergekit": differ,
        "within_half_ulp": within,
        "ties": ties,
        "cancellations": cancellations,
        "worse": worse,
        "max_ulps": max_ulps,
    }


# -- the benchmark -------------------------------------------------------------------------------
FLOOR_ = "floor (read inputs, write output)"
COLD = "merit merge CLI, cold (every input hashed)"
WARM = "merit merge CLI, input hashes cached"
IN_COLD = "merit in-process, cold"
IN_WARM = "merit in-process, input hashes cached"
MERGEKIT_ = "mergekit-yaml 0.1.5 linear"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each contender (best kept)")
    ap.add_argument("--venv", type=Path, default=VENV, help="mergekit's environment")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkpoints and outputs")
    ap.add_argument("--build-only", action="store_true", help="build the checkpoints and stop")
    ap.add_argument("--skip-check", action="store_true", help="skip the bitwise/fp64 check")
    ap.add_argument(
        "--no-mergekit",
        action="store_true",
        help="merit and the floor only (where mergekit cannot be installed, e.g. offline)",
    )
    args = ap.parse_args()
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < 6e9 and not (root / "stamp.json").is_file():
        raise SystemExit(f"{root}: needs ~6 GB free, {free / 1e9:.1f} GB available")
    dirs = build_checkpoints(root, len(WEIGHTS))
    if args.build_only:
        return
    python = None if args.no_mergekit else ensure_mergekit(args.venv)
    config = mergekit_config(dirs, root / "mergekit.yml")
    inputs = [str(f) for d in dirs for f in sorted(d.glob("*.safetensors"))]
    out_size = sum(Path(f).stat().st_size for f in dirs[0].glob("*.safetensors"))
    merit_cli = shutil.which("merit")
    merit = [merit_cli] if merit_cli else [sys.executable, "-m", "merit.cli"]
    # The CLI's hash cache is $MERIT_CACHE/sha256; the in-process runs use the same one.
    cache_env = {"MERIT_CACHE": str(root)}
    argv = ["merge", "--weights", ",".join(map(str, WEIGHTS)), *map(str, dirs)]

    def in_process(out: Path, cache: Path | None) -> dict:
        spec = [[str(d) for d in dirs], WEIGHTS, str(out), cache and str(cache)]
        return measure([sys.executable, "-c", IN_PROCESS, json.dumps(spec)])

    contenders = {
        FLOOR_: lambda o: measure(
            [sys.executable, "-c", FLOOR, json.dumps(inputs), o.with_suffix(".bin"), out_size]
        ),
        COLD: lambda o: measure([*merit, *argv, "--out", o, "--no-hash-cache"]),
        WARM: lambda o: measure([*merit, *argv, "--out", o], env=cache_env),
        IN_COLD: lambda o: in_process(o, None),
        IN_WARM: lambda o: in_process(o, root / "sha256"),
        MERGEKIT_: lambda o: measure(
            [python.parent / "mergekit-yaml", config, o, "--no-copy-tokenizer", "--quiet"]
        ),
    }
    if python is None:
        del contenders[MERGEKIT_]
    outs = {name: root / f"out-{i}" for i, name in enumerate(contenders)}

    def run(name: str) -> dict:
        out = outs[name]
        shutil.rmtree(out, ignore_errors=True)
        out.with_suffix(".bin").unlink(missing_ok=True)
        return contenders[name](out)

    # Warm the page cache (the floor reads every input) and the hash cache.
    run(FLOOR_)
    run(IN_WARM)
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(args.repeats):  # interleaved, so that load from others hits all alike
        for name in contenders:
            m = run(name)
            results[name].append(m)
            inside = f", inside {m['seconds']:.2f} s" if "seconds" in m else ""
            print(
                f"run {r + 1}/{args.repeats}: {name}: wall {m['wall']:.2f} s{inside}, "
                f"CPU {m.get('cpu_inside', m['cpu']):.2f} s",
                file=sys.stderr,
            )
    outs[FLOOR_].with_suffix(".bin").unlink(missing_ok=True)

    # Best of the runs for each time (the least disturbed by other load), worst for memory.
    best = {
        name: {key: (max if key in ("anon", "hwm") else min)(r[key] for r in rs) for key in rs[0]}
        for name, rs in results.items()
    }
    floor = best[FLOOR_]["seconds"]
    n_shards = len(inputs) // len(dirs)
    print(
        f"\n{len(dirs)} bf16 checkpoints of a 267.9M-parameter Llama ({n_shards} shards, "
        f"{out_size / 1e6:.0f} MB each), weights {WEIGHTS}; page cache warm; best of "
        f"{args.repeats} interleaved runs; times as ratios to the floor's, measured inside its "
        'process ("inside": interpreter start-up and imports excluded); CPU time is user + '
        "system of all threads, less sensitive to other load than wall time\n"
    )
    fcpu = best[FLOOR_]["cpu_inside"]
    print(f"{'':40} {'wall / floor':^21} {'CPU time / floor':^21} {'peak anon':>10}")
    print(f"{'':40} {'end to end':>10} {'inside':>10} {'end to end':>10} {'inside':>10}")
    for name, m in best.items():
        inside = f"{m['seconds'] / floor:.2f}" if "seconds" in m else "-"
        cpu_inside = f"{m['cpu_inside'] / fcpu:.2f}" if "cpu_inside" in m else "-"
        print(
            f"{name:40} {m['wall'] / floor:10.2f} {inside:>10} {m['cpu'] / fcpu:10.2f} "
            f"{cpu_inside:>10} {m['anon'] / 2**20:6.0f} MiB"
        )
    cold, warm = best[COLD], best[WARM]
    print(
        f"\n{os.cpu_count()} CPUs; merit in-process / floor: {best[IN_COLD]['seconds'] / floor:.2f} "
        f"cold, {best[IN_WARM]['seconds'] / floor:.2f} with cached input hashes (target <= 2); "
        f"CPU time {best[IN_COLD]['cpu_inside'] / fcpu:.2f} and "
        f"{best[IN_WARM]['cpu_inside'] / fcpu:.2f}; "
        "interpreter start-up and `import merit.merge.streaming` "
        f"({best[IN_COLD]['import'] / floor:.2f} floors) excluded by timing inside the child"
    )
    if python is None:
        print(f"merit's peak anonymous memory: {cold['anon'] / 2**20:.0f} MiB (mergekit not run)")
        return
    mk = best[MERGEKIT_]
    print(
        f"merit vs mergekit, end to end: {mk['wall'] / cold['wall']:.2f}x faster cold, "
        f"{mk['wall'] / warm['wall']:.2f}x with cached input hashes (target >= 2); CPU time "
        f"{mk['cpu'] / cold['cpu']:.2f}x and {mk['cpu'] / warm['cpu']:.2f}x less"
    )
    print(
        f"peak anonymous memory, merit / mergekit: {cold['anon'] / mk['anon']:.2f} "
        f"({cold['anon'] / 2**20:.0f} / {mk['anon'] / 2**20:.0f} MiB; target <= 0.5); "
        f"VmHWM, which also counts mapped page cache: {cold['hwm'] / 2**20:.0f} / "
        f"{mk['hwm'] / 2**20:.0f} MiB"
    )

    if args.skip_check:
        return
    c = compare(outs[COLD], outs[MERGEKIT_], dirs)
    print(
        f"\nmerit vs mergekit: same tensor names: {c['names_equal']}; "
        f"{c['bits_differ_from_mergekit']} of {c['elements']} elements differ"
    )
    print(
        f"merit vs Σ w_k θ_k in fp64: {c['within_half_ulp']} elements within half a bf16 ulp; "
        f"beyond it {c['ties']} at ties (the exact sum within the fp32 error of a rounding "
        f"midpoint), {c['cancellations']} in cancellations (|Σ w θ| ≪ Σ |w θ|, the fp32 error "
        f"bound over an eighth of the result's ulp), {c['worse']} otherwise; largest error "
        f"outside cancellations {c['max_ulps']:.4f} ulp"
    )
    exact = c["names_equal"] and c["bits_differ_from_mergekit"] == 0 and c["worse"] == 0
    print("bit-exact vs mergekit and within half an ulp except at ties:", "yes" if exact else "NO")


if __name__ == "__main__":
    main()
