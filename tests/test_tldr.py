"""--task tldr: TL;DR data, the reward-model path and main() end to end, on tiny random GPT-NeoX models."""

import json
import math
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import tyro
from conftest import build_neox, build_neox_tokenizer, neox_config, tldr_example, write_tldr
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPTNeoXForCausalLM

from online_sft import (
    EMBEDDED_MODEL,
    TLDR_REWARD_MODEL,
    TLDR_SFT_MODEL,
    Args,
    ConfigError,
    cut_after_eos,
    ends_with_eos,
    last_token_scores,
    left_pad,
    load_reward_model,
    load_table,
    main,
    tldr_data,
    tldr_rewards,
    tldr_rows,
    trim_post,
    validate_args,
    with_task_defaults,
)

ROOT = Path(__file__).resolve().parents[1]


def tldr_args(policy_dir, reward_dir, files, tmp_path, **kw) -> Args:
    base = {
        "task": "tldr",
        "model_name_or_path": str(policy_dir),
        "reward_model_path": str(reward_dir),
        "dataset_name": str(files[0]),
        "eval_dataset_name": str(files[1]),
        "output_dir": str(tmp_path),
        "run_name": "run",
        "eval_size": 4,
        "response_length": 6,
        "total_episodes": 16,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "learning_rate": 1e-3,
    }
    return Args(**{**base, **kw})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_samples(run_dir: Path, step: int) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "eval_samples" / f"step_{step:06d}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------------
# Flags, data


def test_task_defaults_and_the_seeds_flag_names():
    tldr = with_task_defaults(Args(task="tldr"))
    assert (tldr.model_name_or_path, tldr.response_length, tldr.reward_model_path, tldr.eval_dataset_split) == (
        TLDR_SFT_MODEL,
        53,
        TLDR_REWARD_MODEL,
        "validation",
    )
    arith = with_task_defaults(Args())
    assert (arith.model_name_or_path, arith.response_length, arith.reward_model_path) == (EMBEDDED_MODEL, 24, None)
    assert with_task_defaults(Args(task="tldr", response_length=20)).response_length == 20  # a flag given wins
    for flag in ("--sft_model_path", "--sft-model-path", "--model_name_or_path"):
        assert tyro.cli(Args, args=["--task", "tldr", flag, "my/policy"]).model_name_or_path == "my/policy"
    with pytest.raises(ConfigError, match="read only by --task tldr"):
        validate_args(Args(reward_model_path="my/reward"))


def test_tldr_rows_and_held_out_file_split(tmp_path, neox_tokenizer):
    path = write_tldr(tmp_path / "tldr.jsonl", 20)
    rows, bad = tldr_rows(load_table(str(path), "train"), str(path))
    assert len(rows) == 20 and bad == 0
    assert rows[0]["content"].startswith("SUBREDDIT: r/") and rows[0]["content"].endswith("\n\nTL;DR:")
    assert rows[0]["answer"] == json.loads(path.read_text().splitlines()[0])["summary"]
    eval_rows, sampler, stats = tldr_data(Args(task="tldr", dataset_name=str(path), eval_size=4), neox_tokenizer)
    assert stats["data/train_rows"] == 16 and stats["data/eval_rows"] == 4
    train = {r["content"] for r in sampler.sample(64)}
    assert len(train) == 16 and not train & {r["content"] for r in eval_rows}


def test_post_is_trimmed_at_a_word_boundary_to_fit_the_prompt_budget(neox_tokenizer):
    tok = neox_tokenizer
    post = " ".join(tldr_example(random.Random(i), i)["post"] for i in range(6))  # long
    head, tail = "SUBREDDIT: r/tifu\n\nTITLE: my dog\n\nPOST: ", "\n\nTL;DR:"
    row = {"content": head + post + tail, "post": post, "answer": " a summary"}
    n = len(tok(row["content"])["input_ids"])
    assert trim_post(tok, row, n) is row  # fits already: untouched

    budget = n // 2
    trimmed = trim_post(tok, row, budget)
    text = trimmed["content"]
    assert len(tok(text)["input_ids"]) <= budget and trimmed["answer"] == " a summary"
    assert text.startswith(head) and text.endswith(tail)  # header and the "TL;DR:" cue stay
    kept = text[len(head) : -len(tail)]
    assert post.startswith(kept) and post[len(kept)] == " "  # cut before a space: no broken word
    next_word = post.index(" ", len(kept) + 1)
    assert len(tok(head + post[:next_word] + tail)["input_ids"]) > budget  # the longest post that fits

    no_post = trim_post(tok, {"content": row["content"], "post": None}, budget)["content"]
    assert no_post.endswith(tail) and len(tok(no_post)["input_ids"]) <= budget  # keeps the end


