"""The memory and speed levers of a branch: answer-only logits (TRL's fused LM head) give the
loss and gradients of full logits; precision resolves to the Trainer's flags and θ0's dtype;
a branch command starts its own ranks only when it is not one already."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from merit.config import config_from_dict
from merit.errors import StageError
from merit.lm import IGNORE, load_model, load_tokenizer
from merit.train.launchers import LaunchError
from merit.train.logits import answer_only_applies, answer_positions
from merit.train.processes import ranks_to_start
from merit.train.sft import (
    check_levers,
    deepspeed_config,
    sft_config,
    train_dtype,
    trainer_class,
)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Rows of different lengths, right-padded, with the loss on each row's last few tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.ones_like(ids)
    for row, (length, answer) in enumerate([(20, 4), (14, 6), (9, 2)]):
        mask[row, length:] = 0
        labels[row, length - answer : length] = ids[row, length - answer : length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns."""

    def __enter__(self):
        self.shapes: list[torch.Size] = []
        super().__enter__()
        return self.shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(t.shape)
        return out


def test_answer_only_logits_give_the_full_logits_loss_and_gradients(tiny_base, tmp_path):
    from datasets import Dataset

    cfg = config_from_dict({"data": {"bigbench": "/x"}}).training
    model = load_model(tiny_base, torch.device("cpu"), "float32")
    reference = load_model(tiny_base, torch.device("cpu"), "float32")
    batch = _batch(model.config.vocab_size)
    args = sft_config(cfg, tmp_path, torch.device("cpu"), 64, 3, progress=False)
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]})
    trainer = trainer_class()(model=model, args=args, train_dataset=rows,
                              processing_class=load_tokenizer(tiny_base))  # fmt: skip
    trainer.merit_answer_only = answer_only_applies(model, torch.device("cpu"))
    assert trainer.merit_answer_only
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    with _Shapes() as made:
        fused = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n))
        fused.backward()
    vocab = model.config.vocab_size
    logits_rows = max(s[:-1].numel() for s in made if len(s) > 1 and s[-1] == vocab)
    # Only the positions some row's loss reads were projected, never all 3 × 19.
    assert logits_rows == 3 * len(answer_positions(batch["labels"])) == 3 * 11 < 3 * 19
    full = reference(**batch)  # the model's own loss over (batch × length × vocab) logits
    full.loss.backward()
    torch.testing.assert_close(fused, full.loss, rtol=1e-6, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)
    assert full.logits.shape[:2] == batch["input_ids"].shape  # what the fused head never makes


@pytest.mark.parametrize(
    ("precision", "device", "bf16", "dtype"),
    [("auto", "cpu", False, "float32"), ("auto", "cuda", True, "float32"),
     ("bf16-mixed", "cpu", True, "float32"), ("bf16", "cuda", True, "bfloat16"),
     ("fp32", "cuda", False, "float32")],
)  # fmt: skip
def test_precision_sets_autocast_and_the_master_weights_dtype(
    tmp_path, precision, device, bf16, dtype
):
    cfg = config_from_dict({"data": {"bigbench": "/x"}, "training": {"precision": precision}})
    dev = torch.device(device)
    assert train_dtype(cfg.training, dev) == dtype
    if device == "cpu":  # the Trainer checks that a GPU has bf16 before it builds its arguments
        assert sft_config(cfg.training, tmp_path, dev, 64, 8, False).bf16 is bf16


def test_speed_levers_are_how_not_what():
    base = config_from_dict({"data": {"bigbench": "/x"}})
    how = config_from_dict({
        "data": {"bigbench": "/x"}, "model": {"attn_implementation": "eager"},
        "training": {"distributed": "fsdp", "gradient_checkpointing": True},
    })  # fmt: skip
    assert how.experiment_hash() == base.experiment_hash()
    for what in ({"precision": "bf16"}, {"max_steps": 10}):
        cfg = config_from_dict({"data": {"bigbench": "/x"}, "training": what})
        assert cfg.experiment_hash() != base.experiment_hash()


def test_liger_kernel_needs_a_gpu():
    cfg = config_from_dict({"data": {"bigbench": "/x"}}).training.model_copy(
        update={"liger_kernel": True}
    )
    with pytest.raises(StageError, match="needs a GPU"):
        check_levers(cfg, torch.device("cpu"))


def test_a_branch_starts_its_ranks_unless_it_is_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks_to_start(1, 1) == 0 and ranks_to_start(4, 1) == 4
    with pytest.raises(LaunchError, match="2 nodes"):
        ranks_to_start(16, 2)
    monkeypatch.setenv("WORLD_SIZE", "4")  # already a rank of torchrun / accelerate / srun
    assert ranks_to_start(4, 1) == 0 and ranks_to_start(16, 2) == 0


def test_shipped_accelerate_and_deepspeed_configs_load(tmp_path):
    """The templates under configs/ are what accelerate and the Trainer read."""
    import json
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    root = Path(__file__).resolve().parents[3] / "configs"
    one = ClusterConfig.from_yaml_file(root / "accelerate" / "one-node.yaml")
    two = ClusterConfig.from_yaml_file(root / "accelerate" / "two-nodes.yaml")
    assert (one.num_processes, one.num_machines) == (8, 1)
    assert (two.num_processes, two.num_machines) == (16, 2)
    for stage in (2, 3):
        shipped = Path(deepspeed_config(f"zero{stage}"))
        assert shipped.read_bytes() == (root / "deepspeed" / f"zero{stage}.json").read_bytes()
        ds = json.loads(shipped.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills in merit's
    assert json.loads(Path(deepspeed_config("zero3")).read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]  # the branch is saved as full 16-bit weights
    assert deepspeed_config(str(tmp_path / "mine.json")) == str(tmp_path / "mine.json")
