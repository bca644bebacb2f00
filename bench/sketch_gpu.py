"""Benchmark: what the gradient sketch costs inside streaming calibration of a big model.

    python bench/sketch_gpu.py            # a 7B-shaped Llama, bf16, on one GPU (~2 min on an H200)
    python bench/sketch_gpu.py --small    # a ~30M-parameter one, fp32, wherever it runs

A Llama built from a config (random weights) is calibrated on random token sequences (the answer
is the second half) by merit's streaming calibration (``mean_gradient_sketch``: a
post-accumulate-grad hook sketches and frees each parameter's gradient). The sketch's cost is
the wall time of a calibration call minus that of the same call with a hook that only frees the
gradient, as a fraction of the latter: on a GPU, timers inside the hooks would see kernel
launches, not kernels. Both paths of ``CountSketch.add`` are timed: whole chunks grouped 64 to an
``index_add_`` (the default off the CPU) and two contiguous ``addcmul_`` per chunk (the CPU's).
Each mode runs ``--repeats`` times interleaved after a warm-up; the best run of each is kept.
``--accumulate`` times accumulate-then-sketch instead (one sketch per call, after all passes).
"""

from __future__ import annotations

import argparse
import time

import torch

from merit.calibrate.sketch import CountSketch, SketchSpec, mean_gradient_sketch
from merit.lm import IGNORE, Encoded, trainable_parameters

BIG = {"hidden": 4096, "layers": 32, "intermediate": 11008, "heads": 32, "vocab": 32000}
SMALL = {"hidden": 512, "layers": 6, "intermediate": 1376, "heads": 8, "vocab": 8192}


class FreeOnly(CountSketch):
    """The baseline: the streaming hooks run and free each gradient, nothing is sketched."""

    def add(self, out, name, values, offset=0) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~30M-parameter model (CPU-sized)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per backward pass")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--passes", type=int, default=4, help="backward passes per calibration call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dim", type=int, default=2**18, help="sketch buckets d")
    ap.add_argument(
        "--accumulate",
        action="store_true",
        help="accumulate-then-sketch (one sketch per call) instead of streaming (one per pass)",
    )
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SMALL if args.small else BIG
    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    params = trainable_parameters(model)
    n_params = sum(p.numel() for _, p in params)
    print(
        f"model: {n_params / 1e9:.2f}B parameters, {dtype}, on {device} (built in "
        f"{time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    g = torch.Generator().manual_seed(0)
    half = args.seq // 2
    examples = []
    for _ in range(args.batch * args.passes):
        ids = torch.randint(2, shape["vocab"], (args.seq,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE] * half + ids[half:]))

    spec = SketchSpec(args.dim, 0)
    modes = {
        "free only (baseline)": FreeOnly(spec),
        "grouped index_add_ (default off CPU)": CountSketch(spec, batched=True),
        "contiguous runs (default on CPU)": CountSketch(spec, batched=False),
    }
    for sk in modes.values():
        sk.prepare(params)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def call(sk: CountSketch):
        sync()
        t = time.perf_counter()
        cal = mean_gradient_sketch(
            model, examples, sk, args.batch, 0, streaming=not args.accumulate
        )
        sync()
        return time.perf_counter() - t, cal

    best: dict[str, float] = {}
    sketches = {}
    for r in range(args.repeats + 1):  # the first round warms up (kernels, allocator)
        for name, sk in modes.items():
            seconds, cal = call(sk)
            print(f"  round {r}: {name}: {seconds:.2f} s", flush=True)
            if r:
                best[name] = min(best.get(name, seconds), seconds)
            sketches[name] = cal.sketch
    base = best["free only (baseline)"]
    tokens = args.batch * args.seq
    mode = "accumulate-then-sketch" if args.accumulate else "streaming"
    print(f"\n== sketch cost in {mode} calibration ({time.strftime('%Y-%m-%d')}) ==")
    print(
        f"{n_params / 1e9:.2f}B-parameter Llama ({dtype}, {device}"
        f"{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}); "
        f"{args.passes} backward passes of {args.batch} × {args.seq} tokens ({tokens} tokens, "
        f"half of them answers); d = 2^{args.dim.bit_length() - 1}; best of {args.repeats}"
    )
    print(f"{'mode':<40} {'s per pass':>10} {'sketch / forward+backward':>26}")
    for name, seconds in best.items():
        frac = "–" if name.startswith("free") else f"{(seconds - base) / base:.1%}"
        print(f"{name:<40} {seconds / args.passes:10.3f} {frac:>26}")
    a = sketches["grouped index_add_ (default off CPU)"].double()
    b = sketches["contiguous runs (default on CPU)"].double()
    print(f"the two paths' sketches differ by {float((a - b).norm() / b.norm()):.1e} (relative)")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
