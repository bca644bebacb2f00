"""``merit merge --out DIR CKPT ...`` and ``merit verify-merge DIR``: the merge stage as a tool for
any same-architecture checkpoints, merit's branches or not. Only :mod:`merit.merge` is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merit.merge.manifest import MergeManifest

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
)


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number) :]])
    except (KeyError, ValueError):
        from merit.merge.errors import MergeError

        raise MergeError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MiB)") from None


def merge_command(args: argparse.Namespace, extra: list[str]) -> int | None:
    """Run a standalone merge or verify-merge; None for a run-config merge (the pipeline's)."""
    from merit.merge.errors import MergeError

    try:
        if args.command == "verify-merge":
            if extra:
                raise MergeError(f"unrecognized arguments: {' '.join(extra)}")
            return _verify_merge(args)
        positionals = [args.config, *args.overrides, *extra]
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
    except (MergeError, OSError) as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE


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
    import os
    import time

    from merit.merge.errors import MergeError
    from merit.merge.streaming import merge_checkpoints

    k = len(checkpoints)
    if args.weights is None:
        weights, weights_from = [1.0 / k] * k, "uniform 1/K (--weights not given)"
    else:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise MergeError(f"--weights: cannot read {args.weights!r} as numbers") from None
        weights_from = "explicit (--weights)"
        if len(weights) != k:
            raise MergeError(f"--weights has {len(weights)} values for {k} checkpoints")
    if args.method == "task_vector" and args.base is None:
        raise MergeError("--method task_vector needs --base θ0 (the task vectors are θ_k − θ0)")
    if args.method == "linear" and args.scale != 1.0:
        raise MergeError("--scale applies to --method task_vector only")
    base, base_is_theta0 = (args.base, True) if args.base else (checkpoints[0], False)
    cache = None
    if not args.no_hash_cache:
        cache = Path(os.environ.get("MERIT_CACHE") or "~/.cache/merit").expanduser() / "sha256"
    t0 = time.perf_counter()
    m = merge_checkpoints(
        base,
        checkpoints,
        weights,
        args.out,
        method=args.method,
        scale=args.scale,
        normalize=args.normalize,
        weights_from=weights_from,
        base_is_theta0=base_is_theta0,
        dtype=args.dtype,
        max_shard_bytes=_size(args.max_shard_size),
        hash_cache=cache,
        threads=args.threads,
        progress=sys.stderr.isatty(),
    )
    _say_what_was_done(m, args.out, time.perf_counter() - t0)
    return 0


def _say_what_was_done(m: MergeManifest, out: str, seconds: float) -> None:
    from merit.merge.card import describe_weights
    from merit.merge.manifest import MANIFEST_FILE

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
    from merit.merge.verify import verify_merge

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
