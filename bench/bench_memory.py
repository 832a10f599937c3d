"""Peak memory of one training step at the lengths real math runs use, measured on this CPU, and what it means for
an 80 GB GPU.

    python bench/bench_memory.py          # from the repository root, in the project's virtualenv; ~10 min on 2 cores

A random model with Qwen2.5-Math-1.5B's vocabulary (151,936) and layer shapes (hidden 1536, MLP 8960, 12 query and 2
key/value heads, tied embeddings) but only 1 or 2 decoder layers, so that the shapes are real and the step fits in
this machine's memory. One training step (generation excluded: the responses are given, each exactly R tokens,
never ending early) of 8 generations of R = 1,024, 2,048 and 4,096 tokens to one 256-token prompt, in micro-batches
of --micro_batch: the policy's and the reference's log-probs, the loss and the backward of the step's first
micro-batch (the others reach the same peak: each frees its activations before the next runs), then the AdamW step,
in a single process and on 2 gloo ranks (FSDP2). Each configuration runs in its own process(es) and a thread samples the
resident memory (VmRSS) every 2 ms, per phase:

- weights: after the models and the optimiser are built (the optimiser state exists after the first step, so it
  counts in the step's peak);
- log-probs: the highest resident memory while a log-prob pass runs, above the weights, next to B x R x V x 4
  bytes, the one fp32 copy of full-vocabulary logits that a plain `model(...).logits` would build;
- step: the highest resident memory over the whole step, above the weights;
- activations: the bytes autograd keeps for the backward (each storage once, counted by saved_tensors_hooks): exact,
  where resident memory moves with the allocator.

Then the per-layer growth of the activations (2 layers less 1) extrapolates the step's peak to 28 layers of Qwen2.5-Math-1.5B on one
GPU, and to Qwen2.5-Math-7B (28 layers, hidden 3584, MLP 18944; its layers scaled from the measured ones by their
hidden and MLP widths, its weights and optimiser state counted exactly) sharded over 8 GPUs, against 80 GB. These
are CPU measurements of the same tensors a GPU holds: the GPU figure adds CUDA's own context and allocator slack
(typically 1-3 GB), and SDPA's CUDA kernels keep no more than the CPU's for the backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS, LAYERS_1P5B = 151_936, 1536, 8960, 12, 2, 28
HIDDEN_7B, MLP_7B, VOCAB_7B, LAYERS_7B = 3584, 18944, 152_064, 28
PARAMS_1P5B, PARAMS_7B = 1.54e9, 7.62e9
PROMPT, GENERATIONS = 256, 8
GB = 1e9
CUDA_OVERHEAD = 3 * GB  # the CUDA context and the caching allocator's slack, which a CPU measurement does not see


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro_batch", type=int, default=2, help="responses per forward/backward micro-batch")
    p.add_argument("--lengths", default="1024,2048,4096", help="response lengths R")
    p.add_argument("--worker", nargs=3, metavar=("LAYERS", "R", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PhasePeaks:
    """Highest resident memory per phase, sampled by a thread every 2 ms."""

    def __init__(self):
        self.phase, self.peaks, self.done = "setup", {}, threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while not self.done.is_set():
            rss = rss_bytes()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(0.002)


def build_model(folder: Path, layers: int):
    """A random Qwen2 of the 1.5B model's shapes with `layers` decoder layers, and a stub tokenizer (the batch is
    token ids; the tokenizer only has to load)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    stub = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=stub, eos_token="<eos>", pad_token="<eos>").save_pretrained(folder)


def worker(layers: int, response_length: int, out: Path, micro_batch: int):
    """One training step in this process (one rank of it under torchrun); writes its phase peaks to out."""
    import torch

    import online_sft as o

    peaks = PhasePeaks()
    rank, world, device = o.setup_distributed()
    folder = out.parent / f"model_{layers}"
    args = o.Args(
        model_name_or_path=str(folder),
        response_length=response_length,
        num_generations=GENERATIONS,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=GENERATIONS // micro_batch,
        total_episodes=GENERATIONS * world,
    )
    dtype = o.resolve_dtype("auto", device)
    policy, ref, _, _ = o.load_models(args, None, device, dtype, world)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and world == 1 else o.nullcontext()
    g = torch.Generator().manual_seed(rank)
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=g).tolist()
    batch = [
        {
            "prompt": prompt,
            "response": torch.randint(0, VOCAB, (response_length,), generator=g).tolist(),
            "reward": torch.tensor(float(i % 2)),
            "baseline": torch.tensor(0.5),
        }
        for i in range(GENERATIONS)
    ]
    logprobs = o.sequence_logprobs

    def timed_logprobs(*a, **k):  # the log-prob passes are their own phase
        before, peaks.phase = peaks.phase, "logprobs"
        try:
            return logprobs(*a, **k)
        finally:
            peaks.phase = before

    o.sequence_logprobs = timed_logprobs
    time.sleep(0.05)
    weights = rss_bytes()
    peaks.phase = "step"
    t = time.time()
    # The step's first micro-batch, then the update: its other micro-batches free their activations before the next
    # one runs, so they reach the same peak (the gradients and the optimiser state are there for all of them).
    # What autograd keeps for the backward, counted exactly (each storage once): the activations. Tensors shaped like
    # a parameter are weights (autocast's bf16 copies, FSDP's gathered ones), held once whatever the batch: left out.
    saved, weight_shapes = {}, {p.shape for m in (policy, ref) for p in m.parameters()}

    def keep(t):
        if t.shape not in weight_shapes:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        o.train_on_batch(
            policy,
            ref,
            batch[:micro_batch],
            batch[:micro_batch],
            args=args,
            pad_id=0,
            n_global=GENERATIONS * world,
            n_micro=1,
            world=world,
            autocast=autocast,
        )
    peaks.phase = "optimizer"
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    time.sleep(0.05)
    peaks.done.set()
    result = {
        "weights": weights,
        "logprobs": peaks.peaks.get("logprobs", 0) - weights,
        "step": max(peaks.peaks.values()) - weights,
        "activations": sum(saved.values()),
        "seconds": time.time() - t,
    }
    (out.parent / f"{out.name}.rank{rank}").write_text(json.dumps(result))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os._exit(0)  # see tests/dist_train_step.py: gloo's threads can race the interpreter's teardown


