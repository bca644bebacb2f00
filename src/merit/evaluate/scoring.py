"""Held-out evaluation per dataset: answer NLL and accuracy, with bootstrap confidence intervals.

Scoring. The NLL of a dataset is the mean over its answer tokens (the tokens the chat template
puts after the generation prompt). Multiple choice: every option is scored as if it were the
answer, and the option with the highest *mean* log-probability per answer token wins (summed
log-likelihood favours short options; the unnormalised accuracy is kept too). Generative: a
greedy decode, post-processed exactly as BIG-bench 1.0.0 does (``stop_string`` kept up to and
including its first occurrence, then the first match of ``output_regex``, whose default for a
task that sets neither is ``[^\\.\\?\\!\\;\\n]+``), compared by exact match with the targets.

Speed. All scoring sequences of all datasets are batched together, sorted by length, so 256
datasets cost about as much as one big one; logits are computed only at answer positions (the
language-model head over a 4k–150k vocabulary is most of the cost of scoring a long prompt).

Statistics. Every dataset counts once in an average. Confidence intervals come from a
stratified bootstrap: examples are resampled within each dataset (the set of datasets is what
the user chose, the examples are a sample), with indices drawn from a generator seeded by the
dataset's name, so two models are always resampled identically — a paired comparison of a
model with itself has a difference of exactly zero in every resample.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.data.mixture import Mixture, encode, encode_pairs, render
from merit.lm import IGNORE, Encoded, pad_batch

# Bumped when what evaluate_model records changes: the pipeline re-evaluates older results.
EVAL_VERSION = 2
BIGBENCH_DEFAULT_REGEX = r"[^\.\?\!\;\n]+"  # bigbench/api/json_task.py, _DEFAULT_REGEX


# -- scoring ------------------------------------------------------------------------------------
def _answer_logits_full(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1][mask]


def _answer_logits_fast(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    # The decoder body once, the LM head only where a label is: for a prompt of 200 tokens and
    # an answer of 5, that skips ~97% of the vocabulary projection.
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][mask])


def _fast_path_ok(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> bool:
    """Whether ``head(body(x))`` is the model's own logits (no softcapping or logit scale).

    Checked once per model instance on a real batch, so any causal LM works: models whose
    forward does more than project the last hidden state fall back to full logits.
    """
    flag = getattr(model, "_merit_fast_logits", None)
    if flag is not None:
        return flag
    ok = False
    if model.get_output_embeddings() is not None and model.base_model is not model:
        try:
            with torch.no_grad():
                sub = {k: v[:2] for k, v in batch.items()}
                m = mask[:2]
                ok = bool(
                    torch.allclose(
                        _answer_logits_fast(model, sub, m).float(),
                        _answer_logits_full(model, sub, m).float(),
                        rtol=1e-3,
                        atol=1e-3,
                    )
                )
        except (AttributeError, TypeError, RuntimeError):
            ok = False
    model._merit_fast_logits = ok
    return ok


def answer_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's label tokens, and their count (differentiable)."""
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    if _fast_path_ok(model, batch, mask):
        logits = _answer_logits_fast(model, batch, mask)
    else:
        logits = _answer_logits_full(model, batch, mask)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    total = torch.zeros(mask.size(0), dtype=picked.dtype, device=picked.device)
    total = total.index_add(0, rows, picked)
    return total, mask.sum(-1)


@torch.no_grad()
def _plain_logprobs(
    model,
    seqs: Sequence[Encoded],
    idx: Sequence[int],
    pad_id: int,
    out: np.ndarray,
    cnt: np.ndarray,
) -> None:
    device = next(model.parameters()).device
    batch = pad_batch([seqs[i] for i in idx], pad_id, device)
    lp, n = answer_logprobs(model, batch)
    out[list(idx)] = lp.double().cpu().numpy()
    cnt[list(idx)] = n.cpu().numpy()


@dataclass
class _Group:
    """Sequences that share one prompt: the prompt is run once, its KV cache reused."""

    prompt: list[int]
    members: list[int]  # indices into the sequence list
    answers: list[list[int]]


