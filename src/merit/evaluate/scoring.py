"""Held-out evaluation per dataset: every registered metric of every dataset's examples.

Scoring. Each example's reference answer is scored (its summed NLL over the answer tokens, the
tokens the chat template puts after the generation prompt). Multiple choice: every option is
scored as if it were the answer, and the option with the highest *mean* log-probability per
answer token wins (:func:`merit.evaluate.metrics.accuracy.choose`; the unnormalised accuracy is
kept too). Generative: a greedy decode, judged by exact match after BIG-bench's post-processing
(:mod:`merit.evaluate.metrics.exact_match`). That makes one scored record per example, from
which every metric of :data:`merit.evaluate.metrics.METRICS` computes its dataset value; the
records are kept as per-example arrays for the bootstrap.

Speed. All scoring sequences of all datasets are batched together, sorted by length, so 256
datasets cost about as much as one big one; logits are computed only at answer positions (the
language-model head over a 4k–150k vocabulary is most of the cost of scoring a long prompt).

Averages, bootstrap intervals and paired comparisons of these records: ``merit.evaluate.statistics``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from merit.data.mixture import Mixture, as_answer, encode, render
from merit.evaluate.metrics import METRICS
from merit.evaluate.metrics.accuracy import choose
from merit.evaluate.metrics.exact_match import judge
from merit.lm import IGNORE, Encoded, model_inputs, pad_batch
from merit.vision import is_processor, open_image, text_tokenizer

# Bumped when what evaluate_model records changes: the pipeline re-evaluates older results.
EVAL_VERSION = 2


# -- scoring ------------------------------------------------------------------------------------
def _answer_logits_full(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    return logits[:, :-1][mask]


def _answer_logits_fast(model, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    # The decoder body once, the LM head only where a label is: for a prompt of 200 tokens and
    # an answer of 5, that skips ~97% of the vocabulary projection.
    hidden = model.base_model(**model_inputs(batch)).last_hidden_state
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
                # Two rows are enough, but image inputs are per image, not per row: keep those
                # batches whole.
                whole = set(batch) - {"input_ids", "attention_mask", "labels"}
                sub = batch if whole else {k: v[:2] for k, v in batch.items()}
                m = mask if whole else mask[:2]
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
    # A prompt with images is not shared: its cache would need the images' mRoPE positions.
    share_prompts = share_prompts and not any(e.pixels for e in seqs)
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
    images: Sequence[tuple[str, ...]] | None = None,
) -> list[str]:
    """Greedy continuation of each rendered prompt, up to the end-of-turn token; ``tokenizer``
    may be a vision-language model's processor, and ``images`` each prompt's image files."""
    if is_processor(tokenizer):
        return _decode_vision(
            model, tokenizer, prompts, images, max_new_tokens, batch_size, progress, desc
        )
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


def _decode_vision(
    model, processor, prompts, images, max_new_tokens: int, batch_size: int, progress, desc
) -> list[str]:
    """:func:`greedy_decode` with images: the processor pads on the left and expands each
    image's tokens; prompts are never cut (an image's tokens cannot be)."""
    device = next(model.parameters()).device
    tok = processor.tokenizer
    images = images or [()] * len(prompts)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        pics = [open_image(p) for i in idx for p in images[i]]
        enc = processor(
            text=[prompts[i] for i in idx],
            images=pics or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
        ).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        n = enc["input_ids"].shape[1]
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r, n:], skip_special_tokens=True)
    return out


# -- evaluation ---------------------------------------------------------------------------------
@dataclass
class _Item:
    dataset: str
    example: int
    kind: str  # "answer" or "choice"
    choice: int = -1


@dataclass
class _Requests:
    """What evaluating a mixture asks of a model: sequences to score (each example's reference
    answer, and every option of a multiple-choice question) and prompts to decode."""

    seqs: list[Encoded] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)
    gen_prompts: list[str] = field(default_factory=list)
    gen_items: list[tuple[str, int]] = field(default_factory=list)
    gen_images: list[tuple[str, ...]] = field(default_factory=list)


def _requests(tokenizer, mixture: Mixture, max_length, max_examples, max_generate):
    """The scoring requests of every dataset's eval split, and each dataset's record so far."""
    req, per = _Requests(), {}
    for ds in mixture.datasets:
        examples = ds.examples("eval")[:max_examples]
        mc = bool(examples) and all(ex.choices for ex in examples)
        per[ds.name] = {"kind": "multiple_choice" if mc else "generative", "n": len(examples)}
        for i, enc in enumerate(encode(tokenizer, examples, max_length)):
            req.seqs.append(enc)
            req.items.append(_Item(ds.name, i, "answer"))
        for i, ex in enumerate(examples):
            if mc:
                variants = [as_answer(ex, c) for c in ex.choices]
                for c, enc in enumerate(encode(tokenizer, variants, max_length)):
                    req.seqs.append(enc)
                    req.items.append(_Item(ds.name, i, "choice", c))
            elif i < max_generate:
                req.gen_prompts.append(render(tokenizer, [ex])[0][0])
                req.gen_items.append((ds.name, i))
                req.gen_images.append(ex.images)
    return req, per


def _record_scores(
    per: dict, mixture: Mixture, items, logp, count, max_examples
) -> dict[str, list[dict]]:
    """Each example's scored record: its answer's summed NLL and tokens and, for multiple
    choice, whether the option of highest mean log-probability per token is a target (the
    unnormalised winner's accuracy is kept alongside). Writes the per-example arrays of each
    dataset's record in place and returns the scored records, NLL unrounded."""
    records: dict[str, list[dict]] = {name: [{} for _ in range(r["n"])] for name, r in per.items()}
    choice_scores: dict[tuple[str, int], dict[int, tuple[float, int]]] = {}
    for it, lp, n in zip(items, logp, count):
        if it.kind == "answer":
            records[it.dataset][it.example].update(nll=-float(lp), tokens=int(n))
        else:
            choice_scores.setdefault((it.dataset, it.example), {})[it.choice] = (float(lp), int(n))
    for ds in mixture.datasets:
        r, exs = per[ds.name], records[ds.name]
        r["example_nll"] = [round(ex["nll"], 5) for ex in exs]
        r["example_tokens"] = [ex["tokens"] for ex in exs]
        if r["kind"] != "multiple_choice":
            continue
        raw_hits = []
        for i, ex in enumerate(ds.examples("eval")[:max_examples]):
            best, raw = choose(choice_scores[(ds.name, i)])
            exs[i]["correct"] = int(ex.choices[best] in ex.targets)
            raw_hits.append(int(ex.choices[raw] in ex.targets))
        r["accuracy_unnormalized"] = float(np.mean(raw_hits)) if raw_hits else None
        r["n_accuracy"] = len(raw_hits)
        r["example_correct"] = [ex["correct"] for ex in exs[: len(raw_hits)]]
    return records


def _record_generations(
    per: dict, records: dict[str, list[dict]], mixture: Mixture, gen_items, outs: Sequence[str]
) -> None:
    """Whether each decoded example matches a target exactly (BIG-bench post-processing): its
    scored record's ``correct`` and its dataset's per-example array, in place."""
    hits_by: dict[str, list[int]] = {}
    for (name, i), text in zip(gen_items, outs):
        ds = mixture[name]
        ex = ds.examples("eval")[i]
        bb = ds.data.format == "bigbench"
        hit = judge(text, ex.targets or (ex.answer,), ds.data.output_regex, ds.data.stop_string, bb)
        records[name][i]["correct"] = hit
        hits_by.setdefault(name, []).append(hit)
    for name, hits in hits_by.items():
        per[name]["n_accuracy"] = len(hits)
        per[name]["example_correct"] = hits


def _record_metrics(per: dict, records: dict[str, list[dict]]) -> None:
    """Every registered metric's value of each dataset, from its unrounded scored records (a
    metric without a value there is left out), placed before the per-example arrays."""
    for name, r in per.items():
        values = {m.name: v for m in METRICS if (v := m.observed(records[name])) is not None}
        rest = {k: v for k, v in r.items() if k not in ("kind", "n")}
        per[name] = {"kind": r["kind"], "n": r["n"], **values, **rest}


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

    Each dataset's record holds ``kind``, ``n``, the value of every registered metric that has
    one (``nll``: mean over answer tokens; ``accuracy``: length-normalised multiple choice, or
    exact match of the first ``max_generate`` examples), and the per-example scores the metrics
    and the bootstrap are computed from: ``example_nll`` (summed NLL), ``example_tokens`` and
    ``example_correct`` (0/1). ``label`` only names the progress bars.
    """
    model.eval()
    req, per = _requests(tokenizer, mixture, max_length, max_examples, max_generate)
    pad = text_tokenizer(tokenizer).pad_token_id
    logp, count = sequence_logprobs(
        model, req.seqs, batch_size, pad, progress, desc=f"score {label}"
    )
    records = _record_scores(per, mixture, req.items, logp, count, max_examples)
    if req.gen_prompts:
        outs = greedy_decode(
            model,
            tokenizer,
            req.gen_prompts,
            max_new_tokens,
            batch_size,
            max_length,
            progress,
            desc=f"generate {label}",
            images=req.gen_images,
        )
        _record_generations(per, records, mixture, req.gen_items, outs)
    _record_metrics(per, records)
    return per
