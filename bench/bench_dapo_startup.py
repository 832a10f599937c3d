"""Start-up on DAPO-Math-17k at its real size: reading and de-duplicating 1.79 M rows (17.9 k unique, each ~100x).

Builds a local parquet in the exact schema of `BytedTsinghua-SIA/DAPO-Math-17k` (integer word problems from
bench/math_word_problems.py, each row repeated `--copies` times and shuffled, its own uuid in `extra_info.index`), then
times, in the same run:
- before: the row loop online_sft.math_rows used up to commit 84d8e34 (a Python dict per row, on every rank),
- after: online_sft.math_data as it is now (Arrow column operations, then one dict per unique row),
each with the datasets cache empty (the first run on a machine: datasets converts the parquet to its Arrow cache) and
warm (every later run), and checks that both give the same rows in the same order. Prints the figures and the ratio.

    python bench/bench_dapo_startup.py                       # 17,900 unique x 100 copies = 1.79 M rows
    python bench/bench_dapo_startup.py --unique 1000 --copies 10   # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build_parquet(path: Path, unique: int, copies: int, seed: int = 0) -> Path:
    """unique problems x copies rows, shuffled, in DAPO-Math-17k's schema; built column-wise (a 1.79 M-row file in
    seconds)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from math_word_problems import dapo_rows

    base = pa.Table.from_pylist(dapo_rows(unique, 1, seed))
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(unique), copies))
    table = base.take(order)
    ids = rng.integers(0, 2**63, size=(len(order), 2), dtype=np.uint64)
    index = pa.array([f"{a:016x}-{b:016x}" for a, b in ids.tolist()])
    table = table.set_column(table.schema.get_field_index("extra_info"), "extra_info",
                             pa.StructArray.from_arrays([index], names=["index"]))  # fmt: skip
    pq.write_table(table, path)
    return path


def rows_before(name: str):
    """online_sft.math_rows up to commit 84d8e34, DAPO branch: one Python dict per row, duplicates dropped."""
    from online_sft import load_table

    table = load_table(name, "train")
    rows, seen, bad = [], set(), 0
    for ex in table:
        messages = ex["prompt"]
        content = messages[-1]["content"] if isinstance(messages, list) and messages else None
        answer = (ex["reward_model"] or {}).get("ground_truth")
        answer = None if answer is None else str(answer).strip()
        if not content or not answer:
            bad += 1
            continue
        if (content, answer) not in seen:
            seen.add((content, answer))
            rows.append({"content": content, "answer": answer})
    return rows, bad


def rows_after(name: str):
    from online_sft import load_table, math_rows

    return math_rows(load_table(name, "train"), name)


def timed(fn, name: str):
    t = time.perf_counter()
    out = fn(name)
    return time.perf_counter() - t, out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unique", type=int, default=17_900, help="distinct problems (DAPO-Math-17k: ~17.9 k)")
    parser.add_argument("--copies", type=int, default=100, help="rows per problem (DAPO-Math-17k: ~100)")
    cli = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = build_parquet(Path(tmp) / "dapo.parquet", cli.unique, cli.copies)
        print(
            f"built {cli.unique * cli.copies:,} rows ({cli.unique:,} unique), {path.stat().st_size / 1e6:.0f} MB "
            f"parquet, in {time.perf_counter() - t:.1f}s"
        )
        import datasets
        import pyarrow.compute  # noqa: F401 (imports out of the timings)

        import online_sft  # noqa: F401

        figures = {}
        for label, fn in (("after", rows_after), ("before", rows_before)):
            for cache in ("cold", "warm"):
                if cache == "cold":  # an empty datasets cache for each implementation
                    datasets.config.HF_DATASETS_CACHE = Path(tempfile.mkdtemp(dir=tmp))
                    os.environ["HF_DATASETS_CACHE"] = str(datasets.config.HF_DATASETS_CACHE)
                seconds, (rows, bad) = timed(fn, str(path))
                figures[label, cache] = seconds
                print(f"{label:6s} {cache} cache: {seconds:6.1f}s  ({len(rows):,} unique rows, {bad} bad)")
            figures[label] = rows
        assert figures["after"] == figures["before"], "the two implementations disagree"
        for cache in ("cold", "warm"):
            ratio = figures["before", cache] / figures["after", cache]
            print(f"{cache} cache: before {figures['before', cache]:.1f}s, after {figures['after', cache]:.1f}s: "
                  f"{ratio:.1f}x faster")  # fmt: skip
        print(f"same {len(figures['after']):,} rows in the same order: yes")
