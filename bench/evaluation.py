"""Benchmark: merit's held-out scoring vs the straightforward alternatives.

    python bench/evaluation.py [--datasets 32] [--bigbench ../shared/data/bigbench]

Scoring is the bulk of `merit evaluate` (every eval answer plus every multiple-choice option of
every dataset is a sequence whose answer-token log-likelihood is needed). On the BIG-bench
mixture with the demo's geometry (a 1.4M-parameter Llama, 4k vocabulary, 8 eval examples per
dataset, max length 256) four ways to score the same sequences are timed:

* merit: a multiple-choice question's prompt runs once for its reference answer and all its
  options (KV cache reused), everything batched across datasets, logits only at answer
  positions;
* merit without prompt sharing: every sequence whole, batched, sorted by length, logits only
  at answer positions;
* batched, full logits: the same batches, the LM head over every position (merit's earlier
  scoring);
* one sequence at a time, full logits (what a per-example loop does).

All four must agree (max |Δ log p| is printed). Reported: the time of each as a ratio to
merit's, measured in one run, interleaved, best of ``--repeats``. The model is randomly
initialised (scoring cost does not depend on the weights); the tokenizer is merit's demo BPE
trained on the prompts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from merit.config import DataConfig, DemoBaseConfig
from merit.data.mixture import encode, encode_choices, load_mixture
from merit.demo import build_model, build_tokenizer
from merit.evaluate.scoring import sequence_logprobs
from merit.lm import IGNORE, pad_batch


@torch.no_grad()
def full_logits(model, seqs, batch_size, pad_id):
    """Summed answer log-probability with logits at every position (the pre-issue-6 code)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    total = np.zeros(len(seqs))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = pad_batch([seqs[i] for i in idx], pad_id, torch.device("cpu"))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = batch["labels"][:, 1:]
        mask = target != IGNORE
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        total[idx] = picked.sum(-1).numpy()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bigbench", default="../shared/data/bigbench")
    ap.add_argument("--datasets", type=int, default=32, help="datasets for the per-sequence loop")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); on a busy shared machine 1 avoids OpenMP "
        "threads waiting on each other, which makes small operations ~10× slower",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")

    cfg = DataConfig(bigbench=args.bigbench, split={"eval": 8, "calibration": 16, "train": 32})
    mix = load_mixture(cfg, Path(args.bigbench), base_examples=64, hashes=False)
    examples = {d.name: d.examples("eval") for d in mix.datasets}
    prompts = [text for exs in examples.values() for text in _texts(exs)]
    tok = build_tokenizer(prompts[:20000], vocab_size=4096)

    # merit's demo θ0 architecture (untrained: only speed and agreement are measured here).
    arch = DemoBaseConfig(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4)
    model = build_model(arch, tok, max_length=256, seed=0).eval()

    def sequences(names):
        seqs = []
        for n in names:
            exs = examples[n]
            seqs += encode(tok, exs, 256)
            for ex in exs:
                if ex.choices:
                    seqs += encode_choices(tok, ex, 256)
        return seqs

    names = [d.name for d in mix.datasets]
    sub = sequences(names[:: max(1, len(names) // args.datasets)][: args.datasets])
    everything = sequences(names)
    pad = tok.pad_token_id
    tokens = sum(len(s.input_ids) for s in sub)
    answer = sum(s.answer_tokens for s in sub)
    print(
        f"{len(names)} datasets; subset: {args.datasets} datasets, {len(sub)} sequences, "
        f"{tokens} tokens ({answer} answer tokens)"
    )

    bs = args.batch_size
    contenders = {
        "merit": lambda: sequence_logprobs(model, sub, bs, pad)[0],
        "merit, no prompt sharing": lambda: sequence_logprobs(
            model, sub, bs, pad, share_prompts=False
        )[0],
        "batched full logits": lambda: full_logits(model, sub, bs, pad),
        "per-sequence full logits": lambda: full_logits(model, sub, 1, pad),
    }
    best = dict.fromkeys(contenders, np.inf)
    outs = {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    ref = best["merit"]
    for k, v in best.items():
        diff = float(np.abs(outs[k] - outs["merit"]).max())
        print(f"  {k:<26} {v / ref:6.2f}× merit's time   (max |Δ log p| vs merit {diff:.1e})")

    t = time.perf_counter()
    sequence_logprobs(model, everything, args.batch_size, pad)
    all_t = time.perf_counter() - t
    print(
        f"all {len(names)} datasets ({len(everything)} sequences): merit scores them in "
        f"{all_t / ref:.1f}× the subset's time, {all_t / len(everything) * 1e3:.2f} ms a sequence"
    )


def _texts(exs):
    return [m["content"] for ex in exs for m in ex.messages] + [ex.answer for ex in exs]


if __name__ == "__main__":
    main()
