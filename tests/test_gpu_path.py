"""What a GPU user runs, tested on this CPU where it can be: dtype choice by device, the context budget, one
conversion of the embedded model for many ranks, size-aware packing, and the GPU smoke script up to its first
CUDA-only step. (NCCL and CUDA kernels themselves need a GPU: bench/gpu_check.py.)"""

import pytest
import torch
from test_main import tiny_args

import online_sft
from online_sft import ConfigError, main, resolve_dtype


@pytest.mark.parametrize("major, auto", [(7, torch.float32), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_dtype_auto_picks_bf16_only_where_the_gpu_has_it(monkeypatch, major, auto):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm{major}0")
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    assert resolve_dtype("auto", cuda) == auto
    assert resolve_dtype("float32", cuda) == torch.float32
    if auto == torch.float32:  # T4 / V100: an explicit bf16 is refused with the reason
        with pytest.raises(ConfigError, match=r"no native bf16 \(compute capability 7.0 < 8.0\)"):
            resolve_dtype("bfloat16", cuda)
    else:
        assert resolve_dtype("bfloat16", cuda) == torch.bfloat16


def test_dtype_auto_on_a_cpu_follows_its_bf16_flags(monkeypatch):
    for flag, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(online_sft, "cpu_has_bf16", lambda flag=flag: flag)
        assert resolve_dtype("auto", torch.device("cpu")) == expected
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # emulated on a CPU, but correct


@pytest.mark.parametrize("response_length", [512, 600])
def test_a_response_length_that_fills_the_context_is_refused_before_loading(
    tiny_model_dir, tmp_path, monkeypatch, response_length
):
    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the context budget was checked")

    monkeypatch.setattr(online_sft, "load_policy", no_load)
    with pytest.raises(ConfigError, match=rf"--response_length {response_length} leaves no room .* 512-token context"):
        main(tiny_args(tiny_model_dir, tmp_path, response_length=response_length))


def test_a_context_too_short_for_every_prompt_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"none of the 6 held-out prompts fits the 2 prompt tokens"):
        main(tiny_args(tiny_model_dir, tmp_path, response_length=510))


def test_gpu_check_gets_to_its_first_cuda_step_on_a_cpu(tiny_model_dir):
    """bench/gpu_check.py builds its flags as a run does (task defaults included) and runs every check that needs no
    GPU; on this CPU it must stop at the first CUDA-only one with its own exit code, not crash before it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--model_name_or_path", str(tiny_model_dir), "--response_length", "64"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert "ok: " in result.stdout and "a prompt budget of 448 tokens beside 64" in result.stdout
    assert result.stdout.strip().endswith("stop: no CUDA GPU here; the checks from now on need one")


def packed_layout(prompt_length: int, response_lengths: list[int]):
    samples = [{"prompt": [1] * prompt_length, "response": [2] * r} for r in response_lengths]
    _, attention_mask, response_mask = online_sft.pack(samples, 0)
    return attention_mask, response_mask, int(response_mask.any(0).int().argmax())


def test_packing_is_chosen_by_size():
    """Groups pack while one packed sequence costs fewer multiply-adds than a row per sample: the demo's short groups
    do, 8 full 1,024-token (and 4,096-token) responses of Qwen2.5-Math-1.5B's shapes do not."""
    from transformers import LlamaConfig, Qwen2Config

    smollm = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    qwen = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2)
    demo = packed_layout(45, [5, 24, 12, 9] * 8)
    assert online_sft.packing_pays(*demo, 4, smollm)
    for length in (1024, 4096):
        assert not online_sft.packing_pays(*packed_layout(256, [length] * 8), 8, qwen)
    assert online_sft.packing_pays(*packed_layout(256, [64] * 8), 8, qwen)  # short responses to a long prompt


def test_size_aware_packing_gives_the_same_logprobs_and_gradients(tiny_model_dir, monkeypatch):
    """Whichever layout packing_pays picks, s and its gradient are the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    torch.manual_seed(3)
    batch = [
        {"prompt": prompt, "response": torch.randint(3, 200, (n,)).tolist()}
        for prompt in ([5, 9, 4], [7, 8, 9, 10, 11])
        for n in (2, 40, 17)
    ]
    packed = online_sft.pack(batch, 0)
    calls = []
    pack_groups = online_sft.pack_groups
    monkeypatch.setattr(online_sft, "pack_groups", lambda *a: calls.append(1) or pack_groups(*a))
    results = []
    for pays in (True, False):
        monkeypatch.setattr(online_sft, "packing_pays", lambda *a, pays=pays: pays)
        calls.clear()
        s = online_sft.sequence_logprobs(model, *packed, group_size=3, chunk_size=16)
        grad = torch.autograd.grad(s.square().sum(), list(model.parameters()))
        assert bool(calls) == pays  # packed only when it pays
        results.append((s, torch.cat([g.flatten() for g in grad])))
    (s_packed, g_packed), (s_rows, g_rows) = results
    torch.testing.assert_close(s_packed, s_rows, rtol=1e-10, atol=1e-10)
    assert ((g_packed - g_rows).norm() / g_rows.norm()).item() < 1e-6  # fp32 RMSNorm inside the fp64 model