def run_config(scratch: Path, layers: int, length: int, world: int, micro_batch: int) -> dict:
    out = scratch / f"l{layers}_r{length}_w{world}"
    launcher = [sys.executable]
    if world > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd = [*launcher, __file__, "--micro_batch", str(micro_batch), "--worker", str(layers), str(length), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads((scratch / f"{out.name}.rank{r}").read_text()) for r in range(world)]
    return {k: max(r[k] for r in ranks) for k in ranks[0]}  # the fullest rank


def main():
    b = parse()
    if b.worker:
        layers, length, out = b.worker
        return worker(int(layers), int(length), Path(out), b.micro_batch)
    import torch

    lengths = [int(x) for x in b.lengths.split(",")]
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; model: Qwen2.5-Math-1.5B shapes (vocabulary "
        f"{VOCAB:,}, hidden {HIDDEN}, MLP {MLP}, {HEADS}/{KV_HEADS} heads), 1 or 2 layers; one step of {GENERATIONS} "
        f"generations x R tokens to a {PROMPT}-token prompt, micro-batch {b.micro_batch} (B)\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as scratch:
        scratch = Path(scratch)
        for layers in (1, 2):
            build_model(scratch / f"model_{layers}", layers)
        results = {}
        print(
            f"{'layers':>6} {'R':>5} {'ranks':>5} {'weights GB':>10} {'log-probs GB':>12} {'B*R*V*4 GB':>10} "
            f"{'step GB':>8} {'activ. GB':>9} {'s':>6}"
        )
        for length in lengths:
            for world, layer_counts in ((1, (1, 2)), (2, (1,))):
                for layers in layer_counts:
                    r = results[layers, length, world] = run_config(scratch, layers, length, world, b.micro_batch)
                    full_logits = b.micro_batch * length * VOCAB * 4
                    print(
                        f"{layers:>6} {length:>5} {world:>5} {r['weights'] / GB:>10.2f} {r['logprobs'] / GB:>12.2f} "
                        f"{full_logits / GB:>10.2f} {r['step'] / GB:>8.2f} {r['activations'] / GB:>9.2f} "
                        f"{r['seconds']:>6.0f}",
                        flush=True,
                    )
    print(
        "\nweights: resident after loading (policy fp32, reference in the compute dtype, data); log-probs and step: "
        "highest resident memory above that,\nduring a log-prob pass and over the whole step (optimiser state included)"
    )
    summary(results, lengths, b.micro_batch)


def summary(results: dict, lengths: list[int], micro_batch: int):
    """The measured per-layer growth, extrapolated to the real models' layer counts and widths."""
    print(f"\nExtrapolated to the real models, against an 80 GB GPU ({CUDA_OVERHEAD / GB:.0f} GB kept for CUDA):")
    layer_params = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * (HIDDEN * KV_HEADS // HEADS) + 3 * HIDDEN * MLP
    state = 18 * layer_params  # bytes a layer holds whatever the batch: fp32 weight, grad, 2 AdamW moments, bf16 ref
    width = (HIDDEN_7B + MLP_7B) / (HIDDEN + MLP)  # a 7B layer's activations per token, relative to a 1.5B one's
    for length in lengths:
        one, two = results[1, length, 1], results[2, length, 1]
        per_response = (two["activations"] - one["activations"]) / micro_batch  # a layer's, for one response
        # the rest of the measured 1-layer step: embeddings and LM head with their state, the log-prob chunk, the
        # process itself
        fixed = one["weights"] + one["step"] - state - micro_batch * per_response
        estimates = {
            "Qwen2.5-Math-1.5B, 1 GPU": lambda m, f=fixed, a=per_response: f + LAYERS_1P5B * (state + m * a),
            # 8 GPUs: weights and optimiser state sharded 8 ways, activations and the log-prob pass not
            "Qwen2.5-Math-7B, 8 GPUs (FSDP)": lambda m, a=per_response, lp=one["logprobs"]: (
                PARAMS_7B * 18 / 8 + LAYERS_7B * m * a * width + lp * HIDDEN_7B / HIDDEN
            ),
        }
        fits = []
        for name, estimate in estimates.items():
            largest = max((m for m in range(1, 65) if estimate(m) + CUDA_OVERHEAD <= 80 * GB), default=0)
            fits.append(
                f"{name}: {estimate(micro_batch) / GB:.1f} GB at B={micro_batch}, largest B that fits {largest}"
            )
        print(f"  R={length}: a layer's activations {per_response / 1e6:.0f} MB a response; " + "; ".join(fits))


if __name__ == "__main__":
    main()
