"""Math answer checking for RL rewards: right, fast, and never hangs.

Public functions
----------------
extract_answer(text) -> str | None
    The final answer of a response: the last `Answer:` line (DAPO format; `**Answer:**`, `Answer:42`, `Answer: 42.`
    and `Final Answer:` are accepted) or the last `\\boxed{...}` / `\\boxed 5` / `\\fbox{...}` (nested braces),
    whichever comes later in the text. Only the last TAIL_CHARS characters are searched. None if there is neither.
normalize_ground_truth(gt) -> str
    A dataset label as an answer string: GSM8K `#### 42` tails and `\\boxed{}` wrappers removed. "" if unusable.
is_equiv(prediction, ground_truth, timeout_s=2.0) -> bool
    Mathematical equality of two answer strings. False when the check runs past timeout_s.
math_reward(completion, ground_truth, correct_reward=1.0, incorrect_reward=-1.0, timeout_s=2.0) -> float
math_reward_batch(completions, ground_truths, correct_reward=1.0, incorrect_reward=-1.0, timeout_s=2.0)
    -> (rewards, {"no_answer": n, "timeouts": n, "bad_ground_truth": n})
    What the trainer calls. A missing answer, a timed-out check and an unusable ground truth all score
    incorrect_reward and are counted, so they show up in the logs instead of hiding as wrong answers.
start_worker() -> None / shutdown_worker() -> None
    Optional: start the sympy worker ahead of the first symbolic check / stop it (it also stops at exit).

How a check runs
----------------
1. Both answers are cleaned as text: `$`, `\\(...\\)`, `\\text{}`/`\\mathrm{}`, `\\left`/`\\right`, spacing, units,
   degrees, thousands separators, `x =` prefixes.
2. Each answer is split into structure (tuple or interval, set, list, union, matrix), compared element by element.
3. Each scalar is read by the small LaTeX/plain-text parser below (a recursive-descent parser; nothing is eval'ed).
   Exact arithmetic on polynomials with rational coefficients (a number is a constant one) decides numbers,
   polynomials, and the equations and inequalities of lines and half-lines; complex floats at fixed points reject
   clear mismatches. Both run in-process without sympy, so integer and plain-number answers (all of
   DAPO-Math-17k's labels) never leave the process.
4. Only answers that look equal but are not polynomial (`2\\pi` vs `\\pi\\cdot 2`, `\\frac{\\sqrt2}{2}` vs `1/\\sqrt2`)
   go to a sympy worker: one persistent process per trainer process, started on first need (never at import), that
   tests whether the difference is exactly zero (sympy's strict evalf finds a non-zero difference to 50 digits; with
   variables, at several points). A check that runs past timeout_s gets the worker killed (SIGKILL works from any
   thread, unlike signal.alarm) and a fresh one started at once; that check counts as incorrect and as a timeout.
   The bound is strict: waiting for another thread, for a worker that is still starting (python + sympy import,
   about 1-2 s, e.g. on the first symbolic check of a process or just after a kill) and for the reply all fit in
   timeout_s. Call start_worker() early to keep the first symbolic check from spending its budget on start-up.

Rules and choices
-----------------
- Last final answer wins: "\\boxed{3} ... actually \\boxed{5}" answers 5. Boxes separated only by math delimiters
  (`$`, `$$`, `\\(...\\)`, `\\[...\\]`, on one line or several), punctuation, the words or/and/maybe/possibly/
  perhaps/probably/also and a name for the next value ("or \\(x = \\boxed{5}\\)") form one answer:
  "\\(\\boxed{3}\\) or maybe \\(\\boxed{5}\\)" is "3 or 5", and so is "\\boxed{3} or maybe 5" (an unboxed
  alternative after the last box). A ground truth written that way is the same list.
- Hedges are lists, and a list never equals a single value: "42 or 43", "42 \\pm 1" (read as {43, 41}) and
  "1, 2, \\ldots, 100" are wrong for 42. `\\pm` in a ground truth expands the same way, so "\\pm 2" equals "2, -2".
- Bare lists ("2, 3") are unordered (solution lists); parenthesised tuples are ordered, intervals must match
  bracket for bracket, `\\{...\\}` sets (and `{1, 2}`, a set that lost its backslashes) are unordered. A list may
  stand for a `( )` tuple in the same order, a column vector equals the tuple of its entries, and a one-element set
  equals its element.
- Percentages: "%" means /100, but labels often drop the sign ("what percent ..." -> "25"), so a value with "%"
  on exactly one side matches either its bare number or its value: "25%" equals "25" and "0.25"; "0.25" equals
  "25%". With "%" on both sides the numbers must match.
- Numbers are exact: "0.5" = "1/2", but "0.333" != "1/3" ("0.\\overline{3}" = "1/3"), "3.14" != "\\pi",
  "e^{-100}" != "0". Expressions with variables are equal when they agree exactly at several generic points.
- A degree sign ending a value is dropped ("30^\\circ" = "30", not pi/6); inside an expression it is pi/180
  ("\\sin 30^\\circ" = "1/2").
- A number followed by a unit or by plain words compares as the number ("5 \\text{ cm}", "18 dollars",
  "7 red marbles"), unless a word qualifies it ("about 42", "42 or more" stay text). "\\frac{\\sqrt2}{2} \\approx 0.707"
  is graded on the exact value before "\\approx".
- Thousands separators: "1,000", "1{,}000", "1{, }000", "1,\\! 000", "1\\,000" and "1 000" are 1000 only when the
  whole answer is such a number (digit groups of exactly three); otherwise a comma separates list items.
- Notation: `e` is Euler's number and `i` the imaginary unit; `2e3` is 2000; `x^23` means x^23 (plain-text
  reading) but `\\frac12` and `\\sqrt2` take one digit (LaTeX reading); `3\\frac{1}{2}` is the mixed number 7/2;
  `\\sqrt[3]{-8}` is -2; `\\log` is the natural log; `1011_2` (base notation) compares as text.
- Against a value, "x = 3", "f(x) = 3", "(x, y) = (1, 2)", "x \\in [2, 5]" and "\\approx 3" compare by their
  right-hand side, and an equation with constant sides by those ("2 + 3 = 5", "m + n = 113" answer 5 and 113; every
  constant side must match, so "42 = 43" answers nothing). Two equations are equal when one is a non-zero multiple
  of the other, so explicit and implicit forms agree ("y = 3 - 2x" = "2x + y = 3", "2x + 2y = 2" = "x + y = 1"),
  but "x = 3" != "y = 3"; equations with the same left-hand side also match by their right-hand sides.
- Inequalities in one variable are intervals: "x > 3" = "(3, \\infty)", "2 \\le x < 5" = "[2, 5)". A linear one is
  solved exactly, whatever side the variable is on and whatever factor scales it ("-x > -1" = "x < 1",
  "-1 < 2x + 1 \\le 5" = "(-1, 2]"); others ("x^2 > 4") are not solved.
- Matrices: pmatrix, bmatrix, `\\left[\\begin{array}...\\right]` and a matrix in brackets are the same matrix; sums,
  products and scalar multiples of literals in an answer are computed exactly ("I + A", "2A", "AB", in order).
- `\\sum` and `\\prod` are not evaluated: two are equal when index, bounds and body agree up to the order of terms
  and factors ("\\sum_{k=0}^{n-1} F_k F_{n-k-1}" = the same with the factors swapped), so "\\sum_{k=1}^{n} 2k" is
  not shown equal to "2\\sum_{k=1}^{n} k".
- A ground truth that is one of A-E (optionally "(C)") is a multiple-choice letter: "C", "(C)", "\\textbf{(C)} 42"
  answer it; "C (or maybe D)" does not.
- Words compare as text, ignoring case and spaces ("\\text{Monday}" = "monday").
- Limits that make every check bounded: answers over MAX_ANSWER_CHARS are wrong (ground truths over it are bad);
  bracket nesting over MAX_NESTING is refused; exact values over MAX_BITS (about 12,000 digits: `10^{10^{10}}`,
  `9^{9^{9^9}}`, `2^{65536}`) are never equal to anything, even themselves written differently (identical text, or
  the same parsed expression, still matches).
- A ground truth is "bad" when it is empty, longer than MAX_ANSWER_CHARS, or has unbalanced brackets.

Linux/macOS only (the worker's timeout uses select() on a pipe).
"""

from __future__ import annotations

import atexit
import cmath
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import traceback
from fractions import Fraction

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "extract_answer",
    "is_equiv",
    "math_reward",
    "math_reward_batch",
    "normalize_ground_truth",
    "shutdown_worker",
    "start_worker",
]

DEFAULT_TIMEOUT_S = 2.0
TAIL_CHARS = 4096  # a final answer sits at the end; searching only the tail bounds the work on huge responses
MAX_ANSWER_CHARS = 1000  # real answers are short; longer ones are runaway generations
MAX_NESTING = 50  # deeper brackets are refused before parsing, so recursion stays far below Python's limit
MAX_PARSE_DEPTH = 150  # the same bound for chains of signs and exponents ("------x", "2^2^2^...")
MAX_BITS = 40_000  # ~12,000 digits: exact values above this are refused instead of computed
MAX_ELEMENTS = 64  # unordered collections bigger than this are compared by their text only (n^2 pairings)
WORKER_START_TIMEOUT_S = 60.0  # python + sympy import takes ~1-2 s; a worker still starting after this is replaced


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------

# Line start, optional markdown (`**`, `#`, `-`, `>`), optional "final", "answer", optional closing `**`, colon.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>#*_-]*(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*[:\uff1a][ \t]*(?:\*\*|__)?(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_DELIMITER_ONLY_RE = re.compile(r"[\s$*]*(?:\\\[|\\\]|\\\(|\\\))?[\s$*]*")
_GAP_TEXT_RE = re.compile(r"\\(?:text|textrm|mathrm)\s*\{([^{}]*)\}")
# What may sit between two boxes of one answer: math delimiters and TeX spaces (whatever wraps each box), punctuation,
# joining or hedging words, and the name the next box's value is given ("or \\(x = \\boxed{3}\\)").
_GAP_NOISE_RE = re.compile(r"\\[()\[\]]|\$|\\(?:quad|qquad|[,;:! ])|[\s,;&.*]")
_GAP_NAME_RE = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=\s*$")
_GAP_WORDS = {"or", "and", "maybe", "possibly", "perhaps", "probably", "also"}
# The same hedge with its alternative left unboxed: "\\(\\boxed{42}\\) or maybe 43". Only a value may follow the
# words (a digit, sign, `$`, `\\`, `(`), so a restatement ("or, equivalently, $42$") is not a hedge.
_HEDGE_AFTER_RE = re.compile(
    r"(?:\s|[,;.*$]|\\[)\]])*(?:(?:or|maybe|possibly|perhaps|probably)\b[\s,]*)+(?=[-+\d$\\(])", re.IGNORECASE
)


