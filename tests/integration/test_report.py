"""`merit diagnose` and `merit report` end to end on a tiny run, and the page in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import write_run_config
from merit.cli import main
from merit.diagnose.verdicts import VERDICT_KEYS
from merit.plan.artifact import Plan, PlanDataset, PlanGroup
from merit.report.page import ReportData, build_report
from merit.train.artifact import BranchManifest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def reported(tmp_path_factory, mixture_specs, tiny_base) -> Path:
    """A finished tiny run with its diagnostics and report (the CLI, as a user runs it)."""
    tmp = tmp_path_factory.mktemp("report")
    path = write_run_config(
        tmp / "run.yaml",
        tmp / "run",
        mixture_specs,
        tiny_base,
        training={"learning_rate": 1e-3, "batch_size": 8},
        evaluation={"max_examples": 6, "max_generate": 2, "max_new_tokens": 4, "batch_size": 16},
        diagnostics={"examples": 20, "batch_size": 10, "lanczos_iters": 6, "top_eigen": 3},
    )
    assert main(["diagnose", str(path)]) == 0  # runs every stage it needs first
    assert main(["report", str(tmp / "run")]) == 0  # a run directory works as well
    return tmp / "run"


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.size > 0 and float(np.std(img)) > 0  # decodes, and is not a blank canvas
    return img.shape[1], img.shape[0]


def test_diagnostics_are_consistent(reported, capsys):
    d = json.loads((reported / "diagnostics" / "diagnostics.json").read_text())
    plan = json.loads((reported / "plan.json").read_text())
    # Barrier curves: zero excess at both ends, the barrier is their maximum.
    kinds = [b["kind"] for b in d["barriers"]]
    assert kinds.count("branches") == 1 and "base-merged" in kinds and "base-joint" in kinds
    for b in d["barriers"]:
        assert b["excess"][0] == 0.0 and b["excess"][-1] == 0.0
        assert b["barrier"] == max(b["excess"]) and len(b["alpha"]) == 5
    # The measured gain is exactly what the branch and merged losses say.
    g = d["gain"]
    w = [grp["weight"] for grp in plan["groups"]]
    assert g["weights"] == pytest.approx(w)
    assert g["measured"] == pytest.approx(
        sum(wk * lk for wk, lk in zip(w, g["branch_losses"])) - g["merged_loss"], abs=1e-12
    )
    assert g["merged_loss"] == d["losses"]["θ̄"]
    assert len(g["eigenvalues"]) == 3 and g["eigenvalues"] == sorted(g["eigenvalues"])[::-1]
    # Distances: positive, and the ratio is what it says.
    dist = d["distances"]
    assert dist["merged"] > 0 and dist["joint"] > 0
    assert dist["ratio_joint_merged"] == pytest.approx(dist["joint"] / dist["merged"])
    # Perturbations start flat: σ = 0 is the unperturbed loss, with no spread.
    for key in ("merged", "joint"):
        c = d["perturbation"][key]
        assert (
            d["perturbation"]["sigmas"][0] == 0 and c["mean"][0] == c["loss"] and c["std"][0] == 0
        )
    assert d["generalization"]["merged"]["heldout"] == d["losses"]["θ̄"]
    assert d["examples"]["heldout"] == 20 and d["examples"]["heldout_tokens"] > 0
    # A verdict per premise, in words.
    assert len(d["verdicts"]) == 6
    # Hessian–PCA alignment: the plan's one conflict axis against the top 3 eigenvectors at θ0,
    # read in the calibration sketch; its verdict follows its z-score.
    a = d["alignment"]
    assert len(a["cos"]) == 1 and len(a["cos"][0]) == 3 and a["eigenvalues"] == d["gain"][
        "eigenvalues"]  # fmt: skip
    assert a["max_abs"] == max(abs(c) for c in a["cos"][0]) and a["random_sd"] > 0
    (v,) = [v for v in d["verdicts"] if v["key"] == "targets_curvature"]
    assert v["holds"] == (a["z"] > 3) and "z = " in v["why"]
    assert all(v["holds"] in (True, False, None) and len(v["why"]) > 20 for v in d["verdicts"])
    for name in ("barriers", "distances", "generalization", "perturbation", "gain"):
        w_, h_ = _png_size(reported / "diagnostics" / f"{name}.png")
        assert w_ > 100 and h_ > 100
    # Re-running is a no-op (same stamp) and prints the verdicts.
    before = (reported / "diagnostics" / "diagnostics.json").stat().st_mtime_ns
    assert main(["diagnose", str(reported)]) == 0
    assert (reported / "diagnostics" / "diagnostics.json").stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert d["overall"] in out and "one basin" in out


def test_report_is_self_contained_with_a_markdown_twin(reported):
    page = (reported / "report" / "index.html").read_text()
    # Nothing is fetched: no external URL and no file reference; every image is a data URI.
    assert not re.search(r'(src|href)="(?!#|data:)', page)
    imgs = re.findall(r'<img [^>]*data-figure="(\w+)" src="data:image/png;base64,', page)
    assert set(imgs) == {
        *("mixture", "conflict", "pca", "losses"),  # the run
        *("barriers", "perturbation", "generalization", "gain", "distances"),  # diagnostics
    }
    results = json.loads((reported / "eval" / "results.json").read_text())
    for key, rec in results["models"].items():
        # One row per model in the results table, shown by its label (records written before
        # they carried one are keyed by it).
        assert f"<td>{rec.get('label', key)}</td>" in page
    md = (reported / "report" / "report.md").read_text()
    figs = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(figs) == len(imgs)
    for f in figs:
        _png_size(reported / "report" / f)
    assert "MERIT K=2 vs joint" in md and "one basin" in md
    # MERIT's overhead: calibration + planning + merge against the branches' training seconds.
    timings = json.loads((reported / "timings.json").read_text())
    seconds = [json.loads((reported / "branches" / f"branch-{k}" / "manifest.json").read_text())[
        "seconds"] for k in range(2)]  # fmt: skip
    share = sum(timings[s] for s in ("calibrate", "plan", "merge")) / sum(seconds)
    assert f"MERIT overhead: calibrate {timings['calibrate']:.0f}s" in md
    assert f"{share:.1%} of branch training" in md
    # One conflict-matrix picture: the report's is the plan stage's, byte for byte.
    plan_png = (reported / "plan_plots" / "cosine.png").read_bytes()
    assert (reported / "report" / "figures" / "conflict.png").read_bytes() == plan_png
    # Verdicts carry their stable key into the page.
    for key in VERDICT_KEYS:
        assert f'data-premise="{key}"' in page
    # The averages in the table are the evaluation's, with their intervals.
    merged = results["models"].get("merged") or results["models"]["MERIT K=2"]
    s = merged["summary"]
    assert f"{100 * s['accuracy']:.1f} [{100 * s['accuracy_ci'][0]:.1f}" in md


def test_run_directory_without_config_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merit: error:") and "no config.yaml" in err and "\n" not in err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(reported, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    url = (reported / "report" / "index.html").resolve().as_uri()
    n_imgs = (reported / "report" / "index.html").read_text().count("<img ")
    profile = tempfile.mkdtemp(dir=tmp_path)
    # The page's own script writes each image's decoded size into the DOM on load.
    dom = subprocess.run(
        [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert f'data-images="{n_imgs}/{n_imgs}"' in dom
    sizes = re.findall(r'data-decoded="(\d+)x(\d+)"', dom)
    assert len(sizes) == n_imgs and all(int(w) > 0 and int(h) > 0 for w, h in sizes)
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    w, h = _png_size(shot)
    assert (w, h) == (1280, 2400)


def _fake_run(evaluation: dict, comparisons: dict) -> ReportData:
    names = ["arith__add", "arith__sub", "copy", "reverse"]
    plan = Plan(
        settings={}, base_fingerprint="", sketches_sha256="", method="median", objective="gain",
        rank=1, K=2, sketch={}, explained_variance=[0.7], scree=[0.7], stability=None,
        candidates=[], hessian=None, warnings=[], changes=None, cosine=np.eye(4).tolist(),
        datasets=[PlanDataset(n, i % 2, 10, 100, [float(i)], None, 1.0, 1.0, "")
                  for i, n in enumerate(names)],
        groups=[PlanGroup(g, names[g::2], 10, 100, 0.5) for g in (0, 1)],
    )  # fmt: skip
    branch = {
        "group": None, "plan_sha256": "", "base_fingerprint": "", "training": "",
        "examples": 10, "tokens_seen": 100, "tokens_scheduled": 100, "epochs": 1.0,
        "answer_tokens": 50, "steps": 3, "lora": False, "resumed_from_step": None,
        "final_loss": None, "loss_summary": {}, "losses": [], "seconds": None, "weights": {},
    }  # fmt: skip
    return ReportData(
        title="fake",
        run_dir="runs/fake",
        config={"model": {"path": "demo"}},
        data=None,
        plan=plan,
        branches=[
            BranchManifest(label=f"branch {g}", datasets=names[g::2], tokens=100, **branch)
            for g in (0, 1)
        ],
        evaluation=evaluation,
        comparisons=comparisons,
    )


def _record(acc: float, label: str | None) -> dict:
    names = ["arith__add", "arith__sub", "copy", "reverse"]
    rec = {
        "datasets": {n: {"accuracy": acc, "nll": 1 - acc} for n in names},
        "summary": {"accuracy": acc, "nll": 1 - acc, "accuracy_ci": [acc - 0.1, acc + 0.1]},
    }
    return rec if label is None else {**rec, "model": label, "label": label}


def _paired() -> dict:
    r = {"difference": 0.01, "ci": [-0.01, 0.03], "p_a_better": 0.8}
    return {"accuracy": {**r, "wins": 2, "ties": 1, "losses": 1}, "nll": r}


def test_report_orders_and_shows_models_by_key(tmp_path):
    """Results keyed by model key, each with its display label: rows in the paper's order (θ0,
    joint, merge, branches by number), labels shown, comparisons named by label."""
    labels = {
        "branch-1": "branch 1",
        "merged": "MERIT K=2",
        "branch-0": "branch 0",
        "joint": "joint",
        "base": "θ0 (base)",
    }
    ev = {
        k: {**_record(0.1 * (i + 1), lab), "model": k} for i, (k, lab) in enumerate(labels.items())
    }
    pairs = {"joint": {"reference": "merged", "other": "joint", **_paired()}}
    html_path, md_path = build_report(_fake_run(ev, pairs), tmp_path / "report")
    md = md_path.read_text()
    results = md[md.index("## Results") :]
    rows = re.findall(r"^\| (θ0 \(base\)|joint|MERIT K=2|branch \d) \|", results, flags=re.M)
    expect = ["θ0 (base)", "joint", "MERIT K=2", "branch 0", "branch 1"]
    assert rows == expect * 2  # the accuracy table, then the NLL table
    assert "| MERIT K=2 vs joint |" in md
    assert "MERIT − joint, accuracy" in md  # the summary finds the merge and joint by key
    page = html_path.read_text()
    assert "<td>merged</td>" not in page and "<td>MERIT K=2</td>" in page


def test_report_shows_the_key_when_a_record_has_no_label(tmp_path):
    ev = {"θ0 (base)": _record(0.2, None), "joint": _record(0.3, None)}
    _, md_path = build_report(_fake_run(ev, {"joint vs θ0 (base)": _paired()}), tmp_path / "r")
    md = md_path.read_text()
    assert "| θ0 (base) |" in md and "| joint |" in md and "| joint vs θ0 (base) |" in md
