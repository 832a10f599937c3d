"""Task data: arith generation and the math loaders on small files in every supported schema."""

import json

import pandas as pd
import pytest

from online_sft import (
    DAPO_TEMPLATE,
    Args,
    ConfigError,
    arith_data,
    last_integer,
    load_table,
    math_data,
    math_rows,
    overlong_penalty,
    render_prompt,
    validate_args,
)

DAPO_PROMPT = 'Solve ... Answer: $Answer ...\n\n{}\n\nRemember to put your answer on its own line after "Answer:".'


def write_dapo(path, n_unique=5, copies=3):
    rows = []
    for i in range(n_unique):
        for _ in range(copies):  # the real file repeats each prompt ~100 times
            rows.append(
                {
                    "data_source": "math_dapo",
                    "prompt": [{"role": "user", "content": DAPO_PROMPT.format(f"{i}+{i}")}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": str(2 * i), "style": "rule-lighteval/MATH_v2"},
                    "extra_info": {"index": f"id-{i}"},
                }
            )
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_arith_eval_and_train_never_overlap():
    args = Args(eval_size=50, arith_digits=1, arith_ops="+")
    eval_rows, sampler = arith_data(args)
    eval_questions = {r["content"] for r in eval_rows}
    assert len(eval_questions) == 50
    train = sampler.sample(2000)
    assert not eval_questions & {r["content"] for r in train}
    assert len({r["content"] for r in train}) == 50  # the other half of the 100 one-digit sums, all reachable
    for r in train[:100]:
        a, b = (int(x) for x in r["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert int(r["answer"]) == a + b


def test_arith_difficulty_and_seed():
    hard = arith_data(Args(arith_digits=3, arith_ops="-*", eval_size=10))[1].sample(200)
    assert any(int(r["answer"]) < 0 for r in hard) and any(int(r["answer"]) > 999 for r in hard)
    assert all(" + " not in r["content"] for r in hard)
    assert arith_data(Args(seed=3))[0] == arith_data(Args(seed=3))[0]
    assert arith_data(Args(seed=3))[0] != arith_data(Args(seed=4))[0]


def test_last_integer():
    assert last_integer("3 + 4 = 7") == "7"
    assert last_integer("The answer is -12.") == "-12"
    assert last_integer("about 1,200 apples") == "1200"
    assert last_integer("no digits") is None


def test_dapo_parquet_is_deduplicated(tmp_path):
    path = write_dapo(tmp_path / "dapo.parquet", n_unique=5, copies=3)
    rows, bad = math_rows(load_table(str(path), "train"), str(path))
    assert len(rows) == 5 and bad == 0
    assert rows[2] == {"content": DAPO_PROMPT.format("2+2"), "answer": "4"}


def test_gsm8k_jsonl(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
                {"question": "Half of 1,000?", "answer": "1000/2 = 500\n#### 500"},
                {"question": "No final answer", "answer": "just reasoning"},  # a bad row: counted, skipped
            ]
        )
    )
    rows, bad = math_rows(load_table(str(path), "train"), str(path))
    assert [r["answer"] for r in rows] == ["7", "500"] and bad == 1
    assert rows[0]["content"] == DAPO_TEMPLATE.format(problem="Tom has 3 apples and buys 4. How many?")


def test_problem_answer_json_and_heldout_split(tmp_path):
    path = tmp_path / "math500.json"
    path.write_text(
        json.dumps([{"problem": f"What is {i} squared?", "answer": str(i * i), "level": 1} for i in range(40)])
    )
    eval_rows, sampler, stats = math_data(Args(task="math", dataset_name=str(path), eval_size=8))
    assert stats["data/train_rows"] == 32 and stats["data/eval_rows"] == 8
    train = {r["content"] for r in sampler.sample(100)}
    assert len(train) == 32 and not train & {r["content"] for r in eval_rows}


def test_missing_column_names_the_schemas(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(ConfigError, match=r"match no known schema.*GSM8K"):
        math_rows(load_table(str(path), "train"), str(path))


def test_bad_args_fail_before_loading_anything(tmp_path):
    cases = [
        (Args(task="chess"), "unknown --task"),
        (Args(task="math", dataset_name=str(tmp_path / "missing.parquet")), "no such file"),
        (Args(per_device_train_batch_size=3, gradient_accumulation_steps=1, num_generations=2), "multiple of"),
        (Args(response_length=0), "--response_length must be > 0"),
        (Args(total_episodes=8), "less than one step"),
        (Args(eval_size=80), "too few training questions"),
        (Args(temperature=0.0), "--temperature must be > 0"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_args(args)


def test_render_prompt_uses_the_chat_template_when_there_is_one(tiny_model_dir, tiny_model_dir_no_template):
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = AutoTokenizer.from_pretrained(tiny_model_dir_no_template)
    assert chat.decode(render_prompt(chat, "What is 1 + 2?")) == "<|user|>What is 1 + 2?\n<|assistant|>"
    assert raw.decode(render_prompt(raw, "What is 1 + 2?")) == "What is 1 + 2?"


def test_overlong_penalty():
    import torch

    penalty = overlong_penalty(torch.tensor([10.0, 24.0, 28.0, 32.0]), max_len=32, buffer=8, factor=1.0)
    assert penalty.tolist() == [0.0, 0.0, -0.5, -1.0]


def test_math_defaults_are_the_gpu_recipe_and_arith_is_unchanged():
    from online_sft import MATH_MODEL, with_task_defaults

    math_args = with_task_defaults(Args(task="math"))
    assert math_args.model_name_or_path == MATH_MODEL == "Qwen/Qwen2.5-Math-1.5B"
    assert (math_args.response_length, math_args.num_generations, math_args.learning_rate) == (2048, 8, 1e-6)
    derived = validate_args(Args(task="math"))
    assert (derived["episodes_per_step"], derived["rank_prompts"], derived["num_steps"]) == (128, 16, 500)
    arith = with_task_defaults(Args())
    assert (arith.per_device_train_batch_size, arith.gradient_accumulation_steps, arith.num_generations) == (32, 1, 4)
    assert (arith.learning_rate, arith.total_episodes, arith.response_length) == (1e-5, 640, 24)
    assert with_task_defaults(Args(task="math", learning_rate=3e-6)).learning_rate == 3e-6  # a flag given wins


def test_the_math_defaults_offline_say_how_to_run_locally():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no hub, and no minute of retries
    result = subprocess.run(
        [sys.executable, "online_sft.py", "--task", "math"], cwd=Path(__file__).resolve().parents[1], env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not load dataset 'BytedTsinghua-SIA/DAPO-Math-17k'")
    assert "To run the math task locally: python bench/math_word_problems.py" in lines[-1]
    assert "--model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct" in lines[-1]
    if not torch.cuda.is_available():  # said before anything loads
        assert any(line.startswith("note: --task math's defaults") and "meant for a GPU" in line for line in lines)


def test_an_unreachable_hub_switches_to_the_cache(monkeypatch):
    import os

    from online_sft import use_cache_if_hub_unreachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    use_cache_if_hub_unreachable(Args(model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))  # embedded: no hub
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    use_cache_if_hub_unreachable(Args(task="math", dataset_name="someone/data"), timeout_s=1.0)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    import datasets
    import huggingface_hub

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True


def loop_rows(table):
    """The row loop math_rows used before dapo_rows (one dict per row), as the reference."""
    rows, seen, bad = [], set(), 0
    for ex in table:
        messages = ex["prompt"]
        content = messages[-1]["content"] if isinstance(messages, list) and messages else None
        answer = (ex["reward_model"] or {}).get("ground_truth")
        answer = None if answer is None else str(answer).strip()
        if not content or not answer:
            bad += 1
        elif (content, answer) not in seen:
            seen.add((content, answer))
            rows.append({"content": content, "answer": answer})
    return rows, bad


def test_dapo_rows_column_wise_equal_the_row_loop(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from math_word_problems import dapo_rows as generated

    rows = generated(60, 5, seed=3)  # shuffled duplicates, as in the real set
    rows[7] = {**rows[7], "prompt": []}  # bad rows: no message, an empty answer, no reward_model, a null message text
    rows[11] = {**rows[11], "reward_model": {"ground_truth": "  ", "style": "x"}}
    rows[12] = {**rows[12], "reward_model": None}
    rows[13] = {**rows[13], "prompt": [{"role": "system", "content": "x"}, {"role": "user", "content": None}]}
    rows[20] = {**rows[20], "reward_model": {"ground_truth": " 42 ", "style": "x"}}  # stripped, like the loop did
    rows[21] = {**rows[21], "prompt": [{"role": "system", "content": "be brief"}, *rows[21]["prompt"]]}  # the last
    path = tmp_path / "dapo.parquet"
    pd.DataFrame(rows).to_parquet(path)
    table = load_table(str(path), "train")
    fast, bad = math_rows(table, str(path))
    assert (fast, bad) == loop_rows(table) and bad == 4
    assert len(fast) == 60 + 1  # 60 problems, and row 20's problem also with the answer 42
    # a Dataset whose rows are not its table's (shuffled) takes the row loop, with the same result
    shuffled = table.shuffle(seed=0)
    assert math_rows(shuffled, str(path)) == loop_rows(shuffled)


def test_word_problems_are_in_the_dapo_schema(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from math_word_problems import dapo_rows as generated
    from math_word_problems import write_parquet

    rows = generated(50, 4, seed=0)
    assert generated(50, 4, seed=0) == rows and len(rows) == 200  # the same seed, the same file
    first = rows[0]
    assert set(first) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert first["data_source"] == "math_dapo" and first["prompt"][0]["role"] == "user"
    assert first["prompt"][0]["content"].startswith(DAPO_TEMPLATE.split("{problem}")[0])
    assert first["prompt"][0]["content"].endswith('Remember to put your answer on its own line after "Answer:".')
    assert all(r["reward_model"]["ground_truth"].isdigit() for r in rows)
    _, _, stats = math_data(Args(task="math", dataset_name=str(write_parquet(tmp_path / "w.parquet", rows)),
                                         eval_size=10))  # fmt: skip
    assert stats["data/train_rows"] + stats["data/eval_rows"] == 50  # duplicates dropped
