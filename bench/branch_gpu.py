"""Benchmark, on a GPU: one SmolLM2-135M-Instruct branch step as merit trains it.

    python bench/branch_gpu.py [--steps 20] [--batch 64] [--length 128]

Run by ``bench/compare_gpu.sh run`` before the comparison (θ0 from the carried GGUF, the wheels
installed). Each configuration trains ``--steps`` optimizer steps of merit's branch trainer
(``train_sft``: TRL's SFTTrainer, merit's callbacks) on rows of exactly ``--length`` tokens of
BIG-bench ``abstract_narrative_understanding`` (prompts cut on the left, answers at the end):

* ``bf16-mixed``: fp32 master weights, bf16 autocast, answer-only logits (TRL's fused LM head
  scores only answer positions where Triton runs);
* ``bf16-mixed+gc``: the same with gradient checkpointing;
* ``bf16``: pure bf16 weights and Adam states;
* ``bare-full``: a bare PyTorch loop, bf16 autocast over fp32 weights, every position's logits.

Reported per configuration: training tokens/s over the steps after the first 3, peak GPU memory
(``torch.cuda.max_memory_allocated``) and model FLOPs utilisation, MFU = 6·N·tokens/s (N: the
parameters; attention FLOPs left out, as is usual for MFU) over the GPU's dense bf16 peak
(``--peak-tflops``, 989 for an H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "answer_logits", Path(__file__).with_name("answer_logits.py")
)
al = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(al)

CONFIGS = {
    "bf16-mixed": {"precision": "bf16-mixed"},
    "bf16-mixed+gc": {"precision": "bf16-mixed", "gradient_checkpointing": True},
    "bf16": {"precision": "bf16"},
    "bare-full": None,
}


class NoPeaks:
    def step(self) -> None:
        pass


def bare_step_times(model, recs, steps: int, batch: int):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ends = []
    for s in range(steps):
        rows = recs[s * batch : (s + 1) * batch]
        ids = torch.tensor([r.input_ids for r in rows], device="cuda")
        labels = torch.tensor([r.labels for r in rows], device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return ends


def run(name: str, args, base: Path, tokenizer, recs) -> dict:
    import torch

    from merit.lm import load_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dtype = "bfloat16" if name == "bf16" else "float32"
    model = load_model(base, torch.device("cuda"), dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    if CONFIGS[name] is None:
        ends = bare_step_times(model, recs, args.steps, args.batch)
    else:
        out = Path("/tmp/merit-branch-gpu") / name
        al.BATCH = args.batch
        ends = al.merit(model, tokenizer, recs, args.steps, True, NoPeaks(), out,
                        batch_size=args.batch, **CONFIGS[name])  # fmt: skip
    tokens_per_s = (len(ends) - 3) * args.batch * args.length / (ends[-1] - ends[2])
    row = {
        "config": name,
        "steps": len(ends),
        "tokens_per_s": round(tokens_per_s),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(6 * n_params * tokens_per_s / (args.peak_tflops * 1e12), 4),
        "params": n_params,
    }
    del model
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from merit.config import RuntimeConfig
    from merit.gguf import named_model
    from merit.lm import cache_dir, load_tokenizer

    print(torch.cuda.get_device_name(0), flush=True)
    base = named_model("smollm2-135m-instruct", cache_dir(RuntimeConfig()), progress=False)
    tokenizer = load_tokenizer(base)
    recs = al.records(tokenizer, args.steps * args.batch, args.length, cycle=True)
    rows = []
    for name in CONFIGS:
        rows.append(run(name, args, base, tokenizer, recs))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "branch_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
