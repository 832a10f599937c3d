"""Run by tests/test_distributed.py, alone or under torchrun: one optimiser step of online_sft on a fixed global
batch of 8 samples, each rank training on its share. Writes what the test compares to the output file."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import online_sft

model_dir, out_file = sys.argv[1], sys.argv[2]
rank, world, device = online_sft.setup_distributed()
# Pairs of samples share a prompt (num_generations 2), so micro-batches run packed groups; a log-prob chunk of 3
# tokens makes the LM head run in several recomputed chunks, sharded or not.
args = online_sft.Args(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    num_generations=2,
    beta=0.1,
    learning_rate=1e-3,
    logprob_chunk_size=3,
)
g = torch.Generator().manual_seed(0)
prompts = [
    torch.randint(3, 200, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(4)
]
batch = [
    {
        "prompt": prompts[i // 2],
        "response": torch.randint(3, 200, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist(),
        "reward": torch.tensor(float(i % 3) - 1.0),
        "baseline": torch.tensor(0.0),
    }
    for i in range(8)
]
policy, tokenizer, _ = online_sft.load_policy(model_dir, device)
plain = None
if world == 1:  # s from the whole-vocabulary logits of each sequence alone, to compare the chunked, packed path with
    with torch.no_grad():
        plain = []
        for x in batch:
            ids = torch.tensor([x["prompt"] + x["response"]])
            logp = policy(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            t = torch.arange(len(x["prompt"]) - 1, ids.size(1) - 1)
            plain.append(logp[t, ids[0, t + 1]].sum())
        plain = torch.stack(plain)
ref = online_sft.load_policy(model_dir, device)[0].requires_grad_(False)
if world > 1:
    policy, ref = online_sft.shard(policy, device, torch.float32), online_sft.shard(ref, device, torch.float32)
names = [name for name, _ in online_sft.vllm_weights(policy, torch.float32)]  # what a vLLM push would send, gathered
optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
mine = batch[rank * len(batch) // world : (rank + 1) * len(batch) // world]
s, s_ref, _ = online_sft.train_on_batch(
    policy,
    ref,
    mine,
    mine[:1],
    args=args,
    pad_id=0,
    n_global=len(batch),
    n_micro=max(online_sft.gather(len(mine) // 2)),
    world=world,
    autocast=online_sft.nullcontext(),
)
grads = {
    n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone() for n, p in policy.named_parameters()
}
torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
optimizer.step()
weights = online_sft.full_state_dict(policy, world)
s, s_ref = torch.cat(online_sft.gather(s)), torch.cat(online_sft.gather(s_ref))
if rank == 0:
    rewards = torch.stack([x["reward"] for x in batch])
    loss = online_sft.online_sft_loss(s, s_ref, rewards, args.beta).mean()
    torch.save({"loss": loss, "s": s, "plain": plain, "grads": grads, "weights": weights, "names": names}, out_file)
if world > 1:
    torch.distributed.barrier()  # rank 0 may still be saving: both are done before either tears gloo down
    torch.distributed.destroy_process_group()
print("done", rank, os.getpid(), flush=True)
# Leave without the interpreter's teardown: gloo's threads can race it and abort a rank that has finished ("terminate
# called without an active exception", 2 of ~8 suite runs on the 2-core machine, never when run alone)
os._exit(0)
