"""torchrun on CPU with gloo: 2 ranks equal 1 process, main() end to end, failing ranks, and the vLLM glue that can
be tested without vLLM. (The real engine: tests/test_vllm.py. NCCL needs a GPU: bench/gpu_check.py.)"""

import importlib.util
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli_flags
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from online_sft import (
    Args,
    ConfigError,
    decoder_layers,
    generate,
    validate_args,
    vllm_outputs_to_tensors,
    vllm_requests,
    vllm_weights,
)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
OPTIMIZER_SHARDS = [".metadata", "__0_0.distcp", "__1_0.distcp"]  # torch.distributed.checkpoint's files, 2 ranks


def run(cmd, timeout=300, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def test_two_ranks_give_the_same_step_as_one_process(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    driver = str(ROOT / "tests" / "dist_train_step.py")
    for cmd, out in (([sys.executable], one), (TORCHRUN, two)):
        result = run([*cmd, driver, str(tiny_model_dir), str(out)])
        assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b["s"], a["s"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a["s"], a["plain"], rtol=1e-5, atol=1e-5)  # chunked and packed = full logits
    for name, grad in a["grads"].items():  # the sharded gradients, gathered, equal the whole-batch ones
        torch.testing.assert_close(b["grads"][name], grad, rtol=1e-5, atol=1e-7)
    # Adam's first step is lr*g/(|g| + eps): where |g| is near eps (1e-8) a float-noise gradient difference of 1e-10
    # moves a weight by ~1e-6, so allow 1% of the lr=1e-3 step
    for name, weight in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], weight, rtol=0, atol=1e-5)
    assert a["grads"]["model.embed_tokens.weight"].abs().max() > 1e-4  # the step did something
    # what a vLLM push sends: the checkpoint's names (tied lm_head once), unchanged by FSDP2 sharding
    assert b["names"] == a["names"] and set(a["names"]) == set(a["weights"]) - {"lm_head.weight"}


def test_main_on_two_ranks_leaves_the_same_run_folder(tiny_model_dir, tmp_path):
    flags = cli_flags(
        model_name_or_path=tiny_model_dir,
        output_dir=tmp_path,
        total_episodes=48,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        response_length=6,
        eval_size=7,
        eval_every=2,
        learning_rate="1e-3",
    )
    two = run([*TORCHRUN, "online_sft.py", *flags, "--run_name", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable, "online_sft.py", *flags, "--run_name", "one", "--gradient_accumulation_steps", "2"])
    assert one.returncode == 0, one.stderr[-3000:]

    def listing(run_dir):
        return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if "tfevents" not in p.name)

    sharded_optimizer = {"checkpoint-000006/optimizer", *(f"checkpoint-000006/optimizer/{f}" for f in OPTIMIZER_SHARDS)}
    assert sorted(set(listing(tmp_path / "two")) - sharded_optimizer) == listing(tmp_path / "one")
    assert sharded_optimizer <= set(listing(tmp_path / "two"))  # each rank wrote its own optimiser shard
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/accuracy" in r]
    assert [r["episodes"] for r in train] == [8, 16, 24, 32, 40, 48]  # both ranks' samples, reduced before logging
    evals = [json.loads(x) for x in (tmp_path / "two" / "eval_samples" / "step_000006.jsonl").read_text().splitlines()]
    assert len(evals) == 7  # the held-out rows split over the ranks, gathered once each
    assert "6 steps x 2 ranks x 4 x 1 accumulation = 8 episodes per step" in two.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")


def test_a_failing_rank_ends_the_job(tiny_model_dir, tmp_path):
    driver = tmp_path / "fail.py"
    driver.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import online_sft\n"
        "real = online_sft.train_on_batch\n"
        "def train_on_batch(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('rank 1 fails')\n"
        "    return real(*a, **k)\n"
        "online_sft.train_on_batch = train_on_batch\n"
        "import tyro\n"
        "online_sft.main(tyro.cli(online_sft.Args))\n"
    )
    flags = cli_flags(
        model_name_or_path=tiny_model_dir,
        output_dir=tmp_path,
        total_episodes=32,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        response_length=6,
        eval_size=4,
    )
    result = run([*TORCHRUN, str(driver), *flags], timeout=180)  # rank 0 would wait in a collective forever
    assert result.returncode != 0
    assert "rank 1 fails" in result.stderr


