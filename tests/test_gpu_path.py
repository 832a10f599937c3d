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
