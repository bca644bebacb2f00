"""Benchmark: how well compressed gradients keep the conflict structure, what sketching costs,
and what streaming calibration saves in memory.

    python bench/calibration.py          # ~20 min on 2 busy CPU cores; prints the figures

A Llama of ≥10M parameters (hidden 320, 8 layers, vocab 4096: 12.5M, untied head) with a
byte-level BPE tokenizer trained here, pre-trained for ``--train-steps`` AdamW steps on examples
reserved for it, then calibrated at that θ0 on ``--datasets`` BIG-bench tasks (spread over the
sorted task list) with ``--calibration`` samples each. The exact token-mean gradient of each half
of every dataset's calibration samples is held in memory (2 × T × P fp32), so that

* exact cosines of the full-sample mean gradients are known, and compared (Pearson of the
  off-diagonal entries) with: CountSketch d = 2^16 and 2^18 (merit), the paper's keep-1-in-5 (a
  fixed random 20 % of the coordinates), and a dense Rademacher projection to 4096 dims (the
  4096 × P matrix generated chunk by chunk from a seed, never materialised);
* the sampling noise is measured the same way: the cosines of one half of the samples against
  the other half (two independent draws of ``calibration / 2`` samples).

Sketch cost: calibration passes over ``--time-datasets`` datasets, the time spent sketching as a
fraction of the rest of forward + backward. Streaming (merit's choice where the gradient does not
fit: post-accumulate-grad hooks, d = 2^18) sketches once per backward pass, so it is timed at 8,
16 and 32 examples per pass; accumulate-then-sketch once per part. The sketch costs O(P) per
pass and forward + backward O(P · tokens), so the fraction falls as 1 / (tokens per backward
pass), printed too. Peak memory: each mode in a child process on the same model, VmHWM reset
(``/proc/self/clear_refs``) after set-up, so the figure is what calibration itself adds over
weights + hash tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from merit.calibrate.sketch import CountSketch, SketchSpec, mean_gradient_sketch, split_parts
from merit.config import DataConfig, DatasetSpec, SplitConfig
from merit.data.mixture import encode, load_mixture
from merit.demo import build_tokenizer, example_texts
from merit.lm import pad_batch, token_nll_sum, trainable_parameters
from merit.plan.conflict import cosine_from_gram, offdiag_pearson

BIGBENCH = Path(os.environ.get("MERIT_BIGBENCH", "/work/shared/data/bigbench"))
LLAMA = {
    "hidden_size": 320,
    "intermediate_size": 864,
    "num_hidden_layers": 8,
    "num_attention_heads": 5,
    "num_key_value_heads": 5,
    "tie_word_embeddings": False,
}


def build_model(vocab: int, pad: int, eos: int, max_length: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max_length,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=None,
        **LLAMA,
    )
    return LlamaForCausalLM(cfg)


def load_tasks(n: int, calibration: int, base: int, seed: int):
    files = sorted(BIGBENCH.glob("*.json*"))
    if len(files) < n:
        sys.exit(f"need {n} BIG-bench tasks in {BIGBENCH} (set MERIT_BIGBENCH)")
    pick = [files[round(i * (len(files) - 1) / (n - 1))] for i in range(n)]
    specs = [
        DatasetSpec(name=f.name.split(".json")[0], path=str(f), format="bigbench") for f in pick
    ]
    cfg = DataConfig(
        datasets=specs, split=SplitConfig(eval=1, calibration=calibration, train=1, seed=seed)
    )
    return load_mixture(cfg, None, base_examples=base, hashes=False)


def pretrain(model, records, steps: int, batch: int, pad: int, lr: float, seed: int) -> float:
    """A few hundred AdamW steps so that θ0 is not a random network."""
    if steps == 0:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = float("nan")
    for step in range(steps):
        idx = torch.randint(len(records), (batch,), generator=g).tolist()
        b = pad_batch([records[i] for i in idx], pad, "cpu")
        n = sum(records[i].answer_tokens for i in idx)
        out = token_nll_sum(model, b) / max(n, 1)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        loss = float(out.detach())
        if step % 20 == 0:
            print(f"  pre-train step {step:>4}: loss {loss:.3f}", flush=True)
    model.eval()
    return loss


def exact_half_gradients(model, examples, name: str, batch: int, pad: int, seed: int):
    """Flat fp32 token-mean gradients of the two halves of ``examples`` and their tokens."""
    params = [p for _, p in trainable_parameters(model)]
    out, tokens = [], []
    for part in split_parts(len(examples), 2, seed, name):
        ex = [examples[i] for i in part]
        n = sum(e.answer_tokens for e in ex)
        model.zero_grad(set_to_none=True)
        order = sorted(range(len(ex)), key=lambda i: len(ex[i].input_ids))
        for s in range(0, len(order), batch):
            b = pad_batch([ex[i] for i in order[s : s + batch]], pad, "cpu")
            (token_nll_sum(model, b) / n).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]).float())
        tokens.append(n)
    model.zero_grad(set_to_none=True)
    return out, tokens


def sketch_flat(model, flat: torch.Tensor, sketcher: CountSketch) -> torch.Tensor:
    out = torch.zeros(sketcher.spec.dim)
    i = 0
    for name, p in trainable_parameters(model):
        sketcher.add(out, name, flat[i : i + p.numel()])
        i += p.numel()
    return out


def dense_projection(full_rows, size: int, dims: int, seed: int, chunk: int = 16384):
    """X Rᵀ for a dims × P Rademacher matrix R generated chunk by chunk from ``seed``.

    Random bytes are drawn from a seeded generator and expanded to 8 signs each through a
    256 × 8 table (the RNG would otherwise cost more than the matrix product).
    """
    g = torch.Generator().manual_seed(seed)
    table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1
    out = None
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        rand = torch.randint(0, 256, ((stop - start) * dims // 8,), generator=g)
        r = table[rand].view(stop - start, dims)
        part = (full_rows(start, stop) @ r).double()
        out = part if out is None else out + part
    return out


def pearson_vs(exact_cos: np.ndarray, vectors: torch.Tensor) -> float:
    v = vectors.double().numpy() if isinstance(vectors, torch.Tensor) else vectors
    return offdiag_pearson(exact_cos, cosine_from_gram(v @ v.T))


# -- memory (child process) ----------------------------------------------------------------------
def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def memory_child(mode: str, vocab: int, seq: int, batches: int, dim: int) -> dict:
    torch.set_num_threads(1)
    model = build_model(vocab, 0, 1, seq, 0).eval()
    spec = SketchSpec(dim, 0)
    sketcher = CountSketch(spec)
    sketcher.prepare(trainable_parameters(model))  # hash tables built before the baseline
    g = torch.Generator().manual_seed(0)
    from merit.lm import IGNORE, Encoded

    ex = []
    for _ in range(batches):
        ids = torch.randint(2, vocab, (seq,), generator=g).tolist()
        ex.append(Encoded(ids, [IGNORE] * (seq // 2) + ids[seq // 2 :]))
    # Warm-up outside the measurement: one forward without grad (allocator, kernels).
    with torch.no_grad():
        model(input_ids=torch.tensor([ex[0].input_ids]))
    Path("/proc/self/clear_refs").write_text("5")
    base = _vm("VmRSS:")
    mean_gradient_sketch(model, ex, sketcher, 1, 0, streaming=mode == "streaming")
    peak = _vm("VmHWM:")
    params = sum(p.numel() for _, p in trainable_parameters(model))
    largest = max(p.numel() for _, p in trainable_parameters(model))
    return {"mode": mode, "added": peak - base, "params": params, "largest": largest}


def measure_memory(vocab: int, seq: int, dim: int) -> dict[str, dict]:
    out = {}
    for mode in ("accumulate", "streaming"):
        argv = [sys.executable, __file__, "--memory-child", mode, "--vocab", str(vocab)]
        argv += ["--seq", str(seq), "--memory-dim", str(dim)]
        # Large blocks straight from mmap and back to the OS on free: RSS then tracks live
        # tensors (otherwise freed heap is reused unseen and the peak is the allocator's).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        res = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=int, default=24)
    ap.add_argument("--calibration", type=int, default=64, help="samples per dataset")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--base-examples", type=int, default=40, help="per dataset, for pre-training")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--time-datasets", type=int, default=6)
    ap.add_argument("--dense-dims", type=int, default=4096, help="dense projection dims")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-child", choices=["accumulate", "streaming"], help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--memory-dim", type=int, default=2**18, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.vocab, args.seq, 4, args.memory_dim)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    mix = load_tasks(args.datasets, args.calibration, args.base_examples, args.seed)
    texts = example_texts(
        ex for d in mix.datasets for split in ("base", "calibration") for ex in d.examples(split)
    )
    tok = build_tokenizer(texts, args.vocab)
    pad = tok.pad_token_id
    model = build_model(len(tok), pad, tok.eos_token_id, args.max_length, args.seed)
    n_params = sum(p.numel() for _, p in trainable_parameters(model))
    cal = {d.name: encode(tok, d.examples("calibration"), args.max_length) for d in mix.datasets}
    base = [e for d in mix.datasets for e in encode(tok, d.examples("base"), args.max_length)]
    print(
        f"model: Llama {n_params / 1e6:.1f}M parameters; {len(cal)} BIG-bench datasets, "
        f"{min(len(v) for v in cal.values())}-{max(len(v) for v in cal.values())} calibration "
        f"samples each; pre-training {args.train_steps} steps on {len(base)} reserved examples",
        flush=True,
    )
    final = pretrain(model, base, args.train_steps, 16, pad, 1e-3, args.seed)
    print(f"θ0: pre-train loss {final:.3f}", flush=True)

    # Exact half-sample gradients (2 × T × P fp32 in memory).
    names = list(cal)
    halves, tokens = [], []
    t0 = time.perf_counter()
    for i, n in enumerate(names):
        h, tk = exact_half_gradients(model, cal[n], n, args.batch_size, pad, args.seed)
        halves.append(h)
        tokens.append(tk)
        print(f"  exact gradients {i + 1}/{len(names)}", end="\r", flush=True)
    t_exact = time.perf_counter() - t0
    x = torch.stack([h for pair in halves for h in pair])  # 2T × P, rows (t, half)
    w = torch.tensor([[a / (a + b), b / (a + b)] for a, b in tokens])  # T × 2
    print(f"\nexact gradients: {x.shape[0]} × {x.shape[1]:,} fp32 = {x.numel() * 4 / 1e9:.2f} GB")

    def full_rows(start, stop):
        piece = x[:, start:stop].view(len(names), 2, -1)
        return (w[:, :, None] * piece).sum(1)

    gram_halves = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[1], 1 << 20):
        c = x[:, s : s + (1 << 20)].double()
        gram_halves += c @ c.T
    mix_w = torch.zeros(len(names), x.shape[0], dtype=torch.float64)
    for t in range(len(names)):
        mix_w[t, 2 * t : 2 * t + 2] = w[t]
    exact = cosine_from_gram((mix_w @ gram_halves @ mix_w.T).numpy())
    half_a = cosine_from_gram(gram_halves[0::2, 0::2].numpy())
    half_b = cosine_from_gram(gram_halves[1::2, 1::2].numpy())

    print(f"  exact cosines ready ({time.perf_counter() - t_start:.0f}s)", flush=True)
    rows = []
    for d in (2**16, 2**18):
        sk = CountSketch(SketchSpec(d, args.seed))
        t0 = time.perf_counter()
        s_halves = torch.stack([sketch_flat(model, x[i], sk) for i in range(x.shape[0])])
        t_sk = (time.perf_counter() - t0) / x.shape[0]
        s_full = (w[:, :, None] * s_halves.view(len(names), 2, -1)).sum(1)
        rows.append((f"CountSketch d=2^{int(math.log2(d))}", d, pearson_vs(exact, s_full), t_sk))
    g = torch.Generator().manual_seed(args.seed)
    keep = torch.randperm(x.shape[1], generator=g)[: x.shape[1] // 5]
    kept = full_rows(0, x.shape[1])[:, keep] * math.sqrt(5)
    rows.append(("keep 1 in 5 (paper)", keep.numel(), pearson_vs(exact, kept), float("nan")))
    print(f"  sketches done; dense projection ({time.perf_counter() - t_start:.0f}s)", flush=True)
    t0 = time.perf_counter()
    proj = dense_projection(full_rows, x.shape[1], args.dense_dims, args.seed)
    t_proj = (time.perf_counter() - t0) / len(names)
    rows.append(
        (f"dense Rademacher {args.dense_dims}", args.dense_dims, pearson_vs(exact, proj), t_proj)
    )
    # Cross-check: for a Gaussian R, X Rᵀ has i.i.d. N(0, X Xᵀ) columns, so its distribution
    # can be drawn from the exact Gram alone (L Z, L the Cholesky factor): 10 draws.
    g_full = (mix_w @ gram_halves @ mix_w.T).numpy()
    chol = np.linalg.cholesky(g_full + 1e-12 * np.trace(g_full) / len(g_full) * np.eye(len(g_full)))
    rs = np.random.default_rng(args.seed)
    gauss = [
        pearson_vs(exact, chol @ rs.normal(size=(len(g_full), args.dense_dims))) for _ in range(10)
    ]
    noise = offdiag_pearson(half_a, half_b)

    # Sketch time within calibration, streaming and accumulate-then-sketch (what "auto" picks
    # where the gradient fits).
    print(f"  projection done; timing passes ({time.perf_counter() - t_start:.0f}s)", flush=True)
    timing = {}
    few = names[: args.time_datasets]
    # The sketch costs O(P) per backward pass, forward + backward O(P · tokens in the pass): the
    # fraction falls as 1/(tokens per pass). Streaming sketches once per backward pass, so it is
    # timed at 8, 16 and 32 examples per pass (one pass per part); accumulate-then-sketch
    # sketches once per part (8 parts of `--batch-size` examples). Hash tables are built first.
    variants = [("accumulate", False, 8, args.batch_size)]
    variants += [(f"streaming{b}", True, max(1, args.calibration // b), b) for b in (8, 16, 32)]
    for label, streaming, n_parts, batch in variants:
        sk = CountSketch(SketchSpec(2**18, args.seed))
        sk.prepare(trainable_parameters(model))
        sketch_s = total_s = 0.0
        passes = tokens = 0
        for n in few:
            parts = split_parts(len(cal[n]), n_parts, args.seed, n)
            passes += sum(math.ceil(len(q) / batch) for q in parts)
            tokens += sum(len(e.input_ids) for e in cal[n])
            t0 = time.perf_counter()
            c = mean_gradient_sketch(
                model, cal[n], sk, batch, pad, parts=parts, fold_dim=2**14, streaming=streaming
            )
            total_s += time.perf_counter() - t0
            sketch_s += c.sketch_seconds
        timing[label] = (sketch_s / (total_s - sketch_s), tokens / passes, n_parts, batch)
    mem = measure_memory(len(tok), 64, 2**18)

    print(f"\n== calibration compression ({time.strftime('%Y-%m-%d')}) ==")
    print(
        f"model {n_params / 1e6:.1f}M params, {len(names)} datasets × {args.calibration} "
        f"calibration samples, θ0 pre-trained {args.train_steps} steps"
    )
    print(f"{'method':<24} {'dims':>9} {'Pearson vs exact':>17} {'time / grad pass':>18}")
    for label, dims, r, t in rows:
        cost = "" if not np.isfinite(t) else f"{t / (t_exact / len(names)):>17.1%}"
        print(f"{label:<24} {dims:>9,} {r:>17.5f} {cost:>18}")
    print(
        f"{'  (Gaussian, same dims)':<24} {args.dense_dims:>9,} {np.mean(gauss):>17.5f}   "
        f"(± {np.std(gauss):.5f} over 10 draws, sampled from the exact Gram)"
    )
    print(
        f"{'sampling noise':<24} {'':>9} {noise:>17.5f}   (cosines of two disjoint halves of "
        f"{args.calibration // 2} samples each)"
    )
    print("sketch time / rest of calibration forward+backward (d=2^18):")
    for label, (frac, per_pass, n_parts, batch) in timing.items():
        mode = "accumulate-then-sketch" if label == "accumulate" else "streaming"
        print(
            f"  {mode:<28} {n_parts} parts × batch {batch:>2} ({per_pass:>5.0f} tokens per "
            f"backward pass): {frac:6.1%}"
        )
    a, s = mem["accumulate"], mem["streaming"]
    print(
        f"peak memory added by calibration (batch 1 × 64 tokens, 4 micro-batches): "
        f"accumulate-then-sketch {a['added'] / 2**20:.1f} MiB, streaming {s['added'] / 2**20:.1f} "
        f"MiB (ratio {s['added'] / max(a['added'], 1):.2f}); a full fp32 gradient is "
        f"{a['params'] * 4 / 2**20:.1f} MiB, the largest parameter's {a['largest'] * 4 / 2**20:.1f} "
        f"MiB, the sketch (d floats) {2**18 * 4 / 2**20:.1f} MiB"
    )
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
