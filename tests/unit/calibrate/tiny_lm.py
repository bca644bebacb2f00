"""A tiny language model and answer-masked examples for the calibration tests."""

import torch

from merit.lm import IGNORE, Encoded


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=13, width=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.mid = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mid(self.emb(input_ids)))
        return type("O", (), {"logits": self.out(h)})()


def examples(n=9, vocab=13, seed=0):
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=rng))
        ids = torch.randint(1, vocab, (length,), generator=rng).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=rng))
        out.append(Encoded(ids, [IGNORE] * cut + ids[cut:]))
    return out
