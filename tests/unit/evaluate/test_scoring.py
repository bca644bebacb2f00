"""Evaluation: answer-only scoring, BIG-bench normalisation, length-normalised multiple choice,
and the paired bootstrap of two evaluated models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit.config import DataConfig
from merit.data.mixture import encode, encode_choices, load_mixture
from merit.evaluate.metrics.exact_match import exact_match, postprocess
from merit.evaluate.scoring import answer_logprobs, evaluate_model, sequence_logprobs
from merit.evaluate.statistics import paired_bootstrap
from merit.lm import load_model, load_tokenizer, pad_batch


@pytest.fixture(scope="module")
def mixture(mixture_specs):
    return load_mixture(
        DataConfig(datasets=mixture_specs, split={"eval": 6, "calibration": 4, "train": 8})
    )


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def evaluated(tiny_base, tok, mixture):
    return evaluate_model(_model(tiny_base), tok, mixture, 96, 6, 2, 4, 8, progress=False)


def _model(path, seed=None):
    model = load_model(path, torch.device("cpu"), "float32")
    if seed is not None:  # a different model with the same architecture
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_postprocess_follows_bigbench():
    # stop_string: kept, cut just after its first occurrence (not at position 0).
    assert postprocess("Paris. Then more.", None, ".") == "Paris."
    assert postprocess(".Paris", None, ".") == ".Paris"
    # output_regex: the first match, "" when none.
    assert postprocess("= 42. 7*7 = 49", r"\d+", None) == "42"
    assert postprocess("no digits", r"\d+", None) == ""
    # A BIG-bench task with neither gets BIG-bench's default regex (first sentence).
    assert postprocess(" Paris! And so on", None, None, bigbench=True) == "Paris"
    assert postprocess("line one\nline two", None, None, bigbench=True) == "line one"
    # Other datasets are compared verbatim (up to surrounding whitespace).
    assert postprocess(" 3.5 apples. ", None, None) == "3.5 apples."
    assert exact_match("Paris", [" Paris ", "paris"]) and not exact_match("paris.", ["Paris"])


def test_answer_logprobs_equal_full_logits(tiny_base, tok, mixture):
    model = _model(tiny_base)
    seqs = encode(tok, mixture["reverse_words"].examples("eval")[:4], 96)
    batch = pad_batch(seqs, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp, n = answer_logprobs(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert model._merit_fast_logits is True  # a Llama: head(body(x)) is its forward
    target = batch["labels"][:, 1:]
    mask = target != -100
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp_min(0)[..., None])
    expect = (full.squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(lp, expect, rtol=1e-5, atol=1e-4)
    assert n.tolist() == [s.answer_tokens for s in seqs]


def test_shared_prompt_scoring_equals_plain_scoring(tiny_base, tok, mixture):
    # The reference answer and every option of a question share one prompt pass.
    seqs = []
    for ex in mixture["pick_word"].examples("eval"):
        seqs += encode(tok, [ex], 96) + encode_choices(tok, ex, 96)
    seqs += encode(tok, mixture["copy_words"].examples("eval"), 96)  # lone answers
    model = _model(tiny_base)
    shared, n1 = sequence_logprobs(model, seqs, 5, tok.pad_token_id)
    assert model._merit_shared_prompts is True  # verified on real groups, then used
    plain, n2 = sequence_logprobs(model, seqs, 5, tok.pad_token_id, share_prompts=False)
    np.testing.assert_allclose(shared, plain, rtol=1e-4, atol=1e-3)
    assert n1.tolist() == n2.tolist() == [s.answer_tokens for s in seqs]


def test_multiple_choice_is_length_normalised(tiny_base, tok, mixture, evaluated):
    model = _model(tiny_base)
    per = evaluated
    rec = per["pick_word"]
    assert rec["kind"] == "multiple_choice" and rec["n_accuracy"] == 6
    for i, ex in enumerate(mixture["pick_word"].examples("eval")[:6]):
        lp, n = sequence_logprobs(model, encode_choices(tok, ex, 96), 8, tok.pad_token_id)
        best = int(np.argmax(lp / n))
        assert rec["example_correct"][i] == int(ex.choices[best] in ex.targets)
    # The per-example values add up to the dataset's metrics.
    for r in per.values():
        assert r["nll"] == pytest.approx(sum(r["example_nll"]) / sum(r["example_tokens"]), 1e-4)
        assert r["accuracy"] == pytest.approx(np.mean(r["example_correct"]))
    assert per["copy_words"]["n_accuracy"] == 2  # generative: the first max_generate decoded


def test_paired_bootstrap_of_identical_models_has_zero_width(tiny_base, tok, mixture, evaluated):
    # Two separately loaded copies of one checkpoint, evaluated independently.
    a = evaluated
    b = evaluate_model(_model(tiny_base), tok, mixture, 96, 6, 2, 4, 8, progress=False)
    for metric in ("nll", "accuracy"):
        r = paired_bootstrap(a, b, metric, samples=500)
        assert r["difference"] == 0.0 and r["ci"] == [0.0, 0.0]
        assert r["ties"] == r["datasets"] == 5 and r["p_a_better"] == 0.0
    # A different model: a non-degenerate interval around the observed difference.
    c = evaluate_model(_model(tiny_base, seed=1), tok, mixture, 96, 6, 2, 4, 8, progress=False)
    r = paired_bootstrap(a, c, "nll", samples=500)
    assert r["ci"][0] < r["ci"][1] and r["ci"][0] <= r["difference"] <= r["ci"][1]
    assert r["wins"] + r["ties"] + r["losses"] == 5