def _match_brace(s: str, i: int) -> int:
    """Index just past the `}` that closes the `{` at s[i], or -1 if unclosed. `\\{` and `\\}` are literal."""
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _boxes(s: str) -> list[tuple[int, int, str]]:
    """Outermost `\\boxed`/`\\fbox` occurrences as (start, end, content), in order."""
    found: list[tuple[int, int, str]] = []
    for m in _BOX_RE.finditer(s):
        start = m.start()
        if found and start < found[-1][1]:
            continue  # nested inside the previous box; cleaning unwraps it later
        k = m.end()
        while k < len(s) and s[k] in " \t":
            k += 1
        if k < len(s) and s[k] == "{":
            end = _match_brace(s, k)
            if end < 0:
                continue  # truncated box: not a final answer
            found.append((start, end, s[k + 1 : end - 1]))
        else:
            arg = re.match(r"[^\s$]+", s[k:])  # `\boxed 5`: the argument runs to the next space or `$`
            if arg:
                found.append((start, k + arg.end(), arg.group()))
    return found


def _last_boxed(s: str) -> tuple[int | None, str | None]:
    """Position and content of the last box; the boxes before it that only delimiters, punctuation and joining or
    hedging words separate ("\\(\\boxed{3}\\) or maybe \\(\\boxed{5}\\)") are merged with it into one list."""
    boxes = _boxes(s)
    if not boxes:
        return None, None
    group = [boxes[-1]]
    joins: list[str] = []
    for prev in reversed(boxes[:-1]):
        gap = _GAP_TEXT_RE.sub(r" \1 ", s[prev[1] : group[0][0]])
        gap = _GAP_NAME_RE.sub("", _GAP_NOISE_RE.sub(" ", gap))
        words = gap.lower().split()
        if not set(words) <= _GAP_WORDS:
            break  # prose between the boxes ("wait, actually"): an earlier answer that was revised, not a hedge
        group.insert(0, prev)
        joins.insert(0, ", " if set(words) <= {"and"} else " or ")
    text = group[0][2]
    for join, box in zip(joins, group[1:]):
        text += join + box[2]
    hedge = _HEDGE_AFTER_RE.match(s, boxes[-1][1])
    if hedge:
        text += " or " + s[hedge.end() :].split("\n\n", 1)[0]  # to the paragraph's end: display math spans lines
    return boxes[-1][0], text


def _last_answer_line(s: str) -> tuple[int | None, str | None]:
    last = None
    for m in _ANSWER_LINE_RE.finditer(s):
        last = m
    if last is None:
        return None, None
    content = last.group(1)
    if _DELIMITER_ONLY_RE.fullmatch(content):
        # "Answer:" alone, or followed by "$$": the value is on one of the next lines.
        content = ""
        for line in s[last.end() :].split("\n")[1:5]:
            if not _DELIMITER_ONLY_RE.fullmatch(line):
                content = line
                break
    return (last.start(), content) if content.strip() else (None, None)


def _tidy(ans: str) -> str:
    ans = ans.strip().strip("*").strip()
    if ans.endswith(".") and not ans.endswith("..."):
        ans = ans[:-1].rstrip()
    if len(ans) >= 2 and ans.startswith("$") and ans.endswith("$"):
        ans = ans.strip("$").strip()
    return ans


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model response, or None. See the module docstring for the accepted forms."""
    if not isinstance(text, str) or not text:
        return None
    tail = text[-TAIL_CHARS:]
    line_pos, line_ans = _last_answer_line(tail)
    box_pos, box_ans = _last_boxed(tail)
    if box_pos is not None and (line_pos is None or box_pos > line_pos):
        ans = box_ans
    elif line_pos is not None:
        ans = line_ans
    else:
        return None
    ans = _tidy(ans)
    return ans or None


def normalize_ground_truth(gt: object) -> str:
    """A dataset label as an answer string: `#### 42` -> "42", `\\boxed{x}` -> "x". "" when there is none."""
    if gt is None:
        return ""
    s = str(gt)[-TAIL_CHARS:]
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    _, boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed
    return _tidy(s)


# --------------------------------------------------------------------------------------------------------------
# Cleaning: answer text -> canonical text
# --------------------------------------------------------------------------------------------------------------

_ROW = "\x01"  # stands for LaTeX's `\\` row break while single-backslash commands are rewritten

_UNICODE = str.maketrans(
    {
        "\u2212": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u00d7": r" \times ",
        "\u00b7": r" \cdot ",
        "\u22c5": r" \cdot ",
        "\u00f7": r" \div ",
        "\u03c0": r" \pi ",
        "\u221a": r"\sqrt",
        "\u221e": r" \infty ",
        "\u00b0": r"^\circ",
        "\u00b1": r" \pm ",
        "\u2213": r" \mp ",
        "\u2264": r" \le ",
        "\u2265": r" \ge ",
        "\u2260": r" \ne ",
        "\u222a": r" \cup ",
        "\u2229": r" \cap ",
        "\u2205": r"\emptyset",
        "\uff0c": ",",
        "\uff1a": ":",
        "\u00a0": " ",
        "\u2009": "",
        "\u202f": "",
        "\u2248": r" \approx ",
    }
)
_SUPERSCRIPT_RE = re.compile("[\u2070\u00b9\u00b2\u00b3\u2074-\u2079\u207a\u207b]+")
_SUPERSCRIPT_MAP = str.maketrans(
    "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207a\u207b", "0123456789+-"
)
_TEXT_CMDS = (
    "text",
    "textbf",
    "textit",
    "textrm",
    "textnormal",
    "textsf",
    "texttt",
    "mathrm",
    "mathbf",
    "mathit",
    "mathsf",
    "mathtt",
    "mathbb",
    "mathcal",
    "operatorname",
    "mbox",
    "hbox",
    "boldsymbol",
    "bm",
)
_UNWRAP_RE = {
    "box": re.compile(r"\\(boxed|fbox)\s*\{"),
    "text": re.compile(r"\\(" + "|".join(_TEXT_CMDS) + r")\s*\{"),
}
_DEGREE_RE = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)(?:\s*[CF](?![A-Za-z]))?")
_LEAD_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|=|:)\s*:?\s*", re.IGNORECASE)
_HOPE_RE = re.compile(r"\.?\s*I hope it is correct\.?$", re.IGNORECASE)
_UNITS_ANY = (
    r"units?|cm|mm|km|m|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|inch(?:es)?|in|feet|"
    r"foot|ft|yards?|yd|miles?|mi|grams?|g|kg|kilograms?|mg|pounds?|lbs?|oz|ounces?|seconds?|secs?|s|minutes?|"
    r"mins?|hours?|hrs?|h|days?|weeks?|months?|years?|yrs?|dollars?|cents?|degrees?|deg|radians?|rad|mph|"
    r"liters?|litres?|l|ml|mL|gallons?|gal|people|persons?|students?|items?|ways?|times"
)
_UNIT_RE = re.compile(
    r"(?:(?<=[\d)}%])\s+|(?<=\d))(?:(?:sq|square|cubic)\.?\s+)?(?:" + _UNITS_ANY + r")"
    r"(?:\s*\^\s*\{?[23]\}?|\s+squared|\s+cubed)?$"
)
_SINGLE_LETTER_UNIT_GLUED_RE = re.compile(r"(?<=\d)[mgslh]$")  # "5m" is 5*m, not 5 metres: keep it
# "18 apples", "7 red marbles": plain words after a number name what was counted. Words that qualify the number
# ("about 42", "42 or more") are not stripped, so such answers stay text and never equal a number.
_NOUNS_RE = re.compile(r"(?<=[\d}])\s+([A-Za-z]{3,})(?:\s+([A-Za-z]{3,}))?$")
_QUALIFIERS = {
    "and",
    "approximately",
    "about",
    "around",
    "roughly",
    "nearly",
    "almost",
    "over",
    "under",
    "more",
    "less",
    "than",
    "least",
    "most",
    "maybe",
    "possibly",
    "probably",
    "either",
    "between",
    "plus",
    "minus",
    "times",
    "per",
    "each",
    "not",
    "only",
    "exactly",
    "total",
    "pi",
    "sqrt",
    "infty",
    "infinity",
    "sin",
    "cos",
    "tan",
    "log",
    "exp",
}
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?")
_THOUSANDS_SPACE_RE = re.compile(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?%?")


def _unwrap(s: str, kind: str, pad: str) -> str:
    """Replace `\\cmd{X}` by X for the commands of `kind`, innermost braces respected."""
    pattern = _UNWRAP_RE[kind]
    pos = 0
    while True:
        m = pattern.search(s, pos)
        if not m:
            return s
        brace = m.end() - 1
        end = _match_brace(s, brace)
        if end < 0:
            s = s[: m.start()] + s[brace:]  # unclosed: drop the command name only
        else:
            s = s[: m.start()] + pad + s[brace + 1 : end - 1] + pad + s[end:]
        pos = m.start()


def _clean(s: str) -> str:
    """Canonical text of one answer (see the module docstring). Pure string work, linear in len(s) per pass."""
    s = s.translate(_UNICODE)
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + m.group().translate(_SUPERSCRIPT_MAP) + "}", s)
    s = s.replace("\\\\", _ROW)
    s = _unwrap(s, "box", "")
    s = re.sub(r"\\(?:boxed|fbox)(?![A-Za-z])\s*", "", s)
    s = _unwrap(s, "text", " ")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", " ", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![A-Za-z])\s*\.?", "", s)
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = re.sub(r"\\(?:lvert|rvert|vert)(?![A-Za-z])", "|", s)
    s = re.sub(r"\\langle(?![A-Za-z])", "(", s)  # vectors written <1, 2> are tuples
    s = re.sub(r"\\rangle(?![A-Za-z])", ")", s)
    s = re.sub(r"\\lbrace(?![A-Za-z])", r"\\{", s)
    s = re.sub(r"\\rbrace(?![A-Za-z])", r"\\}", s)
    s = re.sub(r"\\(leq?|geq?|neq?)(?:slant)?(?![A-Za-z])", lambda m: "\\" + m.group(1)[:2], s)
    s = s.replace("<=", "\\le ").replace(">=", "\\ge ")
    s = re.sub(r"\\in(?![A-Za-z])", r" \\in ", s)  # "x\in[2,5]": give _strip_lhs its separator
    # Thin spaces go, which glues "1\,000" into 1000; `\!` (negative space) pulls its neighbours together, so the
    # spaces around it go too ("32,\! 349"), as do those of a brace-protected comma ("14 {, }916" is "14{,}916").
    s = re.sub(r"\s*\\!\s*|\\[,>]", "", s)
    s = re.sub(r"\\(?:[;: ]|quad(?![A-Za-z])|qquad(?![A-Za-z]))|~", " ", s)
    s = re.sub(r"\s*\{\s*,\s*\}\s*", ",", s)
    s = _DEGREE_RE.sub(r"\\degree ", s)
    s = re.sub(r"\\%|\s*\bpercent\b", "%", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _LEAD_RE.sub("", s)
    s = _HOPE_RE.sub("", s)
    s = s.strip().strip("*").strip()
    while s and s[-1] in ".,;:" and not s.endswith("..."):
        s = s[:-1].rstrip()
    for _ in range(2):
        m = _UNIT_RE.search(s)
        if not m or m.start() == 0 or _SINGLE_LETTER_UNIT_GLUED_RE.search(s):
            break
        s = s[: m.start()].rstrip()
    m = _NOUNS_RE.search(s)
    if m and m.start() > 0 and not ({w.lower() for w in m.groups() if w} & _QUALIFIERS):
        s = s[: m.start()].rstrip()
    s = re.sub(r"^\\approx\s*", "", s)
    s = re.sub(r"^\+\s*(?=[\d.\\(a-zA-Z])", "", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    elif _THOUSANDS_SPACE_RE.fullmatch(s):
        s = s.replace(" ", "")
    return s


def _depth_ok(s: str) -> bool:
    """Brackets balance (types may differ: intervals) and never nest deeper than MAX_NESTING."""
    depth = 0
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
        else:
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            i += 1
        if depth < 0 or depth > MAX_NESTING:
            return False
    return depth == 0


_SPACE_RE = re.compile(r"(?<![0-9]) | (?![0-9])")


def _key(s: str) -> str:
    """Text for exact comparison: spaces dropped, except between digits ("4 2" is not 42)."""
    return _SPACE_RE.sub("", s)


# --------------------------------------------------------------------------------------------------------------
# Structure: tuples, intervals, sets, lists, unions, matrices
# --------------------------------------------------------------------------------------------------------------

_MATRIX_RE = re.compile(r"\\begin\{([a-zA-Z]*matrix|array)\}(?:\{[lcr| ]*\})?(.*?)\\end\{\1\}", re.DOTALL)
_SIMPLE_VAR = r"(?:[A-Za-z]+|\\[A-Za-z]+)(?:_\{?\w+\}?)?"
_SIMPLE_LHS_RE = re.compile(
    r"\s*(?:"
    + _SIMPLE_VAR
    + r"|[A-Za-z]\s*\(\s*[A-Za-z]\s*(?:,\s*[A-Za-z]\s*)*\)"  # f(x), P(a, b)
    + r"|\(\s*"
    + _SIMPLE_VAR
    + r"(?:\s*,\s*"
    + _SIMPLE_VAR
    + r")+\s*\)"  # (x, y)
    + r"|(?:m\s*)?\\angle\s*[A-Z]{1,3})\s*"
)


_LIST_SEPARATORS = (",", ";", " or ", " and ")


def _split_top(s: str, seps: tuple[str, ...]) -> list[str]:
    """Split s at separators that sit outside every bracket."""
    parts: list[str] = []
    depth = 0
    start = 0
    i = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, i):
                    parts.append(s[start:i])
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _encloses(s: str, open_len: int, close_len: int) -> bool:
    """True if the first bracket of s is closed only by its last bracket, e.g. "(1, 2]" but not "(1)(2)"."""
    return _depth_ok(s[open_len : len(s) - close_len]) if len(s) >= open_len + close_len else False


def _drop_approx(s: str) -> str:
    """ "\\frac{\\sqrt2}{2} \\approx 0.707" -> the exact value before the approximation ("x \\approx 0.7" -> "0.7").
    Not across a list: in "a \\approx 0.7 or b" each item drops its own, and the hedge stays a list."""
    approx = _split_top(s, ("\\approx",))
    if len(approx) > 1 and approx[0] and len(_split_top(s, _LIST_SEPARATORS)) == 1:
        return approx[1] if _SIMPLE_LHS_RE.fullmatch(approx[0]) else approx[0]
    return s


def _strip_lhs(s: str) -> str:
    """ "x = 3" -> "3", "(x, y) = (1, 2)" -> "(1, 2)", "x = 1/2 = 0.5" -> "0.5"; "x^2 + y^2 = 1" stays an equation."""
    parts = _split_top(s, ("=", "\\in "))
    # "x = 1, y = 2" and "x = 2 or x = 3" are lists of assignments, not one chain.
    chain_ok = len(parts) == 2 or len(_split_top(s, _LIST_SEPARATORS)) == 1
    if len(parts) >= 2 and chain_ok and all(parts[1:]) and _SIMPLE_LHS_RE.fullmatch(parts[0]):
        return parts[-1]  # "x = 2 + 3 = 5": the last, simplified value
    return s


_RELATION_RE = re.compile(r"(<|>|\\le(?![A-Za-z])|\\ge(?![A-Za-z])|\\lt(?![A-Za-z])|\\gt(?![A-Za-z]))")
_VAR_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?")


_UPPER_OPS = {"<": False, "\\lt": False, "\\le": True}  # "x op b" bounds x from above; True: closed
_LOWER_OPS = {">": False, "\\gt": False, "\\ge": True}


def _half_line(lhs: str, op: str, rhs: str) -> tuple[str, str, bool] | None:
    """ "lhs op rhs" as (side, bound, closed) with side "upper" or "lower", for the one variable it constrains.

    A linear inequality in one variable is solved exactly: a*x + b > 0 is x > -b/a for a > 0 and x < -b/a for
    a < 0 ("-x > -1" is "x < 1", "2x > 4" is "x > 2"). Otherwise a variable alone on one side takes the other
    side as its bound ("x > \\sqrt{2}")."""
    closed = _UPPER_OPS.get(op, _LOWER_OPS.get(op))
    upper = op in _UPPER_OPS
    try:
        diff = _poly_add(_poly(_parse(lhs)), _poly(_parse(rhs)), -1)  # lhs - rhs, "op 0"
    except (_NotMath, _NotRational, _TooBig, _Undefined):
        diff = None
    terms = [m for m in diff if m] if diff is not None else []
    if len(terms) == 1 and len(terms[0]) == 1 and terms[0][0][1] == 1:
        a = diff[terms[0]]
        bound = -diff.get((), Fraction(0)) / a
        return ("upper" if upper == (a > 0) else "lower", f"{bound.numerator}/{bound.denominator}", closed)
    for var, other, side in ((lhs, rhs, upper), (rhs, lhs, not upper)):
        if _VAR_RE.fullmatch(var) and var not in (_symbols_of(other) or ()):  # "x > a + 1": a symbolic bound
            return ("upper" if side else "lower", other, closed)
    return None


def _inequality(s: str) -> tuple | None:
    """ "x > 3" -> the interval (3, oo); "2 \\le x < 5" and "-1 < 2x + 1 \\le 5" -> [2, 5) and (-1, 2]. None if s is
    not such an inequality."""
    parts = [p.strip() for p in _RELATION_RE.split(s)]
    if len(parts) not in (3, 5) or not all(parts):
        return None
    bounds = [_half_line(parts[i], parts[i + 1], parts[i + 2]) for i in range(0, len(parts) - 2, 2)]
    if None in bounds:
        return None
    lower = [b for b in bounds if b[0] == "lower"]
    upper = [b for b in bounds if b[0] == "upper"]
    if len(lower) > 1 or len(upper) > 1:
        return None  # "1 < x > 3": not an interval
    lo = lower[0] if lower else ("lower", "-\\infty", False)
    hi = upper[0] if upper else ("upper", "\\infty", False)
    return ("tuple", "[" if lo[2] else "(", "]" if hi[2] else ")", (("scalar", lo[1]), ("scalar", hi[1])))


_MATRIX_REF = "\x02"  # stands for the k-th matrix literal, "\x02k\x02", while a matrix expression is read
_MATRIX_REF_RE = re.compile(r"\x02(\d+)\x02")
_MATRIX_MUL_RE = re.compile(r"\\cdot|\\times|\*")


def _matrix_value(s: str) -> list[list[str]] | None:
    """Entries (as text) of a matrix answer: one literal, or a sum of products of literals and scalars
    ("I + A", "2A", "AB"), with any brackets around a literal ("\\left[\\begin{array}...\\right]") read as its
    delimiters. Arithmetic is done on the entries' text ("(a)(b)+(c)(d)"), which the scalar comparison then
    evaluates exactly. None when s is not such an expression (a list or set of matrices, a transpose...)."""
    literals: list[list[list[str]]] = []

    def ref(m: re.Match) -> str:
        rows = [r for r in m.group(2).split(_ROW) if r.strip()]
        literals.append([[c.strip() for c in r.split("&")] for r in rows])
        return f"{_MATRIX_REF}{len(literals) - 1}{_MATRIX_REF}"

    skeleton = _MATRIX_RE.sub(ref, s)
    if not literals or len(literals) > 8:
        return None
    skeleton = re.sub(r"[([]\s*(\x02\d+\x02)\s*[)\]]", r"\1", skeleton)
    if _MATRIX_REF_RE.fullmatch(skeleton.strip()):
        return literals[0]
    total: list[list[str]] | None = None
    for sign, term in _signed_terms(skeleton):
        pieces = _MATRIX_REF_RE.split(term)  # scalar text, matrix index, scalar text, ...
        scalars = [_MATRIX_MUL_RE.sub(" ", p).strip() for p in pieces[0::2]]
        scalars = [x for x in scalars if x]
        if len(pieces) < 3 or not all(_symbols_of(x) is not None for x in scalars):
            return None  # a term without a matrix, or a factor that is not a scalar ("A^T", "A, B")
        value = literals[int(pieces[1])]
        for k in pieces[3::2]:
            other = literals[int(k)]
            if any(len(r) != len(other) for r in value) or len({len(r) for r in other}) != 1:
                return None  # shapes that do not multiply: not an answer to grade by value
            value = [
                ["+".join(f"({r[i]})({other[i][j]})" for i in range(len(r))) for j in range(len(other[0]))]
                for r in value
            ]
        coef = "".join(f"({x})" for x in scalars)
        value = [[f"{'-' if sign == '-' else ''}{coef}({e})" for e in r] for r in value]
        if total is not None and [len(r) for r in total] != [len(r) for r in value]:
            return None
        total = value if total is None else [[f"{a}+{b}" for a, b in zip(ra, rb)] for ra, rb in zip(total, value)]
    if total is None or sum(len(e) for r in total for e in r) > MAX_ANSWER_CHARS * 4:
        return None  # large products are refused rather than expanded
    return total


def _signed_terms(s: str) -> list[tuple[str, str]]:
    """The terms of a sum at bracket depth 0, each with its sign: "A - 2B" -> [("", "A"), ("-", "2B")]."""
    terms: list[tuple[str, str]] = []
    depth, start, sign = 0, 0, ""
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "+-" and depth == 0:
            if s[start:i].strip():
                terms.append((sign, s[start:i]))
            elif sign:
                return []  # "A + -B": two signs in a row; refuse rather than guess
            sign, start = ("-" if c == "-" else "+" if terms else ""), i + 1
    terms.append((sign, s[start:]))
    return terms


def _structure(s: str, depth: int = 0) -> tuple:
    """Parse the outer shape of an answer. Leaves are ("scalar", text)."""
    s = _drop_approx(s.strip())
    if depth > 8:
        return ("scalar", s)
    value = _strip_lhs(s)
    if value != s:
        inner = _structure(value, depth + 1)
        # "(x, y) = (1, 2)" is its tuple; "y = 2x + 1" stays an equation leaf, which _scalar_equal compares as an
        # equation with an equation and by its value with a value.
        return ("scalar", s) if inner[0] == "scalar" and _split_eq(s) else inner
    interval = (
        _inequality(s) if ("<" in s or ">" in s or "\\le" in s or "\\ge" in s or "\\lt" in s or "\\gt" in s) else None
    )
    if interval:
        return interval
    if s in ("\\emptyset", "\\varnothing", "\\{\\}"):
        return ("set", ())
    rows = _matrix_value(s) if "\\begin" in s else None
    if rows:
        cells = [[_structure(c, depth + 1) for c in row] for row in rows]
        if len(cells) > 1 and all(len(r) == 1 for r in cells):
            return ("tuple", "(", ")", tuple(r[0] for r in cells))  # a column vector is its tuple of entries
        return ("matrix", tuple(tuple(r) for r in cells))
    parts = _split_top(s, ("\\cup",))
    if len(parts) > 1:
        return ("union", tuple(_structure(p, depth + 1) for p in parts))
    # `\{1, 2\}`, and `{1, 2}` as models write it once the backslashes are lost (a TeX group never holds a comma).
    brace = 2 if s.startswith("\\{") and s.endswith("\\}") else 1 if s[:1] == "{" and s[-1:] == "}" else 0
    if brace and _encloses(s, brace, brace):
        inner = s[brace:-brace].strip()
        items = _split_top(inner, (",", ";")) if inner else []
        if brace == 2 or len(items) > 1:
            return ("set", _flatten(tuple(_structure(p, depth + 1) for p in items)))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s, 1, 1):
        items = _split_top(s[1:-1], (",",))
        if len(items) >= 2:
            return ("tuple", s[0], s[-1], tuple(_structure(p, depth + 1) for p in items))
    items = _split_top(s, _LIST_SEPARATORS)
    if len(items) >= 2:
        return ("list", _flatten(tuple(_structure(p, depth + 1) for p in items)))
    if "\\pm" in s or "\\mp" in s:
        first = re.search(r"\\[pm]m(?![A-Za-z])", s)
        if first:
            sign = "+" if first.group() == "\\pm" else "-"
            other = "-" if sign == "+" else "+"
            a = s[: first.start()] + sign + s[first.end() :]
            b = s[: first.start()] + other + s[first.end() :]
            return ("list", _flatten((_structure(a, depth + 1), _structure(b, depth + 1))))
    return ("scalar", s)


def _flatten(items: tuple) -> tuple:
    """Hedge lists inside a list or set ("1 \\pm 2, 5") join their parent."""
    out: list = []
    for it in items:
        out.extend(it[1] if it[0] == "list" else (it,))
    return tuple(out)


def _cmp(a: tuple, b: tuple, use_sympy: bool) -> bool | None:
    """Compare prediction structure a with ground-truth structure b. None: only sympy can decide."""
    ka, kb = a[0], b[0]
    if ka == "scalar" and kb == "scalar":
        return _scalar_equal(a[1], b[1], use_sympy)
    if ka == "set" and kb == "scalar" and len(a[1]) == 1:
        return _cmp(a[1][0], b, use_sympy)
    if kb == "set" and ka == "scalar" and len(b[1]) == 1:
        return _cmp(a, b[1][0], use_sympy)
    if ka in ("set", "list") and kb in ("set", "list"):
        return _unordered(a[1], b[1], use_sympy)
    if ka == "tuple" and kb == "tuple":
        if a[1] != b[1] or a[2] != b[2]:
            return False
        return _ordered(a[3], b[3], use_sympy)
    if ka == "list" and kb == "tuple" and b[1:3] == ("(", ")"):
        return _ordered(a[1], b[3], use_sympy)  # "1, 2" for the pair "(1, 2)": same order required
    if ka == "tuple" and kb == "list" and a[1:3] == ("(", ")"):
        return _unordered(a[3], b[1], use_sympy)  # the label is an unordered list; brackets add nothing
    if ka == "union" and kb == "union":
        return _unordered(a[1], b[1], use_sympy)
    if ka == "matrix" and kb == "matrix":
        if len(a[1]) != len(b[1]) or any(len(x) != len(y) for x, y in zip(a[1], b[1])):
            return False
        return _ordered(tuple(c for r in a[1] for c in r), tuple(c for r in b[1] for c in r), use_sympy)
    return False


def _ordered(xs: tuple, ys: tuple, use_sympy: bool) -> bool | None:
    if len(xs) != len(ys):
        return False
    undecided = False
    for x, y in zip(xs, ys):
        r = _cmp(x, y, use_sympy)
        if r is False:
            return False
        undecided |= r is None
    return None if undecided else True


def _unordered(xs: tuple, ys: tuple, use_sympy: bool) -> bool | None:
    if len(xs) != len(ys):
        return False
    if len(xs) > MAX_ELEMENTS:
        return sorted(map(repr, xs)) == sorted(map(repr, ys))
    table = [[_cmp(x, y, use_sympy) for y in ys] for x in xs]
    if _perfect_matching(table, (True,)):
        return True
    if _perfect_matching(table, (True, None)):
        return None
    return False


def _perfect_matching(table: list[list], accept: tuple) -> bool:
    """Kuhn's augmenting paths: can every x be paired with a distinct y through an accepted cell?"""
    n = len(table)
    match_of_y = [-1] * n

    def augment(x: int, seen: list[bool]) -> bool:
        for y in range(n):
            if not seen[y] and table[x][y] in accept:
                seen[y] = True
                if match_of_y[y] < 0 or augment(match_of_y[y], seen):
                    match_of_y[y] = x
                    return True
        return False

    return all(augment(x, [False] * n) for x in range(n))


