"""Verifiable rewards: score a completion by the answer it gives, checked against the dataset's reference answer.

For math word problems and arithmetic. A completion's answer is extracted in one of MODES:

- `boxed`: the content of the last top-level `\\boxed{...}` (nested braces kept: `\\boxed{\\frac{1}{2}}` gives
  `\\frac{1}{2}`);
- `hash`: the text after the last `####` up to the end of that line (GSM8K style);
- `last_number`: the last number in the text (`-3`, `1,234.5`, `.5`; a trailing sentence period is not a decimal);
- `auto`: boxed if there is a box, else hash if there is a `####` answer, else last_number.

Answers and references are compared after `normalize`: numbers (integers, decimals, simple fractions `a/b` and
`\\frac{a}{b}`) by exact value, anything else by lowercased text with whitespace collapsed.

Scorers: `VerifiableReward` (1.0 for a correct answer, else 0.0) and `FormatReward` (1.0 when an answer can be
extracted at all). Both read only the completion, never the prompt.
"""

from __future__ import annotations

import numbers
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch

from .scorers import Reward, RewardError

MODES = ("auto", "last_number", "hash", "boxed")

# A number as written in text: an optional sign (not after a letter, digit or closing bracket, where "-" is an
# operator: "10-3"), digits with optional thousands commas, an optional decimal part; or a leading-dot decimal ".5".
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])[-+\u2212])?"
    r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)"
)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SLASH_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_TEX_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{\s*([+-]?\d+)\s*\}\{\s*([+-]?\d+)\s*\}")
_BOX = re.compile(r"\\boxed\s*\{")
_WRAPPERS = ("\\text", "\\textbf", "\\mathrm", "\\mbox")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"answer extraction mode {mode!r} is not one of {', '.join(MODES)}")


