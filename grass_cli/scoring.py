"""Answer extraction and scorers for generated text: exact, numeric, regex.

Pure string functions (no torch), so they are cheap to test on tricky answers and
reusable outside the CLI. A scorer compares one model output with one gold answer
and returns what it extracted from each, so predictions.jsonl shows *why* an item
was marked right or wrong.

Gold answers in GSM8K style end with `#### 42` after a worked solution; every
scorer takes the part after the last `####` as the gold answer when it is there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from grass_cli.eval_config import ScorerName

# A number as people and models write it: optional sign, thousands separators
# (1,234,567), decimals (3.5, .5). A minus counts only when it does not follow a
# word character or a closing bracket, so "10-5" yields 10 and 5, not -5, while
# "x = -5" and "(-5)" yield -5. Unicode minus (U+2212) is accepted.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])[-\u2212])?"  # sign
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?"  # integer part, with or without thousands commas
    r"(?:\.\d+)?"  # fraction
)
_GSM8K_MARK = "####"
# Trailing punctuation that does not change an answer ("42." is "42").
_TRAILING = " \t\n\r.,;:!?"


def _numbers(text: str) -> list[str]:
    """Every number in `text`, in order, as matched (signs and commas kept)."""
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if any(c.isdigit() for c in s):
            out.append(s)
    return out


def parse_number(token: str) -> float | None:
    """`"-1,234.50"` -> -1234.5; None for something that is not one number."""
    s = token.strip().replace("\u2212", "-").replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def after_gsm8k_mark(text: str) -> str | None:
    """The text after the last `####` (GSM8K's final-answer marker), or None."""
    if _GSM8K_MARK not in text:
        return None
    return text.rsplit(_GSM8K_MARK, 1)[1].strip()


def extract_number(text: str) -> float | None:
    """The answer number of a text: the first number after `####` if there is a
    marker (GSM8K style), otherwise the last number in the text.

    The last number, not the first, because models state the result after their
    working ("3 + 4 = 7, so the answer is 7"). Commas are thousands separators,
    negatives and decimals count, trailing text and units are ignored.
    """
    marked = after_gsm8k_mark(text)
    if marked is not None:
        found = _numbers(marked)
        if found:
            return parse_number(found[0])
    found = _numbers(text)
    return parse_number(found[-1]) if found else None


def normalize_text(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding whitespace and trailing
    punctuation removed: "  The Answer.  " and "the answer" match."""
    return " ".join(text.split()).strip(_TRAILING).casefold()


def gold_text(gold: object) -> str:
    """The gold answer as text; GSM8K's worked solutions are cut to what follows `####`."""
    text = gold if isinstance(gold, str) else str(gold)
    marked = after_gsm8k_mark(text)
    return marked if marked is not None else text


@dataclass(frozen=True)
class Score:
    """One item's verdict: what was extracted from the prediction and the gold."""

    correct: bool
    extracted: str | None  # from the prediction; None when nothing could be extracted
    gold: str


def numbers_equal(a: float, b: float) -> bool:
    """Equal up to float noise: 0.1 + 0.2 == 0.3, 1234.50 == 1234.5."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _fmt(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


class Scorer:
    """Compares a prediction with a gold answer.

    exact: normalised text equality (`normalize_text`).
    numeric: `extract_number` on both sides, compared as numbers.
    regex: the pattern's first group (or whole match) in the prediction, compared
    with the gold answer as normalised text; no match is wrong.
    """

    def __init__(self, name: ScorerName, pattern: str | None = None):
        if name == "regex":
            if not pattern:
                raise ValueError("the regex scorer needs a pattern")
            self.regex: re.Pattern[str] | None = re.compile(pattern)
        else:
            self.regex = None
        self.name = name

    def __call__(self, prediction: str, gold: object) -> Score:
        g = gold_text(gold)
        if self.name == "numeric":
            p_num, g_num = extract_number(prediction), extract_number(g)
            if g_num is None:
                # A non-numeric gold cannot match numerically; keep it visible.
                return Score(False, None if p_num is None else _fmt(p_num), g)
            if p_num is None:
                return Score(False, None, _fmt(g_num))
            return Score(numbers_equal(p_num, g_num), _fmt(p_num), _fmt(g_num))
        if self.name == "regex":
            assert self.regex is not None
            m = self.regex.search(prediction)
            if m is None:
                return Score(False, None, g.strip())
            got = m.group(1) if m.groups() and m.group(1) is not None else m.group(0)
            return Score(normalize_text(got) == normalize_text(g), got, g.strip())
        got = prediction.strip()
        return Score(normalize_text(got) == normalize_text(g), got, g.strip())


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut], cut < len(text)
