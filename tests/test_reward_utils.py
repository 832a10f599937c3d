"""Tests for reward_utils: labelled answer-checking cases, extraction, rewards, time bounds, threads, the worker."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from math_cases import CASES, box

import reward_utils
from reward_utils import (
    DEFAULT_TIMEOUT_S,
    extract_answer,
    is_equiv,
    math_reward,
    math_reward_batch,
    normalize_ground_truth,
)

ROOT = Path(__file__).resolve().parents[1]
# Time bounds are asserted with this much slack over the bound: the machine is shared and noisy, and a hang
# (what these assertions exist to catch) overshoots by minutes, not by a second.
SLACK_S = 1.5
HANG = box("\\sin(e^{e^{e^{4}}})")  # sympy's evalf runs for minutes on this: a real hang, not a simulated one


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """Start the sympy worker once, so that no case spends its own time bound on start-up."""
    reward_utils.start_worker()
    assert is_equiv("2\\pi", "\\pi\\cdot 2", timeout_s=60)
    yield
    reward_utils.shutdown_worker()


# ----------------------------------------------------------------------------------------------------------------
# Labelled cases
# ----------------------------------------------------------------------------------------------------------------

REQUIRED_CATEGORIES = {
    "integer",
    "thousands",
    "decimal_fraction",
    "percent",
    "latex_wrapper",
    "units",
    "scientific",
    "symbolic",
    "tuple_interval",
    "set",
    "matrix",
    "equation",
    "choice",
    "extraction",
    "self_correction",
    "gsm8k",
    "wrong_close",
    "hedge",
    "no_answer",
    "adversarial",
}


def test_case_inventory():
    assert len(CASES) >= 150
    assert REQUIRED_CATEGORIES <= {c[3] for c in CASES}
    assert all(isinstance(c[2], bool) for c in CASES)
    # Both verdicts are represented in each category that is not all-wrong by definition.
    for cat in REQUIRED_CATEGORIES - {"hedge", "no_answer", "adversarial", "wrong_close"}:
        assert {c[2] for c in CASES if c[3] == cat} == {True, False} or cat in {"integer", "gsm8k"}


@pytest.mark.parametrize(
    "completion,ground_truth,expected,category",
    CASES,
    ids=[f"{i:03d}-{c[3]}" for i, c in enumerate(CASES)],
)
def test_labelled_case(completion, ground_truth, expected, category):
    t0 = time.monotonic()
    rewards, counts = math_reward_batch([completion], [ground_truth])
    elapsed = time.monotonic() - t0
    assert rewards == [1.0 if expected else -1.0], f"answer {extract_answer(completion)!r} vs {ground_truth!r}"
    assert counts["bad_ground_truth"] == 0
    if category == "adversarial":
        assert elapsed < DEFAULT_TIMEOUT_S + SLACK_S
    else:
        assert counts["timeouts"] == 0
    if category == "no_answer":
        assert counts["no_answer"] == 1


def test_no_wrong_accept_over_all_labelled_cases():
    """Every case labelled incorrect (hedges, off-by-ones, sign errors, swapped tuples...) scores incorrect."""
    wrong = [c for c in CASES if not c[2]]
    rewards, _ = math_reward_batch([c[0] for c in wrong], [c[1] for c in wrong])
    accepted = [(extract_answer(c[0]), c[1], c[3]) for c, r in zip(wrong, rewards) if r > 0]
    assert len(wrong) > 150
    assert accepted == []


# Each way of wrapping a box in math mode, and each way of joining two boxes into one hedged answer.
DELIMITERS = [("", ""), ("$", "$"), ("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("\n\\[\n", "\n\\]\n")]
JOINS = [" or ", " or maybe ", ", possibly ", ", ", " and ", " \\text{ or } "]
CORRECT = [c for c in CASES if c[2] and extract_answer(c[0]) is not None]


def _hedged(answer: str, k: int) -> str:
    """The correct answer and a wrong one, boxed separately, in the k-th wrapping/join/order."""
    left, right = DELIMITERS[k % len(DELIMITERS)]
    wrong = f"({answer})+1"  # never equal to the answer, and never a list that could contain it
    pair = (answer, wrong) if k % 2 == 0 else (wrong, answer)
    join = JOINS[(k // len(DELIMITERS)) % len(JOINS)]
    return f"So {left}\\boxed{{{pair[0]}}}{right}{join}{left}\\boxed{{{pair[1]}}}{right}."


def test_every_correct_answer_hedged_with_a_wrong_one_is_incorrect():
    """A hedge never scores: each correct labelled answer, boxed next to a wrong value in every wrapping and join,
    and followed by an unboxed wrong alternative ("\\boxed{42} or maybe 43")."""
    comps = [_hedged(extract_answer(c[0]), k) for k, c in enumerate(CORRECT)]
    unboxed = [c for c in CORRECT if "\\boxed" not in extract_answer(c[0])]  # else the alternative holds a box
    for k, c in enumerate(unboxed):
        left, right = DELIMITERS[k % len(DELIMITERS)]
        ans = extract_answer(c[0])
        join = (" or ", " or maybe ", ", possibly ")[k % 3]
        comps.append(f"So {left}\\boxed{{{ans}}}{right}{join}{left}({ans})+1{right}.")
    labels = [c[1] for c in CORRECT + unboxed]
    rewards, _ = math_reward_batch(comps, labels)
    accepted = [(comp, gt) for comp, gt, r in zip(comps, labels, rewards) if r > 0]
    assert len(comps) > 500
    assert accepted == []


def test_every_correct_answer_after_a_self_correction_is_correct():
    """A revised answer answers with its last box, whatever wraps the boxes."""
    comps = []
    for k, c in enumerate(CORRECT):
        left, right = DELIMITERS[k % len(DELIMITERS)]
        ans = extract_answer(c[0])
        comps.append(
            f"So {left}\\boxed{{({ans})+1}}{right}. Wait, that is wrong; actually {left}\\boxed{{{ans}}}{right}."
        )
    rewards, _ = math_reward_batch(comps, [c[1] for c in CORRECT])
    rejected = [(comp, c[1]) for comp, c, r in zip(comps, CORRECT, rewards) if r < 0]
    assert rejected == []


def _nonzero_number(gt: str) -> bool:
    """Is the label a plain non-zero number (so that its negation and its successor are both wrong)?"""
    text = reward_utils._clean(normalize_ground_truth(gt)).rstrip("%")
    try:
        return reward_utils._rat(reward_utils._parse(text)) != 0
    except (reward_utils._NotMath, reward_utils._NotRational, reward_utils._TooBig, reward_utils._Undefined):
        return False


def test_every_correct_number_off_by_one_or_negated_is_incorrect():
    """Each correct answer to a non-zero numeric label, plus one or with its sign flipped, scores incorrect."""
    numeric = [c for c in CORRECT if _nonzero_number(c[1])]
    comps = [
        box(f"{op[0]}({extract_answer(c[0])}){op[1]}") for c in numeric for op in (("", "+1"), ("", "-1"), ("-", ""))
    ]
    rewards, _ = math_reward_batch(comps, [c[1] for c in numeric for _ in range(3)])
    assert len(numeric) > 100
    assert [comp for comp, r in zip(comps, rewards) if r > 0] == []


# ----------------------------------------------------------------------------------------------------------------
# Extraction and ground truths
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Work.\n**Answer:** 42", "42"),
        ("Work.\nAnswer:42", "42"),
        ("Work.\nAnswer: 42.", "42"),
        ("Work.\n**Answer: 42**", "42"),
        ("Work.\nFinal Answer: $\\frac{1}{2}$", "\\frac{1}{2}"),
        ("Answer:\n$$\n7\n$$", "7"),
        ("so $\\boxed{\\frac{a^{2}}{b}}$ done", "\\frac{a^{2}}{b}"),
        ("\\boxed{\\boxed{9}}", "\\boxed{9}"),
        ("result \\boxed 5.", "5"),
        ("area \\fbox{7}", "7"),
        ("\\boxed{3} ... no wait, actually \\boxed{5}", "5"),
        ("\\boxed{3} or \\boxed{5}", "3 or 5"),
        ("\\boxed{3}, \\boxed{5}", "3, 5"),
        ("Answer: 3\nAnswer: 4", "4"),
        ("Answer: 3\nactually \\boxed{4}", "4"),
        ("\\boxed{4}\nAnswer: 3", "3"),
        ("no final answer here: 42", None),
        ("\\boxed{}", None),
        ("\\boxed{42", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_reads_only_the_tail():
    # A box far before the end (beyond TAIL_CHARS) is not a final answer, and the work stays bounded.
    assert extract_answer("\\boxed{1}" + "x" * (reward_utils.TAIL_CHARS + 10)) is None
    t0 = time.monotonic()
    assert extract_answer("{" * 1_000_000 + "\\boxed{2}") == "2"
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize(
    "gt,expected",
    [
        ("Natalia sold 24 clips.\n#### 72", "72"),
        ("#### 1,000", "1,000"),
        ("\\boxed{5}", "5"),
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("$\\frac12$", "\\frac12"),
        ("  34 ", "34"),
        (42, "42"),
        (None, ""),
    ],
)
def test_normalize_ground_truth(gt, expected):
    assert normalize_ground_truth(gt) == expected


# ----------------------------------------------------------------------------------------------------------------
# is_equiv, math_reward and the batch form
# ----------------------------------------------------------------------------------------------------------------


def test_is_equiv_basics():
    assert is_equiv("1/2", "0.5")
    assert is_equiv("\\frac{\\sqrt{2}}{2}", "\\sqrt2/2")
    assert is_equiv("3", "#### 3")  # ground truths are normalised inside too
    assert not is_equiv("42 or 43", "42")
    assert not is_equiv(None, "42")
    assert not is_equiv("42", "")
    with pytest.raises(ValueError):
        is_equiv("1", "1", timeout_s=0)


def test_math_reward_values():
    assert math_reward(box("42"), "42") == 1.0
    assert math_reward(box("41"), "42") == -1.0
    assert math_reward("no answer", "42") == -1.0
    assert math_reward(box("42"), "42", correct_reward=2.0, incorrect_reward=0.0) == 2.0
    assert math_reward(box("41"), "42", correct_reward=2.0, incorrect_reward=0.0) == 0.0
    assert math_reward(box("42"), "", correct_reward=1.0, incorrect_reward=-0.5) == -0.5  # bad label: never a reward


def test_batch_rewards_and_counts():
    completions = [
        box("42"),  # correct
        box("41"),  # wrong
        "I believe it is 42.",  # no final answer
        box("42"),  # empty label
        box("\\frac{1}{2}"),  # unbalanced label
        box("\\pi\\cdot 2"),  # correct, decided by the sympy worker
        HANG,  # times out
        box("1,000"),  # correct, decided in-process after the timeout
    ]
    gts = ["42", "42", "42", "", "\\frac{1}{", "2\\pi", "0.5", "1000"]
    t0 = time.monotonic()
    rewards, counts = math_reward_batch(completions, gts, correct_reward=1.0, incorrect_reward=-1.0, timeout_s=1.5)
    assert time.monotonic() - t0 < 2 * 1.5 + SLACK_S
    assert rewards == [1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0]
    assert counts == {"no_answer": 1, "timeouts": 1, "bad_ground_truth": 2}


def test_batch_validates_inputs():
    with pytest.raises(ValueError):
        math_reward_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError):
        math_reward_batch(["a"], ["1"], timeout_s=-1)
    assert math_reward_batch([], []) == ([], {"no_answer": 0, "timeouts": 0, "bad_ground_truth": 0})


# ----------------------------------------------------------------------------------------------------------------
# Never hangs: time bounds, the worker, threads
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "10^{10^{10}}",
        "9^{9^{9^9}}",
        "(" * 400 + "1" + ")" * 400,
        "1+" * 400 + "1",
        "\\sin(e^{e^{e^{4}}})",
        "\\lfloor e^{e^{e^{3}}} \\rfloor",
        "x^{10^{10^{10}}}",
    ],
)
def test_adversarial_answers_respect_a_short_bound(answer):
    t0 = time.monotonic()
    assert not is_equiv(answer, "3", timeout_s=0.5)
    assert time.monotonic() - t0 < 0.5 + SLACK_S


def test_huge_response_is_bounded():
    t0 = time.monotonic()
    rewards, counts = math_reward_batch(["7 " * 50_000 + "\\boxed{10^{10^{10}}}"], ["7"])
    assert rewards == [-1.0]
    assert counts == {"no_answer": 0, "timeouts": 0, "bad_ground_truth": 0}  # refused in-process, not timed out
    assert time.monotonic() - t0 < DEFAULT_TIMEOUT_S + SLACK_S


def test_timeout_kills_and_replaces_the_worker():
    reward_utils.start_worker()
    assert is_equiv("2\\pi", "\\pi\\cdot 2", timeout_s=30)
    old = reward_utils._WORKER.proc
    t0 = time.monotonic()
    # The "sleep" request stands in for a check that never finishes.
    assert reward_utils._ask_worker({"op": "sleep", "seconds": 60}, 0.5) == (False, True)
    assert time.monotonic() - t0 < 0.5 + SLACK_S
    assert old.poll() is not None  # killed, not left running
    assert reward_utils._WORKER.proc.pid != old.pid  # a replacement is already starting
    assert is_equiv("\\sqrt{8}", "2\\sqrt{2}", timeout_s=30)


def test_checks_from_a_non_main_thread():
    # signal.alarm only works in the main thread; the worker's kill-based timeout works anywhere.
    results = {}

    def run():
        results["batch"] = math_reward_batch(
            [box("\\frac{1}{\\sqrt{2}}"), HANG, box("1,000"), box("\\sqrt{3}")],
            ["\\frac{\\sqrt2}{2}", "0.5", "1000", "\\sqrt{2}"],
            timeout_s=1.0,
        )

    t0 = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    rewards, counts = results["batch"]
    assert rewards == [1.0, -1.0, 1.0, -1.0]
    assert counts["timeouts"] == 1
    assert time.monotonic() - t0 < 2 * 1.0 + 2 * SLACK_S


def test_concurrent_threads_share_the_worker():
    outcomes = []

    def run(i):
        outcomes.append(is_equiv(f"{i}\\pi", f"\\pi \\cdot {i}", timeout_s=20))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcomes == [True] * 8


def test_worker_errors_are_raised_not_scored():
    reward_utils.start_worker()
    assert is_equiv("2\\pi", "\\pi\\cdot 2", timeout_s=30)
    with pytest.raises(RuntimeError, match="unknown op"):
        reward_utils._ask_worker({"op": "no-such-op"}, 5.0)


def test_shutdown_and_lazy_restart():
    reward_utils.shutdown_worker()
    assert reward_utils._WORKER is None
    assert is_equiv("\\frac{1}{\\sqrt{2}}", "\\sqrt2/2", timeout_s=30)  # needs sympy: starts a new worker on demand
    assert reward_utils._WORKER is not None


def test_import_has_no_side_effects_and_numbers_skip_sympy():
    """In a fresh interpreter: importing starts nothing, and integer / plain-number answers never touch sympy."""
    code = (
        "import sys, time\n"
        "t0 = time.perf_counter()\n"
        "import reward_utils as r\n"
        "import_s = time.perf_counter() - t0\n"
        "assert r._WORKER is None and 'sympy' not in sys.modules\n"
        "comps = ['Answer: 42', 'Answer: 41', '\\\\boxed{1,000}', '\\\\boxed{0.5}', '\\\\boxed{\\\\frac{3}{4}}',\n"
        "         '\\\\boxed{-7}', '\\\\boxed{2.50}', '\\\\boxed{50\\\\%}', '\\\\boxed{1.5 \\\\times 10^{3}}']\n"
        "gts = ['42', '42', '1000', '1/2', '0.75', '-7', '2.5', '50', '1500']\n"
        "rewards, counts = r.math_reward_batch(comps, gts)\n"
        "assert rewards == [1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], rewards\n"
        "assert r._WORKER is None and 'sympy' not in sys.modules\n"
        "print(import_s)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.0  # imports quickly: sympy and the worker are deferred
