"""Interrupted runs resume exactly; bad rows, raising rewards and non-finite updates are counted, not fatal."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_flags
from safetensors.torch import load_file

import online_sft
from online_sft import Args, ConfigError, RunAborted, list_checkpoints, main

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time/", "perf/")  # wall-clock figures differ between any two runs


def run_args(model_dir, out, run_name, **kw) -> Args:
    base = {
        "model_name_or_path": str(model_dir),
        "output_dir": str(out),
        "run_name": run_name,
        "total_episodes": 32,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "response_length": 6,
        "eval_size": 6,
        "eval_every": 2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
    }
    return Args(**{**base, **kw})


def stable_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, tensor in a.items():
        assert torch.equal(tensor, b[k]), k  # bit for bit: CPU kernels here are deterministic


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """4 steps in one go: the run every interrupted one must reproduce."""
    return main(run_args(tiny_model_dir, tmp_path_factory.mktemp("straight"), "straight"))


def test_stop_and_resume_equals_a_straight_run(straight_run, tiny_model_dir, tmp_path, monkeypatch):
    real_log = online_sft.RunLog.log

    def log_then_stop_after_step_2(self, metrics, step):
        real_log(self, metrics, step)
        if step == 2 and "train/accuracy" in metrics:
            online_sft.stop_requested.set()  # what SIGTERM does

    monkeypatch.setattr(online_sft.RunLog, "log", log_then_stop_after_step_2)
    try:
        run_dir = main(run_args(tiny_model_dir, tmp_path, "resumed", save_every=1, keep_checkpoints=2))
    finally:
        online_sft.stop_requested.clear()
    assert not (run_dir / "model").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-000001", "checkpoint-000002"]
    monkeypatch.setattr(online_sft.RunLog, "log", real_log)

    main(run_args(tiny_model_dir, tmp_path, "resumed", save_every=1, resume="auto"))
    assert_same_weights(weights(run_dir), weights(straight_run))
    assert stable_metrics(run_dir) == stable_metrics(straight_run)
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-000003", "checkpoint-000004"]  # keep 2


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(straight_run, tiny_model_dir, tmp_path):
    marker = tmp_path / "writing"
    args = run_args(tiny_model_dir, tmp_path, "killed", save_every=1)
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        import online_sft
        real_save = torch.save
        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if "tmp-checkpoint-000002" in str(f):  # model written, trainer state written, not yet renamed
                open({str(marker)!r}, "w").close()
                time.sleep(600)
        torch.save = save
        online_sft.main(online_sft.Args(**{vars(args)!r}))
    """)
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached its second checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_dir = tmp_path / "killed"
    assert (run_dir / "tmp-checkpoint-000002").is_dir()  # the half-written one is there...
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-000001"]  # ...but never counts as complete

    main(run_args(tiny_model_dir, tmp_path, "killed", save_every=1, resume=str(run_dir)))
    assert_same_weights(weights(run_dir), weights(straight_run))
    assert stable_metrics(run_dir) == stable_metrics(straight_run)
    assert not (run_dir / "tmp-checkpoint-000002").exists()


def test_sigterm_checkpoints_and_exits_cleanly(tiny_model_dir, tmp_path):
    flags = cli_flags(
        model_name_or_path=tiny_model_dir,
        output_dir=tmp_path,
        run_name="term",
        total_episodes=4000,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        response_length=6,
        eval_size=6,
        eval_every=1000,
    )
    proc = subprocess.Popen(
        [sys.executable, "online_sft.py", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and "train/accuracy" in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    checkpoints = list_checkpoints(tmp_path / "term")
    assert len(checkpoints) == 1
    assert f"--resume {checkpoints[0]}" in out and "SIGTERM" in err


def test_resume_refuses_a_changed_run_unless_forced(straight_run, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"--beta 0.05 -> 0.2"):
        main(run_args(tiny_model_dir, straight_run.parent, "straight", beta=0.2, resume="auto"))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        main(run_args(tiny_model_dir, straight_run.parent, "nothing-here", resume="auto"))


def test_bad_rows_are_skipped_and_counted(tiny_model_dir_no_template, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    rows += [
        {"problem": f"very long {i} " * 400, "answer": "1"} for i in range(20)
    ]  # longer than the 512-token context
    rows += [{"problem": "", "answer": "1"}]  # empty prompt: dropped when loading
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run_dir = main(
        run_args(
            tiny_model_dir_no_template,
            tmp_path,
            "rows",
            task="math",
            dataset_name=str(data),
            eval_dataset_name=str(data),
            total_episodes=16,
        )
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["data/bad_rows"] == 2  # the empty row, in the train file and in the eval file
    assert sum(r.get("errors/prompt_too_long", 0) for r in lines) > 0
    assert sum(1 for r in lines if "train/accuracy" in r) == 2  # and training went on


def test_a_raising_reward_costs_one_sample(tiny_model_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = online_sft.last_integer

    def flaky(text):
        calls["n"] += 1
        if calls["n"] == 9:  # the 6 eval prompts come first: this is the third training sample
            raise ZeroDivisionError("boom")
        return real(text)

    monkeypatch.setattr(online_sft, "last_integer", flaky)
    run_dir = main(run_args(tiny_model_dir, tmp_path, "flaky", total_episodes=16, max_reward_error_fraction=0.2))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("errors/reward_ZeroDivisionError", 0) for r in lines) == 1
    assert sum(1 for r in lines if "train/accuracy" in r) == 2

    monkeypatch.setattr(online_sft, "last_integer", lambda text: 1 / 0)
    with pytest.raises(RunAborted, match="max_reward_error_fraction"):
        main(run_args(tiny_model_dir, tmp_path, "broken", total_episodes=16))


def test_non_finite_updates_are_skipped_then_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    real = online_sft.online_sft_loss
    poisoned = {"steps": {1}}
    calls = {"n": 0}

    def loss(s, s_ref, rewards, beta, **kw):
        calls["n"] += 1
        step = (calls["n"] - 1) // 2 + 1  # two micro-batches per step
        return real(s, s_ref, rewards, beta, **kw) * (float("nan") if step in poisoned["steps"] else 1.0)

    monkeypatch.setattr(online_sft, "online_sft_loss", loss)
    run_dir = main(run_args(tiny_model_dir, tmp_path, "nan", total_episodes=16, learning_rate=0.0 + 1e-3))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "train/accuracy" in r]
    assert train[0]["errors/nonfinite_updates"] == 1 and "errors/nonfinite_updates" not in train[1]
    assert all(torch.isfinite(p).all() for p in load_file(run_dir / "model" / "model.safetensors").values())

    calls["n"], poisoned["steps"] = 0, {1, 2, 3, 4}
    with pytest.raises(RunAborted, match="max_nonfinite_steps"):
        main(run_args(tiny_model_dir, tmp_path, "nan2", max_nonfinite_steps=3))


def test_every_group_filtered_is_said_and_bounded(tiny_model_dir_no_template, tmp_path, capsys):
    data = tmp_path / "hard.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"Prove theorem {i}.", "answer": "42"}) for i in range(30)))
    run_dir = main(
        run_args(
            tiny_model_dir_no_template,
            tmp_path,
            "filtered",
            task="math",
            dataset_name=str(data),
            filter_groups=True,
            max_filter_retries=2,
            total_episodes=16,
        )
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["step"] > 0 and "eval/accuracy" not in r]
    assert len(steps) == 2 and all(r["filter/generation_rounds"] == 3 for r in steps)
    assert all("train/accuracy" not in r for r in steps)
    assert "every group was filtered out after 3 rounds; no update" in capsys.readouterr().out