# ----------------------------------------------------------------------------------------------------------------------
# Reward model


def test_score_is_read_at_the_last_real_token_for_left_and_right_padding(neox_reward_dir):
    model = AutoModelForSequenceClassification.from_pretrained(neox_reward_dir).eval()
    tok = AutoTokenizer.from_pretrained(neox_reward_dir)
    eos = tok.eos_token_id
    texts = ["POST: my dog\n\nTL;DR: my dog", "TL;DR: we", "POST: she said that he was not happy\n\nTL;DR: money"]
    seqs = [tok(t)["input_ids"] + [eos] for t in texts]  # summaries end in EOS, as the TL;DR reward model saw them
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s])).logits[0, 0] for s in seqs])  # one row, no padding: last token
        left = last_token_scores(model, *left_pad(seqs, eos))  # padding reuses the EOS id, as with pythia
        width = max(len(s) for s in seqs)
        right_ids = torch.tensor([s + [eos] * (width - len(s)) for s in seqs])
        right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        right = last_token_scores(model, right_ids, right_mask)
        torch.testing.assert_close(left, alone)
        torch.testing.assert_close(right, alone)
        # transformers' own pooling looks for the last id that is not the pad id: with pad = EOS it skips the EOS
        model.config.pad_token_id = eos
        assert not torch.allclose(model(input_ids=right_ids, attention_mask=right_mask).logits[:, 0], alone)


def test_ends_with_eos_when_padding_reuses_the_eos_id():
    response_ids, response_mask = cut_after_eos(
        torch.tensor([[5, 6, 0, 9], [5, 6, 7, 8], [0, 4, 4, 4], [5, 6, 7, 0]]), eos_ids=[0], pad_id=0
    )
    assert ends_with_eos(response_ids, response_mask, [0]).tolist() == [True, False, True, True]


def test_missing_eos_penalty_sigmoid_scale_and_shift():
    response_ids, response_mask = cut_after_eos(
        torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8], [5, 0, 0, 0], [5, 6, 7, 0]]), eos_ids=[0], pad_id=0
    )
    seen = {}

    def reward_model(prompts, responses, ended):  # stands in for RewardModel: fixed raw scores
        seen.update(prompts=prompts, responses=responses, ended=ended.tolist())
        return torch.tensor([1.0, 2.0, -1.0, 0.0])

    prompts = [[1, 2]] * 4
    rewards, scores, counts = tldr_rewards(Args(task="tldr"), reward_model, prompts, response_ids, response_mask, [0])
    assert seen["responses"] == [[5, 6, 0], [5, 6, 7, 8], [5, 0], [5, 6, 7, 0]]  # EOS kept, padding dropped
    assert seen["ended"] == [True, False, True, True]
    assert rewards.tolist() == [1.0, -1.0, -1.0, 0.0]  # the default penalty, -1, replaces the unfinished one's 2.0
    assert scores.tolist() == [1.0, 2.0, -1.0, 0.0] and counts == {"missing_eos": 1}

    args = Args(task="tldr", missing_eos_penalty=None, reward_sigmoid=True, reward_scale=2.0, reward_shift=-1.0)
    rewards, _, counts = tldr_rewards(args, reward_model, prompts, response_ids, response_mask, [0])
    torch.testing.assert_close(rewards, 2 * torch.tensor([1.0, 2.0, -1.0, 0.0]).sigmoid() - 1)
    assert counts == {"missing_eos": 1}  # counted even when not penalised


