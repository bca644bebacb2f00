"""``merit`` command line: a thin layer over the pipeline's stage functions.

Every command takes a run config (YAML) and ``key.sub=value`` overrides; bad input is reported
in one line with a non-zero exit before any long work starts.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

EXIT_USAGE = 2


def demo_config_path() -> Path:
    """The embedded default config (BIG-bench mixture, merit's small θ0)."""
    return Path(str(resources.files("merit") / "configs" / "demo.yaml"))


def _config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument(
            "config", nargs="?", default=None, help="run config YAML (default: the demo)"
        )
    else:
        p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. planning.rank=3")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="merit",
        description="MERIT: decentralized instruction tuning by conflict-aware splitting and "
        "weight merging.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmds = {
        "demo": "run the whole pipeline on the embedded default (BIG-bench mixture)",
        "run": "run every stage of a config (skips what is done)",
        "data": "load, split and tokenize the mixture; print a table of it",
        "calibrate": "sketch each dataset's mean gradient at θ0",
        "plan": "conflict-aware split into K groups, with stability (writes plan.json, plots)",
        "train": "train branches (all, or --branch k) and baselines from θ0",
        "merge": "merge a run's branches (CONFIG), or any checkpoints (--out DIR CKPT ...)",
        "evaluate": "held-out NLL/accuracy of θ0, joint, merged and branches",
        "diagnose": "is θ0 merge-ready? barriers, distances, flatness, gain vs theory",
        "report": "one self-contained HTML page (and Markdown) of the whole run",
    }
    for name, help_ in cmds.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _config_args(p, optional=name == "demo")
        if name in ("diagnose", "report"):
            p.usage = f"merit {name} (CONFIG | RUN_DIR) [overrides ...]"
        if name == "merge":
            _merge_options(p)
        if name == "plan":
            p.add_argument(
                "--compare",
                action="store_true",
                help="print every splitter's plan side by side (predicted gain, merged loss, "
                "balance, stability) and the chosen one",
            )
            p.add_argument(
                "--add",
                action="store_true",
                help="the config appends datasets to this run's data.datasets: calibrate only "
                "those, re-split, report which datasets changed group",
            )
        if name == "train":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--branch", type=int, help="train only this branch (0-based)")
            g.add_argument("--baseline", choices=["joint"], help="train only this baseline")
            p.add_argument(
                "--plan-sha256",
                metavar="HASH",
                help="refuse unless plan.json has this sha256 (launchers pass it; never re-plans)",
            )
            p.add_argument(
                "--launcher",
                choices=["inline", "local", "ray"],
                help="how to run all branches (runtime.launcher): in this process, as local "
                "subprocesses, or as Ray tasks",
            )
            p.add_argument(
                "--parallel",
                type=int,
                metavar="N",
                help="branches at once with the local launcher (runtime.parallel)",
            )
            g.add_argument(
                "--print-commands",
                choices=["shell", "slurm", "skypilot"],
                help="print the branch commands for another scheduler instead of training",
            )
            p.epilog = (
                "exit codes: 0 done (or already done), 2 bad input or a verification failure, "
                "75 preempted (SIGTERM/SIGUSR1): a checkpoint was saved, re-run the same command"
            )
    help_ = "recompute the sha256 of every file a merge's manifest lists and check it"
    p = sub.add_parser("verify-merge", help=help_, description=help_)
    p.add_argument("dir", metavar="DIR", help="a merged model directory (merge_manifest.json)")
    p.add_argument(
        "--outputs-only", action="store_true", help="do not re-hash the input checkpoints"
    )
    p.epilog = "exit codes: 0 every file matches, 2 a file differs or is missing (each named)"
    return ap


# -- merge (standalone) and verify-merge: only merit.merge.streaming is imported ------------------------
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


def _merge_options(p: argparse.ArgumentParser) -> None:
    p.usage = (
        "merit merge CONFIG [overrides ...]\n"
        "       merit merge --out DIR [--weights W1,W2,...] [--normalize] [--base DIR]\n"
        "                   [--method {linear,task_vector}] [--scale S] [--dtype DTYPE] CKPT ..."
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
        choices=["linear", "task_vector"],
        default="linear",
        help="linear: Σ w_k θ_k; task_vector: θ0 + s·Σ w_k (θ_k − θ0), needs --base",
    )
    g.add_argument("--scale", type=float, default=1.0, metavar="S", help="s (task_vector)")
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
        "--no-hash-cache",
        action="store_true",
        help="hash every input anew (default: reuse hashes of unchanged files from the cache)",
    )


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    try:
        return int(float(number) * units[t[len(number) :]])
    except (KeyError, ValueError):
        from merit.merge.streaming import MergeError

        raise MergeError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MiB)") from None