def test_fsdp_on_an_unknown_layout_is_a_clear_error(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ConfigError, match="cannot find the decoder layers of Odd"):
        decoder_layers(Odd())
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    assert len(decoder_layers(LlamaForCausalLM(config))) == 3


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_use_vllm_without_vllm_is_one_line_exit_2():
    result = run([sys.executable, "online_sft.py", "--use_vllm"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --use_vllm needs vLLM: pip install -r requirements-vllm.txt (GPU) or -r requirements-vllm-cpu.txt (CPU)"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"importance_correction": "is"}, "need --use_vllm"),
        ({"vllm_sleep": True}, "need --use_vllm"),
        ({"use_vllm": True, "importance_correction": "tis"}, "unknown --importance_correction 'tis'"),
        ({"use_vllm": True, "importance_correction": "is", "top_p": 0.9}, "never draws outside the nucleus"),
        ({"use_vllm": True, "is_max_weight": 2.0}, "needs --importance_correction is"),
        ({"use_vllm": True, "importance_correction": "is", "is_max_weight": 0.0}, "must be > 0"),
        ({"use_vllm": True, "vllm_logprob_tolerance": 0.0}, "--vllm_logprob_tolerance must be > 0"),
    ],
)
def test_vllm_flags_that_cannot_work_are_refused_before_loading(flags, message):
    with pytest.raises(ConfigError, match=message):
        validate_args(Args(**flags))


def test_vllm_requests_and_outputs_become_the_trainers_tensors():
    assert vllm_requests([[1, 2], [3]]) == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]

    def output(tokens):  # the fields of vllm.RequestOutput that the trainer reads
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens)])

    EOS, PAD = 2, 0
    ids, mask = vllm_outputs_to_tensors(
        [output([5, 6, EOS]), output([7, 8, 9, 10]), output([]), output([EOS])], [EOS], PAD
    )
    assert ids.tolist() == [[5, 6, EOS, PAD], [7, 8, 9, 10], [PAD, PAD, PAD, PAD], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("tied", [True, False])
def test_vllm_weight_names_are_the_checkpoints(tmp_path, tied):
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    pushed = dict(vllm_weights(model, torch.float32))
    assert set(pushed) == set(saved) - ({"lm_head.weight"} if tied else set())
    for name, tensor in pushed.items():
        torch.testing.assert_close(tensor, saved[name])


def test_tldr_on_two_ranks_shards_gpt_neox(neox_policy_dir, neox_reward_dir, tldr_files, tmp_path):
    flags = cli_flags(
        task="tldr",
        model_name_or_path=neox_policy_dir,
        reward_model_path=neox_reward_dir,
        dataset_name=tldr_files[0],
        eval_dataset_name=tldr_files[1],
        output_dir=tmp_path,
        run_name="tldr",
        eval_size=5,
        response_length=6,
        total_episodes=32,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    result = run([*TORCHRUN, "online_sft.py", *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "tldr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes"] for r in rows if "train/reward_mean" in r] == [16, 32]
    evals = [r for r in rows if "eval/rm_score" in r]
    assert len(evals) == 2 and all(r["eval/kl"] == r["eval/kl"] for r in evals)  # before and after, not NaN
    samples = (tmp_path / "tldr" / "eval_samples" / "step_000002.jsonl").read_text().splitlines()
    assert len(samples) == 5


def test_sharded_generation_gathers_each_layer_once(tiny_model_dir, tmp_path):
    """Generation under FSDP keeps each layer's gathered parameters for the whole block (it used to gather every
    layer again for every token) and agrees on stopping with a tensor all-reduce (it used to all_gather_object per
    token); the greedy responses are those of the unsharded model."""
    result = run([*TORCHRUN, str(ROOT / "tests" / "dist_generate.py"), str(tiny_model_dir), str(tmp_path)])
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        layers = len(decoder_layers(policy))
        assert out["calls"]["all_gather_object"] == 0
        gathers = out["calls"]["all_gather_single"] + out["calls"]["all_gather_into_tensor"]
        assert gathers == layers + 1  # each layer once, and the root, for 12 tokens
        alone = generate(
            policy,
            out["prompts"],
            pad_id=0,
            eos_ids=[-1],
            max_new_tokens=12,
            temperature=1.0,
            top_p=1.0,
            greedy=True,
            autocast=nullcontext(),
        )
        assert torch.equal(out["ids"], alone[0])


def test_two_ranks_resume_from_sharded_optimizer_state_exactly(tiny_model_dir, tmp_path):
    """Under FSDP each rank writes and reads only its own optimiser shards (torch.distributed.checkpoint), and the
    reference is reloaded from the original model: a run resumed from its step-2 checkpoint ends bit for bit where
    the straight run ends."""
    import shutil

    from safetensors.torch import load_file

    flags = cli_flags(
        model_name_or_path=tiny_model_dir,
        output_dir=tmp_path,
        total_episodes=32,
        per_device_train_batch_size=4,
        response_length=6,
        eval_size=4,
        eval_every=2,
        save_every=2,
        learning_rate="1e-3",
    )
    straight = run([*TORCHRUN, "online_sft.py", *flags, "--run_name", "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tmp_path / "straight" / "checkpoint-000002"
    assert sorted(p.name for p in (checkpoint / "optimizer").iterdir()) == OPTIMIZER_SHARDS
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"] is None  # not in here
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint-000004"))
    shutil.rmtree(tmp_path / "resumed" / "model")
    resumed = run(
        [
            *TORCHRUN,
            "online_sft.py",
            *flags,
            "--run_name",
            "resumed",
            "--resume",
            str(tmp_path / "resumed" / checkpoint.name),
        ]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
