"""``merit merge --out DIR CKPT ...`` and ``merit verify-merge DIR``: the merge stage as a tool for
any same-architecture checkpoints, merit's branches or not. Only :mod:`merit.merge` is imported.

``--method`` is any registered merge method (:mod:`merit.merge.methods`, plugins included); the
name and the method's parameters are checked here, before any work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from merit.errors import ConfigError
from merit.memory import keep_freed_memory
from merit.merge.card import describe_weights
from merit.merge.errors import MergeError
from merit.merge.manifest import MANIFEST_FILE, MergeManifest
from merit.merge.mergekit_config import read_mergekit_config
from merit.merge.methods import METHODS, MergeMethod, get_method
from merit.merge.streaming import merge_checkpoints
from merit.merge.verify import verify_merge

EXIT_USAGE = 2

_STANDALONE_ONLY = (
    "weights",
    "normalize",
    "base",
    "method",
    "scale",
    "dtype",
    "max_shard_size",
    "threads",
    "no_hash_cache",
    "mergekit_config",
)


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number) :]])
    except (KeyError, ValueError):
        raise MergeError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MiB)") from None


def merge_command(args: argparse.Namespace, extra: list[str]) -> int | None:
    """Run a standalone merge or verify-merge; None for a run-config merge (the pipeline's)."""
    try:
        if args.command == "verify-merge":
            if extra:
                raise MergeError(f"unrecognized arguments: {' '.join(extra)}")
            return _verify_merge(args)
        positionals = [x for x in (args.config, *args.overrides, *extra) if x is not None]
        if args.out is None:
            given = [f"--{o.replace('_', '-')}" for o in _STANDALONE_ONLY if _given(args, o)]
            if given:
                raise MergeError(f"{', '.join(given)}: only with --out DIR (a standalone merge)")
            first = Path(args.config)
            if (
                first.is_dir()
                and not (first / "config.yaml").is_file()
                and any(first.glob("*.safetensors"))
            ):
                raise MergeError(
                    f"{first} is a checkpoint: to merge checkpoints give --out DIR "
                    "(merit merge --out DIR [--weights W1,...] CKPT ...)"
                )
            return None
        options = [x for x in positionals if x.startswith("-")]
        if options:
            raise MergeError(f"unrecognized arguments: {' '.join(options)}")
        return _standalone_merge(args, positionals)
    except (MergeError, ConfigError, OSError) as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def methods_help() -> str:
    """``--method``'s help: every registered method (plugins included, once imported)."""
    return "; ".join(f"{m.name}: {m.help or m.formula}" for m in METHODS)


def _given(args: argparse.Namespace, option: str) -> bool:
    defaults = {
        "method": "linear",
        "scale": 1.0,
        "max_shard_size": "2GiB",
        "normalize": False,
        "no_hash_cache": False,
    }
    return getattr(args, option) not in (None, defaults.get(option))


def _standalone_merge(args: argparse.Namespace, checkpoints: list[str]) -> int:
    """`merit merge --out DIR CKPT ...`: merge any checkpoints, say exactly what was done."""
    if args.mergekit_config:
        return _mergekit_merge(args, checkpoints)
    method = get_method(args.method)  # an unknown name fails here, before any work
    if method.fitted:
        raise MergeError(
            f"--method {method.name} is fitted on {method.fitted}: it runs in a run's merge "
            f"stage (merit merge CONFIG with merging.method: {method.name})"
        )
    params = _method_params(method, args)
    weights, weights_from = _weights(args, len(checkpoints))
    base, base_is_theta0 = (args.base, True) if args.base else (checkpoints[0], False)
    return _run(args, base, base_is_theta0, checkpoints, weights, weights_from,
                method=method.name, params=params, normalize=args.normalize, dtype=args.dtype)  # fmt: skip


def _mergekit_merge(args: argparse.Namespace, checkpoints: list[str]) -> int:
    """`merit merge --mergekit-config FILE --out DIR`: the YAML says what and how."""
    clash = [f"--{o.replace('_', '-')}" for o in ("weights", "normalize", "base", "method",
             *_PARAM_OPTIONS, "dtype") if _given(args, o)]  # fmt: skip
    if clash or checkpoints:
        what = ", ".join(clash) or "checkpoints"
        raise MergeError(f"--mergekit-config gives the models and the method: drop {what}")
    job = read_mergekit_config(args.mergekit_config)
    get_method(job.method)
    base = job.base or job.checkpoints[0]
    return _run(args, base, job.base is not None, job.checkpoints, job.weights,
                f"mergekit config {args.mergekit_config}", method=job.method, params=job.params,
                normalize=job.normalize, dtype=job.dtype)  # fmt: skip


def _run(args, base, base_is_theta0, checkpoints, weights, weights_from, **how) -> int:
    keep_freed_memory()  # a per-tensor method's chunk temporaries reuse the heap, not fresh pages
    cache = None
    if not args.no_hash_cache:
        cache = Path(os.environ.get("MERIT_CACHE") or "~/.cache/merit").expanduser() / "sha256"
    t0 = time.perf_counter()
    m = merge_checkpoints(
        base,
        checkpoints,
        weights,
        args.out,
        **how,
        weights_from=weights_from,
        base_is_theta0=base_is_theta0,
        max_shard_bytes=_size(args.max_shard_size),
        hash_cache=cache,
        threads=args.threads,
        progress=sys.stderr.isatty(),
    )
    _say_what_was_done(m, args.out, time.perf_counter() - t0)
    return 0


def _method_params(method: MergeMethod, args: argparse.Namespace) -> dict[str, float]:
    """The method's parameters from the options that set them (``--scale``), refusing an option
    the method has no parameter for and a missing θ0 it needs."""
    if method.needs_base and args.base is None:
        raise MergeError(
            f"--method {method.name} needs --base θ0 (the model the checkpoints were trained "
            "from: the task vectors are θ_k − θ0)"
        )
    takes = {p.name for p in method.params}
    given = {name: getattr(args, name) for name in _PARAM_OPTIONS}
    given = {name: value for name, value in given.items() if value is not None}
    for name in given:
        if name not in takes:
            users = [m.name for m in METHODS if any(p.name == name for p in m.params)]
            raise MergeError(f"--{name} applies to --method {' or '.join(users)} only")
    return given


# Method parameters the standalone merge takes as options, each passed to the method by name.
_PARAM_OPTIONS = ("scale", "density", "seed")


def _weights(args: argparse.Namespace, k: int) -> tuple[list[float], str]:
    """``--weights`` (one per checkpoint), or 1/K each; and where they come from, in words."""
    if args.weights is None:
        return [1.0 / k] * k, "uniform 1/K (--weights not given)"
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise MergeError(f"--weights: cannot read {args.weights!r} as numbers") from None
    if len(weights) != k:
        raise MergeError(f"--weights has {len(weights)} values for {k} checkpoints")
    return weights, "explicit (--weights)"


def _say_what_was_done(m: MergeManifest, out: str, seconds: float) -> None:
    scale = f" with s = {m.scale:g}" if m.scale is not None else ""
    print(f"{m.method} merge of {len(m.checkpoints)} checkpoints: {m.formula}{scale}")
    print(f"  weights {', '.join(f'{w:.6g}' for w in m.weights)}: {describe_weights(m)}")
    if m.base_coefficient:
        print(f"  coefficient of θ0: {m.base_coefficient:.6g}")
    role = "θ0" if m.base_is_theta0 else "structure and files only: the first checkpoint"
    print(f"  base {m.base} ({role}); θ0 fingerprint {m.base_fingerprint or 'unknown'}")
    dtype = m.dtype or "as the base: " + ", ".join(m.output_dtypes)
    print(f"  dtype {dtype}; accumulated in {m.accumulation}")
    print(
        f"merged {m.num_tensors} tensors ({m.total_bytes / 1e6:.0f} MB) -> {out} "
        f"in {seconds:.1f} s; proof: {Path(out) / MANIFEST_FILE} "
        f"(check: merit verify-merge {out})"
    )


def _verify_merge(args: argparse.Namespace) -> int:
    report = verify_merge(args.dir, check_inputs=not args.outputs_only)
    for problem in report["problems"]:
        print(f"merit: error: {problem}", file=sys.stderr)
    if report["problems"]:
        return EXIT_USAGE
    inputs = "inputs not checked" if args.outputs_only else f"{report['inputs']} input files"
    missing = report["missing_inputs"]
    gone = f" ({len(missing)} inputs no longer present, not checked)" if missing else ""
    print(f"verified {args.dir}: {report['outputs']} output files and {inputs} match{gone}")
    return 0


def add_merge_options(p: argparse.ArgumentParser) -> None:
    p.usage = (
        "merit merge CONFIG [overrides ...]\n"
        "       merit merge --out DIR [--weights W1,W2,...] [--normalize] [--base DIR]\n"
        "                   [--method METHOD] [--scale S] [--density P] [--seed N]\n"
        "                   [--dtype DTYPE] CKPT ..."
    )
    p.description = (
        "With a run config: verify every branch, then θ̄ = Σ w_k θ_k with w_k = N_k / Σ N_j "
        "into the run's merged/. With --out: merge any same-architecture Hugging Face "
        "checkpoints (safetensors) given as CKPT ... . Either way the merge is streamed in "
        "bounded memory, written atomically, and proved by merge_manifest.json (sha256 of every "
        "input and output file; check with `merit verify-merge DIR`)."
    )
    g = p.add_argument_group("standalone merge (--out DIR CKPT ...)")
    g.add_argument("--out", metavar="DIR", help="output directory (must not exist or be empty)")
    g.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="one weight per checkpoint, comma-separated (default: 1/K each)",
    )
    g.add_argument(
        "--normalize",
        action="store_true",
        help="divide the weights by their sum (default: use them as given)",
    )
    g.add_argument(
        "--base",
        metavar="DIR",
        help="θ0 the checkpoints were trained from: supplies tensor names, config, tokenizer "
        "(default for linear: the first checkpoint, as structure only)",
    )
    g.add_argument(
        "--method",
        default="linear",
        metavar="METHOD",
        help=methods_help(),
    )
    g.add_argument("--scale", type=float, metavar="S", help="s or λ, the task vectors' multiple")
    g.add_argument(
        "--density", type=float, metavar="P", help="the fraction of task vectors kept (TIES, DARE)"
    )
    g.add_argument("--seed", type=int, metavar="N", help="the seed of DARE's random drops")
    _add_output_options(g)


