"""main() end to end on a tiny random model, the command line, and bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_sft import (
    Args,
    ConfigError,
    decoder_layers,
    enable_gradient_checkpointing,
    main,
    pack,
    sequence_logprobs,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(model_dir, tmp_path, **kw) -> Args:
    base = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(tmp_path),
        "run_name": "run",
        "total_episodes": 24,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "response_length": 6,
        "eval_size": 6,
        "eval_every": 2,
        "learning_rate": 1e-3,
    }
    return Args(**{**base, **kw})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_main_arith_leaves_a_complete_run_folder(tiny_model_dir, tmp_path):
    run_dir = main(tiny_args(tiny_model_dir, tmp_path))
    assert run_dir == tmp_path / "run"
    assert json.loads((run_dir / "args.json").read_text())["total_episodes"] == 24
    rows = read_metrics(run_dir)
    train = [r for r in rows if "train/accuracy" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 2, 3]  # before training, every eval_every steps, after the last
    assert train[-1]["episodes"] == 24
    for key in (
        "train/reward_mean",
        "train/reward_std",
        "train/kl",
        "train/s_mean",
        "train/w_mean",
        "train/grad_norm",
        "train/response_length",
        "train/lr",
        "time/generate",
        "time/score",
        "time/train",
        "perf/generated_tokens_per_s",
        "reward/no_answer",
    ):
        assert all(math.isfinite(r[key]) for r in train), key
    assert train[0]["train/grad_norm"] > 0
    assert list(run_dir.glob("events.out.tfevents.*"))
    samples = [json.loads(line) for line in (run_dir / "eval_samples" / "step_000003.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"prompt", "response", "reward"} <= set(samples[0])
    assert (run_dir / "curves.png").stat().st_size > 10_000
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), before.parameters()))  # it trained
    assert AutoTokenizer.from_pretrained(run_dir / "model").eos_token == "<|endoftext|>"


def test_main_math_with_filtering_and_overlong_penalty(tiny_model_dir_no_template, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"}) for i in range(30))
    )
    args = tiny_args(
        tiny_model_dir_no_template,
        tmp_path,
        task="math",
        dataset_name=str(data),
        filter_groups=True,
        max_filter_retries=1,
        apply_overlong_penalty=True,
        overlong_buffer_len=2,
        eval_every=10,
    )
    run_dir = main(args)
    rows = read_metrics(run_dir)
    assert any(r.get("data/train_rows") == 24 for r in rows)
    # A random model never answers: every group has equal rewards unless the overlong penalty splits it.
    for r in (r for r in rows if "filter/groups_dropped" in r):
        assert r["filter/generation_rounds"] <= 2
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_help_says_what_an_episode_is():
    out = subprocess.run(
        [sys.executable, "online_sft.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "One episode is one (prompt, sampled response) pair" in out
    for flag in ("--total-episodes", "--num-generations", "--normalize-logprob-by-length", "--filter-groups"):
        assert flag in out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--task", "chess"], "unknown --task 'chess'"),
        (["--task", "math", "--dataset_name", "nope/missing.parquet"], "no such file"),
        (
            ["--per_device_train_batch_size", "3", "--num_generations", "4", "--gradient_accumulation_steps", "1"],
            "must be a multiple of --num_generations",
        ),
        (["--response_length", "0"], "--response_length must be > 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(flags, message):
    result = subprocess.run(
        [sys.executable, "online_sft.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_unloadable_model_and_missing_column(tmp_path):
    with pytest.raises(ConfigError, match="could not load model"):
        main(Args(model_name_or_path=str(tmp_path), output_dir=str(tmp_path), total_episodes=32))
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt_text": "1+1", "label": "2"}) + "\n")
    with pytest.raises(ConfigError, match="match no known schema"):
        main(Args(task="math", dataset_name=str(data), output_dir=str(tmp_path)))
    assert not (tmp_path / "runs").exists()


def test_unreachable_hub_dataset_is_one_clear_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # what a machine without the hub sees, without the network retries
    result = subprocess.run(
        [sys.executable, "online_sft.py", "--task", "math", "--dataset_name", "someone/missing-dataset"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not load dataset 'someone/missing-dataset'"), result.stderr[-2000:]


def test_gradient_checkpointing_recomputes_and_keeps_the_gradient(tiny_model_dir):
    """The flag really checkpoints (each layer runs again in the backward) and the gradient is unchanged."""
    batch = [{"prompt": [5, 6, 7], "response": [8, 9, 0]}, {"prompt": [5, 6, 7], "response": [10, 0]}]
    grads, calls = {}, {}
    for flag in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        if flag:
            enable_gradient_checkpointing(model)
        layer = decoder_layers(model)[0]
        calls[flag] = 0

        def count(*_, flag=flag):
            calls[flag] += 1

        layer.self_attn.register_forward_hook(count)  # (the recompute stops early, before the MLP)
        sequence_logprobs(model, *pack(batch, pad_id=0)).sum().backward()
        grads[flag] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert calls == {False: 1, True: 2}
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_rloo_run_and_its_bad_flags(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--baseline rloo needs --num_generations >= 2"):
        main(tiny_args(tiny_model_dir, tmp_path, baseline="rloo", num_generations=1))
    with pytest.raises(ConfigError, match="unknown --baseline"):
        main(tiny_args(tiny_model_dir, tmp_path, baseline="ppo"))
    run_dir = main(tiny_args(tiny_model_dir, tmp_path, baseline="rloo", total_episodes=16))
    train = [r for r in read_metrics(run_dir) if "train/accuracy" in r]
    assert len(train) == 2 and all(math.isfinite(r["train/grad_norm"]) for r in train)
    assert all(r["perf/train_tokens"] > 0 for r in train)
