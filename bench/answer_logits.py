"""Benchmark: logits only where the loss reads them, on SmolLM2-135M-Instruct, CPU.

    python bench/answer_logits.py [--steps 10] [--threads 2]   # ~8 min on 2 CPU cores

One batch shape (8 examples × 128 tokens of BIG-bench ``abstract_narrative_understanding``,
prompts cut on the left so every row ends with its answer), AdamW, full fine-tuning, fp32, each
configuration in its own process (so peak memory is its own):

* ``bare-full``: a bare PyTorch loop, ``model(input_ids, labels)``: every position's logits;
* ``bare-answer``: the same loop with ``logits_to_keep`` = the answer positions
  (merit.train.logits);
* ``merit-full``: merit's branch trainer (TRL's SFTTrainer + merit's callbacks, ``train_sft``)
  with answer-only logits turned off: TRL on CPU scores every position;
* ``merit-answer``: merit's branch trainer as it trains a branch.

Reported: training tokens/s over the steps after the first 2 (padding included: every row is
128 tokens), the peak RSS of the process, and the peak activation memory (the largest rise of
RSS within one step over its start, sampled every ms; glibc's keep-freed-memory is off so freed
activations leave RSS). Ratios only: answer over full, merit over the bare loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = ("bare-full", "bare-answer", "merit-full", "merit-answer")
BATCH, LENGTH, TASK = 8, 128, "abstract_narrative_understanding__9_distractors"


class RssPeaks:
    """Samples the process's RSS every millisecond; ``step()`` marks a step's start."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self.rises: list[int] = []
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def step(self) -> None:
        if self.rises or self.peak != self.start:
            self.rises.append(self.peak - self.start)
        self.start = self.peak = self._rss()


def records(tokenizer, n: int, length: int = LENGTH, cycle: bool = False):
    """``n`` encoded examples of exactly ``length`` tokens (``cycle``: repeated if too few)."""
    from merit.data.formats import load_dataset
    from merit.data.mixture import encode

    data = Path(os.environ.get("MERIT_BIGBENCH", "../shared/data/bigbench"))
    examples = load_dataset(TASK, data / f"{TASK}.json.gz", "bigbench").examples
    encoded = [e for e in encode(tokenizer, examples, length) if len(e.input_ids) == length]
    if len(encoded) < n and not (cycle and encoded):
        sys.exit(f"only {len(encoded)} examples of {length} tokens in {TASK}")
    return (encoded * (n // len(encoded) + 1))[:n]


def bare(model, recs, steps: int, answer_only: bool, peaks: RssPeaks) -> list[float]:
    import torch

    from merit.train.logits import answer_loss, answer_positions

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ends = []
    for s in range(steps):
        rows = recs[s * BATCH : (s + 1) * BATCH]
        ids = torch.tensor([r.input_ids for r in rows])
        labels = torch.tensor([r.labels for r in rows])
        peaks.step()
        if answer_only:
            keep = answer_positions(labels)
            loss = answer_loss(model(input_ids=ids, logits_to_keep=keep).logits, labels, keep)
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    peaks.step()
    return ends


def merit(model, tokenizer, recs, steps: int, answer_only: bool, peaks, out: Path, **training):
    """Steps of merit's branch trainer (``train_sft``); ``training``: settings over the bench's."""
    from transformers import TrainerCallback

    import merit.train.sft as sft
    from merit.config import config_from_dict

    if not answer_only:
        sft.answer_only_applies = lambda *_: False
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            peaks.step()

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    cfg = config_from_dict({
        "data": {"bigbench": "/x"},
        "training": {"batch_size": BATCH, "learning_rate": 1e-5, "warmup_ratio": 0.0,
                     "epochs": 1, "extra": {"logging_steps": 1000}, **training},
    }).training  # fmt: skip
    real = sft.trainer_class()

    def with_clock():  # merit's trainer class, with the clock among its callbacks
        class Clocked(real):
            def __init__(self, *a, **k):
                k["callbacks"] = [*k.get("callbacks", []), Clock()]
                super().__init__(*a, **k)

        return Clocked

    sft.trainer_class = with_clock
    length = len(recs[0].input_ids)
    sft.train_sft(model, tokenizer, recs, cfg, out, length, progress=False, max_steps=steps)
    peaks.step()
    return ends


def one(name: str, steps: int, threads: int, out: Path) -> dict:
    import torch

    from merit.gguf import named_model
    from merit.lm import load_model, load_tokenizer

    torch.set_num_threads(threads)
    base = named_model("smollm2-135m-instruct", Path.home() / ".cache" / "merit", progress=False)
    tokenizer = load_tokenizer(base)
    recs = records(tokenizer, steps * BATCH)
    model = load_model(base, torch.device("cpu"), "float32")
    model.train()
    peaks = RssPeaks()
    answer_only = name.endswith("answer")
    if name.startswith("bare"):
        ends = bare(model, recs, steps, answer_only, peaks)
    else:
        ends = merit(model, tokenizer, recs, steps, answer_only, peaks, out / name)
    tokens = (len(ends) - 2) * BATCH * LENGTH
    answer = sum(r.answer_tokens for r in recs) / len(recs)
    return {
        "config": name,
        "steps": len(ends),
        "tokens_per_s": tokens / (ends[-1] - ends[1]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "activation_gb": max(peaks.rises[2:]) / 2**30,
        "answer_tokens_per_row": answer,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=CONFIGS)
    ap.add_argument("--out", type=Path, default=Path("/tmp/merit-bench-answer-logits"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.threads, args.out)))
        return
    rows = {}
    for name in CONFIGS:
        argv = [sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                "--threads", str(args.threads), "--out", str(args.out)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[name]), flush=True)
    r = {k: v["tokens_per_s"] for k, v in rows.items()}
    a = {k: v["activation_gb"] for k, v in rows.items()}
    print(f"answer-only / full tokens/s: bare {r['bare-answer'] / r['bare-full']:.2f}x, "
          f"merit {r['merit-answer'] / r['merit-full']:.2f}x")  # fmt: skip
    print(f"activation memory saved: bare {1 - a['bare-answer'] / a['bare-full']:.0%}, "
          f"merit {1 - a['merit-answer'] / a['merit-full']:.0%}")  # fmt: skip
    print(f"merit / bare loop tokens/s: full {r['merit-full'] / r['bare-full']:.2f}, "
          f"answer-only {r['merit-answer'] / r['bare-answer']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