def _merge_command(args: argparse.Namespace, extra: list[str]) -> int | None:
    """Run a standalone merge or verify-merge; None for a run-config merge (the pipeline's)."""
    from merit.merge.streaming import MergeError

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

    from merit.merge.streaming import MergeError, describe_weights, merge_checkpoints

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
    seconds = time.perf_counter() - t0
    scale = f" with s = {m['scale']:g}" if m["scale"] is not None else ""
    print(f"{m['method']} merge of {k} checkpoints: {m['formula']}{scale}")
    print(f"  weights {', '.join(f'{w:.6g}' for w in m['weights'])}: {describe_weights(m)}")
    if m["coefficients"]["base"]:
        print(f"  coefficient of θ0: {m['coefficients']['base']:.6g}")
    role = "θ0" if base_is_theta0 else "structure and files only: the first checkpoint"
    print(f"  base {m['base']} ({role}); θ0 fingerprint {m['base_fingerprint'] or 'unknown'}")
    dtype = m["dtype"] or "as the base: " + ", ".join(m["output_dtypes"])
    print(f"  dtype {dtype}; accumulated in {m['accumulation']}")
    print(
        f"merged {m['num_tensors']} tensors ({m['total_bytes'] / 1e6:.0f} MB) -> {args.out} "
        f"in {seconds:.1f} s; proof: {Path(args.out) / 'merge_manifest.json'} "
        f"(check: merit verify-merge {args.out})"
    )
    return 0


def _verify_merge(args: argparse.Namespace) -> int:
    from merit.merge.streaming import verify_merge

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


def _load(args: argparse.Namespace):
    from merit.config import load_config

    path = args.config or demo_config_path()
    overrides = list(args.overrides)
    if getattr(args, "parallel", None):
        overrides.append(f"runtime.parallel={args.parallel}")
        if not args.launcher:
            overrides.append("runtime.launcher=local")
    if getattr(args, "launcher", None):
        overrides.append(f"runtime.launcher={args.launcher}")
    if args.config and Path(args.config).is_dir():
        # A run directory: its saved config, with run_dir pointing at it wherever it moved.
        saved = Path(args.config) / "config.yaml"
        if not saved.is_file():
            from merit.config import ConfigError

            raise ConfigError(f"{args.config}: not a run directory (no config.yaml)")
        path, overrides = saved, [f"run_dir={args.config}", *overrides]
    elif args.config and "=" in args.config and not Path(args.config).exists():
        # `merit demo key=value`: the first override was taken for the config path.
        path, overrides = demo_config_path(), [args.config, *overrides]
    return load_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("merge", "verify-merge"):
        done = _merge_command(args, extra)
        if done is not None:
            return done
    # Overrides may also follow the options (`merit plan CONFIG --compare planning.rank=3`).
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    from merit.artifacts import write_json
    from merit.calibrate.sketch import SpecMismatch
    from merit.config import ConfigError
    from merit.data.formats import DataError
    from merit.plan.splitters import PlanError

    try:
        from merit.merge.streaming import MergeError
    except ImportError:  # pragma: no cover
        MergeError = ValueError
    from merit import pipeline
    from merit.train.launchers import EXIT_PREEMPTED, LaunchError
    from merit.train.sft import Preempted

    try:
        cfg = _load(args)
        run = pipeline.Run(cfg).open(add=getattr(args, "add", False))
        if args.command == "data":
            print(pipeline.data_table(pipeline.prepare_data(run)))
        elif args.command == "calibrate":
            rec = pipeline.calibrate(run)
            print(f"calibrated {len(rec['datasets'])} datasets -> {run.paths.sketches}")
        elif args.command == "plan":
            plan = pipeline.make_plan(run, add=args.add)
            print(pipeline.plan_summary(plan))
            if args.compare:
                print(pipeline.plan_comparison(plan))
            print(f"plan -> {run.paths.plan} (plots in {run.paths.root / 'plan_plots'})")
        elif args.command == "train" and args.print_commands:
            print(pipeline.branch_commands(run, args.print_commands))
        elif args.command == "train":
            try:
                done = pipeline.train(
                    run, branch=args.branch, baseline=args.baseline, plan_sha256=args.plan_sha256
                )
            except LaunchError as err:
                print(f"merit: error: {err}", file=sys.stderr)
                return 1
            for m in done:
                print(
                    f"{m['label']}: {m['steps']} steps, {m['tokens']} tokens, final loss {m['final_loss']}"
                )
        elif args.command == "merge":
            m = pipeline.merge(run)
            print(
                f"merged model -> {run.paths.merged} (weights {', '.join(f'{w:.3f}' for w in m['weights'])})"
            )
        elif args.command == "evaluate":
            print(pipeline.evaluate(run)["table"])
        elif args.command == "diagnose":
            print(pipeline.diagnostics_summary(pipeline.diagnose(run)))
            print(f"diagnostics -> {run.paths.root / 'diagnostics'}")
        elif args.command == "report":
            page = pipeline.report(run)
            print(f"report -> {page} (and {page.with_name('report.md')})")
        else:  # run, demo
            result = pipeline.run_all(run)
            print("\nHeld-out metrics, averaged over datasets:\n")
            print(result["table"])
            print("stage wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in run.timings.items()))
            print(f"results -> {run.paths.eval_dir / 'results.md'}")
            write_json(run.paths.root / "timings.json", run.timings)
    except (
        ConfigError,
        DataError,
        PlanError,
        SpecMismatch,
        MergeError,
        pipeline.StageError,
        FileNotFoundError,
    ) as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as err:  # SIGTERM/SIGUSR1 in any training (a branch, the demo's θ0, ...)
        print(f"merit: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
