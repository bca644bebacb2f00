"""Benchmark: `merit data` on a synthetic instruction mixture at scale, against `datasets`.

    python bench/data.py [--records 1000000] [--datasets 200] [--model smollm2-135m-instruct]

Writes a JSONL mixture (`--records` prompt/completion records over `--datasets` files, prompt
and answer lengths drawn per record: about 0.7 KB a record, 0.7 GiB for a million), then times, each in a fresh process under
`/usr/bin/time -v` (wall clock and peak RSS):

* `merit data CONFIG`: load, hash, split, apply `data.overlong`, tokenize the training split;
* the same command again (what every later stage and every branch pays before its own work);
* the reference: `datasets.load_dataset("json", ...)` over the same files, then `map` through
  θ0's chat template and tokenizer with `num_proc=2`, as a user's own preprocessing would.

Reported: merit / reference ratios of wall time and peak RSS, measured in one run. The issue's
targets (peak RSS under 4 GB, first pass within 1.5× of the reference, re-run under 10 s) are
for the streaming data layer, which this measures before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# Common English words: about one token each, as in real instructions.
_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this from "
    "have or by one had not but what all were when we there can an your which their said "
    "if do will each about how up out them then she many some so these would other into "
    "has more her two like him see time could no make than first been its who now people"
)
WORDS = _TEXT.split()

REFERENCE = r"""
import sys, datasets
from transformers import AutoTokenizer
files, model = sys.argv[1].split(","), sys.argv[2]
tok = AutoTokenizer.from_pretrained(model)
def encode(row):
    msgs = [{"role": "user", "content": row["prompt"]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": row["completion"]}],
                                   tokenize=False)
    return {"input_ids": tok(full, add_special_tokens=False)["input_ids"],
            "prompt_len": len(tok(prompt, add_special_tokens=False)["input_ids"])}
ds = datasets.load_dataset("json", data_files=files, split="train")
ds = ds.map(encode, num_proc=2, remove_columns=ds.column_names)
print("tokens", sum(len(x) for x in ds["input_ids"]))
"""


def write_mixture(root: Path, records: int, datasets: int, seed: int = 0) -> list[dict]:
    """``records`` prompt/completion records over ``datasets`` JSONL files; their specs."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for d in range(datasets):
        path = root / f"task_{d:04d}.jsonl"
        n = records // datasets + (d < records % datasets)
        with path.open("w") as f:
            for _ in range(n):
                prompt = " ".join(rng.choices(WORDS, k=rng.randint(40, 250)))
                answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
                f.write(json.dumps({"prompt": f"Task {d}: {prompt}", "completion": answer}) + "\n")
        specs.append({"name": f"task_{d:04d}", "path": str(path)})
    return specs


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, stdout) of ``cmd`` under /usr/bin/time -v."""
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{res.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", res.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    parts = [float(x) for x in wall.group(1).split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return seconds, int(rss.group(1)) / 2**20, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--datasets", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    from merit.config import RuntimeConfig
    from merit.lm import cache_dir, local_model_dir

    model = local_model_dir(args.model, cache_dir(RuntimeConfig()), progress=False)
    with tempfile.TemporaryDirectory(prefix="merit-bench-data-") as tmp:
        root = Path(tmp)
        specs = write_mixture(root / "mixture", args.records, args.datasets)
        size = sum(Path(s["path"]).stat().st_size for s in specs) / 2**30
        cfg = {
            "run_dir": str(root / "run"),
            "model": {"path": str(model), "max_length": 512},
            "data": {"datasets": specs, "split": {"eval": 50, "calibration": 200}},
            "runtime": {"progress": False},
        }
        (root / "run.yaml").write_text(yaml.safe_dump(cfg))
        merit = [sys.executable, "-m", "merit.cli", "data", str(root / "run.yaml")]
        first = timed(merit)
        again = timed(merit)
        files = ",".join(s["path"] for s in specs)
        ref = timed([sys.executable, "-c", REFERENCE, files, str(model)])
    print(f"{args.records:,} records, {args.datasets} datasets, {size:.2f} GiB of JSONL")
    print("| run | wall s | peak RSS GB | wall / reference | RSS / reference |")
    print("|---|---:|---:|---:|---:|")
    for label, (s, gb, _) in (("merit data", first), ("merit data, again", again),
                              ("datasets load + map (num_proc=2)", ref)):  # fmt: skip
        print(f"| {label} | {s:.1f} | {gb:.2f} | {s / ref[0]:.2f} | {gb / ref[1]:.2f} |")


if __name__ == "__main__":
    main()