def test_same_tokenizer_feeds_ids_and_another_tokenizer_gets_text(tmp_path, neox_tokenizer, neox_reward_dir):
    policy_tok = neox_tokenizer
    other_tok = build_neox_tokenizer(vocab_size=280, seed=1)
    other_dir = build_neox(tmp_path / "other_rm", other_tok, reward=True)
    prompts_text = ["SUBREDDIT: r/tifu\n\nTITLE: my dog\n\nPOST: my dog ate it\n\nTL;DR:", "POST: we went\n\nTL;DR:"]
    summaries = [" my dog ate my work", " yes yes"]
    eval_rows = [{"content": p, "answer": s} for p, s in zip(prompts_text, summaries)]
    prompts = [policy_tok(p)["input_ids"] for p in prompts_text]
    eos = policy_tok.eos_token_id
    responses = [policy_tok(summaries[0])["input_ids"] + [eos], policy_tok(summaries[1])["input_ids"]]
    ended = torch.tensor([True, False])

    same = load_reward_model(
        Args(task="tldr", reward_model_path=str(neox_reward_dir)), policy_tok, eval_rows, "cpu", nullcontext()
    )
    assert same.same_vocab and same.inputs(prompts, responses, ended) == [p + r for p, r in zip(prompts, responses)]

    other = load_reward_model(
        Args(task="tldr", reward_model_path=str(other_dir)), policy_tok, eval_rows, "cpu", nullcontext()
    )
    assert not other.same_vocab
    expected = [
        other_tok(prompts_text[0] + summaries[0])["input_ids"] + [other_tok.eos_token_id],  # ended: EOS added back
        other_tok(prompts_text[1] + summaries[1])["input_ids"],
    ]
    assert expected[0] != prompts[0] + responses[0]  # the vocabularies really differ
    assert other.inputs(prompts, responses, ended) == expected
    with torch.no_grad():
        direct = torch.stack([other.model(torch.tensor([ids])).logits[0, 0] for ids in expected])
    torch.testing.assert_close(other(prompts, responses, ended), direct)


# ----------------------------------------------------------------------------------------------------------------------
# main()


def test_main_tldr_end_to_end(neox_policy_dir, neox_reward_dir, tldr_files, tmp_path):
    args = tldr_args(neox_policy_dir, neox_reward_dir, tldr_files, tmp_path, eval_every=1, max_prompt_length=40)
    run_dir = main(args)
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["response_length"] == 6 and saved["eval_dataset_split"] == "validation"
    rows = read_metrics(run_dir)
    train = [r for r in rows if "train/reward_mean" in r]
    evals = [r for r in rows if "eval/rm_score" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    for key in ("train/reward_mean", "train/kl", "train/grad_norm", "train/eos_fraction", "reward/missing_eos"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert not any("train/accuracy" in r for r in rows)  # a summary has no right answer
    for key in ("eval/rm_score", "eval/reward", "eval/kl", "eval/response_length", "eval/missing_eos"):
        assert all(math.isfinite(r[key]) for r in evals), key
    assert evals[0]["eval/kl"] == 0.0  # the policy is still the reference
    tok = AutoTokenizer.from_pretrained(neox_policy_dir)
    for step in (0, 2):
        samples = read_samples(run_dir, step)
        assert len(samples) == 4 and {"prompt", "response", "reference", "rm_score", "reward", "kl"} <= set(samples[0])
        assert all(len(tok(s["prompt"])["input_ids"]) <= 40 for s in samples)  # posts trimmed to the budget
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert (run_dir / "model" / "config.json").is_file()


def word_reward_model(tokenizer, word_id: int) -> torch.nn.Module:
    """A one-layer GPT-NeoX classifier whose score rises with the fraction of tokens that are word_id, set by hand.

    Every embedding has zero mean and the same norm, so LayerNorm only rescales. Dims 0-7 hold a token's identity (the
    word's pattern is orthogonal to all others), dims 8-15 start at zero. Attention has Q = K = 0, so it averages
    uniformly over the sequence; V writes the word's indicator onto a fixed pattern in dims 8-15, the score head reads
    that pattern. So the score is an increasing function of (word count) / (sequence length), whatever the last token."""
    from transformers import GPTNeoXForSequenceClassification

    d = 16
    config = neox_config(tokenizer, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1, num_attention_heads=1)
    config.num_labels = 1
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(config).eval()
    word = torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1])
    out = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])
    g = torch.Generator().manual_seed(0)
    quarter = torch.tensor([1.0, 1, -1, -1])  # two +1 and two -1 per quarter: orthogonal to `word`, zero mean
    with torch.no_grad():
        embeddings = torch.zeros(len(tokenizer), d)
        for t in range(len(tokenizer)):
            embeddings[t, :8] = torch.cat([quarter[torch.randperm(4, generator=g)] for _ in range(2)])
        embeddings[word_id, :8] = word
        model.gpt_neox.embed_in.weight.copy_(embeddings)
        layer = model.gpt_neox.layers[0]
        qkv = torch.zeros(3 * d, d)  # rows: Q, K, V (one head)
        qkv[2 * d + 8 :, :8] = torch.outer(out, word) / 8
        layer.attention.query_key_value.weight.copy_(qkv)
        layer.attention.query_key_value.bias.zero_()
        layer.attention.dense.weight.copy_(torch.eye(d))
        layer.attention.dense.bias.zero_()
        layer.mlp.dense_4h_to_h.weight.zero_()  # no MLP
        layer.mlp.dense_4h_to_h.bias.zero_()
        model.score.weight.zero_()
        model.score.weight[0, 8:] = out / 8
    return model


