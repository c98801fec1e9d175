"""Answer extraction and scorers on tricky answers, and the eval config's validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from grass_cli.eval_config import EvalConfig
from grass_cli.scoring import Scorer, cut_at_stop, extract_number, gold_text, normalize_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("The answer is 1,234.50 dollars.", 1234.5),
        ("1,234,567", 1234567.0),
        ("-52", -52.0),
        ("The result is -3.", -3.0),
        ("x = -0.75 apples", -0.75),
        ("(-5)", -5.0),
        ("\u22127", -7.0),  # unicode minus
        ("10-5", 5.0),  # a hyphen between numbers is not a sign
        ("3 + 4 = 7, so the answer is 7", 7.0),  # the last number, not the first
        ("It costs $18 every day.", 18.0),
        ("50% of them", 50.0),
        (".5 of a cake", 0.5),
        ("First 2, then 3", 3.0),  # list commas are not thousands separators
        ("He sells 9 eggs.\n#### 18", 18.0),  # GSM8K marker wins over the last number
        ("#### 1,000\nand then 5 more", 1000.0),
        ("#### none\nbut 12", 12.0),  # a marker without a number falls back
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_number_on_tricky_answers(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "gold", "correct"),
    [
        ("1,234.50", "1234.5", True),
        ("The answer is 1234.5000.", "1,234.5", True),
        ("-52 is the result", "-52", True),
        ("52", "-52", False),
        ("0.1", "0.10000000000000001", True),
        ("I think it is 17, no wait, 18", "18", True),
        ("18 eggs, so 36 dollars", "18", False),
        ("The total is 18", "Janet sells 9 eggs.\n#### 18", True),  # GSM8K gold
        ("I don't know", "7", False),
        ("7", "seven", False),  # non-numeric gold never matches numerically
    ],
)
def test_numeric_scorer(prediction, gold, correct):
    assert Scorer("numeric")(prediction, gold).correct is correct


def test_numeric_scorer_reports_what_it_extracted():
    s = Scorer("numeric")("so we get -1,200.0 in the end.", "#### -1200")
    assert (s.correct, s.extracted, s.gold) == (True, "-1200", "-1200")
    s = Scorer("numeric")("nothing", "3.5")
    assert (s.correct, s.extracted, s.gold) == (False, None, "3.5")


def test_exact_scorer_normalises_case_space_and_trailing_punctuation():
    exact = Scorer("exact")
    assert exact("  Paris. ", "paris").correct
    assert exact("New   York", "new york").correct
    assert not exact("Paris, France", "Paris").correct
    assert exact("77", 77).correct  # a gold answer read from JSON as a number
    assert normalize_text("  The Answer!  ") == "the answer"


def test_regex_scorer_uses_the_first_group():
    s = Scorer("regex", r"answer is\s*([A-D])")
    assert s("I think the answer is B.", "b").correct
    assert s("the answer is C", "B").extracted == "C"
    assert not s("no idea", "B").correct
    whole = Scorer("regex", r"-?\d+")
    assert whole("got 12 then 13", "12").correct  # no group: the whole (first) match


def test_gold_text_takes_the_gsm8k_final_answer():
    assert gold_text("step 1\nstep 2\n#### 70,000") == "70,000"
    assert gold_text("plain") == "plain"
    assert gold_text(5) == "5"


def test_cut_at_stop_uses_the_earliest_stop():
    assert cut_at_stop("42\nQuestion: next", ["Question:", "\n"]) == ("42", True)
    assert cut_at_stop("42", ["\n"]) == ("42", False)
    assert cut_at_stop("abc", ["", "z"]) == ("abc", False)


def test_eval_config_accepts_one_kind_or_a_list():
    assert EvalConfig(kind="generate").kind == ["generate"]
    assert EvalConfig(kind=["loss", "generate", "loss"]).kind == ["loss", "generate"]
    assert EvalConfig().kind is None


def test_eval_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        EvalConfig(max_tokens=5)
    with pytest.raises(ValidationError, match="regex"):
        EvalConfig(scorer="regex")
    with pytest.raises(ValidationError, match="does not compile"):
        EvalConfig(scorer="regex", regex="(unclosed")
    with pytest.raises(ValidationError):
        EvalConfig(kind="bleu")
    with pytest.raises(ValidationError):
        EvalConfig(batch_size=0)
