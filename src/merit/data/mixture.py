"""A mixture of named datasets: deterministic splits and answer-only tokenization.

Every stage (calibration, training, evaluation) sees the same examples tokenized the same way:
the prompt and the answer are rendered by the model's chat template, and only the answer's tokens
(everything the template adds after the generation prompt, end-of-turn included) carry loss.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from merit.artifacts import sha256_file
from merit.config import DataConfig, DatasetSpec, SplitConfig
from merit.data.formats import (
    IMAGE,
    DataError,
    Example,
    HubArgs,
    LoadedDataset,
    bigbench_task_files,
    load_dataset,
    load_groups,
)
from merit.data.images import check_images
from merit.lm import IGNORE, Encoded
from merit.vision import Pixels, is_processor, open_image, text_tokenizer


@dataclass
class MixtureDataset:
    data: LoadedDataset
    splits: dict[str, list[int]]  # split name -> example indices into data.examples
    file_hash: str = ""
    overlong: dict[str, int] = field(default_factory=dict)  # split -> examples over max_length

    @property
    def name(self) -> str:
        return self.data.name

    def examples(self, split: str) -> list[Example]:
        return [self.data.examples[i] for i in self.splits[split]]


@dataclass
class Mixture:
    datasets: list[MixtureDataset] = field(default_factory=list)
    # Whole tasks kept out of training: only their eval examples are ever read.
    unseen: list[MixtureDataset] = field(default_factory=list)
    # Training datasets left out because they share examples with a task `data.unseen` picked
    # (BIG-bench subtasks of one family may hold the same examples).
    dropped: list[str] = field(default_factory=list)
    # Datasets left out because every example of a split they need is over model.max_length.
    too_long: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def __getitem__(self, name: str) -> MixtureDataset:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)


def split_indices(n: int, name: str, cfg: SplitConfig, base: int = 0) -> dict[str, list[int]]:
    """Disjoint eval / calibration / base / validation / train indices for ``n`` examples.

    The permutation is seeded by (seed, dataset name) only, so a dataset's split does not depend
    on which other datasets are in the mixture. Eval and calibration take at most 1/5 of the
    examples each; ``base`` examples are reserved for building the demo θ0 and never trained on
    or evaluated by the run itself; ``validation`` examples are taken out of the training ones
    (to choose hyperparameters without touching eval) and never trained on.
    """
    order = list(range(n))
    random.Random(f"{cfg.seed}/{name}").shuffle(order)
    n_eval = max(1, min(cfg.eval, n // 5))
    n_cal = max(1, min(cfg.calibration, n // 5))
    n_base = min(base, max(0, (n - n_eval - n_cal) // 2))
    cuts = [n_eval, n_eval + n_cal, n_eval + n_cal + n_base]
    rest = order[cuts[2] :]
    if cfg.train is not None:
        rest = rest[: cfg.train]
    if not rest:
        raise DataError(f"{name}: {n} examples leave none for training")
    v = cfg.validation
    if v and v >= len(rest):
        raise DataError(
            f"{name}: data.split.validation={v} is not smaller than its {len(rest)} training "
            "examples"
        )
    # Validation is carved from the front of the (shuffled) training candidates, after the
    # `train` cap, so validation=0 leaves every other split exactly as before and
    # validation ∪ train is always the training set a run without validation would use.
    return {
        "eval": sorted(order[: cuts[0]]),
        "calibration": sorted(order[cuts[0] : cuts[1]]),
        "base": sorted(order[cuts[1] : cuts[2]]),
        "validation": sorted(rest[:v]),
        "train": sorted(rest[v:]),
    }


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (sorted by relative path)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def _seeded(name: str, purpose: str, seed: int) -> str:
    return hashlib.sha256(f"{purpose}:{seed}:{name}".encode()).hexdigest()


@dataclass
class Source:
    """Where one dataset of the mixture comes from; ``loaded`` when finding it read it (a
    group of a ``group_by`` file)."""

    name: str
    path: str
    format: str
    spec: DatasetSpec | None = None  # None: a task of the BIG-bench folder
    group: str | None = None
    loaded: LoadedDataset | None = None

    @property
    def hub(self) -> HubArgs | None:
        s = self.spec
        return s and HubArgs(s.subset, s.split, s.revision, s.data_files)

    def load(self) -> LoadedDataset:
        if self.loaded is not None:
            return self.loaded
        image_dir = self.spec.image_dir if self.spec else None
        return load_dataset(self.name, self.path, self.format, image_dir, self.hub)

    def digest(self, data: LoadedDataset) -> str:
        """What identifies the data: the file's sha256 (with the group's value), or for a hub
        dataset, which has no local file to hash, a digest of every example."""
        if self.format == "hub":
            h = hashlib.sha256(self.path.encode())
            for ex in data.examples:
                h.update(_example_key(ex))
            return h.hexdigest()
        digest = file_sha256(self.path)
        if self.group is None:
            return digest
        return hashlib.sha256(f"{digest}:{self.group}".encode()).hexdigest()


def _spec_sources(specs: list[DatasetSpec]) -> list[Source]:
    out = []
    for spec in specs:
        fmt = "hub" if spec.is_hub(Path(spec.path).expanduser().exists()) else spec.format
        if spec.group_by is None:
            out.append(Source(spec.name, spec.path, fmt, spec))
            continue
        src = Source(spec.name or spec.group_by, spec.path, fmt, spec)
        groups = load_groups(spec.path, spec.group_by, fmt, spec.image_dir, src.hub)
        out += [Source(g.name, spec.path, fmt, spec, g.name, g) for g in groups]
    return out


def dataset_sources(
    cfg: DataConfig, bigbench_dir: Path | None
) -> tuple[list[Source], list[Source]]:
    """The training datasets and the unseen ones (disjoint), sorted by name."""
    sources = _spec_sources(cfg.datasets)
    explicit = _spec_sources(cfg.unseen_datasets)
    if bigbench_dir is not None:
        for f in bigbench_task_files(bigbench_dir):
            name = f.name.removesuffix(".gz").removesuffix(".json")
            if name == "task":  # a task directory: name it after the directory
                name = f.parent.name
            sources.append(Source(name, str(f), "bigbench"))
    # A BIG-bench task may carry the name of an explicit unseen dataset: names key every
    # artifact, so they must be unique across both lists.
    names = [s.name for s in sources + explicit]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"two datasets have the same name: {', '.join(dupes)}")
    seed = cfg.split.seed
    if cfg.unseen >= len(sources):
        raise DataError(
            f"data.unseen={cfg.unseen} keeps every one of the {len(sources)} datasets out of "
            "training"
        )
    by_hash = sorted(sources, key=lambda s: _seeded(s.name, "unseen", seed))
    unseen = by_hash[: cfg.unseen] + explicit
    train = by_hash[cfg.unseen :]
    if cfg.order == "hash":
        train.sort(key=lambda s: _seeded(s.name, "order", seed))
    else:
        train.sort(key=lambda s: s.name)
    if cfg.max_datasets is not None:
        train = train[: cfg.max_datasets]
    return sorted(train, key=_by_name), sorted(unseen, key=_by_name)


def _by_name(s: Source) -> str:
    return s.name


def load_mixture(
    cfg: DataConfig, bigbench_dir: Path | None = None, base_examples: int = 0, hashes: bool = True
) -> Mixture:
    """Load and split every dataset of the mixture (no tokenization).

    Raises:
        DataError: an unseen task overlaps a training task (same file or a shared example).
    """
    train, unseen = dataset_sources(cfg, bigbench_dir)

    def load(sources: list[Source], base: int) -> list[MixtureDataset]:
        out = []
        for src in sources:
            data = src.load()
            splits = split_indices(len(data.examples), src.name, cfg.split, base)
            ds = MixtureDataset(data, splits)
            images = check_images(ds)  # a missing image fails here, before any long work
            if hashes:
                ds.file_hash = src.digest(data)
                if images:
                    ds.file_hash = hashlib.sha256(f"{ds.file_hash}:{images}".encode()).hexdigest()
            out.append(ds)
        return out

    mixture = Mixture(load(train, base_examples), load(unseen, 0))
    shared = _shared(mixture.datasets, mixture.unseen)
    explicit = {s.name for s in _explicit_unseen(cfg, unseen)}
    # merit chose these unseen tasks: keep their examples out of training rather than refuse.
    leaks = {n for u, found in shared.items() if u not in explicit for n in found}
    mixture.dropped = sorted(leaks)
    mixture.datasets = [d for d in mixture.datasets if d.name not in leaks]
    for u in mixture.unseen:  # the user chose these: an overlap is theirs to fix
        rest = [what for n, what in shared.get(u.name, {}).items() if n not in leaks]
        if rest:
            raise DataError(f"unseen tasks overlap the training tasks: {rest[0]}")
    return mixture


def _explicit_unseen(cfg: DataConfig, unseen: list[Source]) -> list[Source]:
    specs = [id(s) for s in cfg.unseen_datasets]
    return [s for s in unseen if s.spec is not None and id(s.spec) in specs]


def _example_key(ex: Example) -> bytes:
    """A digest of what a model is trained on in an example: its prompt and its answer.

    Whitespace is collapsed so that a re-serialised copy of the same example still matches;
    choices and extra targets are left out because the same question with the same answer is
    a leak whatever options are shown next to it.
    """

    def norm(text: str) -> str:
        return " ".join(text.split())

    key = [[m["role"], norm(m["content"])] for m in ex.messages] + [norm(ex.answer)]
    if ex.images:  # the same question about another image is another example
        key.append(list(ex.images))
    return hashlib.sha256(json.dumps(key).encode()).digest()[:16]


def _shared(train: list[MixtureDataset], unseen: list[MixtureDataset]) -> dict[str, dict]:
    """For each unseen dataset that is (partly) a training dataset: training dataset name ->
    what they share (first found), so unseen scores can mean unseen.

    Compared by file content (when hashed) and by a digest of every example: one map of 16-byte
    digests over the training datasets, then one look-up per unseen example.
    """
    by_file: dict[str, list[str]] = {}
    by_example: dict[bytes, list[str]] = {}
    for d in train:
        if d.file_hash:
            by_file.setdefault(d.file_hash, []).append(d.name)
        for key in {_example_key(ex) for ex in d.data.examples}:
            by_example.setdefault(key, []).append(d.name)
    out: dict[str, dict] = {}
    for u in unseen:
        found: dict[str, str] = {}
        for n in by_file.get(u.file_hash, []) if u.file_hash else []:
            found.setdefault(n, f"{u.name} has the same file content as {n}")
        for i, ex in enumerate(u.data.examples):
            for n in by_example.get(_example_key(ex), []):
                found.setdefault(n, f"{u.name} example {i} is also an example of {n}")
        if found:
            out[u.name] = found
    return out


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template: merit expects an instruction-tuned base model"
        )


def render(tokenizer, examples: Sequence[Example]) -> list[tuple[str, str]]:
    """(prompt text, answer text) per example, through the tokenizer's (or, for a
    vision-language θ0, the processor's) chat template.

    The answer text is what the template appends after the generation prompt, so its tokens are
    exactly the ones the model must produce at inference (end-of-turn marker included).
    """
    require_chat_template(tokenizer)
    vision = is_processor(tokenizer)
    out = []
    for ex in examples:
        msgs = vision_messages(ex) if vision else [dict(m) for m in ex.messages]
        answer = vision_messages(ex, answer=True)[0] if vision else _turn("assistant", ex.answer)
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([*msgs, answer], tokenize=False)
        if vision and not full.startswith(prompt):
            # TRL's vision collator (which trains these) takes the common prefix as the prompt.
            pairs = enumerate(zip(prompt, full))
            same = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(full)))
            prompt = prompt[:same]
        if not full.startswith(prompt):
            # Some templates rewrite earlier turns once an answer follows; fall back to the
            # plain answer so the loss still covers exactly the answer text.
            eos = text_tokenizer(tokenizer).eos_token or ""
            out.append((prompt, ex.answer + eos))
        else:
            out.append((prompt, full[len(prompt) :]))
    return out


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def vision_messages(ex: Example, answer: bool = False) -> list[dict]:
    """The prompt (or, with ``answer``, the answer turn) in the structured form processors and
    TRL's vision collator read: every content a list of text and image parts."""
    turns = [_turn("assistant", ex.answer)] if answer else ex.messages
    out = []
    for m in turns:
        pieces = m["content"].split(IMAGE) if ex.images else [m["content"]]
        parts: list[dict] = []
        for i, text in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out


