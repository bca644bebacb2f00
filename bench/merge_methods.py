"""Benchmark: merit's task_arithmetic, ties and model_stock vs mergekit 0.1.5's, and the disk floor.

    python bench/merge_methods.py [--repeats 2] [--density 0.3] [--methods ties model_stock]

The checkpoints of ``bench/merge.py`` (four bf16 fine-tunes of a 267.9M-parameter Llama, built
once under ``/tmp/merit-bench-merge``, mergekit in its own venv): the first is θ0, the other three
its branches, weights .5/.3/.2. Per method, each contender in its own child process, page cache
warm, best of ``--repeats`` interleaved runs, as ratios to the floor (read every input once, θ0
included, write one output-sized file):

* ``merit merge --method M --base θ0 ...`` end to end, input hashes cached;
* merit in-process (``merge_checkpoints`` after its imports);
* ``mergekit-yaml`` with the same method and parameters, computing in float32 (``dtype:
  float32``, ``out_dtype: bfloat16``: one rounding, as merit does).

Then merit's output against mergekit's: the elements whose bits differ, and for each tool the
elements within half a bf16 ulp of the merge computed in float64 (correctly rounded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("merge_bench", Path(__file__).with_name("merge.py"))
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)

WEIGHTS = [0.5, 0.3, 0.2]

IN_PROCESS = """
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
from merit.memory import keep_freed_memory
from merit.merge.streaming import merge_checkpoints
keep_freed_memory()  # as `merit merge` does
t1, c1 = time.perf_counter(), cpu()
base, ckpts, weights, out, method, params, cache = json.loads(sys.argv[1])
merge_checkpoints(base, ckpts, weights, out, method=method, params=params, hash_cache=cache,
                  progress=False)
