"""Runs that cannot learn say so (SignalGuard): each guard driven by the tiny model and a reward that makes it fire."""

import json

import pytest
import torch

import online_sft
from online_sft import Args, RunAborted, SignalGuard, StepSignal, main, score

ANSWERS = "\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"}) for i in range(40))


def run_args(model_dir, out, run_name, **kw) -> Args:
    base = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(out),
        "run_name": run_name,
        "total_episodes": 32,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,  # (math's default is 32)
        "num_generations": 4,
        "response_length": 6,
        "eval_size": 4,
        "eval_every": 100,
        "learning_rate": 1e-3,
    }
    return Args(**{**base, **kw})


def math_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(ANSWERS)
    return path


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/truncated" in r]


def patch_correct(monkeypatch, pattern):
    """score() returns pattern(i) for the i-th response it is asked about (so every reward is chosen by the test)."""
    calls = {"n": 0}

    def fake(task, responses, answers, extraction="strict"):
        out = []
        for _ in responses:
            out.append(pattern(calls["n"]))
            calls["n"] += 1
        return out, {"no_answer": 0}

    monkeypatch.setattr(online_sft, "score", fake)


def test_shares_are_logged_every_step(tiny_model_dir, tmp_path):
    # the random tiny model never writes EOS within 6 tokens, nor an answer the math checker reads
    run_dir = main(run_args(tiny_model_dir, tmp_path, "shares", task="math", dataset_name=str(math_file(tmp_path))))
    rows = train_rows(run_dir)
    assert len(rows) == 4
    for r in rows:
        assert r["train/truncated"] > 0.9 and r["train/no_answer"] > 0.9 and r["train/equal_groups"] > 0.5


def test_truncation_and_no_answer_warn_once_with_the_flag_to_change(tiny_model_dir, tmp_path, capsys):
    args = run_args(
        tiny_model_dir,
        tmp_path,
        "warn",
        task="math",
        dataset_name=str(math_file(tmp_path)),
        total_episodes=40,
        signal_warn_steps=2,
    )
    main(args)
    out = capsys.readouterr().out
    assert out.count("were cut at --response_length 6") == 1 and "raise --response_length" in out
    assert out.count("gave no `Answer:` line or \\boxed{}") == 1 and "--answer_extraction free" in out
    # a level no step exceeds: no warning
    main(run_args(tiny_model_dir, tmp_path, "quiet", task="math", dataset_name=str(math_file(tmp_path)),
                  signal_warn_share=1.0))  # fmt: skip
    assert "warning" not in capsys.readouterr().out


def test_steps_without_contrast_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    patch_correct(monkeypatch, lambda i: False)  # every response wrong: every group equal at the lowest reward
    args = run_args(tiny_model_dir, tmp_path, "flat", total_episodes=80, max_no_contrast_steps=3)
    with pytest.raises(RunAborted, match="3 steps in a row without contrast") as e:
        main(args)
    assert "only push down whatever was sampled" in str(e.value) and "raise --response_length" in str(e.value)
    assert len(train_rows(tmp_path / "flat")) == 3  # the step that stopped the run is logged
    with pytest.raises(RunAborted, match="with --baseline rloo or --filter_groups such steps have no signal"):
        main(run_args(tiny_model_dir, tmp_path, "flat_rloo", total_episodes=80, max_no_contrast_steps=2,
                      baseline="rloo"))  # fmt: skip
    # 0: never stops
    assert len(train_rows(main(run_args(tiny_model_dir, tmp_path, "flat_ok", max_no_contrast_steps=0)))) == 4


def test_one_success_is_contrast(tiny_model_dir, tmp_path, monkeypatch):
    patch_correct(monkeypatch, lambda i: i % 8 == 3)  # one correct response a step
    run_dir = main(run_args(tiny_model_dir, tmp_path, "some", max_no_contrast_steps=1))
    assert len(train_rows(run_dir)) == 4


def test_every_response_correct_is_said_and_not_stopped(tiny_model_dir, tmp_path, monkeypatch, capsys):
    patch_correct(monkeypatch, lambda i: True)
    run_dir = main(run_args(tiny_model_dir, tmp_path, "solved", max_no_contrast_steps=1, baseline="rloo"))
    assert len(train_rows(run_dir)) == 4
    out = capsys.readouterr().out
    assert out.count("was correct: the run has learned its task") == 1


def test_filtered_steps_count_what_was_generated(tiny_model_dir, tmp_path, monkeypatch):
    patch_correct(monkeypatch, lambda i: False)
    # every group dropped by --filter_groups: no update, yet the run still sees that nothing can be learned
    args = run_args(tiny_model_dir, tmp_path, "filtered", total_episodes=80, filter_groups=True, max_filter_retries=1,
                    max_no_contrast_steps=2)  # fmt: skip
    with pytest.raises(RunAborted, match="2 steps in a row without contrast.*all 16 responses"):
        main(args)


def test_step_signal_counts_and_merges():
    sig = StepSignal()
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    sig.add(rewards, torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), torch.tensor([True, False] * 4), group_size=4)
    assert (sig.responses, sig.truncated, sig.correct, sig.groups, sig.equal_groups) == (8, 4, 1, 2, 1)
    other = StepSignal()
    other.add(torch.full((4,), -2.0), torch.full((4,), float("nan")), torch.ones(4, dtype=torch.bool), group_size=4)
    total = StepSignal.merge([sig, other])
    assert (total.responses, total.truncated, total.correct, total.equal_groups) == (12, 8, 1, 2)
    assert (total.reward_min, total.reward_max) == (-2.0, 1.0)


def test_guard_resumes_its_counts():
    guard = SignalGuard(Args(max_no_contrast_steps=2))
    flat = StepSignal()
    flat.add(torch.full((4,), -1.0), torch.zeros(4), torch.zeros(4, dtype=torch.bool), group_size=4)
    shares = guard.shares(flat, 0)
    assert guard.observe(1, flat, shares)[1] is None
    resumed = SignalGuard(Args(max_no_contrast_steps=2))
    resumed.load_state_dict(guard.state_dict())
    assert "2 steps in a row without contrast" in resumed.observe(2, flat, shares)[1]


def test_free_extraction_reads_the_last_number():
    responses = ["Leo has 4 - 3 = 1 book left.", "The answer is: 1,200.", "Answer: 7", "no number here"]
    strict, counts = score("math", responses, ["1", "1200", "7", "1"])
    assert strict == [False, False, True, False] and counts["no_answer"] == 3 and counts["strict_format"] == 1
    free, counts = score("math", responses, ["1", "1200", "7", "1"], extraction="free")
    assert free == [True, True, True, False] and counts["no_answer"] == 1 and counts["free_text_answers"] == 2
    # an `Answer:` line still wins over the numbers before it
    assert score("math", ["3 + 4 = 7\nAnswer: 8"], ["7"], extraction="free")[0] == [False]


def test_format_reward_adds_to_formatted_responses(tiny_model_dir, tmp_path, monkeypatch):
    # every response scored wrong; half are "formatted": the reward then has contrast and the run does not stop
    calls = {"n": 0}

    def every_other(task, text, extraction="strict"):
        calls["n"] += 1
        return "1" if calls["n"] % 2 else None

    monkeypatch.setattr(online_sft, "final_answer", every_other)
    run_dir = main(run_args(tiny_model_dir, tmp_path, "fmt", task="math", dataset_name=str(math_file(tmp_path)),
                            format_reward=0.5, max_no_contrast_steps=1))  # fmt: skip
    rows = train_rows(run_dir)
    assert len(rows) == 4 and all(-1.0 < r["train/reward_mean"] < -0.5 for r in rows)