# --------------------------------------------------------------------------------------------------------------
# Scalars: tokenizer and parser (LaTeX and plain text) -> small AST of tuples
# --------------------------------------------------------------------------------------------------------------
# AST nodes: ("num", Fraction) ("sym", name) ("const", "pi"|"e"|"i"|"oo") ("add", (terms)) ("mul", (factors))
# ("neg", x) ("inv", x) ("pow", base, exp) ("root", x, index) ("fact", x) ("binom", n, k) ("abs", x) ("floor", x)
# ("ceil", x) ("fn", name, x) ("log", x, base | None)


class _NotMath(Exception):
    """The text is not an expression this parser reads; it is compared as text."""


class _NotRational(Exception):
    """Exact rational arithmetic cannot evaluate this node."""


class _TooBig(Exception):
    """An exact value would exceed MAX_BITS; computing it is what hangs other checkers."""


class _Undefined(Exception):
    """Division by zero or a similar undefined value."""


class _FloatFail(Exception):
    """A float evaluation overflowed, hit a pole or left the domain."""


_FUNCS = {
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "exp",
    "ln",
    "log",
}
_GREEK = {
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Sigma",
    "Phi",
    "Psi",
    "Omega",
}
_PLAIN_WORDS = {
    **{f: f for f in _FUNCS},
    "sqrt": "sqrt",
    "pi": "pi",
    "inf": "infty",
    "infty": "infty",
    "infinity": "infty",
    "oo": "infty",
}
_ATOM_CMDS = {"frac", "binom", "sqrt", "pi", "infty", "lfloor", "lceil", "sum", "prod"} | _FUNCS | _GREEK
_CLOSE = {"(": ")", "[": "]", "{": "}"}
_NUM_RE = re.compile(r"(?P<int>\d+)?(?:\.(?P<frac>\d*)(?:\\overline\{(?P<rep>\d+)\})?)?(?:[eE](?P<exp>[+-]?\d+))?")
_CMD_RE = re.compile(r"\\([A-Za-z]+)")
_WORD_RE = re.compile(r"[A-Za-z]+")
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _tokenize(s: str) -> list[tuple]:
    toks: list[tuple] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
        elif c in "0123456789" or (c == "." and i + 1 < n and s[i + 1] in "0123456789"):
            m = _NUM_RE.match(s, i)
            whole, frac, rep, exp = m.group("int") or "0", m.group("frac") or "", m.group("rep"), m.group("exp")
            value = Fraction(int(whole + frac), 10 ** len(frac))
            if rep:
                value += Fraction(int(rep), 10 ** len(frac) * (10 ** len(rep) - 1))
            if exp:
                if abs(int(exp)) > 1000:
                    raise _NotMath  # 1e100000 is no answer; refusing it keeps the arithmetic small
                value *= Fraction(10) ** int(exp)
            toks.append(("num", value, m.group()))
            i = m.end()
        elif c == "\\":
            m = _CMD_RE.match(s, i)
            if not m:
                raise _NotMath  # \{, \| ...: set or norm syntax is not a scalar
            name = m.group(1)
            i = m.end()
            if name in ("cdot", "times", "ast"):
                toks.append(("op", "*"))
            elif name == "div":
                toks.append(("op", "/"))
            else:
                toks.append(("cmd", name))
        elif c in _ASCII_LETTERS:
            word = _WORD_RE.match(s, i).group()
            i += len(word)
            if word in _PLAIN_WORDS:
                toks.append(("cmd", _PLAIN_WORDS[word]))
            elif len(word) <= 2:
                toks.extend(("name", ch) for ch in word)  # "xy" is x*y
            else:
                raise _NotMath  # a word: compared as text, never as a product of letters
        elif c == "*" and s.startswith("**", i):
            toks.append(("op", "^"))
            i += 2
        elif c in "+-*/^_()[]{}!|=":  # "=" only inside \\sum_{k=0}
            toks.append(("op", c))
            i += 1
        else:
            raise _NotMath
    return toks


def _tok_text(tok: tuple) -> str:
    return tok[2] if tok[0] == "num" else tok[1]


class _Parser:
    """Recursive descent: sum -> product (explicit or implicit) -> unary -> power -> postfix -> atom."""

    def __init__(self, toks: list[tuple]):
        self.toks = toks
        self.pos = 0
        self.depth = 0
        self.in_abs = False

    def parse(self) -> tuple:
        node = self.sum()
        if self.pos != len(self.toks):
            raise _NotMath
        return node

    def peek(self) -> tuple:
        return self.toks[self.pos] if self.pos < len(self.toks) else (None, None)

    def is_op(self, ch: str) -> bool:
        tok = self.peek()
        return tok[0] == "op" and tok[1] == ch

    def expect(self, ch: str) -> None:
        if not self.is_op(ch):
            raise _NotMath
        self.pos += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_PARSE_DEPTH:
            raise _NotMath

    def sum(self) -> tuple:
        self.enter()
        terms = [self.product()]
        while self.is_op("+") or self.is_op("-"):
            negative = self.is_op("-")
            self.pos += 1
            term = self.product()
            terms.append(("neg", term) if negative else term)
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", tuple(terms))

    def product(self) -> tuple:
        factors = [self.unary()]
        while True:
            if self.is_op("*"):
                self.pos += 1
                factors.append(self.unary())
            elif self.is_op("/"):
                self.pos += 1
                factors.append(("inv", self.unary()))
            elif self.starts_atom():
                factors.append(self.power())  # implicit multiplication: 2x, 2\pi, (a)(b)
            else:
                break
        return factors[0] if len(factors) == 1 else ("mul", tuple(factors))

    def starts_atom(self) -> bool:
        kind, val = self.peek()[:2]
        if kind in ("num", "name"):
            return True
        if kind == "op":
            return val in "([{" or (val == "|" and not self.in_abs)
        return kind == "cmd" and val in _ATOM_CMDS

    def unary(self) -> tuple:
        if self.is_op("-") or self.is_op("+"):
            negative = self.is_op("-")
            self.pos += 1
            self.enter()
            node = self.unary()
            self.depth -= 1
            return ("neg", node) if negative else node
        return self.power()

    def power(self) -> tuple:
        base = self.postfix()
        if self.is_op("^"):
            self.pos += 1
            self.enter()
            exponent = self.unary()  # right-associative: a^b^c = a^(b^c)
            self.depth -= 1
            return ("pow", base, exponent)
        return base

    def postfix(self) -> tuple:
        node = self.atom()
        while self.is_op("!") or self.peek()[:2] == ("cmd", "degree"):
            if self.is_op("!"):
                node = ("fact", node)
            else:  # a degree sign inside an expression (\sin 30^\circ) is pi/180 of a radian
                node = ("mul", (node, ("const", "pi"), ("inv", ("num", Fraction(180)))))
            self.pos += 1
        return node

    def subscript(self) -> str:
        if not self.is_op("_"):
            return ""
        self.pos += 1
        tok = self.peek()
        if tok[0] == "op" and tok[1] == "{":
            self.pos += 1
            parts = []
            while not self.is_op("}"):
                tok = self.peek()
                if tok[0] is None or (tok[0] == "op" and tok[1] in "{}"):
                    raise _NotMath
                parts.append(_tok_text(tok))
                self.pos += 1
            self.pos += 1
            return "_" + "".join(parts)
        if tok[0] in ("num", "name", "cmd"):
            self.pos += 1
            return "_" + _tok_text(tok)
        raise _NotMath

    def atom(self) -> tuple:
        tok = self.peek()
        kind, val = tok[:2]
        if kind == "num":
            self.pos += 1
            if self.is_op("_"):
                raise _NotMath  # base notation (1011_2) is compared as text
            if val.denominator == 1 and self.peek() == ("cmd", "frac"):
                saved = (self.pos, list(self.toks))
                frac = self.atom()
                # 3\frac{1}{2} is the mixed number 7/2, as competition answers write it.
                if frac[0] == "mul" and frac[1][0][0] == "num" and frac[1][1][0] == "inv" and frac[1][1][1][0] == "num":
                    p, q = frac[1][0][1], frac[1][1][1][1]
                    if p.denominator == 1 and q.denominator == 1 and 0 < p < q:
                        return ("num", val + p / q)
                self.pos, self.toks = saved
            return ("num", val)
        if kind == "name":
            self.pos += 1
            name = val + self.subscript()
            if name in ("e", "i"):
                return ("const", name)
            return ("sym", name)
        if kind == "op":
            if val in _CLOSE:
                self.pos += 1
                self.enter()
                node = self.sum()
                self.expect(_CLOSE[val])
                self.depth -= 1
                return node
            if val == "|" and not self.in_abs:
                self.pos += 1
                self.in_abs = True
                node = self.sum()
                self.expect("|")
                self.in_abs = False
                return ("abs", node)
            raise _NotMath
        if kind == "cmd":
            self.pos += 1
            return self.command(val)
        raise _NotMath

    def arg(self) -> tuple:
        """One argument of \\frac, \\sqrt, \\binom: a {group}, a (group), or a single character."""
        tok = self.peek()
        if tok[0] == "num":
            text = tok[2]
            if len(text) > 1 and text.isdigit():
                self.toks[self.pos] = ("num", Fraction(int(text[1:])), text[1:])  # \frac12: digits one at a time
                return ("num", Fraction(int(text[0])))
            self.pos += 1
            return ("num", tok[1])
        if tok[0] == "name":
            self.pos += 1
            return ("const", tok[1]) if tok[1] in ("e", "i") else ("sym", tok[1])
        if (tok[0] == "op" and tok[1] in "({") or (tok[0] == "cmd" and tok[1] in _ATOM_CMDS):
            return self.atom()
        raise _NotMath

    def big_operator(self, name: str) -> tuple:
        """\\sum_{k=lo}^{hi} body (the body runs to the end of the product, as it is read). Its value is not computed
        (bounds are usually symbolic): it becomes one opaque symbol named by its canonical form, so two sums are
        equal when their index, bounds and bodies agree up to the order of terms and factors, and the rest of the
        expression compares as usual ("1 + \\sum ..." vs "\\sum ... + 1")."""
        self.expect("_")
        self.expect("{")
        index = self.peek()
        if index[0] not in ("name", "cmd"):
            raise _NotMath
        self.pos += 1
        self.expect("=")
        lo = self.sum()
        self.expect("}")
        self.expect("^")
        hi = self.arg()
        self.enter()
        body = self.product()
        self.depth -= 1
        return ("sym", f"\\{name}[{index[1]}={_canonical(lo)};{_canonical(hi)};{_canonical(body)}]")

    def command(self, name: str) -> tuple:
        if name == "frac":
            a = self.arg()
            b = self.arg()
            return ("mul", (a, ("inv", b)))
        if name == "binom":
            n = self.arg()
            return ("binom", n, self.arg())
        if name == "sqrt":
            index = ("num", Fraction(2))
            if self.is_op("["):
                self.pos += 1
                index = self.sum()
                self.expect("]")
            return ("root", self.arg(), index)
        if name == "pi":
            return ("const", "pi")
        if name == "infty":
            return ("const", "oo")
        if name in _GREEK:
            return ("sym", name + self.subscript())
        if name in ("sum", "prod"):
            return self.big_operator(name)
        if name in ("lfloor", "lceil"):
            node = self.sum()
            close = "rfloor" if name == "lfloor" else "rceil"
            if self.peek()[:2] != ("cmd", close):
                raise _NotMath
            self.pos += 1
            return ("floor" if name == "lfloor" else "ceil", node)
        if name in _FUNCS:
            base = None
            power = None
            if name == "log" and self.is_op("_"):
                self.pos += 1
                base = self.arg()
            if self.is_op("^"):
                self.pos += 1
                power = self.arg()
            arg = self.atom() if self.is_op("(") else self.power()
            node = ("log", arg, base) if name in ("log", "ln") else ("fn", name, arg)
            return ("pow", node, power) if power is not None else node
        raise _NotMath


def _canonical(node: tuple) -> str:
    """A text for node that is the same for sums and products written in any order (a + b = b + a, ab = ba)."""
    kind = node[0]
    if kind in ("add", "mul"):
        flat: list[tuple] = []
        stack = list(node[1])
        while stack:  # associativity too: (a + b) + c is a + b + c
            child = stack.pop()
            if child[0] == kind:
                stack.extend(child[1])
            else:
                flat.append(child)
        return kind + "(" + ",".join(sorted(_canonical(c) for c in flat)) + ")"
    args = [_canonical(c) if isinstance(c, tuple) else str(c) for c in node[1:]]
    return kind + "(" + ",".join(args) + ")"


@functools.lru_cache(maxsize=4096)
def _parse(s: str) -> tuple:
    """AST of one scalar, or _NotMath. Cached: a batch repeats the same ground truth many times."""
    return _Parser(_tokenize(s)).parse()


def _symbols(node: tuple) -> set[str]:
    if node[0] == "sym":
        return {node[1]}
    out: set[str] = set()
    for child in node[1:]:
        if isinstance(child, tuple):
            if child and isinstance(child[0], str):
                out |= _symbols(child)
            else:
                for c in child:
                    out |= _symbols(c)
    return out


# --------------------------------------------------------------------------------------------------------------
# Exact rational evaluation (in-process, bounded)
# --------------------------------------------------------------------------------------------------------------


def _bits(v: Fraction) -> int:
    return max(v.numerator.bit_length(), v.denominator.bit_length())


def _iroot(v: int, n: int) -> int | None:
    """Exact integer n-th root of v >= 0, or None."""
    if v < 2:
        return v
    if n == 2:
        r = math.isqrt(v)
    else:
        r = 1 << -(-v.bit_length() // n)  # an upper bound; Newton's iteration then descends to floor(root)
        while True:
            nxt = ((n - 1) * r + v // r ** (n - 1)) // n
            if nxt >= r:
                break
            r = nxt
    return r if r**n == v else None


def _rat_root(x: Fraction, n: int) -> Fraction:
    if n < 1 or n > 64:
        raise _NotRational
    if x < 0:
        if n % 2 == 0:
            raise _NotRational
        return -_rat_root(-x, n)  # odd roots of negatives are real, as textbooks read them
    a, b = _iroot(x.numerator, n), _iroot(x.denominator, n)
    if a is None or b is None:
        raise _NotRational
    return Fraction(a, b)


def _rat_pow(b: Fraction, e: Fraction) -> Fraction:
    if e.denominator != 1:
        if b < 0:
            raise _NotRational  # principal complex value: left to sympy
        return _rat_pow(_rat_root(b, e.denominator), Fraction(e.numerator))
    n = e.numerator
    if b == 0:
        if n < 0:
            raise _Undefined
        return Fraction(1 if n == 0 else 0)
    if abs(b) == 1:
        return b ** (n % 2)
    if _bits(b) * abs(n) > MAX_BITS:
        raise _TooBig
    return b**n


def _rat(node: tuple) -> Fraction:
    """Exact value of a node without variables; _NotRational when it has one or is irrational."""
    p = _poly(node)
    if any(p):  # a monomial other than the constant one
        raise _NotRational
    return p.get((), Fraction(0))


def _rat_function(node: tuple) -> Fraction:
    """Exact value of the nodes _poly does not build from sums and products: numbers, roots, factorials..."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "root":
        index = _rat(node[2])
        if index.denominator != 1:
            raise _NotRational
        return _rat_root(_rat(node[1]), int(index))
    if kind == "fact":
        v = _rat(node[1])
        if v.denominator != 1 or v < 0:
            raise _NotRational
        if v > 1000:
            raise _TooBig
        return Fraction(math.factorial(int(v)))
    if kind == "binom":
        n, k = _rat(node[1]), _rat(node[2])
        if n.denominator != 1 or k.denominator != 1 or n < 0 or k < 0:
            raise _NotRational
        if n > 10_000:
            raise _TooBig
        return Fraction(math.comb(int(n), int(k)))
    if kind == "abs":
        return abs(_rat(node[1]))
    if kind == "floor":
        return Fraction(math.floor(_rat(node[1])))
    if kind == "ceil":
        return Fraction(math.ceil(_rat(node[1])))
    if kind == "log" and node[2] is not None:
        x, b = _rat(node[1]), _rat(node[2])
        if x <= 0 or b <= 0 or b == 1:
            raise _NotRational
        ratio = (math.log(x.numerator) - math.log(x.denominator)) / (math.log(b.numerator) - math.log(b.denominator))
        k = round(ratio)
        if abs(ratio - k) > 1e-9:
            raise _NotRational
        try:
            if _rat_pow(b, Fraction(k)) == x:  # log_2 8 = 3 exactly
                return Fraction(k)
        except _TooBig:
            pass  # fall through: an exponent that large is not worth an exact proof here
        raise _NotRational
    raise _NotRational


# A polynomial with rational coefficients: {monomial: coefficient}, a monomial being a sorted tuple of
# (symbol, exponent); zero coefficients are never stored, so equal polynomials are equal dicts. A number is the
# polynomial {(): value}. Exact, in-process, and it decides what answers mostly are: numbers, polynomials, and the
# linear equations and inequalities of lines and half-lines.
MAX_TERMS = 256  # expanding (a + b + c)^20 is no answer check: larger polynomials go to the float/sympy path


def _poly_add(p: dict, q: dict, sign: int = 1) -> dict:
    out = dict(p)
    for m, c in q.items():
        v = out.get(m, 0) + sign * c
        if v:
            if _bits(v) > MAX_BITS:
                raise _TooBig
            out[m] = v
        else:
            out.pop(m, None)
    return out


def _poly_mul(p: dict, q: dict) -> dict:
    if len(p) * len(q) > MAX_TERMS * MAX_TERMS:
        raise _NotRational
    out: dict = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            if _bits(c1) + _bits(c2) > MAX_BITS:
                raise _TooBig
            powers = dict(m1)
            for name, k in m2:
                powers[name] = powers.get(name, 0) + k
            out = _poly_add(out, {tuple(sorted(powers.items())): c1 * c2})
    if len(out) > MAX_TERMS:
        raise _NotRational
    return out


def _poly(node: tuple) -> dict:
    """The polynomial node stands for, or _NotRational (irrational constants, roots of variables, division by a
    variable...), _TooBig, _Undefined."""
    kind = node[0]
    if kind == "sym":
        return {((node[1], 1),): Fraction(1)}
    if kind == "add":
        total: dict = {}
        for t in node[1]:
            total = _poly_add(total, _poly(t))
        return total
    if kind == "mul":
        prod = {(): Fraction(1)}
        for f in node[1]:
            prod = _poly_mul(prod, _poly(f))
        return prod
    if kind == "neg":
        return {m: -c for m, c in _poly(node[1]).items()}
    if kind in ("inv", "pow"):
        base = _poly(node[1])
        if not any(base):  # a constant base: rational arithmetic
            c = base.get((), Fraction(0))
            if kind == "inv":
                if c == 0:
                    raise _Undefined
                return {(): 1 / c}
            v = _rat_pow(c, _rat(node[2]))
            return {(): v} if v else {}
        if kind == "inv":
            raise _NotRational  # a rational function: left to the float screen and sympy
        e = _rat(node[2])
        if e.denominator != 1 or e < 0:
            raise _NotRational
        if len(base) == 1:  # a monomial: exponents multiply, however large (bounded by MAX_BITS)
            ((m, c),) = base.items()
            if e * max(k for _, k in m) > MAX_BITS:
                raise _TooBig
            return {tuple((name, k * int(e)) for name, k in m if e): _rat_pow(c, e)}  # x^0 is 1
        if e > 64:
            raise _NotRational
        out = {(): Fraction(1)}
        for _ in range(int(e)):
            out = _poly_mul(out, base)
        return out
    v = _rat_function(node)  # every other node is a constant, or not a polynomial (_NotRational)
    return {(): v} if v else {}


def _try_poly(node: tuple):
    """The polynomial, or one of the exception classes that stopped exact evaluation."""
    try:
        return _poly(node)
    except (_NotRational, _TooBig, _Undefined) as e:
        return type(e)


def _poly_multiple(p: dict, q: dict) -> bool:
    """Is p a non-zero rational multiple of q (the same equation "p = 0")? Both must involve a variable."""
    if not any(p) or not any(q) or p.keys() != q.keys():
        return False
    m = next(iter(q))
    ratio = p[m] / q[m]
    return all(p[k] == ratio * q[k] for k in q)


# --------------------------------------------------------------------------------------------------------------
# Float screening (in-process): clear mismatches never reach sympy
# --------------------------------------------------------------------------------------------------------------

_POINTS = (0.6137, 1.2911, 2.4743, 0.8359, 1.9073, 0.4421)  # generic values for free symbols
_CFUNCS = {
    "sin": cmath.sin,
    "cos": cmath.cos,
    "tan": cmath.tan,
    "cot": lambda z: 1 / cmath.tan(z),
    "sec": lambda z: 1 / cmath.cos(z),
    "csc": lambda z: 1 / cmath.sin(z),
    "arcsin": cmath.asin,
    "arccos": cmath.acos,
    "arctan": cmath.atan,
    "sinh": cmath.sinh,
    "cosh": cmath.cosh,
    "tanh": cmath.tanh,
    "exp": cmath.exp,
}


def _real(z: complex) -> float:
    if abs(z.imag) > 1e-12 * max(1.0, abs(z.real)):
        raise _FloatFail
    return z.real


def _cpow(b: complex, e: complex) -> complex:
    if b.imag == 0 and e.imag == 0 and (b.real > 0 or float(e.real).is_integer()):
        return complex(b.real**e.real)
    return b**e


def _flt(node: tuple, env: dict, mag: list) -> complex:
    """Complex-float value of node; mag[0] tracks the largest intermediate, which sets the error tolerance."""
    kind = node[0]
    if kind == "num":
        v = complex(float(node[1]))
    elif kind == "sym":
        v = complex(env[node[1]])
    elif kind == "const":
        if node[1] == "oo":
            raise _FloatFail
        v = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j}[node[1]]
    elif kind == "add":
        v = sum((_flt(t, env, mag) for t in node[1]), 0j)
    elif kind == "mul":
        v = 1 + 0j
        for f in node[1]:
            v *= _flt(f, env, mag)
    elif kind == "neg":
        v = -_flt(node[1], env, mag)
    elif kind == "inv":
        v = 1 / _flt(node[1], env, mag)
    elif kind == "pow":
        v = _cpow(_flt(node[1], env, mag), _flt(node[2], env, mag))
    elif kind == "root":
        x, n = _flt(node[1], env, mag), _flt(node[2], env, mag)
        if x.imag == 0 and x.real < 0 and n.imag == 0 and float(n.real).is_integer() and int(n.real) % 2 == 1:
            v = complex(-((-x.real) ** (1 / n.real)))
        else:
            v = _cpow(x, 1 / n)
    elif kind == "fact":
        v = complex(math.gamma(_real(_flt(node[1], env, mag)) + 1))
    elif kind == "binom":
        n, k = _real(_flt(node[1], env, mag)), _real(_flt(node[2], env, mag))
        v = complex(math.gamma(n + 1) / (math.gamma(k + 1) * math.gamma(n - k + 1)))
    elif kind == "abs":
        v = complex(abs(_flt(node[1], env, mag)))
    elif kind in ("floor", "ceil"):
        x = _real(_flt(node[1], env, mag))
        v = complex(math.floor(x) if kind == "floor" else math.ceil(x))
    elif kind == "fn":
        v = _CFUNCS[node[1]](_flt(node[2], env, mag))
    elif kind == "log":
        v = cmath.log(_flt(node[1], env, mag))
        if node[2] is not None:
            v /= cmath.log(_flt(node[2], env, mag))
    else:
        raise _FloatFail
    if not cmath.isfinite(v):
        raise _FloatFail
    mag[0] = max(mag[0], abs(v))
    # -(4+0j) is -4-0j, which lies on the other side of sqrt's branch cut; sympy's -4 has no signed zero.
    return complex(v.real, v.imag + 0.0)


def _floats_differ(a: tuple, b: tuple) -> bool:
    """True only when a and b clearly differ at some point (difference far above float rounding)."""
    names = sorted(_symbols(a) | _symbols(b))
    for k in range(3 if names else 1):
        env = {name: _POINTS[(k + 2 * j) % len(_POINTS)] for j, name in enumerate(names)}
        mag = [1.0]
        try:
            va = _flt(a, env, mag)
            vb = _flt(b, env, mag)
        except (_FloatFail, ZeroDivisionError, OverflowError, ValueError):
            # Poles, overflow (10^{10^{10}}) and domain errors say nothing about equality: skip this point.
            continue
        # Rounding error grows with the largest intermediate value, so the tolerance scales with it.
        if abs(va - vb) > 1e-7 * mag[0]:
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Comparing scalars
# --------------------------------------------------------------------------------------------------------------

_TRAILING_DEGREE_RE = re.compile(r"\s*\\degree\s*$")
_TRIG_RE = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)(?![A-Za-z])|\b(?:sin|cos|tan)\b")


def _drop_final_degree(s: str) -> str:
    """ "30^\\circ" as a final value compares as 30; in "\\sin 30^\\circ" the degree belongs to the argument."""
    return s if _TRIG_RE.search(s) else _TRAILING_DEGREE_RE.sub("", s)


_CHOICE_RE = re.compile(r"\(?([A-E])\)?")
_CHOICE_PRED_RE = re.compile(r"\(?([A-E])(?:\)|(?=[\s:.])|$).*", re.DOTALL)
# What may follow the letter is its option's value ("(C) 42"), never a second letter or a hedging word: "C (or
# maybe D)" hedges between two options.
_CHOICE_HEDGE_RE = re.compile(r"(?<![A-Za-z\\])(?:[A-E]|(?i:or|maybe|possibly|perhaps|probably))(?![A-Za-z])")


def _split_eq(s: str) -> tuple[str, str] | None:
    """The two ends of an equation or of a chain "x = 2 + 3 = 5"; None if s is not one."""
    parts = _split_top(s, ("=",))
    if len(parts) < 2 or not all(parts) or any(p.endswith(("<", ">", "!")) for p in parts):
        return None
    return parts[0], parts[-1]


def _equation_values(s: str) -> list[str] | None:
    """What an equation answers when the other side is a value: what follows a name ("x = 3", "f(x) = x^2",
    "x = 2 + 3 = 5"), or else its constant sides, whatever names them ("2 + 3 = 5", "m + n = 113": answers that
    restate what was asked). Every one must equal the value, so "42 = 43" answers nothing. None for an equation in
    unknowns that answers no value ("y = x^2 + 1" has a name, "x + y = 2x" has neither)."""
    parts = _split_top(s, ("=",))
    if _SIMPLE_LHS_RE.fullmatch(parts[0]):
        return parts[1:]
    return [p for p in parts if _is_constant(p)] or None


def _symbols_of(s: str) -> set[str] | None:
    """The variables of an expression, or None if it is not one."""
    try:
        return _symbols(_parse(s))
    except _NotMath:
        return None


def _is_constant(s: str) -> bool:
    return _symbols_of(s) == set()


def _text_key(s: str) -> str:
    return re.sub(r"[\s{}]", "", s).casefold()


def _scalar_equal(p: str, g: str, use_sympy: bool) -> bool | None:
    p, g = _drop_final_degree(p), _drop_final_degree(g)
    if _key(p) == _key(g):
        return True
    choice = _CHOICE_RE.fullmatch(g)
    if choice:
        m = _CHOICE_PRED_RE.fullmatch(p)
        return bool(m) and m.group(1) == choice.group(1) and not _CHOICE_HEDGE_RE.search(p, m.end(1))
    p_pct, g_pct = p.endswith("%"), g.endswith("%")
    p, g = p.rstrip("%").rstrip(), g.rstrip("%").rstrip()
    if _key(p) == _key(g):
        return True  # "25%" vs "25": the label dropped the sign (see the percentage rule)
    pe, ge = _split_eq(p), _split_eq(g)
    if pe and ge:
        verdict = False
        if _key(pe[0]) == _key(ge[0]):  # the same quantity named: "\\angle A = 30^\\circ" vs "\\angle A = 30"
            verdict = _scalar_equal(pe[1], ge[1], use_sympy)
        return verdict or _or_none(verdict, _equations_equal(pe, ge, use_sympy))
    if pe or ge:
        values = _equation_values(p if pe else g)
        if values is None:
            return False
        verdict = True
        for v in values:
            r = _scalar_equal(v, g, use_sympy) if pe else _scalar_equal(p, v, use_sympy)
            if r is False:
                return False
            verdict = verdict and r  # None (undecided) stays None unless another value is False
        return verdict
    try:
        pa, ga = _parse(p), _parse(g)
    except _NotMath:
        return _text_key(p) == _text_key(g)
    hundred = ("inv", ("num", Fraction(100)))
    p_vals = [pa] + ([("mul", (pa, hundred))] if p_pct and not g_pct else [])
    g_vals = [ga] + ([("mul", (ga, hundred))] if g_pct and not p_pct else [])
    verdict: bool | None = False
    for x in p_vals:
        for y in g_vals:
            r = _expr_equal(x, y, use_sympy)
            if r:
                return True
            if r is None:
                verdict = None
    return verdict


def _or_none(a: bool | None, b: bool | None) -> bool | None:
    """Either verdict true: True; otherwise None if either is undecided, else False."""
    return True if a or b else None if a is None or b is None else False


def _infinity(node: tuple) -> int:
    """1 for "\\infty", -1 for "-\\infty", 0 for anything else."""
    sign = 1
    while node[0] == "neg":
        sign, node = -sign, node[1]
    return sign if node == ("const", "oo") else 0


def _expr_equal(a: tuple, b: tuple, use_sympy: bool) -> bool | None:
    if a == b:
        return True  # the same tree: nothing to evaluate (this is how opaque sums and products compare)
    inf_a, inf_b = _infinity(a), _infinity(b)
    if inf_a or inf_b:
        return inf_a == inf_b  # an interval's infinite end meets a finite one: no float or sympy needed to say no
    pa, pb = _try_poly(a), _try_poly(b)
    if pa in (_TooBig, _Undefined) or pb in (_TooBig, _Undefined):
        return False
    if isinstance(pa, dict) and isinstance(pb, dict):
        return pa == pb
    if _floats_differ(a, b):
        return False
    if not use_sympy:
        return None
    return _sympy_equal(a, b)


def _equations_equal(pe: tuple[str, str], ge: tuple[str, str], use_sympy: bool) -> bool | None:
    try:
        sides = [_parse(x) for x in (*pe, *ge)]
    except _NotMath:
        return False
    polys = [_try_poly(x) for x in sides]
    if all(isinstance(x, dict) for x in polys):  # lines, planes, conics with rational coefficients: decided exactly
        return _poly_multiple(_poly_add(polys[0], polys[1], -1), _poly_add(polys[2], polys[3], -1))
    if not use_sympy:
        return None
    return _sympy_equations_equal(*sides)


# --------------------------------------------------------------------------------------------------------------
# sympy (worker process only)
# --------------------------------------------------------------------------------------------------------------

_SP = None
_SP_ERRORS: tuple = ()
_PRECISION_EXHAUSTED: type = ArithmeticError
_POINTS_Q = ("0.6137", "1.2911", "2.4743", "0.8359", "1.9073", "0.4421")


def _sympy():
    """Import sympy on first use: the trainer process never pays for it, the worker imports it at start-up."""
    global _SP, _SP_ERRORS, _PRECISION_EXHAUSTED
    if _SP is None:
        import sympy
        from sympy.core.evalf import PrecisionExhausted
        from sympy.polys.polyerrors import BasePolynomialError

        _SP = sympy
        _PRECISION_EXHAUSTED = PrecisionExhausted
        # sympy signals unsupported or degenerate input with many exception types; each means "cannot show
        # equality", so a check that raises one of these is not-equal. Anything else is a bug and propagates.
        _SP_ERRORS = (
            TypeError,
            ValueError,
            ArithmeticError,
            NotImplementedError,
            AttributeError,
            BasePolynomialError,
            sympy.SympifyError,
        )
    return _SP


def _sympy_pow(b, e):
    sp = _sympy()
    if b.is_number and e.is_number and e.is_Rational and abs(b) != 1 and b != 0:
        if b.is_Rational:
            if max(int(b.p).bit_length(), int(b.q).bit_length()) * abs(int(e.p)) > MAX_BITS:
                raise _TooBig
        elif abs(e.p) > 10_000:
            raise _TooBig  # sympy expands e.g. sqrt(2)^(10^10) into an exact integer: refuse
    return sp.Pow(b, e)


def _to_sympy(node: tuple):
    sp = _sympy()
    kind = node[0]
    if kind == "num":
        return sp.Rational(node[1].numerator, node[1].denominator)
    if kind == "sym":
        return sp.Symbol(node[1])
    if kind == "const":
        return {"pi": sp.pi, "e": sp.E, "i": sp.I, "oo": sp.oo}[node[1]]
    if kind == "add":
        return sp.Add(*[_to_sympy(t) for t in node[1]])
    if kind == "mul":
        return sp.Mul(*[_to_sympy(f) for f in node[1]])
    if kind == "neg":
        return -_to_sympy(node[1])
    if kind == "inv":
        return sp.Pow(_to_sympy(node[1]), -1)
    if kind == "pow":
        return _sympy_pow(_to_sympy(node[1]), _to_sympy(node[2]))
    if kind == "root":
        x, n = _to_sympy(node[1]), _to_sympy(node[2])
        if n == 2:
            return sp.sqrt(x)
        if n.is_Integer and n % 2 == 1 and x.is_extended_negative:
            return sp.real_root(x, n)
        return sp.root(x, n)
    if kind in ("fact", "binom"):
        args = [_to_sympy(c) for c in node[1:]]
        if args[0].is_number and args[0].is_Rational and abs(args[0]) > 1000:
            raise _TooBig
        return sp.factorial(*args) if kind == "fact" else sp.binomial(*args)
    if kind == "abs":
        return sp.Abs(_to_sympy(node[1]))
    if kind == "floor":
        return sp.floor(_to_sympy(node[1]))
    if kind == "ceil":
        return sp.ceiling(_to_sympy(node[1]))
    if kind == "fn":
        fn = {"arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}.get(node[1]) or getattr(sp, node[1])
        return fn(_to_sympy(node[2]))
    if kind == "log":
        x = _to_sympy(node[1])
        return sp.log(x) if node[2] is None else sp.log(x, _to_sympy(node[2]))
    raise ValueError(f"unknown AST node {kind!r}")


def _sympy_points(symbols: list, count: int) -> list[dict]:
    sp = _sympy()
    return [
        {s: sp.Rational(_POINTS_Q[(k + 2 * j) % len(_POINTS_Q)]) for j, s in enumerate(symbols)} for k in range(count)
    ]


def _zero_at(expr, point: dict) -> bool | None:
    """Is expr exactly zero at point? None if it is not a finite number there.

    evalf(strict=True) returns a non-zero difference with 50 correct digits, so any digits at all mean "not zero"
    (this is what tells e^{-100} from 0 and a 50-digit decimal from sqrt(2)/2). A true zero has no digits to find
    and raises PrecisionExhausted."""
    sp = _sympy()
    try:
        v = expr.evalf(50, subs=point, strict=True)
    except _PRECISION_EXHAUSTED:
        return True
    if not v.is_number or v.has(sp.oo, -sp.oo, sp.zoo, sp.nan):
        return None
    return v == 0


def _sympy_equal(a: tuple, b: tuple) -> bool:
    try:
        ea, eb = _to_sympy(a), _to_sympy(b)
        if ea == eb:
            return True
        diff = ea - eb
        symbols = sorted(diff.free_symbols, key=str)
        agree = 0
        for point in _sympy_points(symbols, 4 if symbols else 1):
            zero = _zero_at(diff, point)
            if zero is False:
                return False
            agree += bool(zero)
        return agree >= (2 if symbols else 1)  # a pole at one point may skip it; two agreeing points are needed
    except _TooBig:
        return False
    except _SP_ERRORS:
        return False  # see _sympy(): sympy could not evaluate this input, so equality is not shown


def _sympy_equations_equal(pl: tuple, pr: tuple, gl: tuple, gr: tuple) -> bool:
    """Equal when one equation is a non-zero constant multiple of the other, checked at several points."""
    try:
        dp = _to_sympy(pl) - _to_sympy(pr)
        dg = _to_sympy(gl) - _to_sympy(gr)
        symbols = sorted(dp.free_symbols | dg.free_symbols, key=str)
        if not symbols:
            return False
        points = _sympy_points(symbols, 4)
        ratio = None
        for point in points:  # the constant, exact, from the first point where the label's side is non-zero
            if _zero_at(dg, point) is False:
                ratio = dp.subs(point) / dg.subs(point)
                break
        if ratio is None or _zero_at(ratio, {}) is not False:
            return False
        agree = 0
        for point in points:
            zero = _zero_at(dp - ratio * dg, point)
            if zero is False:
                return False
            agree += bool(zero)
        return agree >= 3
    except _TooBig:
        return False
    except _SP_ERRORS:
        return False  # see _sympy()


# --------------------------------------------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?\d{1,300}")


def _judge(pred: str, gt: str, use_sympy: bool) -> bool | None:
    """Compare two answer strings. With use_sympy=False, None means only sympy can decide."""
    a, b = pred.strip(), gt.strip()
    if _INT_RE.fullmatch(a) and _INT_RE.fullmatch(b):
        return int(a) == int(b)  # the common case (DAPO labels are integers): no cleaning needed
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False
    p, g = _clean(a), _clean(b)
    if not p or not g:
        return False
    if _key(p) == _key(g):
        return True
    if not _depth_ok(p) or not _depth_ok(g):
        return False
    return _cmp(_structure(p), _structure(g), use_sympy)


def _ground_truth_ok(gt: str) -> bool:
    if not gt or len(gt) > MAX_ANSWER_CHARS:
        return False
    cleaned = _clean(gt)
    return bool(cleaned) and _depth_ok(cleaned)


# --------------------------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------------------------

# The worker loads this file by path, so it runs the same code whatever the trainer's import name for it.
_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_reward_utils_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main()\n"
)
_LOCK = threading.Lock()
_WORKER: _Worker | None = None
_ATEXIT_REGISTERED = False


class _Worker:
    """One sympy process, spoken to over pipes in JSON lines, one request at a time."""

    def __init__(self) -> None:
        global _ATEXIT_REGISTERED
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # find the same sympy as this process
        self.owner_pid = os.getpid()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self.buf = b""
        self.ready = False
        self.last_id = 0
        if not _ATEXIT_REGISTERED:
            atexit.register(shutdown_worker)
            _ATEXIT_REGISTERED = True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_line(self, deadline: float) -> bytes | None:
        """Next line from the worker, or None on timeout or end of file."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def wait_ready(self, deadline: float) -> bool:
        """True once the worker has imported sympy; False if the deadline passes first."""
        line = self.read_line(deadline)
        if line is None:
            if not self.alive():
                raise RuntimeError(
                    f"reward_utils: the sympy worker exited during start-up (code {self.proc.returncode}); "
                    "its error is printed above. Is sympy installed for this Python?"
                )
            return False
        self.ready = json.loads(line).get("ready") is True
        return self.ready

    def request(self, payload: dict, deadline: float) -> dict | None:
        self.last_id += 1
        data = (json.dumps({**payload, "id": self.last_id}) + "\n").encode()
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None  # the worker died since the last check; the caller replaces it
        while True:
            line = self.read_line(deadline)
            if line is None:
                return None
            reply = json.loads(line)
            if reply.get("id") == self.last_id:
                return reply

    def kill(self) -> None:
        if self.owner_pid != os.getpid():
            return  # a forked child holds a copy of its parent's handle: the process is not ours to kill
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # SIGKILL was sent; an unkillable (D-state) process is the kernel's to reap, not ours to wait for
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # closing a pipe whose other end is gone can report EPIPE; nothing is lost


def _ask_worker(payload: dict, timeout_s: float) -> tuple[bool, bool]:
    """(verdict, timed_out). Waiting for the lock, for a (re)starting worker and for the reply all share one
    deadline, so a call never outlives timeout_s (plus scheduling noise)."""
    global _WORKER
    deadline = time.monotonic() + timeout_s
    if not _LOCK.acquire(timeout=timeout_s):
        return False, True  # another thread held the worker for the whole bound
    try:
        worker = _WORKER
        if worker is None or worker.owner_pid != os.getpid() or not worker.alive():
            worker = _WORKER = _Worker()
        if not worker.ready and not worker.wait_ready(deadline):
            if time.monotonic() - worker.started_at > WORKER_START_TIMEOUT_S:
                worker.kill()  # stuck in start-up: try a fresh one next time
                _WORKER = None
            # Otherwise leave it starting: the next check finds it ready.
            return False, True
        reply = worker.request(payload, deadline)
        if reply is None:
            # Hung (or died): kill it and start the replacement now, so it warms up while the trainer carries on.
            worker.kill()
            _WORKER = _Worker()
            return False, True
        if "error" in reply:
            raise RuntimeError("reward_utils: the sympy worker raised an unexpected error:\n" + reply["error"])
        return bool(reply["result"]), False
    finally:
        _LOCK.release()


def start_worker() -> None:
    """Start the sympy worker in the background now (optional). Otherwise the first check that needs it starts
    it, and that check's timeout_s also covers the ~1-2 s start-up."""
    global _WORKER
    with _LOCK:
        if _WORKER is None or _WORKER.owner_pid != os.getpid() or not _WORKER.alive():
            _WORKER = _Worker()


def _watch_parent(parent: int) -> None:
    """Exit when the trainer dies, even mid-computation, so no orphan keeps a core busy."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_main() -> None:
    """Entry point of the worker process: answer JSON-line requests until stdin closes."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print from a library must not corrupt the protocol
    _sympy()
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = 4 << 30  # a runaway expression gets MemoryError instead of swapping the trainer's machine
        if hard == resource.RLIM_INFINITY or hard > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, ValueError, OSError):
        pass  # no RLIMIT_AS on this platform: the parent's timeout still bounds the check
    _watch_parent(os.getppid())
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        req = json.loads(line)
        try:
            if req["op"] == "judge":
                reply = {"result": bool(_judge(req["pred"], req["gt"], use_sympy=True))}
            elif req["op"] == "sleep":  # used by the tests to stand in for a check that hangs
                time.sleep(float(req["seconds"]))
                reply = {"result": False}
            else:
                raise ValueError(f"unknown op {req['op']!r}")
        except (MemoryError, RecursionError):
            reply = {"result": False}  # a hostile input exhausted a resource: a wrong answer, not a crash
        except Exception:  # noqa: BLE001 - not swallowed: forwarded to the parent, which re-raises it
            # A bug must stop the run with its traceback, not score zero; this is how it crosses the process boundary.
            reply = {"error": traceback.format_exc()}
        reply["id"] = req["id"]
        out.write((json.dumps(reply) + "\n").encode())
        out.flush()


def shutdown_worker() -> None:
    """Stop this process's sympy worker, if any. The next symbolic check starts a new one."""
    global _WORKER
    with _LOCK:
        if _WORKER is not None:
            _WORKER.kill()
        _WORKER = None


# --------------------------------------------------------------------------------------------------------------
# Public checks and rewards
# --------------------------------------------------------------------------------------------------------------


def _check(pred: str, gt: str, timeout_s: float) -> tuple[bool, bool]:
    """(equal, timed_out) for an extracted prediction and a normalised ground truth."""
    verdict = _judge(pred, gt, use_sympy=False)
    if verdict is not None:
        return verdict, False
    return _ask_worker({"op": "judge", "pred": pred, "gt": gt}, timeout_s)


def _validate_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")


def is_equiv(prediction: str | None, ground_truth: object, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if the answer `prediction` equals `ground_truth` mathematically; False on a timeout."""
    _validate_timeout(timeout_s)
    if prediction is None:
        return False
    gt = normalize_ground_truth(ground_truth)
    if not _ground_truth_ok(gt):
        return False
    return _check(str(prediction), gt, timeout_s)[0]


def math_reward_batch(
    completions: list[str],
    ground_truths: list[str],
    correct_reward: float = 1.0,
    incorrect_reward: float = -1.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[float], dict[str, int]]:
    """Returns one reward per completion and counts {"no_answer": n, "timeouts": n, "bad_ground_truth": n}."""
    _validate_timeout(timeout_s)
    if len(completions) != len(ground_truths):
        raise ValueError(f"{len(completions)} completions but {len(ground_truths)} ground truths")
    counts = {"no_answer": 0, "timeouts": 0, "bad_ground_truth": 0}
    rewards: list[float] = []
    for completion, ground_truth in zip(completions, ground_truths):
        gt = normalize_ground_truth(ground_truth)
        if not _ground_truth_ok(gt):
            counts["bad_ground_truth"] += 1
            rewards.append(incorrect_reward)
            continue
        pred = extract_answer(completion)
        if pred is None:
            counts["no_answer"] += 1
            rewards.append(incorrect_reward)
            continue
        equal, timed_out = _check(pred, gt, timeout_s)
        counts["timeouts"] += timed_out
        rewards.append(correct_reward if equal else incorrect_reward)
    return rewards, counts


def math_reward(
    completion: str,
    ground_truth: str,
    correct_reward: float = 1.0,
    incorrect_reward: float = -1.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> float:
    """Reward of one completion; math_reward_batch also reports why answers were scored incorrect."""
    rewards, _ = math_reward_batch([completion], [ground_truth], correct_reward, incorrect_reward, timeout_s)
    return rewards[0]
