"""The pipeline's commands: one per registered stage (it makes that stage's artifact, and what it
needs, through the executor), plus ``run``/``demo``. Every command takes a run config (YAML) and
``key.sub=value`` overrides; bad input is reported in one line with a non-zero exit before any
long work starts.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from merit.calibrate.sketch import SpecMismatch
from merit.compare.stage import check as check_compare
from merit.config import ConfigError, load_config
from merit.context import open_context
from merit.data.formats import DataError
from merit.errors import StageError
from merit.evaluate.stage import run_command
from merit.fetch import FetchError
from merit.gguf import ModelSourceError
from merit.graph import Context
from merit.lm import DeviceError, ModelPathError, cache_dir
from merit.merge.errors import MergeError
from merit.merge.standalone import add_merge_options, add_verify_parser, merge_command
from merit.plan.splitters import PlanError
from merit.run import Run
from merit.stages import STAGES
from merit.train.estimate import config_dir, estimate
from merit.train.launchers import EXIT_PREEMPTED
from merit.train.sft import Preempted
from merit.train.stage import train_command
from merit.vision import ProcessorError

EXIT_USAGE = 2
# Every error that is the user's to fix: one line on stderr, exit code 2.
USER_ERRORS = (
    ConfigError, DataError, PlanError, SpecMismatch, MergeError, StageError, DeviceError,
    ModelPathError, ModelSourceError, FetchError, ProcessorError,
)  # fmt: skip


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


def _plan_options(p: argparse.ArgumentParser) -> None:
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


def _train_options(p: argparse.ArgumentParser) -> None:
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
        "--parallel", type=int, metavar="N", help="branches at once with the local launcher"
    )
    g.add_argument(
        "--print-commands",
        choices=["shell", "slurm", "skypilot"],
        help="print the branch commands for another scheduler instead of training",
    )
    g.add_argument(
        "--estimate",
        action="store_true",
        help="print each branch's memory per GPU (weights, gradients, optimizer, activations) "
        "under DDP, FSDP and ZeRO-3 from θ0's config alone; trains and writes nothing",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=80.0,
        metavar="GIB",
        help="GPU memory in GiB that --estimate checks each setup against (default 80)",
    )
    p.epilog = (
        "exit codes: 0 done (or already done), 2 bad input or a verification failure, "
        "75 preempted (SIGTERM/SIGUSR1): a checkpoint was saved, re-run the same command"
    )


def _run_dir_usage(name: str):
    def usage(p: argparse.ArgumentParser) -> None:
        p.usage = f"merit {name} (CONFIG | RUN_DIR) [overrides ...]"

    return usage


def _demo(ctx: Context, _args) -> int:
    run_command(ctx)
    return 0


def _train(ctx: Context, args) -> int:
    return train_command(ctx, args)


def _estimate(args: argparse.Namespace) -> int:
    """``merit train --estimate``: from the config and θ0's config.json alone, before the run is
    opened (no data read, no run directory, nothing trained)."""
    cfg = _load(args)
    model_dir = config_dir(cfg.model.path, cache_dir(cfg.runtime), cfg.runtime.progress)
    print(estimate(model_dir, cfg, args.gpu_memory))
    return 0


# Commands that are not one stage's artifact, and stages with options of their own; every other
# registered stage is a command that makes its artifact (and what it needs) and prints it.
EXTRA_COMMANDS = {
    "demo": "run the whole pipeline on the embedded default (BIG-bench mixture)",
    "run": "run every stage of a config (skips what is done)",
}
OPTIONS = {
    "plan": _plan_options,
    "train": _train_options,
    "diagnose": _run_dir_usage("diagnose"),
    "report": _run_dir_usage("report"),
}
HANDLERS = {"demo": _demo, "run": _demo, "train": _train}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="merit",
        description="MERIT: decentralized instruction tuning by conflict-aware splitting and "
        "weight merging.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmds = {**EXTRA_COMMANDS, **{s.name: s.help for s in STAGES}}
    for name, help_ in cmds.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _config_args(p, optional=name == "demo")
        OPTIONS.get(name, lambda _p: None)(p)
        if name == "merge":
            add_merge_options(p)
    add_verify_parser(sub)
    return ap


def _load(args: argparse.Namespace):
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
            raise ConfigError(f"{args.config}: not a run directory (no config.yaml)")
        path, overrides = saved, [f"run_dir={args.config}", *overrides]
    elif args.config and "=" in args.config and not Path(args.config).exists():
        # `merit demo key=value`: the first override was taken for the config path.
        path, overrides = demo_config_path(), [args.config, *overrides]
    return load_config(path, overrides)


def _dispatch(args: argparse.Namespace, ctx: Context) -> int:
    """Run the command: its handler, or the stage of that name, printing what it made."""
    if args.command in HANDLERS:
        return HANDLERS[args.command](ctx, args)
    stage = STAGES.get(args.command)
    made = ctx.executor.get(stage.name)
    if stage.show is not None:
        print(stage.show(ctx, made))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("merge", "verify-merge"):
        done = merge_command(args, extra)
        if done is not None:
            return done
    # Overrides may also follow the options (`merit plan CONFIG --compare planning.rank=3`).
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    options = {k: getattr(args, k, False) for k in ("add", "compare")}
    try:
        if getattr(args, "estimate", False):
            return _estimate(args)
        ctx = open_context(Run(_load(args)), options)
        if args.command == "compare":  # every row checked before anything is written
            check_compare(ctx)
        ctx.open(add=options["add"])
        return _dispatch(args, ctx)
    except USER_ERRORS as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as err:  # SIGTERM/SIGUSR1 in any training (a branch, the demo's θ0, ...)
        print(f"merit: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
