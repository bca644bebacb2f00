"""Benchmark: `merit diagnose` + `merit report` on a finished run.

    python bench/diagnose.py RUN_DIR [--cache-dir DIR]

RUN_DIR is a finished run (``merit demo`` writes ``runs/demo``); it is copied to a temporary
directory first (its diagnostics and report removed) so the original is never touched. Both
commands run through the CLI, as a user runs them, and are timed end to end (interpreter start-up,
loading the mixture and the models included). Reported: each time, their sum against the
5-minute budget, and as a ratio to the run's own pipeline wall time
(``timings.json``: ``total``, or the sum of its stages), plus where diagnose spends its time.
The report is then rendered with headless Chromium when it is installed (screenshot written next
to the copy).

``--reuse-artifacts`` is for a run directory written by an older merit whose config schema (and
hence experiment hash) or calibration format differ from this checkout's: each stage then runs
in a fresh process as ``merit.diagnose.stage.diagnose`` / ``merit.report.stage.report``
themselves, with the upstream stage checks (plan, train, merge) replaced by reading the saved
artifacts, and evaluation records without a format version accepted as current.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t


def _stage_reusing_artifacts(run_dir: Path, stage: str) -> None:
    """One stage on a run whose upstream artifacts predate this checkout (see the docstring):
    the executor is handed the saved artifacts as made, so only ``stage`` runs."""
    from merit.artifacts import read_json, write_json
    from merit.config import load_config
    from merit.context import open_context
    from merit.data.stage import DataRecord
    from merit.evaluate.scoring import EVAL_VERSION
    from merit.evaluate.stage import EvaluationResults
    from merit.merge.manifest import MergeManifest
    from merit.plan.stage import Plan
    from merit.run import Run
    from merit.train.stage import Trained

    cfg = load_config(run_dir / "config.yaml", [f"run_dir={run_dir}", "runtime.progress=false"])
    ctx = open_context(Run(cfg))
    ctx.base.__dict__["dir"] = Path(read_json(run_dir / "base.json")["path"])
    ctx.validate()  # loads the mixture, as opening a run does
    for f in (run_dir / "eval").glob("*.json"):
        rec = read_json(f)
        if "datasets" in rec and "version" not in rec:
            write_json(f, {**rec, "version": EVAL_VERSION})
    made = {
        "data": DataRecord.load(ctx.paths.data),
        "plan": Plan.load(ctx.paths.plan),
        "train": Trained({}),
        "joint": Trained({}),
        "merge": MergeManifest.load(ctx.paths.merged),
    }
    if stage == "report":
        made["evaluate"] = EvaluationResults.load(ctx.paths.results)
    ctx.executor.made.update(made)
    ctx.executor.get(stage)


def _print_results(source: Path, run: Path, t_diag: float, t_rep: float, pipeline: float) -> None:
    d = json.loads((run / "diagnostics" / "diagnostics.json").read_text())
    total = t_diag + t_rep
    print(f"run: {source} ({d['parameters']:,} parameters, K={len(d['gain']['weights'])})")
    print(
        f"merit diagnose {t_diag:.0f} s + merit report {t_rep:.0f} s = {total:.0f} s: "
        f"{total / 300:.0%} of the 5-minute budget"
        + (
            f", {total / pipeline:.2f}× the run's own pipeline time ({pipeline:.0f} s)"
            if pipeline
            else ""
        )
    )
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in d["timings"].items())
    print(
        f"diagnose: {d['evaluations']} loss evaluations and {d['hvps']} Hessian-vector products "
        f"on {d['examples']['heldout']} held-out examples ({d['examples']['heldout_tokens']} "
        f"answer tokens); {parts}"
    )
    print(d["overall"])
    tag = {True: "holds", False: "fails", None: "n/a"}
    for v in d["verdicts"]:
        print(f"  [{tag[v['holds']]}] {v['premise']}: {v['why']}")


def _screenshot(work: Path, run: Path) -> None:
    """The report rendered by headless Chromium, when it is installed."""
    exe = shutil.which("chromium")
    if not exe:
        return
    shot = work / "report.png"
    subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tempfile.mkdtemp(dir=work)}",
            f"--screenshot={shot}",
            "--window-size=1280,9000",
            (run / "report" / "index.html").as_uri(),
        ],
        capture_output=True,
    )
    print(f"screenshot: {shot}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--stage":  # child process of --reuse-artifacts
        _stage_reusing_artifacts(Path(sys.argv[3]), sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument(
        "--reuse-artifacts",
        action="store_true",
        help="the run predates this checkout's config schema (see above)",
    )
    ap.add_argument("--cache-dir", help="runtime.cache_dir of the run (where the demo θ0 is)")
    ap.add_argument("--keep", action="store_true", help="keep the copy (prints its path)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="merit-bench-diagnose-"))
    run = work / args.run_dir.name
    shutil.copytree(args.run_dir, run, ignore=shutil.ignore_patterns("trainer", "checkpoint-*"))
    for sub in ("diagnostics", "report"):
        shutil.rmtree(run / sub, ignore_errors=True)
    timings = (
        json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    )
    pipeline = timings.get("total") or sum(
        v for k, v in timings.items() if k not in ("diagnose", "report")
    )
    over = ["runtime.progress=false"] + (
        [f"runtime.cache_dir={args.cache_dir}"] if args.cache_dir else []
    )
    if args.reuse_artifacts:
        t_diag = _timed([sys.executable, __file__, "--stage", "diagnose", str(run)])
        t_rep = _timed([sys.executable, __file__, "--stage", "report", str(run)])
    else:
        merit = [sys.executable, "-m", "merit.cli"]
        t_diag = _timed([*merit, "diagnose", str(run), *over])
        t_rep = _timed([*merit, "report", str(run), *over])
    _print_results(args.run_dir, run, t_diag, t_rep, pipeline)
    _screenshot(work, run)
    if args.keep:
        print(f"kept: {run}")
    else:
        shutil.rmtree(work / args.run_dir.name)


if __name__ == "__main__":
    main()
