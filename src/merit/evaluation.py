"""Held-out evaluation per dataset: answer NLL and accuracy.

Multiple choice: the option with the highest log-likelihood as an answer. Generative: exact match
of a greedy decode after BIG-bench's post-processing (stop string, output regex). All scoring
sequences of all datasets are batched together, sorted by length, so 256 datasets cost about as
much as one big one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.gradients import pad_batch
from merit.mixture import IGNORE, Encoded, Mixture, encode, encode_pairs, render


@torch.no_grad()
def sequence_logprobs(
    model,
    seqs: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    progress: bool = False,
    desc: str = "score",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each sequence's label tokens, and their count."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    total = np.zeros(len(seqs))
    count = np.zeros(len(seqs), dtype=np.int64)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        batch = pad_batch([seqs[i] for i in idx], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = batch["labels"][:, 1:]
        mask = target != IGNORE
        picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        total[idx] = picked.sum(-1).cpu().numpy()
        count[idx] = mask.sum(-1).cpu().numpy()
    return total, count


@torch.no_grad()
def greedy_decode(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, max_length: int
) -> list[str]:
    """Greedy continuation of each rendered prompt, up to the end-of-turn token."""
    device = next(model.parameters()).device
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ids = [x[-(max_length - max_new_tokens) :] for x in ids]
    pad = tokenizer.pad_token_id
    out: list[str] = [""] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        n = max(len(ids[i]) for i in idx)
        # Left padding, so every row's continuation starts at the same position.
        x = torch.full((len(idx), n), pad, dtype=torch.long)
        m = torch.zeros((len(idx), n), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, n - len(ids[i]) :] = torch.tensor(ids[i])
            m[r, n - len(ids[i]) :] = 1
        gen = model.generate(
            input_ids=x.to(device),
            attention_mask=m.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[r, n:], skip_special_tokens=True)
    return out


def postprocess(text: str, output_regex: str | None, stop_string: str | None) -> str:
    """BIG-bench's post-processing of a generation: cut at the stop string, then the regex."""
    if stop_string and stop_string in text:
        text = text[: text.index(stop_string)]
    if output_regex:
        m = re.search(output_regex, text)
        text = m.group(0) if m else ""
    return text.strip()


@dataclass
class _Item:
    dataset: str
    example: int
    kind: str  # "answer" or "choice"
    choice: int = -1


def evaluate_model(
    model,
    tokenizer,
    mixture: Mixture,
    max_length: int,
    max_examples: int | None,
    max_generate: int,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
    label: str = "model",
) -> dict[str, dict]:
    """Per-dataset metrics on the eval split: ``nll`` (mean over answer tokens) and ``accuracy``."""
    model.eval()
    seqs: list[Encoded] = []
    items: list[_Item] = []
    gen_prompts: list[str] = []
    gen_items: list[tuple[str, int]] = []
    per: dict[str, dict] = {}
    for ds in mixture.datasets:
        examples = ds.examples("eval")[:max_examples]
        mc = bool(examples) and all(ex.choices for ex in examples)
        per[ds.name] = {"kind": "multiple_choice" if mc else "generative", "n": len(examples)}
        for i, enc in enumerate(encode(tokenizer, examples, max_length)):
            seqs.append(enc)
            items.append(_Item(ds.name, i, "answer"))
        for i, ex in enumerate(examples):
            if mc:
                variants = [type(ex)(ex.messages, c) for c in ex.choices]
                for c, enc in enumerate(encode(tokenizer, variants, max_length)):
                    seqs.append(enc)
                    items.append(_Item(ds.name, i, "choice", c))
            elif i < max_generate:
                gen_prompts.append(render(tokenizer, [ex])[0][0])
                gen_items.append((ds.name, i))
    pad = tokenizer.pad_token_id
    logp, count = sequence_logprobs(model, seqs, batch_size, pad, progress, desc=f"score {label}")
    nll_sum: dict[str, float] = {}
    tok: dict[str, int] = {}
    choice_scores: dict[tuple[str, int], dict[int, float]] = {}
    for it, lp, n in zip(items, logp, count):
        if it.kind == "answer":
            nll_sum[it.dataset] = nll_sum.get(it.dataset, 0.0) - lp
            tok[it.dataset] = tok.get(it.dataset, 0) + int(n)
        else:
            choice_scores.setdefault((it.dataset, it.example), {})[it.choice] = lp
    for ds in mixture.datasets:
        r = per[ds.name]
        r["nll"] = nll_sum.get(ds.name, 0.0) / max(1, tok.get(ds.name, 0))
        if r["kind"] == "multiple_choice":
            examples = ds.examples("eval")[:max_examples]
            hits = []
            for i, ex in enumerate(examples):
                scores = choice_scores[(ds.name, i)]
                best = max(scores, key=lambda c: scores[c])
                hits.append(ex.choices[best] in ex.targets)
            r["accuracy"] = float(np.mean(hits)) if hits else None
            r["n_accuracy"] = len(hits)
    if gen_prompts:
        outs = greedy_decode(model, tokenizer, gen_prompts, max_new_tokens, batch_size, max_length)
        hits_by: dict[str, list[bool]] = {}
        for (name, i), text in zip(gen_items, outs):
            ds = mixture[name]
            ex = ds.examples("eval")[i]
            pred = postprocess(text, ds.data.output_regex, ds.data.stop_string)
            targets = {postprocess(t, None, None) for t in ex.targets}
            hits_by.setdefault(name, []).append(pred in targets)
        for name, hits in hits_by.items():
            per[name]["accuracy"] = float(np.mean(hits))
            per[name]["n_accuracy"] = len(hits)
    return per


def summarize(per: dict[str, dict]) -> dict[str, float | None]:
    """Dataset averages: every dataset counts once, whatever its size."""
    nll = [r["nll"] for r in per.values() if r.get("nll") is not None]
    acc = [r["accuracy"] for r in per.values() if r.get("accuracy") is not None]
    return {
        "nll": float(np.mean(nll)) if nll else None,
        "accuracy": float(np.mean(acc)) if acc else None,
        "datasets": len(per),
        "perplexity": float(math.exp(np.mean(nll))) if nll else None,
    }


def markdown_table(summaries: dict[str, dict]) -> str:
    """Models × (held-out NLL, accuracy) averaged over datasets."""
    lines = ["| model | held-out NLL ↓ | accuracy ↑ | datasets |", "|---|---:|---:|---:|"]
    for name, s in summaries.items():
        acc = f"{100 * s['accuracy']:.2f}%" if s.get("accuracy") is not None else "n/a"
        nll = f"{s['nll']:.4f}" if s.get("nll") is not None else "n/a"
        lines.append(f"| {name} | {nll} | {acc} | {s['datasets']} |")
    return "\n".join(lines) + "\n"


__all__ = ["encode_pairs", "evaluate_model", "markdown_table", "postprocess", "summarize"]
