"""``merit`` command line: a thin entry point.

The standalone merge (``merit merge --out DIR CKPT ...``) and ``merit verify-merge`` need torch
and safetensors only, so they are parsed here; every other command is the pipeline's
(:mod:`merit.commands`), imported only then.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from merit.errors import ConfigError
from merit.merge.standalone import add_merge_options, add_verify_parser, merge_command
from merit.registry import load_plugins

EXIT_USAGE = 2


def _standalone(argv: list[str]) -> bool:
    return bool(argv) and (argv[0] == "verify-merge" or (argv[0] == "merge" and "--out" in argv))


def _merge_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="merit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("merge", help="merge any checkpoints (--out DIR CKPT ...)")
    p.add_argument("config", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    add_merge_options(p)
    add_verify_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        load_plugins(os.environ.get("MERIT_PLUGINS"))
    except ConfigError as err:
        print(f"merit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if _standalone(argv):
        args, extra = _merge_parser().parse_known_args(argv)
        done = merge_command(args, extra)
        if done is not None:
            return done
    # Deferred on purpose: the pipeline's stages import transformers, TRL and pydantic, which
    # the standalone merge never needs (a merge host may have torch alone).
    commands = importlib.import_module("merit.commands")
    return commands.main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
