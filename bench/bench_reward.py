"""Benchmark reward_utils' math checker, side by side with Hugging Face's math-verify.

Run from the repository root:

    python bench/bench_reward.py

It prints, for reward_utils and (if importable) math-verify:
  1. agreement with the labelled cases in tests/math_cases.py, overall and per category;
  2. median / p95 latency per check and checks per second on a batch of 1,000 cases sampled from those cases
     (adversarial ones excluded: they are timed separately), plus a DAPO-like batch (integer labels);
  3. the time of every adversarial case and the slowest one.

math-verify is only a comparison here, never a dependency: pip install -r bench/requirements-bench.txt
Both checkers get the same per-check bound (2 s). math-verify is given the ground truth after
reward_utils.normalize_ground_truth (which only strips GSM8K `####` tails and `\\boxed{}`, several boxes of one
answer becoming one list), wrapped in `$...$` as its README shows, and the whole completion as the prediction.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# These two resolve through the sys.path entries above: the bench runs as a plain script from the repo root.
from math_cases import CASES

import reward_utils

TIMEOUT_S = 2


def load_math_verify():
    """(parse, verify) from math-verify, or None when it is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every timeout it hits
    return parse, verify


def ours(completion: str, gt: str) -> bool:
    return reward_utils.math_reward(completion, gt, timeout_s=TIMEOUT_S) > 0


def make_theirs(mv):
    parse, verify = mv

    def theirs(completion: str, gt: str) -> bool:
        gold = parse("$" + reward_utils.normalize_ground_truth(gt) + "$", parsing_timeout=TIMEOUT_S)
        pred = parse(completion, parsing_timeout=TIMEOUT_S)
        return bool(verify(gold, pred, timeout_seconds=TIMEOUT_S))

    return theirs


def timed(fn, cases) -> tuple[list[bool], list[float]]:
    verdicts, seconds = [], []
    for completion, gt, *_ in cases:
        t0 = time.perf_counter()
        verdicts.append(fn(completion, gt))
        seconds.append(time.perf_counter() - t0)
    return verdicts, seconds


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_line(name: str, seconds: list[float]) -> str:
    return (
        f"  {name:<14} median {statistics.median(seconds) * 1e3:8.3f} ms   p95 {pct(seconds, 0.95) * 1e3:8.3f} ms"
        f"   {len(seconds) / sum(seconds):10.0f} checks/s"
    )


