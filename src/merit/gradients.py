"""Representative gradients g_t at θ0 (paper §3.1), compressed by a CountSketch.

The paper keeps 1 coordinate in 5; a CountSketch keeps every coordinate, hashed into d signed
buckets, so <S a, S b> is an unbiased estimate of <a, b> with variance ≤ |a|²|b|²/d whatever the
model size (Charikar et al. 2002). Each coordinate's bucket and sign are a pure function of
(seed, parameter name, flat index): no index table is stored, and the sketch does not depend on
the order in which parameters are visited nor on how a parameter is cut into chunks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from merit.mixture import IGNORE, Encoded

# splitmix64 constants, written as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
LOSS_DEFINITION = "mean NLL over answer tokens (chat template; prompt tokens masked)"


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # splitmix64 finaliser: int64 multiplication wraps modulo 2^64, which is what we want.
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def _name_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class SketchSpec:
    """Everything that must match for two sketches to be comparable."""

    dim: int
    seed: int


class CountSketch:
    """Linear map R^n -> R^d; ``sketch(name, values, offset)`` adds a slice of a parameter.

    Buckets and signs of a parameter are cached (5 bytes a coordinate is far less than the
    hashing work) while the cache stays under ``cache_limit`` coordinates; beyond that they are
    recomputed on the fly, so memory stays bounded for big models.
    """

    def __init__(self, spec: SketchSpec, cache_limit: int = 50_000_000):
        self.spec = spec
        self.cache_limit = cache_limit
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached = 0

    def hashes(
        self, name: str, start: int, stop: int, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (int64 in [0, d)) and sign (±1 float) of flat coordinates [start, stop)."""
        idx = torch.arange(start, stop, dtype=torch.int64, device=device)
        h = _mix(idx * _GOLDEN + _name_key(self.spec.seed, name))
        bucket = _shr(h, 1) % self.spec.dim
        sign = 1.0 - 2.0 * _shr(h, 63).to(torch.float32)
        return bucket, sign

    def _param_hashes(self, name: str, numel: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get(name)
        if hit is not None and hit[0].numel() == numel and hit[0].device == device:
            return hit
        bucket, sign = self.hashes(name, 0, numel, device)
        if self._cached + numel <= self.cache_limit:
            self._cache[name] = (bucket, sign)
            self._cached += numel
        return bucket, sign

    def add(self, out: torch.Tensor, name: str, values: torch.Tensor, offset: int = 0) -> None:
        """out += S(values placed at flat ``offset`` of parameter ``name``)."""
        flat = values.detach().reshape(-1).to(torch.float32)
        if offset == 0:
            bucket, sign = self._param_hashes(name, flat.numel(), flat.device)
        else:
            bucket, sign = self.hashes(name, offset, offset + flat.numel(), flat.device)
        out.index_add_(0, bucket, flat * sign)

    def sketch_named(
        self, tensors: Iterable[tuple[str, torch.Tensor]], device=None
    ) -> torch.Tensor:
        """Sketch of the concatenation of named tensors (order does not matter)."""
        out = None
        for name, t in tensors:
            if out is None:
                out = torch.zeros(self.spec.dim, dtype=torch.float32, device=device or t.device)
            self.add(out, name, t.to(out.device))
        if out is None:
            raise ValueError("nothing to sketch")
        return out


def pad_batch(batch: Sequence[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels tensors."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def token_nll_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed NLL of the label tokens (labels are shifted inside: position t predicts t+1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Named trainable parameters, each shared (tied) tensor once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@dataclass
class Calibration:
    """Sketch of the mean answer-token gradient of one dataset, and its exact squared norm."""

    sketch: torch.Tensor
    sq_norm: float
    loss: float
    tokens: int


def mean_gradient_sketch(
    model,
    examples: Sequence[Encoded],
    sketcher: CountSketch,
    batch_size: int,
    pad_id: int,
    on_batch: Callable[[], None] | None = None,
) -> Calibration:
    """g_t = ∇θ mean answer-token NLL over ``examples`` at the model's current weights, sketched.

    Gradients of all micro-batches accumulate in ``.grad`` (each scaled by 1/total answer tokens,
    so the sum is the token mean), then each parameter is sketched once.
    """
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    total = sum(e.answer_tokens for e in examples)
    if total == 0:
        raise ValueError("calibration examples have no answer tokens")
    model.zero_grad(set_to_none=True)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    loss_sum = 0.0
    for s in range(0, len(order), batch_size):
        batch = pad_batch([examples[i] for i in order[s : s + batch_size]], pad_id, device)
        nll = token_nll_sum(model, batch)
        (nll / total).backward()
        loss_sum += float(nll.detach())
        if on_batch:
            on_batch()
    out = torch.zeros(sketcher.spec.dim, dtype=torch.float32, device=device)
    sq = 0.0
    for name, p in params:
        if p.grad is None:
            continue
        sketcher.add(out, name, p.grad)
        sq += float(p.grad.detach().float().pow(2).sum())
    model.zero_grad(set_to_none=True)
    return Calibration(out.cpu(), sq, loss_sum / total, total)


def calibrate_model(
    model,
    datasets: dict[str, Sequence[Encoded]],
    spec: SketchSpec,
    batch_size: int,
    pad_id: int,
    progress: bool = True,
) -> dict[str, Calibration]:
    """Sketched representative gradient of each dataset at θ0 (the model's current weights)."""
    model.eval()  # no dropout: g_t is the gradient of the loss, not of a random sub-network
    sketcher = CountSketch(spec)
    n_batches = sum(math.ceil(len(v) / batch_size) for v in datasets.values())
    bar = tqdm(total=n_batches, desc="calibrate", unit="batch", disable=not progress)
    out = {}
    for name, examples in datasets.items():
        out[name] = mean_gradient_sketch(
            model, examples, sketcher, batch_size, pad_id, lambda: bar.update()
        )
    bar.close()
    return out


def spec_dict(spec: SketchSpec) -> dict:
    return {
        **asdict(spec),
        "hash": "splitmix64(blake2b(seed, name) + index·φ)",
        "loss": LOSS_DEFINITION,
    }
