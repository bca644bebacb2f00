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
        "plan": "conflict-aware split into K = 2^r groups (writes plan.json)",
        "train": "train branches (all, or --branch k) and baselines from θ0",
        "merge": "merge the branches: θ̄ = Σ w_k θ_k, streamed",
        "evaluate": "held-out NLL/accuracy of θ0, joint, merged and branches",
    }
    for name, help_ in cmds.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _config_args(p, optional=name == "demo")
        if name == "train":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--branch", type=int, help="train only this branch (0-based)")
            g.add_argument("--baseline", choices=["joint"], help="train only this baseline")
    return ap


def _load(args: argparse.Namespace):
    from merit.config import load_config

    path = args.config or demo_config_path()
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        # `merit demo key=value`: the first override was taken for the config path.
        path, overrides = demo_config_path(), [args.config, *overrides]
    return load_config(path, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from merit.artifacts import write_json
    from merit.config import ConfigError
    from merit.data import DataError
    from merit.planning import PlanError

    try:
        from merit.merging import MergeError
    except ImportError:  # pragma: no cover
        MergeError = ValueError
    from merit import pipeline

    try:
        cfg = _load(args)
        run = pipeline.Run(cfg).open()
        if args.command == "data":
            print(pipeline.data_table(pipeline.prepare_data(run)))
        elif args.command == "calibrate":
            rec = pipeline.calibrate(run)
            print(f"calibrated {len(rec['datasets'])} datasets -> {run.paths.sketches}")
        elif args.command == "plan":
            pipeline.make_plan(run)
            print(pipeline.plan_summary(pipeline.read_json(run.paths.plan)))
            print(f"plan -> {run.paths.plan}")
        elif args.command == "train":
            for m in pipeline.train(run, branch=args.branch, baseline=args.baseline):
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
        MergeError,
        pipeline.StageError,
        FileNotFoundError,
    ) as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
