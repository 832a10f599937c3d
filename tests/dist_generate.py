"""Run by tests/test_distributed.py under torchrun: greedy generation with the policy sharded by FSDP2, counting the
collectives it makes. Each rank writes its responses and counts to out_dir/rank{RANK}.pt."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import online_sft

model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
rank, world, device = online_sft.setup_distributed()
policy, tokenizer, _ = online_sft.load_policy(model_dir, device)
prompts = [online_sft.render_prompt(tokenizer, f"What is {rank} + {i}?") for i in range(3)]
if world > 1:
    policy = online_sft.shard(policy, device, torch.float32)
# count the collectives generation makes: FSDP2 in torch 2.13 gathers parameters with all_gather_single (older
# releases with all_gather_into_tensor)
calls = {"all_gather_single": 0, "all_gather_into_tensor": 0, "all_gather_object": 0}
for name in calls:
    original = getattr(dist, name)

    def counted(*a, _name=name, _original=original, **k):
        calls[_name] += 1
        return _original(*a, **k)

    setattr(dist, name, counted)
ids, mask = online_sft.generate(
    policy,
    prompts,
    pad_id=tokenizer.pad_token_id,
    eos_ids=[-1],  # never stops early: every rank runs max_new_tokens forwards
    max_new_tokens=12,
    temperature=1.0,
    top_p=1.0,
    greedy=True,
    autocast=online_sft.nullcontext(),
    synced=world > 1,
)
torch.save({"ids": ids, "mask": mask, "calls": calls, "prompts": prompts}, out_dir / f"rank{rank}.pt")
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
os._exit(0)  # see dist_train_step.py: gloo's threads can race the interpreter's teardown
