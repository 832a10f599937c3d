"""Integer word problems in the exact DAPO-Math-17k schema, for running `--task math` offline.

Each row is what `BytedTsinghua-SIA/DAPO-Math-17k` holds: `data_source` "math_dapo", `prompt` (one user message with
DAPO's instruction around the problem), `ability` "MATH", `reward_model` {ground_truth: the answer as a string, style},
`extra_info` {index: a uuid-like id}. As in the real set, every unique problem appears `copies` times (DAPO's ~100x
duplication), so the trainer's de-duplication is exercised too.

Problems take one or two operations (+, -, x) on small numbers; answers are non-negative integers. The same seed
always gives the same file.

    python bench/math_word_problems.py --out data/word_problems.parquet --unique 2000 --copies 4
"""

from __future__ import annotations

import argparse
import random
import uuid
from pathlib import Path

# The prompt of DAPO-Math-17k, word for word (see online_sft.DAPO_TEMPLATE; copied so this script runs on its own).
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Ella"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells", "coins", "balloons"]


def one_problem(rng: random.Random) -> tuple[str, int]:
    """(problem text, answer): one of seven templates with one or two operations."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.randrange(7)
    if kind == 0:
        return f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?", a + b
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?", a - b
    if kind == 2:
        a = rng.randint(2, 9)
        return f"{name} has {a} boxes with {c} {item} in each box. How many {item} are there in total?", a * c
    if kind == 3:
        other = rng.choice([x for x in NAMES if x != name])
        return f"{name} has {a} {item} and {other} has {b} {item}. How many {item} do they have together?", a + b
    if kind == 4:
        total = a + b + c
        return (
            f"{name} has {total} {item}, gives {a} to a friend and then loses {b}. How many {item} are left?",
            total - a - b,
        )
    if kind == 5:
        return f"{name} has {a} {item}, gets {b} more and then {c} more. How many {item} does {name} have?", a + b + c
    n = rng.randint(2, 9)
    return (
        f"{name} buys {n} bags of {item} with {c} {item} in each bag, and already had {a}. How many {item} does "
        + f"{name} have now?",
        n * c + a,
    )


def dapo_rows(unique: int, copies: int, seed: int = 0) -> list[dict]:
    """unique distinct problems, each repeated copies times, in the DAPO-Math-17k schema (in file order: the real
    set's duplicates are spread through it, so the rows are shuffled)."""
    rng = random.Random(seed)
    problems: dict[str, int] = {}
    while len(problems) < unique:
        text, answer = one_problem(rng)
        problems.setdefault(text, answer)
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_TEMPLATE.format(problem=text)}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(answer), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": str(uuid.UUID(int=rng.getrandbits(128)))},
        }
        for text, answer in problems.items()
        for _ in range(copies)
    ]
    rng.shuffle(rows)
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/word_problems.parquet"), help="parquet file to write")
    parser.add_argument("--unique", type=int, default=2000, help="distinct problems")
    parser.add_argument("--copies", type=int, default=4, help="rows per problem (DAPO-Math-17k: ~100)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same file")
    cli = parser.parse_args()
    print(write_parquet(cli.out, dapo_rows(cli.unique, cli.copies, cli.seed)), f"{cli.unique * cli.copies} rows")