Segments = list[tuple[str, bool]]  # an example's text in pieces, each trained on or not


def render_turns(tokenizer, ex: Example) -> Segments | None:
    """An example whose every assistant turn is an answer, in pieces: each turn's generation
    prompt (not trained) and its reply (trained), as TRL's ``assistant_only_loss``. Found by
    rendering the conversation up to each turn; None when the template rewrites earlier
    turns once a later one follows (the final answer is then the only one trained)."""
    msgs = [dict(m) for m in ex.messages] + [_turn("assistant", ex.answer)]
    pieces: Segments = []
    done = ""
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:j], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs[: j + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            return None
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def segments(tokenizer, examples: Sequence[Example], loss_on: str = "final") -> list[Segments]:
    """Each example's text in trained / untrained pieces: the prompt and the final answer, or
    under ``loss_on="all_assistant"`` every assistant turn of a ``messages`` record."""
    out = []
    for ex, (prompt, answer) in zip(examples, render(tokenizer, examples)):
        turns = render_turns(tokenizer, ex) if loss_on == "all_assistant" and ex.turns else None
        out.append(turns or [(prompt, False), (answer, True)])
    return out


def encode_segments(tokenizer, segs: Sequence[Segments], max_length: int) -> list[Encoded]:
    """Tokenize every piece (one batched call), labels on the trained pieces; a sequence over
    ``max_length`` is truncated (``data.overlong=truncate``; by default the corpus drops such
    examples before they get here): the final answer keeps at least half the budget, and the
    oldest tokens go first."""
    flat = [text for s in segs for text, _ in s]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for s in segs:
        pieces = ids[k : k + len(s)]
        k += len(s)
        context = sum(len(p) for p in pieces[:-1])
        if context + len(pieces[-1]) > max_length:
            keep = max(max_length - context, max(1, max_length // 2))
            pieces = [*pieces[:-1], pieces[-1][:keep]]
        input_ids, labels = [], []
        for piece, (_, trained) in zip(pieces, s):
            input_ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        cut = max(0, len(input_ids) - max_length)
        out.append(Encoded(input_ids[cut:], labels[cut:]))
    return out


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> list[Encoded]:
    """Tokenize (prompt, answer) pairs, loss on the answer (truncated as :func:`encode_segments`)."""
    return encode_segments(tokenizer, [[(p, False), (a, True)] for p, a in pairs], max_length)


def encode(
    tokenizer, examples: Sequence[Example], max_length: int, loss_on: str = "final"
) -> list[Encoded]:
    """Chat-template, tokenize and mask a list of examples (loss on answer tokens only: the
    final answer, or with ``loss_on="all_assistant"`` every assistant turn of a ``messages``
    record).

    ``tokenizer`` may be a vision-language θ0's processor: see :func:`encode_vision` (final
    answer only).
    """
    if is_processor(tokenizer):
        return encode_vision(tokenizer, examples)
    return encode_segments(tokenizer, segments(tokenizer, examples, loss_on), max_length)


def token_lengths(tokenizer, examples: Sequence[Example], choices: bool = False) -> list[int]:
    """Each example's tokens uncut, as scoring reads it (with ``choices``, its longest
    multiple-choice option as the answer)."""
    segs = segments(tokenizer, examples)
    sizes = [len(e.input_ids) for e in encode_segments(tokenizer, segs, sys.maxsize)]
    if choices:
        for i, ex in enumerate(examples):
            if ex.choices:
                options = [as_answer(ex, c) for c in ex.choices]
                sizes[i] = max(sizes[i], *token_lengths(tokenizer, options))
    return sizes


def encode_vision(processor, examples: Sequence[Example]) -> list[Encoded]:
    """Image-text examples tokenized by θ0's processor: each image's placeholder expanded to the
    image tokens its size gives (so the plan's N_k and the merge weights count them), the
    images kept as paths for :class:`~merit.vision.Pixels`.

    Nothing is cut (``model.max_length`` is for text): cutting into an image's tokens would
    leave tokens without features; TRL's vision collator does not cut either.
    """
    tok = processor.tokenizer
    out = []
    for ex, (prompt, answer) in zip(examples, render(processor, examples)):
        images = [open_image(p) for p in ex.images] or None
        enc = processor(text=[prompt], images=images, add_special_tokens=False)
        ids = list(enc["input_ids"][0])
        a = tok(answer, add_special_tokens=False)["input_ids"]
        pixels = None
        if ex.images:
            types = {k: tuple(enc[k][0]) for k in _TOKEN_TYPES if k in enc}
            pixels = Pixels(ex.images, processor.image_processor, types)
        out.append(Encoded(ids + a, [IGNORE] * len(ids) + a, pixels))
    return out


# Per-token inputs a processor returns besides the ids (Qwen's mRoPE needs the first).
_TOKEN_TYPES = ("mm_token_type_ids", "token_type_ids")


def as_answer(example: Example, answer: str) -> Example:
    """``example`` with ``answer`` as its answer (a multiple-choice option, scored as one)."""
    return replace(example, answer=answer, choices=(), targets=())


def encode_choices(tokenizer, example: Example, max_length: int) -> list[Encoded]:
    """One sequence per multiple-choice option, scored as if it were the answer."""
    variants = [as_answer(example, c) for c in example.choices]
    return encode(tokenizer, variants, max_length)
