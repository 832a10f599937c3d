"""Shared fixtures: a tiny random Llama with a small byte-level BPE tokenizer, built offline in a few seconds."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHAT_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
CORPUS = [
    "What is 3 + 4? Answer with just the number. 7",
    "Solve the following math problem step by step. The last line of your response should be of the form Answer:",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 plus minus times equals the answer is",
] * 20


def cli_flags(**kw) -> list[str]:
    """online_sft.py's command line for these flag values: cli_flags(eval_size=4) -> ["--eval_size", "4"]."""
    return [x for name, value in kw.items() for x in (f"--{name}", str(value))]


def build_tiny_model(folder: Path, chat_template: bool = True, hidden_size: int = 32) -> Path:
    """Save a random 2-layer Llama and its tokenizer (eos = pad, like SmolLM2) to folder. Two query heads of
    hidden_size / 2 dimensions (vLLM's CPU attention wants 32 or more)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_model_dir_no_template(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model_raw"), chat_template=False)


# ----------------------------------------------------------------------------------------------------------------------
# TL;DR: tiny random GPT-NeoX models (pythia's architecture) with a pythia-like tokenizer: eos <|endoftext|>, no pad.

SUBREDDITS = ["relationships", "AskReddit", "personalfinance", "tifu"]
WORDS = "my friend and i went to the store she said that he was not happy about money work school dog cat today we"
WORDS = WORDS.split()


def tldr_example(rng, i: int) -> dict:
    """One row in the schema of trl-internal-testing/tldr-preference-sft-trl-style."""
    post = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
    title = " ".join(rng.choice(WORDS) for _ in range(5))
    subreddit = rng.choice(SUBREDDITS)
    summary = " " + " ".join(rng.choice(WORDS) for _ in range(6))
    prompt = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": summary}]
    return {"prompt": prompt, "messages": messages, "id": f"t3_{i}", "subreddit": subreddit, "title": title,
            "post": post, "summary": summary}  # fmt: skip


def write_tldr(path: Path, n: int, seed: int = 0) -> Path:
    import json
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(json.dumps(tldr_example(rng, i)) for i in range(n)))
    return path


def build_neox_tokenizer(vocab_size: int = 300, lowercase: bool = False, seed: int = 0):
    """Byte-level BPE trained on TL;DR-like text, where " yes" is one token. lowercase: a tokenizer that does not give
    back the text it encodes."""
    import random

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [tldr_example(rng, i)["prompt"] + " yes yes" for i in range(200)]
    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def neox_config(tokenizer, **kw):
    from transformers import GPTNeoXConfig

    base = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "pad_token_id": None,  # like pythia
    }
    return GPTNeoXConfig(**{**base, **kw})


def build_neox(folder: Path, tokenizer, reward: bool = False, num_labels: int = 1, seed: int = 0) -> Path:
    """Save a random GPT-NeoX causal LM, or a sequence classifier with num_labels labels, and the tokenizer."""
    from transformers import GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    torch.manual_seed(seed)
    if reward:
        model = GPTNeoXForSequenceClassification(neox_config(tokenizer, num_labels=num_labels))
    else:
        model = GPTNeoXForCausalLM(neox_config(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def neox_tokenizer():
    return build_neox_tokenizer()


@pytest.fixture(scope="session")
def neox_policy_dir(tmp_path_factory, neox_tokenizer) -> Path:
    return build_neox(tmp_path_factory.mktemp("neox_policy"), neox_tokenizer)


@pytest.fixture(scope="session")
def neox_reward_dir(tmp_path_factory, neox_tokenizer) -> Path:
    return build_neox(tmp_path_factory.mktemp("neox_reward"), neox_tokenizer, reward=True, seed=1)


@pytest.fixture(scope="session")
def tldr_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tldr_data")
    return write_tldr(folder / "train.jsonl", 40, seed=0), write_tldr(folder / "validation.jsonl", 8, seed=1)
