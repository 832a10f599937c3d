"""Evaluation: greedy pass@1, pass@k (Chen et al. 2021's unbiased estimator) and maj@k, and --eval_only."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import online_sft
from online_sft import Args, ConfigError, main, majority_answer, pass_at_k, sampled_metrics, validate_args

ROOT = Path(__file__).resolve().parents[1]


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (8, 3, 4), (8, 0, 8), (10, 2, 9)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_majority_vote_counts_equal_answers_together():
    assert majority_answer("math", ["1/2", "3", "0.5", None, "3", "\\frac{1}{2}"]) == "1/2"  # three halves beat two 3s
    assert majority_answer("math", ["3", "4"]) == "3"  # a tie goes to the first seen
    assert majority_answer("math", [None, None]) is None
    assert majority_answer("arith", ["07", "7", "7"]) == "7"  # arith compares the integers as text


def test_sampled_metrics():
    records = [
        {"sampled_correct": 4, "majority_correct": True},
        {"sampled_correct": 1, "majority_correct": False},
        {"sampled_correct": 0, "majority_correct": False},
    ]
    m = sampled_metrics(records, 4)
    assert set(m) == {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/maj@4"}
    assert m["eval/pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["eval/pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["eval/pass@4"] == pytest.approx(2 / 3) and m["eval/maj@4"] == pytest.approx(1 / 3)
    assert set(sampled_metrics(records, 6)) == {
        "eval/pass@1",
        "eval/pass@2",
        "eval/pass@4",
        "eval/pass@6",
        "eval/maj@6",
    }


def tiny(model_dir, tmp_path, **kw) -> Args:
    base = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(tmp_path),
        "run_name": "run",
        "total_episodes": 16,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,  # (math's default is 32)
        "num_generations": 4,
        "response_length": 6,
        "eval_size": 6,
        "eval_every": 1,
        "learning_rate": 1e-3,
    }
    return Args(**{**base, **kw})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_samples_log_pass_and_maj_and_leave_training_alone(tiny_model_dir, tmp_path, monkeypatch):
    # the tiny model answers at random: call a response "correct" by its length, whatever it says
    def every_third(task, responses, answers, extraction="strict"):
        return [len(r) % 3 == 0 for r in responses], {"no_answer": 0}

    monkeypatch.setattr(online_sft, "score", every_third)
    with_k = main(tiny(tiny_model_dir, tmp_path, run_name="k", eval_samples=4))
    evals = [r for r in read(with_k / "metrics.jsonl") if "eval/accuracy" in r]
    assert len(evals) == 3
    for r in evals:
        assert 0 < r["eval/pass@1"] < r["eval/pass@4"] <= 1 and 0 <= r["eval/maj@4"] <= 1
        assert r["eval/pass@1"] <= r["eval/pass@2"] <= r["eval/pass@4"]
    samples = read(with_k / "eval_samples" / "step_000000.jsonl")
    assert len(samples) == 6 and all(len(x["samples"]) == 4 for x in samples)
    assert all(x["sampled_correct"] == sum(s["correct"] for s in x["samples"]) for x in samples)
    # the sampled eval uses its own random numbers: training samples exactly as without it
    without = main(tiny(tiny_model_dir, tmp_path, run_name="no_k"))
    train = [{k: v for k, v in r.items() if k.startswith("train/")} for r in read(with_k / "metrics.jsonl")]
    train_without = [{k: v for k, v in r.items() if k.startswith("train/")} for r in read(without / "metrics.jsonl")]
    assert [r for r in train if r] and [r for r in train if r] == [r for r in train_without if r]


def test_eval_only_reproduces_the_runs_last_eval(tiny_model_dir, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{i} + 1?", "answer": f"#### {i + 1}"}) for i in range(30)))
    run_dir = main(tiny(tiny_model_dir, tmp_path, task="math", dataset_name=str(data)))
    last = [r for r in read(run_dir / "metrics.jsonl") if "eval/accuracy" in r][-1]
    flags = ["--task", "math", "--dataset_name", str(data), "--eval_size", "6", "--response_length", "6"]
    flags += ["--model_name_or_path", str(run_dir / "model"), "--output_dir", str(tmp_path), "--run_name", "ev"]
    out = subprocess.run(
        [sys.executable, "online_sft.py", "--eval_only", "--eval_samples", "2", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert "held-out (6 prompts" in out and "pass@2" in out and "maj@2" in out
    assert (
        report["eval/accuracy"] == last["eval/accuracy"]
        and report["eval/response_length"] == last["eval/response_length"]
    )
    greedy = [x["response"] for x in read(tmp_path / "ev" / "eval_samples" / "eval.jsonl")]
    assert greedy == [x["response"] for x in read(run_dir / "eval_samples" / "step_000002.jsonl")]  # same prompts
    assert not (tmp_path / "ev" / "metrics.jsonl").exists() and not (tmp_path / "ev" / "model").exists()


def test_eval_flags_are_checked():
    with pytest.raises(ConfigError, match="--eval_samples must be >= 0"):
        validate_args(Args(eval_samples=-1))
    with pytest.raises(ConfigError, match="not tldr"):
        validate_args(Args(task="tldr", eval_samples=4, dataset_name="x.jsonl"))
    with pytest.raises(ConfigError, match="read only by --task math"):
        validate_args(Args(answer_extraction="free"))
    with pytest.raises(ConfigError, match="unknown --answer_extraction"):
        validate_args(Args(task="math", answer_extraction="loose"))
