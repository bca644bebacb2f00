"""What an example trains on: every assistant turn of a ``messages`` record (as TRL's
``assistant_only_loss``) or the final one, checked token by token; and an example over the
token budget refused, dropped or truncated as ``data.overlong`` says, never cut silently."""

from __future__ import annotations

import pytest

from merit.data.mixture import encode, segments, token_lengths
from merit.data.records import examples_from_records
from merit.lm import IGNORE, load_tokenizer

TWO_TURNS = {
    "messages": [
        {"role": "user", "content": "Copy: apple river"},
        {"role": "assistant", "content": "apple river"},
        {"role": "user", "content": "Copy: stone"},
        {"role": "assistant", "content": "stone"},
    ]
}


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(tiny_base)


def _example(record):
    return examples_from_records([("test:1", record)])[0]


def _trained_runs(enc) -> list[list[int]]:
    """The maximal runs of trained tokens, in order."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def _reply_tokens(tok, msgs, j) -> list[int]:
    """The tokens the template writes for assistant turn ``j`` after its generation prompt."""
    prompt = tok.apply_chat_template(msgs[:j], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs[: j + 1], tokenize=False)
    return tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]


def test_all_assistant_trains_every_turn_and_final_only_the_last(tok):
    ex = _example(TWO_TURNS)
    assert ex.turns
    msgs = TWO_TURNS["messages"]
    every = encode(tok, [ex], 512, loss_on="all_assistant")[0]
    last = encode(tok, [ex], 512, loss_on="final")[0]
    assert _trained_runs(every) == [_reply_tokens(tok, msgs, 1), _reply_tokens(tok, msgs, 3)]
    assert _trained_runs(last) == [_reply_tokens(tok, msgs, 3)]
    # The same text either way: only where the loss goes differs.
    assert every.input_ids == last.input_ids
    assert tok.decode(every.input_ids) == tok.decode(
        tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    )
    assert every.answer_tokens > last.answer_tokens


def test_a_prompt_completion_record_trains_its_completion_only(tok):
    record = {"prompt": TWO_TURNS["messages"][:3], "completion": "stone"}
    ex = _example(record)
    assert not ex.turns
    enc = encode(tok, [ex], 512, loss_on="all_assistant")[0]
    assert _trained_runs(enc) == [_reply_tokens(tok, TWO_TURNS["messages"], 3)]


def test_a_template_that_rewrites_earlier_turns_trains_the_final_answer(tok):
    """Templates that drop earlier turns' reasoning once a later turn follows are not
    prefix-consistent: there is no honest way to mark the earlier replies."""
    ex = _example(TWO_TURNS)

    class Rewriting:
        chat_template = "x"
        eos_token = "|"

        def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=False):
            body = "".join(f"<{m['role']}>{m['content'][:1]}|" for m in msgs[:-1])
            last = msgs[-1]
            return (
                body
                + f"<{last['role']}>{last['content']}|"
                + ("<assistant>" * add_generation_prompt)
            )

    segs = segments(Rewriting(), [ex], "all_assistant")[0]
    assert [trained for _, trained in segs] == [False, True]


def test_token_lengths_count_the_longest_choice(tok):
    ex = _example({"prompt": "Pick one.", "completion": "a", "choices": ["a", "a " * 40]})
    short, long = token_lengths(tok, [ex]), token_lengths(tok, [ex], choices=True)
    assert long[0] > short[0] + 30


def test_truncation_keeps_half_the_budget_for_the_answer(tok):
    ex = _example({"prompt": "word " * 80, "completion": "river " * 80})
    n = token_lengths(tok, [ex])[0]
    assert n > 64
    enc = encode(tok, [ex], 64)[0]
    assert len(enc.input_ids) == 64 and enc.answer_tokens == 32
    # An answer of more than half the budget that fits is not cut (it used to be).
    fits = _example({"prompt": "Copy: apple", "completion": "river " * 20})
    m = token_lengths(tok, [fits])[0]
    whole = encode(tok, [fits], m)[0]
    assert whole.answer_tokens > m // 2 and len(whole.input_ids) == m
