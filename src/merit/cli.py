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
        "compare": "the paper's table with its controls: joint (1/2 epochs, best LR), shrinkage, "
        "random split, soup, MERIT-1D/2D/3D, gain planner; one run directory per row",
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


def _errors() -> tuple[type[BaseException], ...]:
    """Every error that is the user's to fix: one line on stderr, exit code 2."""
    from merit.calibrate.sketch import SpecMismatch
    from merit.config import ConfigError
    from merit.data.formats import DataError
    from merit.fetch import FetchError
    from merit.gguf import ModelSourceError
    from merit.lm import DeviceError, ModelPathError
    from merit.merge.errors import MergeError
    from merit.plan.splitters import PlanError
    from merit.run import StageError
    from merit.vision import ProcessorError

    return (
        ConfigError,
        DataError,
        PlanError,
        SpecMismatch,
        MergeError,
        StageError,
        DeviceError,
        ModelPathError,
        ModelSourceError,
        FetchError,
        ProcessorError,
    )


def _dispatch(args: argparse.Namespace, run) -> int:
    """Run the command's stage and print what it made."""
    from merit.calibrate import stage as calibrate
    from merit.data import stage as data
    from merit.diagnose import stage as diagnose
    from merit.evaluate import stage as evaluate
    from merit.merge import stage as merge
    from merit.plan import stage as plan
    from merit.report import stage as report
    from merit.train import stage as train

    cmd = args.command
    if cmd == "data":
        print(data.data_table(data.prepare_data(run)))
    elif cmd == "calibrate":
        rec = calibrate.calibrate(run)
        print(f"calibrated {len(rec.datasets)} datasets -> {run.paths.sketches}")
    elif cmd == "plan":
        p = plan.make_plan(run, add=args.add)
        print(plan.plan_summary(p))
        if args.compare:
            print(plan.plan_comparison(p))
        print(f"plan -> {run.paths.plan} (plots in {run.paths.root / 'plan_plots'})")
    elif cmd == "train" and args.print_commands:
        print(train.branch_commands(run, args.print_commands))
    elif cmd == "train":
        return train.train_command(run, args.branch, args.baseline, args.plan_sha256)
    elif cmd == "merge":
        m = merge.merge(run)
        weights = ", ".join(f"{w:.3f}" for w in m.weights)
        print(f"merged model -> {run.paths.merged} (weights {weights})")
    elif cmd == "evaluate":
        print(evaluate.evaluate(run).table)
    elif cmd == "diagnose":
        print(diagnose.diagnostics_summary(diagnose.diagnose(run)))
        print(f"diagnostics -> {run.paths.root / 'diagnostics'}")
    elif cmd == "compare":
        from merit.compare.stage import compare_command

        compare_command(run)
    elif cmd == "report":
        page = report.report(run)
        print(f"report -> {page} (and {page.with_name('report.md')})")
    else:  # run, demo
        evaluate.run_command(run)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("merge", "verify-merge"):
        from merit.merge.standalone import merge_command

        done = merge_command(args, extra)
        if done is not None:
            return done
    # Overrides may also follow the options (`merit plan CONFIG --compare planning.rank=3`).
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    from merit.run import Run
    from merit.train.launchers import EXIT_PREEMPTED
    from merit.train.sft import Preempted

    try:
        run = Run(_load(args))
        if args.command == "compare":  # every row checked before anything is written
            from merit.compare.stage import check

            check(run)
        run.open(add=getattr(args, "add", False))
        return _dispatch(args, run)
    except _errors() as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as err:  # SIGTERM/SIGUSR1 in any training (a branch, the demo's θ0, ...)
        print(f"merit: {err}", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