def _add_output_options(g) -> None:
    g.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], help="output dtype (default: base's)"
    )
    g.add_argument(
        "--max-shard-size",
        default="2GiB",
        metavar="SIZE",
        help="largest output file, e.g. 5GB or 500MiB (default: 2GiB)",
    )
    g.add_argument(
        "--threads", type=int, metavar="N", help="arithmetic threads (default: CPUs − 1)"
    )
    g.add_argument(
        "--mergekit-config",
        metavar="FILE",
        help="a mergekit YAML (merge_method, base_model, models, parameters) instead of CKPT ... "
        "and the method options; methods: linear, task_arithmetic, ties, dare_linear, dare_ties, "
        "model_stock",
    )
    g.add_argument(
        "--no-hash-cache",
        action="store_true",
        help="hash every input anew (default: reuse hashes of unchanged files from the cache)",
    )


def add_verify_parser(sub) -> None:
    """``merit verify-merge DIR``."""
    help_ = "recompute the sha256 of every file a merge's manifest lists and check it"
    p = sub.add_parser("verify-merge", help=help_, description=help_)
    p.add_argument("dir", metavar="DIR", help="a merged model directory (merge_manifest.json)")
    p.add_argument(
        "--outputs-only", action="store_true", help="do not re-hash the input checkpoints"
    )
    p.epilog = "exit codes: 0 every file matches, 2 a file differs or is missing (each named)"