def test_a_reward_model_that_likes_a_word_moves_the_policy_toward_it(tmp_path, neox_tokenizer, tldr_files):
    tok = neox_tokenizer
    yes = tok.convert_tokens_to_ids("Ġyes")
    reward = word_reward_model(tok, yes)
    base = tok("POST: my dog\n\nTL;DR: my dog")["input_ids"]
    with torch.no_grad():
        scores = [reward(torch.tensor([base + [yes] * k])).logits.item() for k in range(4)]
    assert scores == sorted(scores) and scores[0] == 0.0  # more "yes", higher score
    reward.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")

    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(neox_config(tok)).eval()
    with torch.no_grad():  # make the random policy say " yes" about one token in ten, so there is something to reward
        policy.gpt_neox.final_layer_norm.bias[0] = 10.0
        policy.get_output_embeddings().weight[yes, 0] = 0.35
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")

    args = tldr_args(
        tmp_path / "policy",
        tmp_path / "rm",
        tldr_files,
        tmp_path,
        eval_size=8,
        response_length=8,
        total_episodes=96,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        missing_eos_penalty=None,  # few random summaries end within 8 tokens
        reward_scale=10.0,
        eval_every=100,
    )
    run_dir = main(args)
    evals = [r for r in read_metrics(run_dir) if "eval/rm_score" in r]
    before, after = evals[0], evals[-1]

    def yes_per_summary(step):
        return sum(s["response"].count(" yes") for s in read_samples(run_dir, step)) / len(read_samples(run_dir, step))

    print(
        f"tiny word-loving reward model: held-out score {before['eval/rm_score']:.4f} -> {after['eval/rm_score']:.4f}, "
        f"' yes' per summary {yes_per_summary(0):.2f} -> {yes_per_summary(after['step']):.2f}, "
        f"KL {before['eval/kl']:.3f} -> {after['eval/kl']:.3f}"
    )
    # Seed 1 (this run): 0.025 -> 0.069, 1.25 -> 3.38 " yes" per summary. Seeds 1-10: the score rose 2.4 to 6.9 times
    # and " yes" per summary by 1.9 to 2.5; the margins below leave room for other CPUs' arithmetic.
    assert after["eval/rm_score"] > 1.5 * before["eval/rm_score"]
    assert yes_per_summary(after["step"]) > yes_per_summary(0) + 1.0
    assert after["eval/kl"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_reward_models_and_data_are_config_errors(tmp_path, neox_tokenizer, neox_policy_dir, tldr_files):
    two_labels = build_neox(tmp_path / "two_labels", neox_tokenizer, reward=True, num_labels=2)
    lowercase = build_neox(tmp_path / "lowercase", build_neox_tokenizer(lowercase=True), reward=True)
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"post": "my dog", "summary": "dog"}) + "\n")
    cases = [
        ({"reward_model_path": str(two_labels)}, "has 2 labels"),
        ({"reward_model_path": str(neox_policy_dir)}, "not a ...ForSequenceClassification"),
        ({"reward_model_path": str(lowercase)}, "does not give back the text"),
        ({"dataset_name": str(no_prompt)}, "no `prompt` column"),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            main(tldr_args(neox_policy_dir, neox_policy_dir, tldr_files, tmp_path / "runs", **kw))
    assert not (tmp_path / "runs").exists()  # nothing written before the checks


def test_bad_reward_model_is_one_line_and_exit_code_2(tmp_path, neox_tokenizer, neox_policy_dir, tldr_files):
    two_labels = build_neox(tmp_path / "two_labels", neox_tokenizer, reward=True, num_labels=2)
    flags = ["--task", "tldr", "--sft_model_path", str(neox_policy_dir), "--reward_model_path", str(two_labels)]
    flags += ["--dataset_name", str(tldr_files[0]), "--eval_dataset_name", str(tldr_files[1]), "--eval_size", "4"]
    flags += ["--output_dir", str(tmp_path / "runs")]
    result = subprocess.run(
        [sys.executable, "online_sft.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has 2 labels" in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # above it, only the data loader's progress bar
