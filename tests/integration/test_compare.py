"""``merit compare`` end to end on the tiny θ0: every row from the ordinary stages, every cell of
the table, resume after a kill, and bad input refused before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_tasks, write_run_config
from merit.cli import main

ROWS = ["base", "joint", "joint-2ep", "joint-lr", "shrink", "random", "soup", "merit-1d",
        "merit-2d", "gain"]  # fmt: skip


@pytest.fixture(scope="module")
def eight_tasks(tmp_path_factory, mixture_specs) -> tuple[list[dict], list[dict]]:
    """Eight training datasets (K = 4 groups of 2) and two unseen ones, all distinct."""
    root = tmp_path_factory.mktemp("mixture8")
    specs = [s for s in mixture_specs if s["name"] != "reverse_words"]
    more = make_tasks(seed=7)
    words = [r["completion"] for r in more["copy_words"]]
    more["last_word"] = [
        {"prompt": f"Last word of: {w}", "completion": w.split()[-1]} for w in words
    ]
    more["first_word"] = [{"prompt": f"First word: {w}", "completion": w.split()[0]} for w in words]
    extra = []
    for name in ("copy_words", "copy_upper", "reverse_letters", "last_word", "first_word"):
        path = root / f"{name}_b.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in more[name]))
        extra.append({"name": f"{name}_b", "path": str(path)})
    train = specs + extra[:4]
    unseen = [next(s for s in mixture_specs if s["name"] == "reverse_words"), extra[4]]
    return train, unseen


def _config(tmp_path: Path, specs, unseen, base: Path, **compare) -> Path:
    return write_run_config(
        tmp_path / "compare.yaml",
        tmp_path / "run",
        specs,
        base,
        data={
            "unseen_datasets": unseen,
            "split": {"eval": 4, "calibration": 4, "train": 12, "validation": 3},
        },
        planning={"rank": 2, "bootstrap": 0},
        training={"learning_rate": 3e-3, "batch_size": 8},
        evaluation={
            "max_examples": 4,
            "max_generate": 1,
            "max_new_tokens": 4,
            "batch_size": 16,
            "bootstrap_samples": 200,
        },
        compare={
            "rows": ROWS,
            "learning_rates": [1.0, 2.0],
            "alphas": [0.5, 1.0],
            "random_draws": 2,
            "soup_runs": 2,
            "train_loss_examples": 8,
            **compare,
        },
    )


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_compare_end_to_end(tmp_path, eight_tasks, tiny_base, capsys):
    train, unseen = eight_tasks
    cfg = _config(tmp_path, train, unseen, tiny_base)
    assert main(["compare", str(cfg)]) == 0
    run = tmp_path / "run"
    res = json.loads((run / "compare" / "results.json").read_text())
    rows = {r["key"]: r for r in res["rows"]}
    assert list(rows) == ROWS

    # Every row's models come from run directories of the ordinary stages.
    for key in ("joint-2ep", "merit-1d", "gain"):
        (unit,) = rows[key]["units"]
        assert Path(unit["run_dir"]).parent == run / "compare" / "runs"
        saved = yaml.safe_load((Path(unit["run_dir"]) / "config.yaml").read_text())
        assert saved["data"]["split"]["validation"] == 3
    # θ0, joint and MERIT-2D are the compare config's own experiment: its run directory.
    for key in ("base", "joint", "merit-2d"):
        assert rows[key]["units"][0]["run_dir"] == str(run)
    plan1 = json.loads((Path(rows["merit-1d"]["units"][0]["run_dir"]) / "plan.json").read_text())
    assert plan1["K"] == 2 and all(len(g["datasets"]) == 4 for g in plan1["groups"])
    gain = json.loads((Path(rows["gain"]["units"][0]["run_dir"]) / "plan.json").read_text())
    assert gain["K"] == 4 and gain["method"] == "gain"
    assert len(rows["random"]["units"]) == 2 and len(rows["soup"]["units"]) == 1
    assert len(rows["soup"]["units"][0]["members"]) == 2

    # Budgets: one epoch of the mixture for every row but θ0 (none) and joint-2ep (two).
    assert rows["base"]["budget"] == 0
    assert rows["joint-2ep"]["budget"] == pytest.approx(2.0, rel=1e-6)
    for key in ("merit-1d", "merit-2d", "gain", "random", "shrink"):
        assert rows[key]["budget"] == pytest.approx(1.0, rel=1e-6), key
    # Each soup run sees a random half of the examples: the same count, not the same tokens.
    assert rows["soup"]["budget"] == pytest.approx(1.0, rel=0.25)

    # Selection used the validation split only and is recorded.
    sel = res["selection"]["0"]
    assert sel["learning_rate"]["chosen"] in (3e-3, 6e-3)
    assert sel["alpha"]["chosen"] in (0.5, 1.0)
    assert set(sel["alpha"]["validation_loss"]) == {"0.5", "1.0"}

    # Paired tests against joint: every row but joint itself, on both kinds of held-out data.
    for key, r in rows.items():
        assert (r["vs_joint"] is None) == (key == "joint")
        assert r["unseen_summary"]["datasets"] == 2
        assert r["summary"]["datasets"] == 8
    assert rows["base"]["distance"] == 0 and rows["joint"]["distance"] > 0
    d = res["diagnostics"]
    assert d["distance_ratio"] == pytest.approx(d["joint_distance"] / d["merged_distance"])
    assert d["merge_alpha"] == pytest.approx(1 / d["distance_ratio"])
    # A verdict on each of the paper's claims, from the rows present.
    verdicts = {c["claim"]: c["verdict"] for c in res["claims"]}
    assert "ordering joint < random < merit-1d < merit-2d (unseen tasks)" in verdicts
    assert "random split ≈ uniform soup (held-out examples)" in verdicts
    assert set(verdicts.values()) <= {"held", "did not hold", "could not be decided"}
    assert len(verdicts) == 8

    # Every table cell is filled (θ0's Δ and joint's own Δ excepted).
    lines = (run / "compare" / "results.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Row")) + 2
    body = lines[start : start + len(ROWS)]
    assert not lines[start + len(ROWS)].startswith("|")  # one line per row, no more
    for ln, key in zip(body, ROWS):
        cells = _cells(ln)
        empty = [i for i, c in enumerate(cells) if c in ("", "–")]
        assert empty == {"joint": [7, 10], "base": [2]}.get(key, []), (key, cells)
    assert (run / "compare" / "gain.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "MERIT-2D (K=4)" in out and "Uniform soup" in out

    # A row's directory is a run `merit report` opens; the compare run's report has the table.
    assert main(["report", rows["joint-2ep"]["units"][0]["run_dir"]]) == 0
    assert main(["report", str(cfg)]) == 0
    page = (run / "report" / "report.md").read_text()
    assert "Comparison" in page and "Uniform soup" in page and "paper's claims" in page

    # Re-running reuses every row: identical results.
    assert main(["compare", str(cfg)]) == 0
    again = json.loads((run / "compare" / "results.json").read_text())
    assert again["rows"] == res["rows"]


MERGE_ROWS = ["base", "joint", "merit-2d", "merit-2d+ta", "merit-2d+ties", "merit-2d+regmean",
              "merit-2d+learned", "random", "random+ta"]  # fmt: skip


def test_merge_rows_reuse_the_trained_branches_and_choose_on_validation(
    tmp_path, eight_tasks, tiny_base, capsys
):
    train, unseen = eight_tasks
    cfg = _config(tmp_path, train, unseen, tiny_base, rows=[*MERGE_ROWS[:3], "random"],
                  random_draws=1, merge_scales=[1.0, 2.0], merge_densities=[0.5, 1.0],
                  merge_params={"learned": {"steps": 3}})  # fmt: skip
    assert main(["compare", str(cfg)]) == 0
    run = tmp_path / "run"
    manifests = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}
    said = capsys.readouterr()
    assert "fewer than 16" in said.out + said.err  # the tiny run's branches take 2 steps

    text = yaml.safe_load(cfg.read_text())
    text["compare"]["rows"] = MERGE_ROWS
    cfg.write_text(yaml.safe_dump(text))
    assert main(["compare", str(cfg)]) == 0
    # Adding merge rows trained nothing: every training job's manifest is untouched.
    assert {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")} == manifests
    res = json.loads((run / "compare" / "results.json").read_text())
    rows = {r["key"]: r for r in res["rows"]}
    assert list(rows) == MERGE_ROWS
    assert rows["merit-2d"]["steps"] == rows["merit-2d+ties"]["steps"]
    (ta,) = rows["merit-2d+ta"]["units"]
    curve = ta["validation_curve"]
    assert set(curve) == {"1.0", "2.0"} and ta["params"]["scale"] == float(
        min(curve, key=curve.get)
    )
    (ties,) = rows["merit-2d+ties"]["units"]
    assert len(ties["validation_curve"]) == 4 and ties["params"]["density"] in (0.5, 1.0)
    assert Path(ta["model"]).parent == run / "compare" / "models"
    (learned,) = rows["merit-2d+learned"]["units"]
    meta = json.loads((Path(learned["model"]) / "merge_manifest.json").read_text())["metadata"]
    assert learned["params"]["scale"] == ta["params"]["scale"]  # it starts where TA ends
    fit = meta["learned"]
    assert len(fit["groups"]) >= 3 and all(len(v) == 4 for v in fit["groups"].values())
    assert fit["validation_loss"]["fitted"] <= fit["validation_loss"]["start"] + 0.05
    (reg,) = rows["merit-2d+regmean"]["units"]
    assert json.loads((Path(reg["model"]) / "merge_manifest.json").read_text())["metadata"][
        "regmean"]["layers"] > 0  # fmt: skip
    assert (run / "branches").is_dir() and any((run / "branches").rglob("grams.safetensors"))
    assert rows["random+ta"]["units"][0]["run_dir"] == rows["random"]["units"][0]["run_dir"]
    table = (run / "compare" / "results.md").read_text()
    assert "MERIT-2D (K=4) + TIES" in table and "steps/job" in table


def test_a_learning_rate_sweep_trains_each_model_and_rate_once(tmp_path, eight_tasks, tiny_base):
    train, unseen = eight_tasks
    cfg = _config(tmp_path, train, unseen, tiny_base, rows=["joint", "merit-2d"],
                  lr_sweep=[1.0, 2.0])  # fmt: skip
    assert main(["compare", str(cfg)]) == 0
    run = tmp_path / "run"
    res = json.loads((run / "compare" / "results.json").read_text())
    sweep = res["lr_sweep"]
    assert [p["learning_rate"] for p in sweep] == [3e-3, 6e-3]
    for p in sweep:
        for where in ("heldout", "unseen"):
            d = p[where]["difference"]
            assert d["difference"] == pytest.approx(p[where]["merit"] - p[where]["joint"])
    rows = {r["key"]: r for r in res["rows"]}  # at a multiple of 1 the sweep is the table's
    assert sweep[0]["heldout"]["joint"] == pytest.approx(rows["joint"]["summary"]["nll"])
    assert sweep[0]["heldout"]["merit"] == pytest.approx(rows["merit-2d"]["summary"]["nll"])
    jobs = {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")}
    assert len([p for p in jobs if p.parent.name == "joint"]) == 2  # joint at 1× and 2×
    assert (run / "compare" / "lr_sweep.png").stat().st_size > 1000
    assert "Learning-rate sweep" in (run / "compare" / "results.md").read_text()
    assert main(["compare", str(cfg)]) == 0  # every (model, rate) reused
    assert {p: p.stat().st_mtime_ns for p in run.rglob("manifest.json")} == jobs


def test_compare_resumes_after_a_kill(tmp_path, eight_tasks, tiny_base):
    train, unseen = eight_tasks
    rows = ["base", "joint", "merit-1d", "merit-2d"]
    cfg = _config(tmp_path, train, unseen, tiny_base, rows=rows)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "merit.cli", "compare", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill it mid-row: once MERIT-1D's first branch has started training.
    row_dir = run / "compare" / "runs" / "merit-1d-s0"
    marker = row_dir / "branches" / "branch-0"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "compare" / "results.json").exists()
    assert not (row_dir / "merged").exists()
    assert (run / "eval" / "joint.json").is_file()  # the rows before it were done
    done = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "eval").glob("*.json")}

    assert main(["compare", str(cfg)]) == 0
    for p, (mtime, data) in done.items():  # the rows already done were not redone
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    res = json.loads((run / "compare" / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == rows
    # ... and equal what an uninterrupted comparison gives.
    (tmp_path / "fresh").mkdir()
    fresh = _config(tmp_path / "fresh", train, unseen, tiny_base, rows=rows)
    assert main(["compare", str(fresh)]) == 0
    ref = json.loads((tmp_path / "fresh" / "run" / "compare" / "results.json").read_text())
    for a, b in zip(res["rows"], ref["rows"]):
        assert a["summary"] == b["summary"] and a["unseen_summary"] == b["unseen_summary"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"compare": {"rows": ["base", "joint", "merit-3d"]}, "datasets": 6}, "K=8 groups"),
        ({"unseen": "overlap"}, "unseen tasks overlap the training tasks"),
        ({"split": {"validation": 12}}, "validation=12"),
        ({"split": {"validation": 0}}, "choose on a validation split"),
    ],
)
def test_compare_bad_input(tmp_path, eight_tasks, tiny_base, capsys, change, message):
    train, unseen = eight_tasks
    train = train[: change.get("datasets", len(train))]
    if change.get("unseen") == "overlap":  # a training dataset's file under another name
        unseen = [{"name": "copy_again", "path": train[0]["path"]}]
    cfg = _config(tmp_path, train, unseen, tiny_base, **change.get("compare", {}))
    if "split" in change:
        raw = yaml.safe_load(cfg.read_text())
        raw["data"]["split"].update(change["split"])
        cfg.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained
