"""One rank of the FSDP2 check (run by tests/integration/test_fsdp2_cpu.py under torchrun, or
alone as the one-process reference): a tiny Llama, sharded by merit's FSDP rule, trained with
AdamW on fixed batches, its full state dict gathered and saved by rank 0."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from merit.train.sft import fsdp_layers

STEPS, BATCH, LENGTH, VOCAB = 16, 8, 24, 128


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    # float64: the check is of what FSDP computes, not of float32 rounding in near-zero gradients
    model = LlamaForCausalLM(cfg).double()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        units = set(fsdp_layers(model))
        assert units == {"LlamaDecoderLayer"}, units
        for module in model.modules():
            if type(module).__name__ in units:
                fully_shard(module)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(
        0, VOCAB, (STEPS, BATCH, LENGTH), generator=torch.Generator().manual_seed(1)
    )
    per = BATCH // world
    for step in range(STEPS):
        ids = data[step, rank * per : (rank + 1) * per]
        # Each rank's mean over its equal share of tokens: FSDP averages the ranks' gradients.
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        dist.barrier()  # no rank tears gloo down while another still reads from it
        dist.destroy_process_group()
    else:
        state = model.state_dict()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1])