print(json.dumps({"seconds": time.perf_counter() - t1, "cpu_inside": cpu() - c1}))
"""


def mergekit_config(base: Path, dirs: list[Path], method: str, density: float, path: Path):
    import yaml

    params = {"weight": None, **({"density": density} if method == "ties" else {})}
    models = [
        {"model": str(d), "parameters": {**params, "weight": w}} for d, w in zip(dirs, WEIGHTS)
    ]
    if method == "model_stock":  # the weights take no part
        models = [{"model": str(d)} for d in dirs]
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": {} if method == "model_stock" else {"normalize": method == "ties"},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _exact(method: str, density: float, theta0, thetas):
    """The merge in float64 from the stored values: the reference both outputs round."""
    import torch

    from merit.merge.methods import get_method

    if method == "task_arithmetic":
        return theta0 + sum(w * (t - theta0) for w, t in zip(WEIGHTS, thetas))
    m = get_method(method)
    params = m.validate(WEIGHTS, {"density": density} if method == "ties" else {})
    flat0, flats = theta0.flatten(), [t.flatten() for t in thetas]
    stats = m.statistics(flat0, flats, tuple(WEIGHTS), params) if m.statistics else None
    out = m.merge(flat0.clone(), [t.clone() for t in flats], tuple(WEIGHTS), params, stats)
    return out.reshape(theta0.shape).to(torch.float64)


def differences(ours: Path, theirs: Path, base: Path, dirs, method: str, density: float) -> dict:
    """Elements whose bits differ between the outputs, and of each, the elements within half a
    bf16 ulp of the float64 merge (correctly rounded)."""
    import torch
    from safetensors import safe_open

    def read(where: dict, name: str):
        with safe_open(where[name], framework="pt") as h:
            return h.get_tensor(name)

    a, b = mb.tensors_of(ours), mb.tensors_of(theirs)
    sources = [mb.tensors_of(d) for d in [base, *dirs]]
    assert a.keys() == b.keys(), "tensor names differ"
    counts = {"elements": 0, "differ": 0, "merit_rounded": 0, "mergekit_rounded": 0}
    for name in a:
        x, y = read(a, name), read(b, name)
        theta0, *thetas = (read(s, name).double() for s in sources)
        exact = _exact(method, density, theta0, thetas)
        ulp = torch.ldexp(
            torch.ones_like(exact), torch.frexp(exact.abs().clamp_min(2.0**-126))[1] - 8
        )
        counts["elements"] += x.numel()
        counts["differ"] += int((x.view(torch.int16) != y.view(torch.int16)).sum())
        counts["merit_rounded"] += int(((x.double() - exact).abs() <= ulp / 2).sum())
        counts["mergekit_rounded"] += int(((y.double() - exact).abs() <= ulp / 2).sum())
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--root", type=Path, default=mb.ROOT)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    args = ap.parse_args()
    root = args.root
    base, *dirs = mb.build_checkpoints(root, 4)
    python = mb.ensure_mergekit(mb.VENV)
    for method in args.methods:
        one_method(method, args.density, args.repeats, root, base, dirs, python)


def one_method(method: str, density: float, repeats: int, root: Path, base: Path, dirs, python):
    """Time merit and mergekit on ``method``; print the ratios and the output differences."""
    inputs = [str(f) for d in [base, *dirs] for f in sorted(d.glob("*.safetensors"))]
    out_size = sum(Path(f).stat().st_size for f in base.glob("*.safetensors"))
    merit = [sys.executable, "-m", "merit.cli", "merge", "--base", str(base)]
    merit += ["--weights", ",".join(map(str, WEIGHTS))]
    cache = {"MERIT_CACHE": str(root)}
    params = {"density": density} if method == "ties" else {}
    flags = [f"--{k}={v}" for k, v in params.items()]
    config = mergekit_config(base, dirs, method, density, root / f"{method}.yml")
    spec = lambda o: json.dumps([str(base), [str(d) for d in dirs], WEIGHTS, str(o),  # noqa: E731
                                 method, params, str(root / "sha256")])  # fmt: skip
    contenders = {
        "floor": lambda o: mb.measure(
            [
                sys.executable,
                "-c",
                mb.FLOOR,
                json.dumps(inputs),
                o.with_suffix(".bin"),
                out_size,
            ]
        ),
        "merit CLI": lambda o: mb.measure(
            [*merit, "--method", method, *flags, "--out", o, *map(str, dirs)], env=cache
        ),
        "merit in-process": lambda o: mb.measure([sys.executable, "-c", IN_PROCESS, spec(o)]),
        "mergekit-yaml": lambda o: mb.measure(
            [python.parent / "mergekit-yaml", config, o, "--no-copy-tokenizer", "--quiet"]
        ),
    }
    outs = {name: root / f"{method}-{i}" for i, name in enumerate(contenders)}
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, run in contenders.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            outs[name].with_suffix(".bin").unlink(missing_ok=True)
            m = run(outs[name])
            key = "seconds" if "seconds" in m else "wall"
            if name not in best or m[key] < best[name][key]:
                best[name] = {**m, "key": key}
    outs["floor"].with_suffix(".bin").unlink(missing_ok=True)
    floor = best["floor"]["seconds"]
    print(f"\n{method}{' density ' + str(density) if params else ''}, weights {WEIGHTS}:")
    for name, m in best.items():
        t = m[m["key"]]
        where = "inside the process" if m["key"] == "seconds" else "end to end"
        print(
            f"  {name:18} {t / floor:6.2f} × floor ({where}), peak anon {m['anon'] / 2**20:.0f} MiB"
        )
    mk, cli = best["mergekit-yaml"]["wall"], best["merit CLI"]["wall"]
    print(f"  merit CLI vs mergekit-yaml, end to end: {mk / cli:.2f}× faster")
    c = differences(outs["merit CLI"], outs["mergekit-yaml"], base, dirs, method, density)
    n = c["elements"]
    print(
        f"  vs mergekit: {c['differ']} of {n} elements differ ({c['differ'] / n:.3%}); within half "
        f"a bf16 ulp of the float64 merge: merit {c['merit_rounded'] / n:.4%}, mergekit "
        f"{c['mergekit_rounded'] / n:.4%}"
    )


if __name__ == "__main__":
    main()