def short(text: str, n: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1000, help="size of the mixed batch used for latency")
    ap.add_argument("--show-disagreements", action="store_true", help="list every case a checker gets wrong")
    args = ap.parse_args()

    mv = load_math_verify()
    theirs = make_theirs(mv) if mv else None
    if mv is None:
        print(
            "math-verify is not installed; its columns are skipped. "
            "Install it with: pip install -r bench/requirements-bench.txt\n"
        )

    # Worker start-up, measured once from cold, then kept warm for everything below.
    reward_utils.shutdown_worker()
    t0 = time.perf_counter()
    reward_utils.is_equiv("2\\pi", "\\pi\\cdot 2", timeout_s=60)
    cold_start = time.perf_counter() - t0

    # 1. Agreement with the labels.
    labelled = [c for c in CASES]
    our_verdicts, our_times = timed(ours, labelled)
    their_verdicts, their_times = timed(theirs, labelled) if theirs else (None, None)
    n = len(labelled)
    our_ok = [v == c[2] for v, c in zip(our_verdicts, labelled)]
    print(f"== Agreement with {n} labelled cases (tests/math_cases.py) ==")
    print(f"  reward_utils   {sum(our_ok):4d}/{n}  ({100 * sum(our_ok) / n:5.1f}%)")
    if theirs:
        their_ok = [v == c[2] for v, c in zip(their_verdicts, labelled)]
        print(f"  math-verify    {sum(their_ok):4d}/{n}  ({100 * sum(their_ok) / n:5.1f}%)")
    categories = list(dict.fromkeys(c[3] for c in labelled))
    print(f"\n  {'category':<18}{'cases':>6}{'reward_utils':>14}" + (f"{'math-verify':>13}" if theirs else ""))
    for cat in categories:
        idx = [i for i, c in enumerate(labelled) if c[3] == cat]
        row = f"  {cat:<18}{len(idx):>6}{sum(our_ok[i] for i in idx):>14}"
        if theirs:
            row += f"{sum(their_ok[i] for i in idx):>13}"
        print(row)
    for name, oks, verdicts in (
        ("reward_utils", our_ok, our_verdicts),
        ("math-verify", their_ok if theirs else None, their_verdicts),
    ):
        if oks is None:
            continue
        wrong = [i for i, ok in enumerate(oks) if not ok]
        if wrong and (args.show_disagreements or name == "reward_utils"):
            print(f"\n  {name} disagrees with the label on:")
            for i in wrong:
                completion, gt, expected, cat = labelled[i]
                answer = reward_utils.extract_answer(completion)
                print(f"    [{cat}] answer={short(str(answer))!r} gt={short(gt, 40)!r} label={expected}")

    # 2. Latency and throughput.
    rng = random.Random(0)
    pool = [c for c in CASES if c[3] != "adversarial"]
    batch = [rng.choice(pool) for _ in range(args.batch)]
    dapo = []
    for _ in range(args.batch):
        truth = rng.randint(0, 10_000)
        guess = truth if rng.random() < 0.4 else truth + rng.choice((-1, 1, 10, -10, 100))
        dapo.append((f"Step by step ...\nThe total is {guess}.\n\nAnswer: {guess}", str(truth), guess == truth, "dapo"))
    print(f"\n== Latency per check, {len(batch)}-case mixed batch (labelled cases, adversarial excluded) ==")
    _, our_lat = timed(ours, batch)
    print(latency_line("reward_utils", our_lat))
    if theirs:
        _, their_lat = timed(theirs, batch)
        print(latency_line("math-verify", their_lat))
    t0 = time.perf_counter()
    _, counts = reward_utils.math_reward_batch([c[0] for c in batch], [c[1] for c in batch], timeout_s=TIMEOUT_S)
    batch_s = time.perf_counter() - t0
    print(
        f"  math_reward_batch on the whole batch: {batch_s:.3f} s = {len(batch) / batch_s:.0f} checks/s   "
        f"counts={counts}"
    )
    print(f"\n== Latency per check, {len(dapo)}-case DAPO-like batch (integer labels, 'Answer: N') ==")
    _, our_lat = timed(ours, dapo)
    print(latency_line("reward_utils", our_lat))
    if theirs:
        _, their_lat = timed(theirs, dapo)
        print(latency_line("math-verify", their_lat))
    print(f"\n  sympy worker cold start (first symbolic check of a process): {cold_start:.3f} s")

    # 3. Adversarial inputs.
    adversarial = [(i, c) for i, c in enumerate(labelled) if c[3] == "adversarial"]
    print(f"\n== Adversarial cases (bound {TIMEOUT_S} s per check) ==")
    print(f"  {'reward_utils':>12}" + (f"{'math-verify':>13}" if theirs else "") + "  answer")
    for i, (completion, gt, *_rest) in adversarial:
        row = f"  {our_times[i]:>11.3f}s"
        if theirs:
            row += f"{their_times[i]:>12.3f}s"
        print(row + f"  {short(str(reward_utils.extract_answer(completion)), 50)!r} vs {gt!r}")
    worst = max(adversarial, key=lambda ic: our_times[ic[0]])
    print(
        f"  slowest for reward_utils: {our_times[worst[0]]:.3f} s on "
        f"{short(str(reward_utils.extract_answer(worst[1][0])), 50)!r}"
    )
    if theirs:
        worst = max(adversarial, key=lambda ic: their_times[ic[0]])
        print(
            f"  slowest for math-verify:  {their_times[worst[0]]:.3f} s on "
            f"{short(str(reward_utils.extract_answer(worst[1][0])), 50)!r}"
        )
    reward_utils.shutdown_worker()


if __name__ == "__main__":
    main()