def _prompt_groups(seqs: Sequence[Encoded]) -> tuple[list[_Group], list[int]]:
    """Group sequences by identical prompt tokens; the rest (no prompt, odd labels) stay alone."""
    groups: dict[tuple[int, ...], _Group] = {}
    alone = []
    for i, e in enumerate(seqs):
        n = next((j for j, x in enumerate(e.labels) if x != IGNORE), len(e.labels))
        if n == 0 or n == len(e.labels) or any(x == IGNORE for x in e.labels[n:]):
            alone.append(i)
            continue
        key = tuple(e.input_ids[:n])
        g = groups.setdefault(key, _Group(list(key), [], []))
        g.members.append(i)
        g.answers.append(e.input_ids[n:])
    return list(groups.values()), alone


@torch.no_grad()
def _shared_logprobs(model, groups: Sequence[_Group], pad_id: int) -> list[tuple[float, int]]:
    """Score every answer of every group with one prompt pass per group (KV cache reused).

    The prompts are left-padded and run once; the cache rows are repeated for each of a
    group's answers (its multiple-choice options), which then run on top of it, right-padded,
    with explicit positions. Answer token 0 is predicted from the prompt's last position.
    """
    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings()
    p_len = max(len(g.prompt) for g in groups)
    x = torch.full((len(groups), p_len), pad_id, dtype=torch.long)
    m = torch.zeros((len(groups), p_len), dtype=torch.long)
    for r, g in enumerate(groups):
        x[r, p_len - len(g.prompt) :] = torch.tensor(g.prompt)
        m[r, p_len - len(g.prompt) :] = 1
    x, m = x.to(device), m.to(device)
    pos = (m.cumsum(-1) - 1).clamp_min(0)
    out = body(input_ids=x, attention_mask=m, position_ids=pos, use_cache=True)
    # transformers ≥ 5.2x names the cache ``cache`` (``past_key_values`` before).
    new_api = "cache" in inspect.signature(body.forward).parameters
    cache = out.cache if new_api else out.past_key_values
    rep = torch.tensor([r for r, g in enumerate(groups) for _ in g.answers], device=device)
    cache.reorder_cache(rep)
    answers = [a for g in groups for a in g.answers]
    a_len = max(len(a) for a in answers)
    y = torch.full((len(answers), a_len), pad_id, dtype=torch.long)
    am = torch.zeros((len(answers), a_len), dtype=torch.long)
    for r, a in enumerate(answers):
        y[r, : len(a)] = torch.tensor(a)
        am[r, : len(a)] = 1
    y, am = y.to(device), am.to(device)
    ypos = m.sum(-1)[rep].unsqueeze(1) + torch.arange(a_len, device=device)
    out2 = body(
        input_ids=y,
        attention_mask=torch.cat([m[rep], am], dim=1),
        position_ids=ypos,
        use_cache=False,
        **{"cache" if new_api else "past_key_values": cache},
    )
    last = out.last_hidden_state[:, -1][rep].unsqueeze(1)
    hidden = torch.cat([last, out2.last_hidden_state[:, :-1]], dim=1)  # predicts y[:, j]
    mask = am.bool()
    logp = torch.log_softmax(head(hidden[mask]).float(), dim=-1)
    picked = logp.gather(-1, y[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(len(answers), device=device).unsqueeze(1).expand_as(mask)[mask]
    sums = torch.zeros(len(answers), dtype=torch.float64, device=device)
    sums.index_add_(0, rows, picked.double())
    return [(float(v), len(a)) for v, a in zip(sums.cpu(), answers)]


def _shared_ok(model, seqs: Sequence[Encoded], groups: Sequence[_Group], pad_id: int) -> bool:
    """Whether prompt sharing reproduces plain scoring for this model (checked once on real
    groups; models whose cache or positions work differently fall back to plain scoring)."""
    flag = getattr(model, "_merit_shared_prompts", None)
    if flag is not None:
        return flag
    ok = False
    probe = sorted(groups, key=lambda g: -len(g.answers))[:2]
    if probe and model.get_output_embeddings() is not None and model.base_model is not model:
        try:
            got = [lp for lp, _ in _shared_logprobs(model, probe, pad_id)]
            idx = [i for g in probe for i in g.members]
            want, cnt = np.zeros(len(seqs)), np.zeros(len(seqs), dtype=np.int64)
            _plain_logprobs(model, seqs, idx, pad_id, want, cnt)
            ok = bool(np.allclose(got, want[idx], rtol=1e-4, atol=2e-3))
        except (AttributeError, TypeError, ValueError, RuntimeError, IndexError):
            ok = False
    model._merit_shared_prompts = ok
    return ok


@torch.no_grad()
def sequence_logprobs(
    model,
    seqs: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    progress: bool = False,
    desc: str = "score",
    share_prompts: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each sequence's label tokens, and their count.

    Sequences with the same prompt (a multiple-choice question's options and its reference
    answer) share one prompt pass when the model supports it (verified once per model); the
    rest are batched plainly, sorted by length.
    """
    total = np.zeros(len(seqs))
    count = np.zeros(len(seqs), dtype=np.int64)
    groups, alone = _prompt_groups(seqs) if share_prompts else ([], list(range(len(seqs))))
    if groups and not _shared_ok(model, seqs, groups, pad_id):
        groups, alone = [], list(range(len(seqs)))
    # Groups with several answers share; a lone answer gains nothing from its own cache.
    alone += [i for g in groups if len(g.answers) == 1 for i in g.members]
    groups = sorted((g for g in groups if len(g.answers) > 1), key=lambda g: len(g.prompt))
    batches: list[tuple[str, list]] = []
    cur: list[_Group] = []
    for g in groups:
        if cur and sum(len(c.answers) for c in cur) + len(g.answers) > batch_size:
            batches.append(("shared", cur))
            cur = []
        cur.append(g)
    if cur:
        batches.append(("shared", cur))
    order = sorted(alone, key=lambda i: len(seqs[i].input_ids))
    batches += [("plain", order[s : s + batch_size]) for s in range(0, len(order), batch_size)]
    for kind, part in tqdm(batches, desc=desc, disable=not progress, leave=False):
        if kind == "plain":
            _plain_logprobs(model, seqs, part, pad_id, total, count)
            continue
        scored = _shared_logprobs(model, part, pad_id)
        for i, (lp, n) in zip([i for g in part for i in g.members], scored):
            total[i], count[i] = lp, n
    return total, count


@torch.no_grad()
def greedy_decode(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    max_length: int,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuation of each rendered prompt, up to the end-of-turn token."""
    device = next(model.parameters()).device
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ids = [x[-(max_length - max_new_tokens) :] for x in ids]
    pad = tokenizer.pad_token_id
    out: list[str] = [""] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
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


# -- BIG-bench normalisation --------------------------------------------------------------------
def postprocess(
    text: str, output_regex: str | None, stop_string: str | None, bigbench: bool = False
) -> str:
    """A generation post-processed as BIG-bench 1.0.0 does (``models/model_utils.py``).

    The stop string is kept (the text is cut just after its first occurrence past position 0),
    then the first ``re.findall`` match of the regex is returned ("" when none). A BIG-bench task
    that sets neither gets BIG-bench's default regex (up to the first sentence end); other
    datasets are compared verbatim. Surrounding whitespace is stripped last: a chat template,
    unlike BIG-bench's raw ``"\\nA: "`` continuation, fixes no convention for a leading space.
    """
    if bigbench and output_regex is None and stop_string is None:
        output_regex = BIGBENCH_DEFAULT_REGEX
    if stop_string:
        index = text.find(stop_string)
        if index > 0:
            text = text[: index + len(stop_string)]
    if output_regex:
        text = next(iter(re.findall(output_regex, text)), "")
    return text.strip()


def exact_match(response: str, targets: Sequence[str]) -> bool:
    """BIG-bench's ``exact_str_match``: the (post-processed) response is one of the targets."""
    return response in {t.strip() for t in targets}


# -- evaluation ---------------------------------------------------------------------------------
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
    """Per-dataset metrics on the eval split.

    Each dataset's record holds ``nll`` (mean over answer tokens), ``accuracy`` (length-normalised
    multiple choice, or exact match of the first ``max_generate`` examples), ``n``, ``kind``, and
    per-example values for the bootstrap: ``example_nll`` (summed NLL), ``example_tokens`` and
    ``example_correct`` (0/1).
    """
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
    ex_nll: dict[str, dict[int, float]] = {name: {} for name in per}
    ex_tok: dict[str, dict[int, int]] = {name: {} for name in per}
    choice_scores: dict[tuple[str, int], dict[int, tuple[float, int]]] = {}
    for it, lp, n in zip(items, logp, count):
        if it.kind == "answer":
            ex_nll[it.dataset][it.example] = -float(lp)
            ex_tok[it.dataset][it.example] = int(n)
        else:
            choice_scores.setdefault((it.dataset, it.example), {})[it.choice] = (float(lp), int(n))
    for ds in mixture.datasets:
        r = per[ds.name]
        nlls = [ex_nll[ds.name][i] for i in range(r["n"])]
        toks = [ex_tok[ds.name][i] for i in range(r["n"])]
        r["nll"] = sum(nlls) / max(1, sum(toks)) if toks else None
        r["example_nll"] = [round(x, 5) for x in nlls]
        r["example_tokens"] = toks
        if r["kind"] == "multiple_choice":
            examples = ds.examples("eval")[:max_examples]
            hits, raw_hits = [], []
            for i, ex in enumerate(examples):
                scores = choice_scores[(ds.name, i)]
                best = max(scores, key=lambda c: scores[c][0] / max(1, scores[c][1]))
                raw = max(scores, key=lambda c: scores[c][0])
                hits.append(int(ex.choices[best] in ex.targets))
                raw_hits.append(int(ex.choices[raw] in ex.targets))
            r["accuracy"] = float(np.mean(hits)) if hits else None
            r["accuracy_unnormalized"] = float(np.mean(raw_hits)) if raw_hits else None
            r["n_accuracy"] = len(hits)
            r["example_correct"] = hits
    if gen_prompts:
        outs = greedy_decode(
            model,
            tokenizer,
            gen_prompts,
            max_new_tokens,
            batch_size,
            max_length,
            progress,
            desc=f"generate {label}",
        )
        hits_by: dict[str, list[int]] = {}
        for (name, i), text in zip(gen_items, outs):
            ds = mixture[name]
            ex = ds.examples("eval")[i]
            bb = ds.data.format == "bigbench"
            pred = postprocess(text, ds.data.output_regex, ds.data.stop_string, bigbench=bb)
            hits_by.setdefault(name, []).append(int(exact_match(pred, ex.targets or (ex.answer,))))
        for name, hits in hits_by.items():
            per[name]["accuracy"] = float(np.mean(hits))
            per[name]["n_accuracy"] = len(hits)
            per[name]["example_correct"] = hits
    return per


# -- averages and the bootstrap -----------------------------------------------------------------
METRICS = ("nll", "accuracy")


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


def _resample_idx(name: str, n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) example indices of one dataset: a function of (seed, name, n) only."""
    key = int.from_bytes(
        hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little"
    )
    return np.random.default_rng([key, n]).integers(0, n, size=(samples, n))


def _has(rec: dict, metric: str) -> bool:
    if metric == "nll":
        return bool(rec.get("example_tokens")) and sum(rec["example_tokens"]) > 0
    return bool(rec.get("example_correct"))


def _dataset_resamples(rec: dict, name: str, metric: str, samples: int, seed: int) -> np.ndarray:
    """The dataset's metric under each bootstrap resample of its examples."""
    if metric == "nll":
        nll = np.asarray(rec["example_nll"], dtype=np.float64)
        tok = np.asarray(rec["example_tokens"], dtype=np.float64)
        idx = _resample_idx(name, len(nll), samples, seed)
        return nll[idx].sum(1) / np.maximum(tok[idx].sum(1), 1.0)
    hits = np.asarray(rec["example_correct"], dtype=np.float64)
    idx = _resample_idx(name + "/accuracy", len(hits), samples, seed)
    return hits[idx].mean(1)


def _average_resamples(
    per: dict[str, dict], names: Sequence[str], metric: str, samples: int, seed: int
) -> np.ndarray:
    acc = np.zeros(samples)
    for name in names:
        acc += _dataset_resamples(per[name], name, metric, samples, seed)
    return acc / max(1, len(names))


def _interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(x, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    per: dict[str, dict],
    metric: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the dataset average of ``metric`` ('nll'/'accuracy')."""
    names = [n for n, r in per.items() if _has(r, metric)]
    if not names:
        return None
    return _interval(_average_resamples(per, names, metric, samples, seed), confidence)


def paired_bootstrap(
    per_a: dict[str, dict],
    per_b: dict[str, dict],
    metric: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict | None:
    """Model A minus model B on the datasets both have, examples resampled identically.

    Returns the observed difference of dataset averages, its percentile interval, the share of
    resamples in which A is better (lower NLL / higher accuracy), and per-dataset wins, ties
    and losses of A.
    """
    names = [n for n in per_a if n in per_b and _has(per_a[n], metric) and _has(per_b[n], metric)]
    if not names:
        return None
    for n in names:
        key = "example_tokens" if metric == "nll" else "example_correct"
        if len(per_a[n][key]) != len(per_b[n][key]):
            raise ValueError(f"{n}: the two models were evaluated on different examples")
    a = _average_resamples(per_a, names, metric, samples, seed)
    b = _average_resamples(per_b, names, metric, samples, seed)
    diff = a - b
    sign = -1.0 if metric == "nll" else 1.0
    obs_a = float(np.mean([per_a[n][metric] for n in names]))
    obs_b = float(np.mean([per_b[n][metric] for n in names]))
    d = np.array([per_a[n][metric] - per_b[n][metric] for n in names]) * sign
    return {
        "metric": metric,
        "datasets": len(names),
        "a": obs_a,
        "b": obs_b,
        "difference": obs_a - obs_b,
        "ci": list(_interval(diff, confidence)),
        "confidence": confidence,
        "p_a_better": float(np.mean(sign * diff > 0)),
        "wins": int((d > 1e-12).sum()),
        "ties": int((np.abs(d) <= 1e-12).sum()),
        "losses": int((d < -1e-12).sum()),
    }


def with_intervals(
    per: dict[str, dict], samples: int, confidence: float, seed: int
) -> dict[str, object]:
    """:func:`summarize` plus a bootstrap interval for each averaged metric."""
    s: dict[str, object] = dict(summarize(per))
    for m in METRICS:
        ci = bootstrap_ci(per, m, samples, confidence, seed)
        s[f"{m}_ci"] = list(ci) if ci else None
    s["confidence"] = confidence
    return s


def compare_models(
    results: dict[str, dict[str, dict]],
    anchor: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """Paired comparisons of ``anchor`` with every other model: ``{"A vs B": {metric: ...}}``.

    ``results`` maps a model label to its per-dataset records (:func:`evaluate_model`).
    """
    out = {}
    for other in results:
        if other == anchor:
            continue
        out[f"{anchor} vs {other}"] = {
            m: paired_bootstrap(results[anchor], results[other], m, samples, confidence, seed)
            for m in METRICS
        }
    return out


def _fmt(value, ci, pct: bool) -> str:
    if value is None:
        return "n/a"
    if pct:
        text = f"{100 * value:.2f}%"
        return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    return f"{value:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown_table(summaries: dict[str, dict]) -> str:
    """Models × (held-out NLL, accuracy) averaged over datasets, with intervals when known."""
    conf = next((s.get("confidence") for s in summaries.values() if s.get("confidence")), None)
    tag = f" ({100 * conf:.0f}% CI)" if conf else ""
    lines = [
        f"| model | held-out NLL ↓{tag} | accuracy ↑{tag} | datasets |",
        "|---|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        nll = _fmt(s.get("nll"), s.get("nll_ci"), pct=False)
        acc = _fmt(s.get("accuracy"), s.get("accuracy_ci"), pct=True)
        lines.append(f"| {name} | {nll} | {acc} | {s['datasets']} |")
    return "\n".join(lines) + "\n"


def comparison_table(rows: dict[str, dict[str, dict | None]]) -> str:
    """Paired comparisons ``{"A vs B": {"nll": paired, "accuracy": paired}}`` as Markdown."""
    lines = [
        "| comparison | Δ NLL (A−B) [CI] | P(A lower NLL) | Δ accuracy (A−B) [CI] | P(A more accurate) | datasets A/=/B better (acc) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        n, a = r.get("nll"), r.get("accuracy")
        dn = f"{n['difference']:+.4f} [{n['ci'][0]:+.4f}, {n['ci'][1]:+.4f}]" if n else "n/a"
        da = (
            f"{100 * a['difference']:+.2f} pt [{100 * a['ci'][0]:+.2f}, {100 * a['ci'][1]:+.2f}]"
            if a
            else "n/a"
        )
        pn = f"{n['p_a_better']:.3f}" if n else "n/a"
        pa = f"{a['p_a_better']:.3f}" if a else "n/a"
        wl = f"{a['wins']}/{a['ties']}/{a['losses']}" if a else "n/a"
        lines.append(f"| {name} | {dn} | {pn} | {da} | {pa} | {wl} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "EVAL_VERSION",
    "answer_logprobs",
    "bootstrap_ci",
    "compare_models",
    "comparison_table",
    "encode_pairs",
    "evaluate_model",
    "exact_match",
    "markdown_table",
    "paired_bootstrap",
    "postprocess",
    "summarize",
    "with_intervals",
]