def _braced(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at text[start]; None when it is never closed. `\\{` does not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level `\\boxed{...}` that is closed (boxes inside it are part of it); None if none."""
    found, pos = None, 0
    while (m := _BOX.search(text, pos)) is not None:
        end = _braced(text, m.end() - 1)
        if end is None:
            pos = m.end()
            continue
        found, pos = text[m.end():end - 1].strip(), end
    return found


def extract_hash(text: str) -> str | None:
    """The text after the last `####` up to the end of its line, stripped; None when absent or empty."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    return answer or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text as written ("1,234.5", "-3", ".5"); None when there is none."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """The answer a completion gives, extracted per `mode` (one of MODES); None when nothing is found."""
    _check_mode(mode)
    if mode == "boxed":
        return extract_boxed(text)
    if mode == "hash":
        return extract_hash(text)
    if mode == "last_number":
        return extract_last_number(text)
    for extract in (extract_boxed, extract_hash, extract_last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def has_format(completion: str, mode: str = "auto") -> bool:
    """Whether an answer can be extracted from the completion in `mode` (`auto`: in any of the modes)."""
    return extract_answer(completion, mode) is not None


def _unwrap(s: str) -> str:
    """`s` without a `\\text{...}` (or `\\mathrm`, `\\textbf`, `\\mbox`) wrapper around all of it."""
    for cmd in _WRAPPERS:
        if s.startswith(cmd + "{") and _braced(s, len(cmd)) == len(s):
            return s[len(cmd) + 1:-1]
    return s


def _strip_decorations(s: str) -> str:
    """Remove surrounding whitespace, a trailing period, surrounding `$` and text wrappers until none is left."""
    prev = None
    while s != prev:
        prev = s
        s = s.strip().removesuffix(".").strip().strip("$")
        s = _unwrap(s)
    return s


def parse_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, `a/b` or `\\frac{a}{b}` (integer parts); None for anything else."""
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    m = _SLASH_FRACTION.fullmatch(s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    m = _TEX_FRACTION.fullmatch(s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if not den:
            return None
        value = Fraction(num, den)
        return -value if m.group(1) == "-" else value
    return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: an integer ("3"), else an exact decimal ("0.5", "-1.25"), else "p/q" ("1/3")."""
    num, den = value.numerator, value.denominator
    if den == 1:
        return str(num)
    rest, twos, fives = den, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{num}/{den}"
    places = max(twos, fives)
    digits = str(abs(num) * 10 ** places // den).rjust(places + 1, "0")
    sign = "-" if num < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def normalize(ans: str) -> str:
    """Canonical form of an answer for exact match: numbers by value ("1,000" -> "1000", "0.50" and "1/2" -> "0.5",
    "-0" -> "0"), other text lowercased with whitespace collapsed; decorations ($, \\text{}, a final period) removed."""
    s = ans.replace("\u2212", "-").replace("{,}", ",").replace("\\$", "$").replace("\\!", "")
    s = _THOUSANDS.sub("", _strip_decorations(s))
    value = parse_number(s)
    if value is not None:
        return format_number(value)
    return " ".join(s.lower().split())


def _number_text(truth: numbers.Number) -> str | None:
    """Canonical text of a numeric column value (a float by its shortest repr: 0.1 -> "0.1"); None for NaN, inf
    and complex numbers."""
    try:
        if isinstance(truth, numbers.Rational):
            value = Fraction(truth.numerator, truth.denominator)
        elif isinstance(truth, Decimal):
            value = Fraction(truth)
        elif isinstance(truth, numbers.Real):
            value = Fraction(Decimal(repr(float(truth))))
        else:
            return None
    except (ValueError, OverflowError, InvalidOperation):
        return None
    return format_number(value)


def reference_answer(truth) -> str | None:
    """The normalised true answer held in a dataset column value; None when it holds none (None, empty, NaN).

    A number gives its canonical text; a string with `####` (a GSM8K solution) the part after the last `####`;
    a string with `\\boxed{}` its content; any other string all of it."""
    if truth is None:
        return None
    if isinstance(truth, numbers.Number) and not isinstance(truth, bool):
        return _number_text(truth)
    text = str(truth)
    answer = extract_hash(text) if "####" in text else extract_boxed(text) if _BOX.search(text) else text
    if answer is None:
        return None
    return normalize(answer) or None


def is_correct(completion: str, truth, mode: str = "auto") -> bool:
    """Whether the answer extracted from the completion (per `mode`) equals the reference answer in `truth`."""
    answer = extract_answer(completion, mode)
    reference = reference_answer(truth)
    return answer is not None and reference is not None and normalize(answer) == reference


class VerifiableReward(Reward):
    """1.0 when the completion's answer matches the row's reference answer (column `answer_column`), else 0.0."""

    name = "verifiable"

    def __init__(self, answer_column: str = "answer", extract: str = "auto", **kw):
        super().__init__(**kw)
        _check_mode(extract)
        self.answer_column, self.extract = answer_column, extract

    def _references(self, rows: list[dict] | None, n: int) -> list:
        if rows is None or len(rows) < n or (n and not any(rows[:n])):
            raise RewardError(f"{self.source} needs the dataset's answer column: this task's prompts carry no "
                              "columns (use data.source=dataset or arithmetic)")
        for row in rows[:n]:
            if self.answer_column not in row:
                raise RewardError(f"reward.answer_column={self.answer_column!r}: the prompts have columns "
                                  f"[{', '.join(map(str, row))}] (set it to the column holding the reference answer)")
        return [row[self.answer_column] for row in rows[:n]]

    def score(self, prompts, completions, rows=None, conversations=None):
        truths = self._references(rows, len(completions))
        out = torch.tensor([float(is_correct(c, t, self.extract)) for c, t in zip(completions, truths, strict=True)],
                           dtype=torch.float32)
        self.last_parts = {"accuracy": out}  # the evaluation's sampled accuracy (with its interval)
        return out


class FormatReward(Reward):
    """1.0 when an answer can be extracted from the completion (see `has_format`), else 0.0."""

    name = "format"

    def __init__(self, extract: str = "auto", **kw):
        super().__init__(**kw)
        _check_mode(extract)
        self.extract = extract

    def score(self, prompts, completions, rows=None, conversations=None):
        return torch.tensor([float(has_format(c, self.extract)) for c in completions], dtype=torch.float32)
